// Live URB captures: who captures which session or device, and each capture's bounded queue.
// A capture never slows the device: an event that does not fit the queue of a capture whose
// client does not keep up is dropped and counted, and the client hears how many.
import type { CaptureEvent, UrbEvent } from '../../gen/usbroam/v1/usbhost.js';

export const DEFAULT_SNAPLEN = 65536;
export const MAX_SNAPLEN = 1024 * 1024;
/** Bounds of one capture's queue (events waiting for its gRPC stream to drain). */
export const CAPTURE_QUEUE_EVENTS = 4096;
export const CAPTURE_QUEUE_BYTES = 8 * 1024 * 1024;
const EVENT_OVERHEAD = 96;

export interface CaptureSink {
  /** false: the transport is full; wait for onceDrain. */
  write(ev: CaptureEvent): boolean;
  onceDrain(cb: () => void): void;
}

export type CaptureTarget = { sessionId: string; deviceId?: undefined } | { deviceId: string; sessionId?: undefined };

/** One running capture. */
export class CaptureSubscriber {
  private readonly queue: CaptureEvent[] = [];
  private queuedBytes = 0;
  private waiting = false;
  /** Dropped since the client last heard of drops. */
  private unreported = 0;
  dropped = 0;
  delivered = 0;
  closed = false;
  /** finish(): no more events come in; called once the queue is out. */
  private onDrained?: () => void;

  constructor(
    readonly target: CaptureTarget,
    readonly snaplen: number,
    private readonly sink: CaptureSink,
    private readonly onDrop: (n: number) => void,
  ) {}

  /**
   * Take one URB event. `ev.data` and `ev.setup` may be the URB's own buffers, which a backend
   * may reuse once the URB completed, and grpc-js may serialize a write later: keep a copy (cut
   * at snaplen) of what goes out.
   */
  offer(ev: UrbEvent): void {
    if (this.closed || this.onDrained) return;
    const direct = !this.waiting && this.queue.length === 0;
    const bytes = Math.min(ev.data.length, this.snaplen) + EVENT_OVERHEAD;
    if (!direct && (this.queue.length >= CAPTURE_QUEUE_EVENTS || this.queuedBytes + bytes > CAPTURE_QUEUE_BYTES)) {
      this.dropped++;
      this.unreported++;
      this.onDrop(1);
      return;
    }
    const e: UrbEvent = { ...ev, data: ev.data.slice(0, this.snaplen), setup: ev.setup.slice() };
    if (direct) {
      if (this.unreported) this.reportDrops();
      this.send({ kind: { $case: 'urb', value: e } });
      return;
    }
    // The drops happened between what is queued and this event: say so at that place.
    if (this.unreported) this.queue.push(this.takeDropReport());
    this.queue.push({ kind: { $case: 'urb', value: e } });
    this.queuedBytes += bytes;
  }

  /** Write a control event (started) right away, ahead of the queue. */
  control(ev: CaptureEvent): void {
    if (!this.closed) this.send(ev);
  }

  private takeDropReport(): CaptureEvent {
    const n = this.unreported;
    this.unreported = 0;
    return { kind: { $case: 'dropped', value: { events: n } } };
  }

  private reportDrops(): void {
    this.send(this.takeDropReport());
  }

  private send(ev: CaptureEvent): void {
    this.delivered++;
    if (!this.sink.write(ev) && !this.waiting) {
      this.waiting = true;
      this.sink.onceDrain(() => this.pump());
    }
  }

  private pump(): void {
    this.waiting = false;
    while (!this.waiting && !this.closed) {
      const ev = this.queue.shift();
      if (!ev) {
        // Drops after the last queued event.
        if (this.unreported) this.reportDrops();
        if (!this.waiting) this.drained();
        return;
      }
      if (ev.kind?.$case === 'urb') this.queuedBytes -= ev.kind.value.data.length + EVENT_OVERHEAD;
      this.send(ev);
    }
  }

  /**
   * What was captured is complete (the session ended): send what is queued, then `done`; after
   * `timeoutMs` without the client reading, `done` anyway.
   */
  finish(done: () => void, timeoutMs = 5000): void {
    if (this.closed) return done();
    const t = setTimeout(() => this.drained(), timeoutMs);
    t.unref?.();
    this.onDrained = () => {
      clearTimeout(t);
      done();
    };
    if (!this.waiting) this.pump();
  }

  private drained(): void {
    const cb = this.onDrained;
    if (!cb) return;
    this.onDrained = () => {};
    cb();
  }

  close(): void {
    this.closed = true;
    this.queue.length = 0;
    this.queuedBytes = 0;
  }
}

/** What a session tap needs to know: the captures that see this session, or null (the common case). */
export interface CaptureListener {
  readonly sessionId: string;
  readonly deviceId: string;
  captures: CaptureSubscriber[] | null;
}

export class CaptureHub {
  private readonly subscribers = new Set<CaptureSubscriber>();
  private readonly listeners = new Set<CaptureListener>();
  /** usbmon-style device numbers: 1 is the root hub, so devices count from 2, in order of first capture. */
  private readonly addresses = new Map<string, number>();
  droppedTotal = 0;

  get active(): number {
    return this.subscribers.size;
  }

  addListener(l: CaptureListener): void {
    this.listeners.add(l);
    this.refresh(l);
  }

  removeListener(l: CaptureListener): void {
    this.listeners.delete(l);
    l.captures = null;
  }

  subscribe(target: CaptureTarget, snaplen: number, sink: CaptureSink): CaptureSubscriber {
    const s = new CaptureSubscriber(target, Math.min(Math.max(1, snaplen || DEFAULT_SNAPLEN), MAX_SNAPLEN), sink, (n) => {
      this.droppedTotal += n;
    });
    this.subscribers.add(s);
    for (const l of this.listeners) this.refresh(l);
    return s;
  }

  unsubscribe(s: CaptureSubscriber): void {
    s.close();
    if (!this.subscribers.delete(s)) return;
    for (const l of this.listeners) this.refresh(l);
  }

  addressOf(deviceId: string): number {
    let a = this.addresses.get(deviceId);
    if (a === undefined) {
      a = 2 + (this.addresses.size % 126);
      this.addresses.set(deviceId, a);
    }
    return a;
  }

  private refresh(l: CaptureListener): void {
    const list = [...this.subscribers].filter((s) => s.target.sessionId === l.sessionId || s.target.deviceId === l.deviceId);
    l.captures = list.length ? list : null;
  }
}
