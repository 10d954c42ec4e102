// Output to QEMU's chardev socket: packets produced in one turn leave corked in one write; the
// tail of what was written is remembered (the sent ring: what QEMU may not have read yet, for a
// hand-off); during a hand-off output is held instead of written; reading from QEMU pauses while
// our output or the requests in flight are too many (backpressure).
import type { Socket } from 'node:net';

/** Most bytes the kernel can hold in an AF_UNIX stream socket (net.core.wmem_max default 4 MiB). */
const KERNEL_RETAIN = 4 * 1024 * 1024;

export class ChardevOutput {
  private corked = false;
  /** The last parts written to the socket (at least what QEMU may not have read). */
  private readonly sentRing: Uint8Array[] = [];
  private sentRingBytes = 0;
  /** During a hand-off: output held here instead of written. */
  private held: Uint8Array[] | null = null;
  private heldLength = 0;
  private _bytesWritten = 0;
  private readonly uncork = () => {
    this.corked = false;
    if (!this.socket.destroyed) this.socket.uncork();
  };

  constructor(
    private readonly socket: Socket,
    /** Called after each write: the owner re-evaluates its read flow. */
    private readonly afterWrite: () => void,
    private readonly writeHighWater: number,
    private readonly maxInFlight: number,
  ) {}

  /** Bytes handed to this output (written or held). */
  get bytesWritten(): number {
    return this._bytesWritten;
  }
  /** Bytes written and not yet taken by the kernel. */
  get backlog(): number {
    return this.socket.writableLength;
  }
  /** Bytes the sent ring remembers: QEMU has read everything written before them. */
  get retained(): number {
    return this.sentRingBytes;
  }
  get holding(): boolean {
    return this.held !== null;
  }
  get heldBytes(): number {
    return this.heldLength;
  }

  /** Write encoded parts (or hold them), remembering the tail. */
  write(parts: readonly Uint8Array[]): void {
    if (this.held) {
      for (const part of parts) {
        this._bytesWritten += part.length;
        this.heldLength += part.length;
        this.held.push(part);
      }
      return;
    }
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      // Uncork at the end of this turn: packets produced together leave in one write, without waiting a loop turn.
      queueMicrotask(this.uncork);
    }
    for (const part of parts) {
      this._bytesWritten += part.length;
      this.socket.write(part);
      this.sentRing.push(part);
      this.sentRingBytes += part.length;
    }
    // Keep at least what Node buffers plus what the kernel can hold.
    const keep = this.socket.writableLength + KERNEL_RETAIN;
    while (this.sentRing.length > 1 && this.sentRingBytes - this.sentRing[0]!.length >= keep) this.sentRingBytes -= this.sentRing.shift()!.length;
    this.afterWrite();
  }

  /** Start holding output (hand-off freeze). */
  hold(): void {
    this.held ??= [];
  }
  /** Stop holding; returns what was held (to be written, or dropped after a hand-off). */
  release(): Uint8Array[] {
    const held = this.held ?? [];
    this.held = null;
    this.heldLength = 0;
    return held;
  }

  /**
   * What QEMU has not read: the last `unreadInSocket` bytes written (views into the sent ring,
   * no copy) and everything held.
   */
  unread(unreadInSocket: number): Uint8Array[] {
    if (unreadInSocket > this.sentRingBytes) throw new Error(`QEMU has ${unreadInSocket} unread bytes but only ${this.sentRingBytes} are remembered`);
    const tail: Uint8Array[] = [];
    let o = unreadInSocket;
    for (let i = this.sentRing.length - 1; i >= 0 && o > 0; i--) {
      const part = this.sentRing[i]!;
      const take = Math.min(part.length, o);
      tail.push(take === part.length ? part : part.subarray(part.length - take));
      o -= take;
    }
    tail.reverse();
    if (this.held) tail.push(...this.held);
    return tail;
  }

  /** Run fn once what is queued has been handed to the kernel. */
  afterFlush(fn: () => void): void {
    setImmediate(() => {
      if (this.socket.writableLength === 0 || this.socket.destroyed) fn();
      else this.socket.once('drain', fn);
    });
  }

  /**
   * Pause reading requests from QEMU while our output or the URBs in flight are too many;
   * `draining` (hand-off): read whatever QEMU wrote, whatever our output.
   */
  updateReadFlow(inFlight: number, draining: boolean): void {
    const tooMuch = (!draining && this.socket.writableLength > this.writeHighWater) || inFlight >= this.maxInFlight;
    const paused = this.socket.isPaused();
    if (tooMuch && !paused) this.socket.pause();
    else if (!tooMuch && paused) this.socket.resume();
  }

  /** Closing: what is corked leaves now. */
  flushCork(): void {
    if (this.corked) {
      this.corked = false;
      this.socket.uncork();
    }
  }
}
