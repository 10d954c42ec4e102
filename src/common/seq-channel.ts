// One end of a URB channel's sequenced exchange, the same for the server's Session and the
// SDK's RemoteDevice: data frames going out are numbered and journaled until the peer
// acknowledges them (replayed after a resume), data frames coming in are accepted once by seq
// (a replayed duplicate is dropped), and acks ride along with data or follow on their own
// (AckScheduler). Frames are batched into messages by FlushScheduler within the limits below,
// and a full transport holds the rest until it drains.
//
// Per frame this costs no timer, no closure and no promise: `send` numbers the frame in place
// and arms at most one microtask per batch.
import { AckScheduler } from './ack-scheduler.js';
import { FlushScheduler } from './flush-scheduler.js';
import { SeqJournal, SeqReceiver } from './seq-journal.js';

/** Frames in one message at most. */
export const MAX_FRAMES_PER_MESSAGE = 1024;
/** Payload bytes in one message, about (a single larger frame still goes alone). */
export const MAX_BYTES_PER_MESSAGE = 256 * 1024;
/** Journal weight of a frame beyond its payload (seq, kind, fields). */
export const FRAME_OVERHEAD = 32;

/** A ClientFrame or ServerFrame: a seq and a kind; both directions have an `ack` kind. */
export interface SeqFrame {
  seq: number;
  kind?: { $case: string } | undefined;
}

/** The stream a channel writes to while it is attached: a Connect call, seen narrowly. */
export interface ChannelLink<F> {
  /** false: the transport is full; nothing more is written until `onceDrain` fires. */
  write(msg: { frames: F[] }): boolean;
  onceDrain(cb: () => void): void;
}

export interface SeqChannelOptions {
  /** Bound on unacknowledged outgoing frames, in weighted bytes (JournalOverflowError beyond). */
  maxJournalBytes: number;
  /** How long a bare ack may wait for data to ride with. */
  ackDelayMs?: number;
  /** Acknowledge at once when this many received frames are unacknowledged. */
  ackBacklog?: number;
}

export class SeqChannel<F extends SeqFrame> {
  private readonly journal: SeqJournal<F>;
  private rx = new SeqReceiver();
  private readonly acks: AckScheduler;
  private readonly flusher: FlushScheduler;
  private link?: ChannelLink<F>;
  /** The link said it is full: wait for its drain. */
  private blocked = false;

  constructor(opts: SeqChannelOptions) {
    this.journal = new SeqJournal(opts.maxJournalBytes);
    this.flusher = new FlushScheduler(() => this.flush());
    this.acks = new AckScheduler(() => this.flusher.schedule(), opts.ackDelayMs, opts.ackBacklog);
  }

  /** Highest seq sent (assigned) so far. */
  get highestSeq(): number {
    return this.journal.highestSeq;
  }
  /** Highest seq the peer acknowledged. */
  get ackedSeq(): number {
    return this.journal.ackedSeq;
  }
  /** Weighted bytes of unacknowledged frames. */
  get journalBytes(): number {
    return this.journal.bytes;
  }
  /** Highest seq received from the peer. */
  get lastReceived(): number {
    return this.rx.lastSeq;
  }
  get attached(): boolean {
    return this.link !== undefined;
  }

  // ------------------------------------------------------------ outgoing

  /**
   * Journal a data frame and send it soon; returns its seq. `bytes`: its payload size.
   * Throws JournalOverflowError when the journal bound would be exceeded.
   */
  send(kind: NonNullable<F['kind']>, bytes: number): number {
    const seq = this.journal.push({ seq: 0, kind } as F, bytes + FRAME_OVERHEAD);
    this.flusher.schedule();
    return seq;
  }

  /** The peer acknowledged up to `seq`. Throws InvalidAckError for a seq never sent. */
  peerAcked(seq: number): void {
    this.journal.ack(seq);
  }

  /** Continue another sender's numbering (taking a session over): the next frame is `seq + 1`. */
  continueAfter(seq: number): void {
    this.journal.continueAfter(seq);
  }

  /** Unacknowledged frames, oldest first (inspection and tests). */
  unacked(): F[] {
    return this.journal.unacked();
  }

  // ------------------------------------------------------------ incoming

  /**
   * A data frame from the peer: 'new' (handle it; an ack becomes due), 'duplicate' (seen before a
   * resume: drop it) or 'gap' (a protocol error).
   */
  receive(seq: number): 'new' | 'duplicate' | 'gap' {
    const r = this.rx.accept(seq);
    if (r === 'new') this.flusher.schedule();
    return r;
  }

  /** Take up the peer's numbering at `lastSeq` (resuming or taking over a position). */
  receiveAfter(lastSeq: number): void {
    this.rx = new SeqReceiver(lastSeq);
  }

  // ------------------------------------------------------------ streams

  /**
   * Write to `link` from now on. `peerHas`: the peer holds every frame up to it, the rest of the
   * journal is replayed (omitted: the send cursor stays). The peer hears our position again.
   * Throws InvalidAckError when `peerHas` is beyond what was sent.
   */
  attach(link: ChannelLink<F>, peerHas?: number): void {
    if (peerHas !== undefined) this.journal.rewindTo(peerHas);
    this.link = link;
    this.blocked = false;
    this.acks.reset();
    this.flusher.schedule();
  }

  /** Stop writing to `link` (or to whatever is attached); frames wait in the journal. */
  detach(link?: ChannelLink<F>): void {
    if (link === undefined || this.link === link) this.link = undefined;
  }

  /** No more delayed acks (the channel is ending). */
  stop(): void {
    this.acks.stop();
  }

  /** Send what is due soon (batching policy: FlushScheduler). */
  flushSoon(): void {
    this.flusher.schedule();
  }

  /** Send what is due now, within the message limits, until the link is full; true when a message went out. */
  flush(): boolean {
    const link = this.link;
    if (!link || this.blocked) return false;
    let wrote = false;
    for (;;) {
      const frames = this.journal.takeUnsent(MAX_FRAMES_PER_MESSAGE, MAX_BYTES_PER_MESSAGE);
      const ack = this.acks.take(this.rx.lastSeq, frames.length > 0);
      if (ack !== undefined) frames.push(this.ackFrame(ack));
      if (frames.length === 0) return wrote;
      wrote = true;
      if (!link.write({ frames })) {
        this.blocked = true;
        link.onceDrain(() => this.drained(link));
        return wrote;
      }
    }
  }

  /** Everything journaled and a final ack, now, whether or not the link is full (a closing channel). */
  flushAll(): void {
    this.blocked = false;
    const link = this.link;
    if (!link) return;
    for (;;) {
      const frames = this.journal.takeUnsent(MAX_FRAMES_PER_MESSAGE, MAX_BYTES_PER_MESSAGE);
      const ack = this.acks.take(this.rx.lastSeq, true);
      if (ack !== undefined) frames.push(this.ackFrame(ack));
      if (frames.length === 0) return;
      link.write({ frames });
    }
  }

  private drained(link: ChannelLink<F>): void {
    if (this.link !== link) return;
    this.blocked = false;
    this.flush();
  }

  private ackFrame(seq: number): F {
    return { seq: this.journal.highestSeq, kind: { $case: 'ack', value: { seq } } } as unknown as F;
  }
}
