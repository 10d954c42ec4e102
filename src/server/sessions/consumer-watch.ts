// Whether the client reads what its session sends. The session is backed up while its stream does
// not drain (grpc-js write() said false and no 'drain' came yet) or while it holds the client's URBs
// back because its byte bound is full of frames the client has not acknowledged. A backed-up spell
// that lasts `limitMs` without progress (a drain, an advancing ack) is a stall: `onStalled` runs.
//
// No timer per URB or per ack: progress only moves a timestamp, and the one timer of a spell, when it
// fires, re-arms itself for what is left.
export class ConsumerWatch {
  private blocked = false;
  private held = false;
  /** Backed up (blocked or held) now. */
  private spell = false;
  /** Start of the current spell, or of its last progress. */
  private since = 0;
  private timer?: NodeJS.Timeout;

  constructor(
    private readonly limitMs: number,
    /** The client owes acknowledgements (unacknowledged frames); a hold without it is the device's pace. */
    private readonly owes: () => boolean,
    private readonly onStalled: (info: { ms: number; blocked: boolean }) => void,
  ) {}

  /** The stream's transport is full (true) or drained (false). */
  setBlocked(on: boolean): void {
    this.blocked = on;
    this.update();
  }

  /** The session holds the client's URBs back for its byte bound (true), or takes them again (false). */
  setHeld(on: boolean): void {
    if (this.held === on) return;
    this.held = on;
    this.update();
  }

  /** The client acknowledged something new. */
  progress(): void {
    if (this.spell) this.since = Date.now();
  }

  /** A new stream, or none: forget the old one's state. */
  reset(): void {
    this.blocked = this.held = this.spell = false;
    clearTimeout(this.timer);
    this.timer = undefined;
  }

  private update(): void {
    if (!this.blocked && !this.held) {
      this.spell = false;
      return;
    }
    if (this.spell) return;
    this.spell = true;
    this.since = Date.now();
    if (!this.timer) this.arm(this.limitMs);
  }

  private arm(ms: number): void {
    this.timer = setTimeout(this.check, ms);
    this.timer.unref?.();
  }

  private readonly check = (): void => {
    this.timer = undefined;
    if (!this.spell) return;
    if (!this.blocked && !this.owes()) {
      // Held only by what is in flight at the device: not the client's doing.
      this.since = Date.now();
      return this.arm(this.limitMs);
    }
    const ms = Date.now() - this.since;
    if (ms >= this.limitMs) this.onStalled({ ms, blocked: this.blocked });
    else this.arm(this.limitMs - ms);
  };
}
