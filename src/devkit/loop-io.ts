// Verified I/O through an emulated loopback device in loop mode (bulk IN returns what bulk OUT
// wrote): OUT URBs carry random payloads and IN URBs read them back, a window of each in flight,
// and every byte read is compared with the byte written at that position of the stream. An IN is
// submitted only for bytes an OUT has already completed with, so no IN waits on an empty FIFO and
// each one must return exactly its length.
import { randomBytes } from 'node:crypto';
import { TransferType, UrbStatus, type RemoteDevice } from '../client/sdk/remote-device.js';
import { LOOP_BULK_IN, LOOP_BULK_OUT, VREQ_SET_MODE } from '../server/backends/emulated/loopback.js';

export interface LoopIoOptions {
  /** Bytes per URB (default 16 KiB). */
  urbBytes?: number;
  /** OUT URBs and IN URBs in flight, each (default 8). */
  window?: number;
  /** Told each URB's round trip, in microseconds. */
  onRtt?: (us: number) => void;
}

export interface LoopIoResult {
  /** Bytes OUT URBs completed with (accepted by the device). */
  bytesOut: number;
  /** Bytes read back and verified equal to what was written. */
  bytesVerified: number;
  urbs: number;
  /** Read back but different from what was written, or accepted and never read back (while the device lived). */
  bytesLost: number;
  /** URBs that failed (a status other than success, a short transfer, or a rejected promise): what, in order. */
  errors: string[];
}

/** Random payload source: OUT URBs are slices of it at random offsets (no allocation per URB). */
const POOL = randomBytes(2 * 1024 * 1024);

/** Configure a loopback device for loop mode. */
export async function prepareLoop(dev: RemoteDevice): Promise<void> {
  await dev.selectConfiguration(1);
  const r = await dev.controlTransferOut({ requestType: 'vendor', recipient: 'device', request: VREQ_SET_MODE, value: 1, index: 0 });
  if (r.status !== UrbStatus.URB_STATUS_SUCCESS) throw new Error(`device ${dev.device.id}: SET_MODE loop failed: ${UrbStatus[r.status]}`);
}

export class LoopIo {
  private readonly urbBytes: number;
  private readonly window: number;
  private readonly onRtt?: (us: number) => void;
  private outs = 0;
  private ins = 0;
  private bytesOut = 0;
  /** Bytes IN URBs have asked for so far. */
  private requested = 0;
  private verified = 0;
  private lost = 0;
  private urbs = 0;
  private readonly errors: string[] = [];
  /** Written and not yet read back: slices of POOL, in stream order. */
  private readonly pending: Uint8Array[] = [];
  private stopping = false;
  /** Set once a URB failed: no new URBs (the stream's position is unknown from then on). */
  private broken = false;
  private nextIn = 0;
  private nextInDone = 0;
  private readonly inDone = new Map<number, { length: number; data?: Uint8Array; error?: string }>();
  private finished?: () => void;
  private readonly done: Promise<void>;

  constructor(
    private readonly dev: RemoteDevice,
    opts: LoopIoOptions = {},
  ) {
    this.urbBytes = opts.urbBytes ?? 16 * 1024;
    this.window = opts.window ?? 8;
    this.onRtt = opts.onRtt;
    this.done = new Promise((r) => (this.finished = r));
  }

  start(): this {
    this.fill();
    return this;
  }

  /** Bytes verified so far (progress and throughput). */
  get progress(): { bytesOut: number; bytesVerified: number; urbs: number; errors: number } {
    return { bytesOut: this.bytesOut, bytesVerified: this.verified, urbs: this.urbs, errors: this.errors.length };
  }

  /** Stop writing, read back everything written, and report. */
  async stop(): Promise<LoopIoResult> {
    this.stopping = true;
    this.fill();
    await this.done;
    return { bytesOut: this.bytesOut, bytesVerified: this.verified, urbs: this.urbs, bytesLost: this.lost, errors: [...this.errors] };
  }

