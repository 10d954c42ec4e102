// One direction of a URB channel, as seen by its sender: data frames are
// numbered 1, 2, 3, ... and kept until the peer acknowledges them, so that
// after a lost stream they can be replayed from any position the peer names.
//
// The same class serves the server (its completions) and the client SDK (its
// submits), which is what makes exactly-once hold in both directions.

export class JournalOverflowError extends Error {
  constructor(
    readonly bytes: number,
    readonly limit: number,
  ) {
    super(`journal holds ${bytes} unacknowledged bytes, over the limit of ${limit}`);
    this.name = 'JournalOverflowError';
  }
}

export class InvalidAckError extends Error {
  constructor(
    readonly ack: number,
    readonly highest: number,
  ) {
    super(`ack for seq ${ack}, but the highest seq ever sent is ${highest}`);
    this.name = 'InvalidAckError';
  }
}

interface Entry<F> {
  seq: number;
  frame: F;
  bytes: number;
}

export class SeqJournal<F> {
  /** Unacknowledged entries, ascending seq; `head` indexes the first live one. */
  private entries: Entry<F>[] = [];
  private head = 0;
  private lastSeq = 0;
  private acked = 0;
  private byteCount = 0;
  /** Highest seq handed to the current stream (the send cursor). */
  private sentSeq = 0;

  constructor(private readonly maxBytes: number) {}

  /** Highest seq assigned so far. */
  get highestSeq(): number {
    return this.lastSeq;
  }
  /** Highest seq the peer acknowledged. */
  get ackedSeq(): number {
    return this.acked;
  }
  get bytes(): number {
    return this.byteCount;
  }
  get length(): number {
    return this.entries.length - this.head;
  }

  /**
   * Number and keep a frame. `bytes` is its weight for the bound (payload
   * size). Throws JournalOverflowError when the bound would be exceeded.
   */
  append(makeFrame: (seq: number) => F, bytes: number): F {
    this.checkRoom(bytes);
    const seq = ++this.lastSeq;
    const frame = makeFrame(seq);
    this.entries.push({ seq, frame, bytes });
    this.byteCount += bytes;
    return frame;
  }

  /** As append, for a frame that carries its seq: numbers `frame` in place (no closure per frame). */
  push(frame: F & { seq: number }, bytes: number): number {
    this.checkRoom(bytes);
    const seq = ++this.lastSeq;
    frame.seq = seq;
    this.entries.push({ seq, frame, bytes });
    this.byteCount += bytes;
    return seq;
  }

  private checkRoom(bytes: number): void {
    if (this.byteCount + bytes > this.maxBytes && this.length > 0) {
      throw new JournalOverflowError(this.byteCount + bytes, this.maxBytes);
    }
  }

  /**
   * Continue another sender's numbering: the next frame gets `seq + 1`.
   * Only for a journal that holds nothing (a stream taking a session over).
   */
  continueAfter(seq: number): void {
    if (this.length > 0) throw new Error('continueAfter on a journal that holds frames');
    this.lastSeq = this.acked = this.sentSeq = seq;
  }

  /** Drop everything up to and including `seq`. Acks never go backwards. */
  ack(seq: number): void {
    if (!Number.isSafeInteger(seq) || seq < 0 || seq > this.lastSeq) {
      throw new InvalidAckError(seq, this.lastSeq);
    }
    if (seq <= this.acked) return;
    this.acked = seq;
    const e = this.entries;
    let h = this.head;
    while (h < e.length && e[h].seq <= seq) {
      this.byteCount -= e[h].bytes;
      // The entry stays in the array until the next compaction (up to ~1024 of them): its frame and
      // payload must not, or a session would keep megabytes of acknowledged completions alive.
      (e[h] as { frame: unknown }).frame = undefined;
      h++;
    }
    // Compact now and then rather than shift() per entry.
    if (h > 1024 && h * 2 > e.length) {
      this.entries = e.slice(h);
      h = 0;
    }
    this.head = h;
    if (this.sentSeq < seq) this.sentSeq = seq;
  }

  /**
   * Point the send cursor after `seq` (what the peer has). Used when a stream
   * (re)connects. Seqs the peer claims beyond what was sent are refused.
   */
  rewindTo(seq: number): void {
    if (seq > this.lastSeq) throw new InvalidAckError(seq, this.lastSeq);
    this.ack(seq);
    this.sentSeq = Math.max(seq, this.acked);
  }

  /**
   * Frames not yet handed to the current stream, at most `maxFrames` of them
   * and about `maxBytes` (always at least one); advances the send cursor.
   */
  takeUnsent(maxFrames = Infinity, maxBytes = Infinity): F[] {
    const out: F[] = [];
    const e = this.entries;
    if (this.length === 0) return out;
    // Entries are contiguous in seq, so the first unsent one is found by offset.
    let i = this.head + Math.max(0, this.sentSeq - (e[this.head].seq - 1));
    let bytes = 0;
    while (i < e.length && out.length < maxFrames && (out.length === 0 || bytes + e[i].bytes <= maxBytes)) {
      out.push(e[i].frame);
      bytes += e[i].bytes;
      this.sentSeq = e[i].seq;
      i++;
    }
    return out;
  }

  hasUnsent(): boolean {
    return this.sentSeq < this.lastSeq;
  }

  /** Every unacknowledged frame, oldest first (for inspection and tests). */
  unacked(): F[] {
    return this.entries.slice(this.head).map((x) => x.frame);
  }
}

/**
 * The receiving side of one direction: which data seq comes next, and
 * whether a frame is new, a duplicate (already seen: drop it) or a gap.
 */
export class SeqReceiver {
  /** `last`: the highest seq already received (when taking over a position). */
  constructor(private last = 0) {}

  get lastSeq(): number {
    return this.last;
  }

  /** 'new' advances the position; 'duplicate' must be dropped; 'gap' is a protocol error. */
  accept(seq: number): 'new' | 'duplicate' | 'gap' {
    if (seq <= this.last) return 'duplicate';
    if (seq !== this.last + 1) return 'gap';
    this.last = seq;
    return 'new';
  }
}
