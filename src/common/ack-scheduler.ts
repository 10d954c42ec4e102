// When to acknowledge what the peer sent. An ack rides along with any data
// frame going out anyway; on its own it waits a little (or for a backlog),
// so a ping-pong of URBs does not double its messages with bare acks.

export class AckScheduler {
  private lastSent = 0;
  private timer?: NodeJS.Timeout;
  private forced = false;

  constructor(
    /** Called when a delayed ack is due: the owner should flush. */
    private readonly onDue: () => void,
    private readonly delayMs = 5,
    /** Acknowledge at once when this many frames are unacknowledged. */
    private readonly backlog = 64,
  ) {}

  /**
   * The seq to acknowledge in the message about to be sent, if any.
   * `lastReceived`: the highest seq received; `withData`: data frames go out anyway.
   */
  take(lastReceived: number, withData: boolean): number | undefined {
    if (lastReceived <= this.lastSent) return undefined;
    if (withData || this.forced || lastReceived - this.lastSent >= this.backlog) {
      this.forced = false;
      clearTimeout(this.timer);
      this.timer = undefined;
      this.lastSent = lastReceived;
      return lastReceived;
    }
    this.timer ??= setTimeout(() => {
      this.timer = undefined;
      this.forced = true;
      this.onDue();
    }, this.delayMs);
    return undefined;
  }

  /** A new stream: the peer must hear the position again. */
  reset(): void {
    this.lastSent = 0;
    this.forced = false;
    clearTimeout(this.timer);
    this.timer = undefined;
  }

  stop(): void {
    clearTimeout(this.timer);
    this.timer = undefined;
  }
}
