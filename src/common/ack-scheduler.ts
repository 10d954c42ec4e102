// When to acknowledge what the peer sent. An ack rides along with any data
// frame going out anyway; on its own it waits a little (or for a backlog),
// so a ping-pong of URBs does not double its messages with bare acks.
//
// The delay timer is created at most once per delay period: an ack that
// rides with data does not clear it (clearing and re-arming a timer on every
// round trip costs more than the round trip's own work); when it fires it
// checks whether an ack is still owed.

export class AckScheduler {
  private lastSent = 0;
  /** Highest seq seen owed by take() (what the timer will force out). */
  private owed = 0;
  private timer?: NodeJS.Timeout;
  private forced = false;
  private stopped = false;

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
      this.lastSent = lastReceived;
      return lastReceived;
    }
    this.owed = lastReceived;
    if (!this.timer && !this.stopped) {
      this.timer = setTimeout(this.fire, this.delayMs);
    }
    return undefined;
  }

  private readonly fire = (): void => {
    this.timer = undefined;
    if (this.stopped || this.owed <= this.lastSent) return; // went out with data meanwhile
    this.forced = true;
    this.onDue();
  };

  /** A new stream: the peer must hear the position again. */
  reset(): void {
    this.lastSent = 0;
    this.owed = 0;
    this.forced = false;
    this.stopped = false;
    clearTimeout(this.timer);
    this.timer = undefined;
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.timer);
    this.timer = undefined;
  }
}