  /** Unread bytes the device accepted (counted lost by stop() unless read back). */
  get unread(): number {
    return this.bytesOut - this.requested;
  }

  private fill(): void {
    if (!this.broken) {
      while (!this.stopping && this.outs < this.window) this.submitOut();
      while (this.ins < this.window && this.bytesOut > this.requested) this.submitIn(Math.min(this.urbBytes, this.bytesOut - this.requested));
    }
    if ((this.stopping || this.broken) && this.outs === 0 && this.ins === 0) {
      if (!this.broken) this.lost += this.bytesOut - this.requested; // cannot happen: stop reads everything back
      this.finished?.();
      this.finished = undefined;
    }
  }

  private fail(what: string): void {
    this.errors.push(what);
    this.broken = true;
  }

  private submitOut(): void {
    const n = this.urbBytes;
    const off = Math.floor(Math.random() * (POOL.length - n));
    const data = POOL.subarray(off, off + n);
    this.outs++;
    const t0 = performance.now();
    this.dev.submit({ endpoint: LOOP_BULK_OUT, type: TransferType.TRANSFER_BULK, data }).then(
      (c) => {
        this.outs--;
        this.urbs++;
        this.onRtt?.((performance.now() - t0) * 1000);
        if (c.status !== UrbStatus.URB_STATUS_SUCCESS || c.actualLength !== n) this.fail(`OUT: ${UrbStatus[c.status]}, ${c.actualLength} of ${n} bytes`);
        else if (!this.broken) {
          this.bytesOut += n;
          this.pending.push(data);
        }
        this.fill();
      },
      (err: Error) => {
        this.outs--;
        this.fail(`OUT: ${err.message}`);
        this.fill();
      },
    );
  }

  private submitIn(n: number): void {
    const idx = this.nextIn++;
    this.requested += n;
    this.ins++;
    const t0 = performance.now();
    this.dev.submit({ endpoint: LOOP_BULK_IN, type: TransferType.TRANSFER_BULK, length: n }).then(
      (c) => {
        this.onRtt?.((performance.now() - t0) * 1000);
        this.urbs++;
        const ok = c.status === UrbStatus.URB_STATUS_SUCCESS && c.data.length === n;
        this.inDone.set(idx, ok ? { length: n, data: c.data } : { length: n, error: `IN: ${UrbStatus[c.status]}, ${c.data.length} of ${n} bytes` });
        this.completeIns();
      },
      (err: Error) => {
        this.inDone.set(idx, { length: n, error: `IN: ${err.message}` });
        this.completeIns();
      },
    );
  }

  /** IN completions in submission order: each compared with the next bytes written. */
  private completeIns(): void {
    for (let r = this.inDone.get(this.nextInDone); r; r = this.inDone.get(this.nextInDone)) {
      this.inDone.delete(this.nextInDone++);
      this.ins--;
      if (r.error) {
        this.fail(r.error);
        continue;
      }
      const mismatched = this.verify(r.data!);
      if (mismatched) {
        this.lost += mismatched;
        this.fail(`IN: ${mismatched} of ${r.length} bytes differ from what was written at stream offset ${this.verified}`);
      }
      this.verified += r.length - mismatched;
    }
    this.fill();
  }

  /** Compare `got` with the front of `pending` (consuming it); returns how many bytes differ. */
  private verify(got: Uint8Array): number {
    let off = 0;
    let bad = 0;
    while (off < got.length) {
      const head = this.pending[0];
      if (!head) return bad + got.length - off; // more than was written
      const n = Math.min(head.length, got.length - off);
      if (Buffer.compare(head.subarray(0, n), got.subarray(off, off + n)) !== 0) {
        for (let i = 0; i < n; i++) if (head[i] !== got[off + i]) bad++;
      }
      off += n;
      if (n === head.length) this.pending.shift();
      else this.pending[0] = head.subarray(n);
    }
    return bad;
  }
}
