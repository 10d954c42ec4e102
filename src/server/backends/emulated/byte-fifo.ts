// A bounded byte FIFO with waiting readers and writers, for echo devices.
// Writers that do not fit wait (the device NAKs) instead of dropping data;
// readers wait until at least one byte is available. Both queues are FIFO.
import type { TransferContext } from './emulated-device.js';

interface Reader {
  max: number;
  resolve: (b: Uint8Array) => void;
}
interface Writer {
  data: Uint8Array;
  off: number;
  resolve: (n: number) => void;
}

const EMPTY = new Uint8Array(0);

export class ByteFifo {
  private chunks: Uint8Array[] = [];
  private headOff = 0;
  private size = 0;
  private readers: Reader[] = [];
  private writers: Writer[] = [];

  constructor(readonly capacity: number) {
    if (capacity <= 0) throw new RangeError('capacity must be > 0');
  }

  get length(): number {
    return this.size;
  }
  get waitingReaders(): number {
    return this.readers.length;
  }
  get waitingWriters(): number {
    return this.writers.length;
  }

  /** Accept all of `data`; resolves (or returns) its length once every byte is buffered. */
  write(data: Uint8Array, ctx?: TransferContext): number | Promise<number> {
    if (data.length === 0) return 0;
    if (this.writers.length === 0) {
      let n = this.accept(data, 0);
      this.serveReaders();
      while (n < data.length && this.size < this.capacity) {
        n = this.accept(data, n);
        this.serveReaders();
      }
      if (n === data.length) return n;
      return this.waitWrite(data, n, ctx);
    }
    return this.waitWrite(data, 0, ctx);
  }

  /** Take up to `max` bytes; waits while empty. */
  read(max: number, ctx?: TransferContext): Uint8Array | Promise<Uint8Array> {
    if (max <= 0) return EMPTY;
    if (this.readers.length === 0 && this.size > 0) {
      const out = this.take(max);
      this.serveWriters();
      return out;
    }
    return new Promise<Uint8Array>((resolve) => {
      const r: Reader = { max, resolve };
      this.readers.push(r);
      ctx?.onCancel(() => {
        const i = this.readers.indexOf(r);
        if (i >= 0) this.readers.splice(i, 1);
        resolve(EMPTY);
      });
    });
  }

  /** Drop buffered data and release every waiter (readers get empty, writers their count). */
  clear(): void {
    this.chunks = [];
    this.headOff = 0;
    this.size = 0;
    for (const r of this.readers.splice(0)) r.resolve(EMPTY);
    for (const w of this.writers.splice(0)) w.resolve(w.off);
  }

  private waitWrite(data: Uint8Array, off: number, ctx?: TransferContext): Promise<number> {
    return new Promise<number>((resolve) => {
      const w: Writer = { data, off, resolve };
      this.writers.push(w);
      ctx?.onCancel(() => {
        const i = this.writers.indexOf(w);
        if (i >= 0) this.writers.splice(i, 1);
        resolve(w.off);
      });
    });
  }

  /** Copy as much of data[off..] as fits; returns the new offset. */
  private accept(data: Uint8Array, off: number): number {
    const n = Math.min(data.length - off, this.capacity - this.size);
    if (n <= 0) return off;
    // Copy: the submitter owns its buffer once the URB completes.
    this.chunks.push(data.slice(off, off + n));
    this.size += n;
    return off + n;
  }

  private take(max: number): Uint8Array {
    const n = Math.min(max, this.size);
    const first = this.chunks[0]!;
    let out: Uint8Array;
    if (first.length - this.headOff >= n) {
      out = first.subarray(this.headOff, this.headOff + n);
      this.headOff += n;
      if (this.headOff === first.length) {
        this.chunks.shift();
        this.headOff = 0;
      }
    } else {
      out = new Uint8Array(n);
      let filled = 0;
      while (filled < n) {
        const c = this.chunks[0]!;
        const k = Math.min(n - filled, c.length - this.headOff);
        out.set(c.subarray(this.headOff, this.headOff + k), filled);
        filled += k;
        this.headOff += k;
        if (this.headOff === c.length) {
          this.chunks.shift();
          this.headOff = 0;
        }
      }
    }
    this.size -= n;
    return out;
  }

  private serveReaders(): void {
    while (this.readers.length > 0 && this.size > 0) {
      const r = this.readers.shift()!;
      r.resolve(this.take(r.max));
    }
  }

  private serveWriters(): void {
    let progress = true;
    while (progress) {
      progress = false;
      while (this.writers.length > 0 && this.size < this.capacity) {
        const w = this.writers[0]!;
        w.off = this.accept(w.data, w.off);
        progress = true;
        if (w.off === w.data.length) {
          this.writers.shift();
          w.resolve(w.off);
        } else break;
      }
      if (this.readers.length > 0 && this.size > 0) {
        this.serveReaders();
        progress = this.writers.length > 0 && this.size < this.capacity;
      }
    }
  }
}
