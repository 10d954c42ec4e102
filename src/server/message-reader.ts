// Reads a grpc-js server stream one message at a time with flow control
// (the stream is paused while messages wait), without destroying the call
// when the reader stops early: the handler still has to send a status.
import type { Readable } from 'node:stream';

const HIGH_WATER = 4;

export class MessageReader<T> {
  private readonly queue: T[] = [];
  private waiter?: () => void;
  private ended = false;
  private error?: Error;

  constructor(private readonly stream: Readable) {
    stream.on('data', (m: T) => {
      this.queue.push(m);
      if (this.queue.length >= HIGH_WATER) stream.pause();
      this.wake();
    });
    stream.on('end', () => {
      this.ended = true;
      this.wake();
    });
    stream.on('error', (e: Error) => {
      this.error ??= e;
      this.ended = true;
      this.wake();
    });
    stream.on('close', () => {
      this.ended = true;
      this.wake();
    });
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = undefined;
    w?.();
  }

  /** The next message; undefined at the end of the stream. Rejects with the stream's error. */
  async next(): Promise<T | undefined> {
    for (;;) {
      if (this.queue.length) {
        const m = this.queue.shift()!;
        if (this.queue.length < HIGH_WATER) this.stream.resume();
        return m;
      }
      if (this.error) throw this.error;
      if (this.ended) return undefined;
      await new Promise<void>((r) => (this.waiter = r));
    }
  }
}
