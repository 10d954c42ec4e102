// The URB side of a session: validates the client's submits against the device's active
// configuration, runs them on the backend (many in flight per endpoint), cancels them, runs
// device ops and keeps the receiving streams. What it produces (completions, op results,
// received data) goes to the session's channel through `ExecutorOutput`.
import { status as Status } from '@grpc/grpc-js';
import type { Logger } from '../../common/log.js';
import type { DeviceOp, OpResult, ServerFrame, UrbSubmit } from '../../gen/usbroam/v1/usbhost.js';
import { TransferType, UrbStatus, UsbError, type DeviceHandle, type Urb, type UrbResult } from '../backends/types.js';
import { endpointToProto, interfaceToProto, pbIsoPackets, pbStatus, transferTypeFromProto } from '../convert.js';
import { ReceivingStream } from './receiving-stream.js';
import type { SessionLimits } from './session-types.js';
import type { SessionObserver } from '../observe/observer.js';

/** Where the executor's results go (the session's channel). */
export interface ExecutorOutput {
  /** Journal a data frame for the client; `bytes` is its payload size. */
  emit(kind: NonNullable<ServerFrame['kind']>, bytes: number): void;
  /** A channel-control error frame (informational, not journaled). */
  error(code: Status, message: string, clientSeq: number): void;
  /** Weighted bytes the client has not acknowledged yet. */
  journalBytes(): number;
  /** The stream's next submit waits for the client to acknowledge (true: the byte bound is full), or goes on. */
  held(on: boolean): void;
}

interface InFlight {
  backendId: number;
  endpoint: number;
  /** What the URB holds or will bring back: its IN length or its OUT data. */
  bytes: number;
}

const EMPTY = new Uint8Array(0);
/** An endpoint address as a message shows it (built only for a refusal: no string per URB). */
const hexOf = (endpoint: number) => `0x${endpoint.toString(16)}`;

export class UrbExecutor {
  private readonly inFlight = new Map<number, InFlight>();
  private readonly receivers = new Map<number, ReceivingStream>();
  /** Endpoints whose URBs the backend cannot execute, already reported to the client (UNIMPLEMENTED). */
  private readonly unsupportedTold = new Set<number>();
  private nextBackendId = 1;
  /** Sum of the in-flight URBs' bytes. */
  private inFlightBytes = 0;
  private slotWaiters: (() => void)[] = [];
  /** The session closed: completions are dropped, every slot waiter released. */
  private closed = false;
  readonly stats = { urbsSubmitted: 0, urbsCompleted: 0 };
  /** Metrics and capture (observe/): told of every URB that goes to the device and comes back. */
  observer?: SessionObserver;

  constructor(
    private readonly handle: DeviceHandle,
    private readonly limits: SessionLimits,
    private readonly log: Logger,
    private readonly out: ExecutorOutput,
  ) {}

  get inFlightCount(): number {
    return this.inFlight.size;
  }

  // ------------------------------------------------------------ flow control

  /**
   * Another URB may be submitted now (or the session is closed: frames are refused anyway): fewer
   * than maxInFlight in flight, and unacknowledged frames plus in-flight data under maxBufferedBytes
   * (one URB may pass the bound: the journal stays within it plus maxUrbBytes).
   */
  hasSlot(): boolean {
    return (this.inFlight.size < this.limits.maxInFlight && !this.overBytes()) || this.closed;
  }

  /** The byte bound is full: what the client has not acknowledged plus what is in flight. */
  private overBytes(): boolean {
    return this.out.journalBytes() + this.inFlightBytes >= this.limits.maxBufferedBytes;
  }

  /** Resolves when another URB may be submitted; tells `out.held` while the byte bound is why not. */
  async waitForSlot(): Promise<void> {
    while (!this.hasSlot()) {
      this.out.held(this.overBytes());
      await new Promise<void>((resolve) => this.slotWaiters.push(resolve));
    }
    this.out.held(false);
  }

  /** Call `cb` once when a slot frees up (or the session closes). */
  onSlot(cb: () => void): void {
    this.slotWaiters.push(cb);
  }

  // ------------------------------------------------------------ URBs

