// A host-driven stream on an IN endpoint (usbredir's interrupt receiving,
// bulk receiving and iso streams): keep `transfers` URBs submitted, hand
// every result on in order with its index, resubmit. A stall or error ends
// the stream after reporting it, as usbredir expects.
import type { ReceivedData } from '../../gen/usbroam/v1/usbhost.js';
import { pbIsoPackets, pbStatus } from '../convert.js';
import { TransferType, UrbStatus, type DeviceHandle, type Urb, type UrbResult } from '../backends/types.js';
import type { SessionObserver } from '../observe/observer.js';

export class ReceivingStream {
  private index = 0;
  private running = false;
  private paused = 0;
  private readonly pending = new Set<number>();
  private idle?: () => void;

  constructor(
    private readonly handle: DeviceHandle,
    private readonly type: TransferType,
    readonly endpoint: number,
    private readonly length: number,
    private readonly transfers: number,
    private readonly isoPackets: number,
    private readonly nextId: () => number,
    private readonly deliver: (d: ReceivedData) => void,
    /** True while the session's journal is too full: do not resubmit. */
    private readonly shouldPause: () => boolean,
    /** Metrics and capture: told of each URB the stream submits, like the session's own. */
    private readonly observer: () => SessionObserver | undefined = () => undefined,
  ) {}

  start(): void {
    this.running = true;
    for (let i = 0; i < this.transfers; i++) this.submitOne();
  }

  private submitOne(): void {
    if (!this.running) return;
    if (this.shouldPause()) {
      this.paused++;
      return;
    }
    const id = this.nextId();
    this.pending.add(id);
    const iso = this.type === TransferType.Isochronous;
    const urb: Urb = {
      id,
      endpoint: this.endpoint,
      type: this.type,
      length: iso ? this.length * this.isoPackets : this.length,
      streamId: 0,
      flags: 0,
      timeoutMs: 0,
      isoPackets: iso ? Array.from({ length: this.isoPackets }, () => ({ length: this.length, status: UrbStatus.Success, actualLength: 0 })) : undefined,
    };
    const observer = this.observer();
    observer?.urbSubmitted(urb);
    this.handle.submit(urb, (r) => {
      observer?.urbCompleted(urb, r);
      this.onResult(id, r);
    });
  }

  private onResult(id: number, r: UrbResult): void {
    this.pending.delete(id);
    if (r.status === UrbStatus.Cancelled && !this.running) {
      if (this.pending.size === 0) this.idle?.();
      return;
    }
    this.deliver({
      endpoint: this.endpoint,
      index: this.index++,
      status: pbStatus(r.status),
      data: r.data ?? new Uint8Array(0),
      isoPackets: pbIsoPackets(r.isoPackets),
    });
    if (r.status !== UrbStatus.Success && this.type !== TransferType.Isochronous) {
      // usbredir: after a stall or error the stream stops; the guest restarts it.
      void this.stop();
      return;
    }
    this.submitOne();
    if (!this.running && this.pending.size === 0) this.idle?.();
  }

  resumeIfPaused(): void {
    while (this.paused > 0 && this.running) {
      this.paused--;
      this.submitOne();
      if (this.shouldPause()) break;
    }
  }

  async stop(): Promise<void> {
    this.running = false;
    this.paused = 0;
    if (this.pending.size === 0) return;
    const done = new Promise<void>((resolve) => (this.idle = resolve));
    for (const id of this.pending) this.handle.cancel(id);
    await Promise.race([done, new Promise((r) => setTimeout(r, 2000))]);
  }
}
