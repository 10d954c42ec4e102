// When a URB-channel end (the SDK's RemoteDevice, the server's Session) sends its queued frames.
//
// The first message of a turn of the event loop goes out at the end of the current microtask run
// (a lone URB or completion is not held back: per-URB latency); whatever comes later in the same
// turn is batched until setImmediate (throughput under load: few, full messages).
export class FlushScheduler {
  private scheduled = false;
  /** A message went out in this turn of the event loop: more frames wait for setImmediate. */
  private flushedThisTurn = false;

  /** `flush` sends what is due and returns true when a message went out. */
  constructor(private readonly flush: () => boolean) {}

  schedule(): void {
    if (this.scheduled) return;
    this.scheduled = true;
    if (this.flushedThisTurn) return; // the armed setImmediate flushes
    queueMicrotask(this.task);
  }

  private readonly task = (): void => {
    if (!this.scheduled) return;
    this.scheduled = false;
    if (this.flush() && !this.flushedThisTurn) {
      this.flushedThisTurn = true;
      setImmediate(this.turnEnd);
    }
  };

  private readonly turnEnd = (): void => {
    this.flushedThisTurn = false;
    if (!this.scheduled) return;
    this.scheduled = false;
    this.flush();
  };
}