  submit(s: UrbSubmit, seq: number): void {
    const why = this.invalid(s);
    if (why) {
      this.log.warn({ urbId: s.urbId, endpoint: s.endpoint, seq }, why);
      this.out.error(Status.INVALID_ARGUMENT, why, seq);
      this.out.emit({ $case: 'complete', value: { urbId: s.urbId, status: pbStatus(UrbStatus.Inval), data: EMPTY, actualLength: 0, isoPackets: [] } }, 0);
      return;
    }
    const type = transferTypeFromProto(s.type)!; // invalid() refused any other
    // A backend that cannot execute such URBs at all (e.g. iso or bulk streams on usb@2): the URB
    // still goes to it (it completes INVAL at the bus pace), and the client hears why, once per
    // endpoint, as UNIMPLEMENTED: a URB completion has no room for a message.
    const unsupported = this.handle.unsupported?.({ endpoint: s.endpoint, type, streamId: s.streamId });
    if (unsupported && !this.unsupportedTold.has(s.endpoint)) {
      this.unsupportedTold.add(s.endpoint);
      this.log.warn({ urbId: s.urbId, endpoint: s.endpoint, seq }, unsupported);
      this.out.error(Status.UNIMPLEMENTED, unsupported, seq);
    }
    const isIn = (s.endpoint & 0x80) !== 0;
    const backendId = this.nextBackendId++;
    const urb: Urb = {
      id: backendId,
      endpoint: s.endpoint,
      type,
      setup: s.setup,
      data: isIn && (s.endpoint & 0x0f) !== 0 ? undefined : s.data,
      length: s.length,
      streamId: s.streamId,
      flags: s.flags,
      isoPackets: s.isoPackets.length ? s.isoPackets.map((p) => ({ length: p.length, status: UrbStatus.Success, actualLength: 0 })) : undefined,
      timeoutMs: s.timeoutMs,
    };
    const bytes = isIn ? s.length : s.data.length;
    this.inFlight.set(s.urbId, { backendId, endpoint: s.endpoint, bytes });
    this.inFlightBytes += bytes;
    this.stats.urbsSubmitted++;
    const observer = this.observer;
    if (!observer) return this.handle.submit(urb, (r) => this.completed(s.urbId, r));
    observer.urbSubmitted(urb);
    this.handle.submit(urb, (r) => {
      observer.urbCompleted(urb, r);
      this.completed(s.urbId, r);
    });
  }

  /** Why the device cannot take this URB as submitted, or undefined. */
  private invalid(s: UrbSubmit): string | undefined {
    if (this.inFlight.has(s.urbId)) return `URB id ${s.urbId} is already in flight`;
    const epNum = s.endpoint & 0x0f;
    if (s.endpoint & 0x70) return `endpoint ${hexOf(s.endpoint)} is not a valid endpoint address`;
    const type = transferTypeFromProto(s.type);
    if (type === undefined) return `URB ${s.urbId} has transfer type ${s.type}, which is none of control, isochronous, bulk and interrupt`;
    if (epNum === 0) {
      if (type !== TransferType.Control) return `endpoint 0 takes control transfers only`;
      if (!s.setup || s.setup.length !== 8) return `control URB ${s.urbId} needs an 8-byte setup packet`;
    } else {
      const ep = this.handle.info.endpoints.find((e) => e.address === s.endpoint);
      if (!ep) return `device ${this.handle.info.id} has no endpoint ${hexOf(s.endpoint)} in its active configuration`;
      if (ep.type !== type) return `endpoint ${hexOf(s.endpoint)} is ${TransferType[ep.type]}, not ${TransferType[type]}`;
    }
    const outLen = s.data?.length ?? 0;
    if (outLen > this.limits.maxUrbBytes || s.length > this.limits.maxUrbBytes) {
      return `URB ${s.urbId} of ${Math.max(outLen, s.length)} bytes exceeds the limit of ${this.limits.maxUrbBytes}`;
    }
    if (type === TransferType.Isochronous && s.isoPackets.length === 0) return `isochronous URB ${s.urbId} has no packets`;
    return undefined;
  }

  private completed(urbId: number, r: UrbResult): void {
    const f = this.inFlight.get(urbId);
    if (f) this.inFlightBytes -= f.bytes;
    this.inFlight.delete(urbId);
    this.stats.urbsCompleted++;
    if (this.closed) return;
    const data = r.data ?? EMPTY;
    this.out.emit(
      { $case: 'complete', value: { urbId, status: pbStatus(r.status), data, actualLength: r.actualLength, isoPackets: pbIsoPackets(r.isoPackets) } },
      data.length,
    );
    const w = this.slotWaiters.shift();
    if (w) w();
  }

  /** The client cancels a URB; an unknown id already completed: nothing to do. */
  cancel(urbId: number): void {
    const f = this.inFlight.get(urbId);
    if (f) this.handle.cancel(f.backendId);
  }

  // ------------------------------------------------------------ device ops

  async runOp(op: DeviceOp, seq: number): Promise<void> {
    const result: OpResult = { opId: op.opId, status: pbStatus(UrbStatus.Success), value: 0, message: '', interfaces: [], endpoints: [] };
    const withLayout = () => {
      result.interfaces = this.handle.info.interfaces.map(interfaceToProto);
      result.endpoints = this.handle.info.endpoints.map(endpointToProto);
    };
    const o = op.op;
    try {
      switch (o?.$case) {
        case 'setConfiguration':
          await this.stopAllReceivers();
          await this.handle.setConfiguration(o.value.value);
          withLayout();
          break;
        case 'getConfiguration':
          result.value = await this.handle.getConfiguration();
          break;
        case 'setInterface':
          await this.stopReceiversOfInterface(o.value.interfaceNumber);
          await this.handle.setInterface(o.value.interfaceNumber, o.value.alternateSetting);
          withLayout();
          break;
        case 'getInterface':
          result.value = await this.handle.getInterface(o.value.interfaceNumber);
          break;
        case 'clearHalt':
          await this.handle.clearHalt(o.value.endpoint);
          break;
        case 'reset':
          await this.stopAllReceivers();
          await this.handle.reset();
          withLayout();
          break;
        case 'startReceiving':
          this.startReceiving(o.value);
          break;
        case 'stopReceiving':
          await this.receivers.get(o.value.endpoint)?.stop();
          this.receivers.delete(o.value.endpoint);
          break;
        case 'allocBulkStreams':
          result.value = await this.handle.allocBulkStreams(o.value.endpoints, o.value.numStreams);
          break;
        case 'freeBulkStreams':
          await this.handle.freeBulkStreams(o.value.endpoints);
          break;
        default:
          result.status = pbStatus(UrbStatus.Inval);
          result.message = `device op ${op.opId} (seq ${seq}) has no known operation`;
          this.out.error(Status.INVALID_ARGUMENT, result.message, seq);
      }
    } catch (err) {
      result.status = pbStatus(err instanceof UsbError ? err.status : UrbStatus.IoError);
      result.message = (err as Error).message;
      this.log.warn({ op: o?.$case, err: result.message }, 'device op failed');
    }
    this.out.emit({ $case: 'opResult', value: result }, 64);
  }

  // ------------------------------------------------------------ receiving streams

  private startReceiving(s: { endpoint: number; type: number; transferLength: number; transfers: number; isoPacketsPerTransfer: number }): void {
    const hex = `0x${s.endpoint.toString(16)}`;
    const ep = this.handle.info.endpoints.find((e) => e.address === s.endpoint);
    if (!ep || (s.endpoint & 0x80) === 0) throw new UsbError(`device ${this.handle.info.id} has no IN endpoint ${hex}`, UrbStatus.Inval);
    if (ep.type === TransferType.Control) throw new UsbError(`endpoint ${hex} is a control endpoint`, UrbStatus.Inval);
    if (this.receivers.has(s.endpoint)) throw new UsbError(`endpoint ${hex} is already receiving`, UrbStatus.Inval);
    const why = this.handle.unsupported?.({ endpoint: s.endpoint, type: ep.type, streamId: 0 });
    if (why) throw new UsbError(why, UrbStatus.Inval);
    const length = s.transferLength || ep.maxPacketSize;
    const iso = ep.type === TransferType.Isochronous ? Math.max(1, s.isoPacketsPerTransfer || 8) : 0;
    if (length * Math.max(1, iso) > this.limits.maxUrbBytes) throw new UsbError(`receiving transfer size exceeds ${this.limits.maxUrbBytes}`, UrbStatus.Inval);
    const transfers = Math.min(Math.max(1, s.transfers || 3), 32);
    const r = new ReceivingStream(
      this.handle,
      ep.type,
      s.endpoint,
      length,
      transfers,
      iso,
      () => this.nextBackendId++,
      (rd) => this.out.emit({ $case: 'received', value: rd }, rd.data.length),
      () => this.out.journalBytes() > this.limits.receivingPauseBytes,
      () => this.observer,
    );
    this.receivers.set(s.endpoint, r);
    r.start();
  }

  /** The client acknowledged: a submit held by the byte bound and receiving streams paused on a full journal may go on. */
  acked(): void {
    if (this.slotWaiters.length && this.hasSlot()) for (const w of this.slotWaiters.splice(0)) w();
    if (this.out.journalBytes() > this.limits.receivingPauseBytes) return;
    for (const r of this.receivers.values()) r.resumeIfPaused();
  }

  async stopAllReceivers(): Promise<void> {
    const all = [...this.receivers.values()];
    this.receivers.clear();
    await Promise.all(all.map((r) => r.stop()));
  }

  private async stopReceiversOfInterface(iface: number): Promise<void> {
    for (const [addr, r] of this.receivers) {
      const ep = this.handle.info.endpoints.find((e) => e.address === addr);
      if (!ep || ep.interfaceNumber === iface) {
        this.receivers.delete(addr);
        await r.stop();
      }
    }
  }

  /** The device went away: its receiving streams end (their URBs fail anyway). */
  dropReceivers(): void {
    for (const r of this.receivers.values()) void r.stop();
    this.receivers.clear();
  }

  // ------------------------------------------------------------ ending

  /** Cancel everything in flight and wait (at most 2 s) for the backend to complete it. */
  async cancelAll(): Promise<void> {
    const pending = [...this.inFlight.values()];
    if (!pending.length) return;
    const settled = new Promise<void>((resolve) => {
      const check = () => (this.inFlight.size === 0 ? resolve() : setTimeout(check, 5));
      check();
    });
    for (const f of pending) this.handle.cancel(f.backendId);
    await Promise.race([settled, new Promise((r) => setTimeout(r, 2000))]);
  }

  /** From now on completions are dropped; whoever waits for a slot goes on (and is refused). */
  markClosed(): void {
    this.closed = true;
    for (const w of this.slotWaiters.splice(0)) w();
  }
}
