// The data requests of a usbredir host (usbredirhost's transfers): each control, bulk,
// interrupt OUT and iso OUT packet from QEMU becomes one URB, submitted at once; its completion
// is answered with the same usbredir id. A cancel is answered at once with status cancelled and
// the later completion dropped (QEMU may reuse the id right after the cancel).
import type { Logger } from '../../common/log.js';
import type { Device, DeviceOp, OpResult, UrbComplete } from '../../gen/usbroam/v1/usbhost.js';
import { TransferType, UrbStatus } from '../../gen/usbroam/v1/usbhost.js';
import type { UrbRequest } from '../sdk/remote-device.js';
import { Status, type BulkPacket, type ControlPacket, type InterruptPacket, type IsoPacket as RedirIsoPacket, type Packet } from '../../qemu/usbredir/index.js';

export interface InFlight {
  /** usbredir id of the request. */
  id: bigint;
  kind: 'control' | 'bulk' | 'interrupt' | 'iso';
  endpoint: number;
  cancelled: boolean;
  /** The packet header fields to echo back. */
  pkt: ControlPacket | BulkPacket | InterruptPacket | RedirIsoPacket;
}

/** What the requests need of their usbredir host. */
export interface RequestHost {
  readonly log: Logger;
  readonly id: string;
  /** The device went away: requests fail at once. */
  readonly gone: boolean;
  readonly closed: boolean;
  send(p: Packet): void;
  runOp(op: DeviceOp['op'], done: (r: OpResult) => void): void;
  guard(what: string, fn: () => unknown): void;
  /** An iso OUT stream was started on the endpoint. */
  isoStreamOn(endpoint: number): boolean;
}

/** The device calls the requests make. */
export interface RequestDevice {
  readonly device: Device;
  submit(req: UrbRequest): Promise<UrbComplete>;
  cancel(urbId: number): void;
  peekNextUrbId(): number;
  adopt(urbId: number): Promise<UrbComplete>;
  continueUrbIdsAfter(urbId: number): void;
}

const EMPTY = new Uint8Array(0);

export class DataRequests {
  /** client URB id -> request. */
  private readonly inFlight = new Map<number, InFlight>();
  /** usbredir id -> client URB id, for cancel (only requests not cancelled yet). */
  private readonly byRedirId = new Map<bigint, number>();
  /** Our prediction of the URB id the next device.submit gets (see redir-host.ts). */
  private nextUrbId: number;
  submitted = 0;
  completed = 0;
  cancelled = 0;

  constructor(
    private readonly h: RequestHost,
    private readonly dev: RequestDevice,
    private readonly o: {
      exported: () => boolean;
      flow: () => void;
      /** A bulk or control request was answered (control under endpoint 0). */
      bulkAnswered?: (urbId: number, id: bigint, endpoint: number, streamId: number) => void;
    },
  ) {
    this.nextUrbId = dev.peekNextUrbId();
  }

  get size(): number {
    return this.inFlight.size;
  }
  /** client URB id -> request. */
  requests(): ReadonlyMap<number, InFlight> {
    return this.inFlight;
  }

  onControl(p: ControlPacket): void {
    const reply = (status: number, data: Uint8Array = EMPTY, length = data.length) => this.h.send({ ...p, status, length, data: p.endpoint & 0x80 ? data : EMPTY });
    if (this.h.gone) return reply(Status.ioerror);
    if ((p.endpoint & 0x0f) !== 0) {
      this.h.log.warn({ attachment: this.h.id, ep: p.endpoint }, 'control packet on a non-control endpoint');
      return reply(Status.inval);
    }
    // CLEAR_FEATURE(ENDPOINT_HALT): a real clear halt, so the host stack knows (usbredirhost).
    if (p.requesttype === 0x02 && p.request === 0x01 && p.value === 0 && p.data.length === 0) {
      const ep = p.index & 0xff;
      this.h.runOp({ $case: 'clearHalt', value: { endpoint: ep } }, (r) => reply(r.status));
      return;
    }
    const setup = new Uint8Array(8);
    setup[0] = p.requesttype;
    setup[1] = p.request;
    setup[2] = p.value & 0xff;
    setup[3] = p.value >> 8;
    setup[4] = p.index & 0xff;
    setup[5] = p.index >> 8;
    setup[6] = p.length & 0xff;
    setup[7] = p.length >> 8;
    const isIn = (p.endpoint & 0x80) !== 0;
    this.submit(p, 'control', { endpoint: p.endpoint, type: TransferType.TRANSFER_CONTROL, setup, data: isIn ? EMPTY : p.data, length: p.length });
  }

  onBulk(p: BulkPacket): void {
    if (this.h.gone) return this.h.send({ ...p, status: Status.ioerror, length: 0, data: EMPTY });
    const isIn = (p.endpoint & 0x80) !== 0;
    this.submit(p, 'bulk', {
      endpoint: p.endpoint,
      type: TransferType.TRANSFER_BULK,
      data: isIn ? EMPTY : p.data,
      length: isIn ? p.length : p.data.length,
      streamId: p.streamId,
    });
  }

  onInterruptOut(p: InterruptPacket): void {
    // The parser only lets OUT interrupt packets through (IN data comes by interrupt receiving).
    if (this.h.gone) return this.h.send({ ...p, status: Status.ioerror, length: 0, data: EMPTY });
    this.submit(p, 'interrupt', { endpoint: p.endpoint, type: TransferType.TRANSFER_INTERRUPT, data: p.data, length: p.data.length });
  }

  onIsoOut(p: RedirIsoPacket): void {
    // iso OUT: submit each packet as a one-packet iso URB; errors go back as iso_stream_status.
    if (this.h.gone) return;
    if (!this.h.isoStreamOn(p.endpoint)) {
      this.h.send({ type: 'iso_stream_status', id: p.id, status: Status.inval, endpoint: p.endpoint });
      return;
    }
    this.submit(p, 'iso', {
      endpoint: p.endpoint,
      type: TransferType.TRANSFER_ISOCHRONOUS,
      data: p.data,
      length: p.data.length,
      isoPackets: [{ length: p.data.length, status: UrbStatus.URB_STATUS_SUCCESS, actualLength: 0 }],
    });
  }

  private submit(pkt: InFlight['pkt'], kind: InFlight['kind'], req: UrbRequest): void {
    const urbId = this.nextUrbId++;
    const entry: InFlight = { id: pkt.id, kind, endpoint: pkt.endpoint, cancelled: false, pkt };
    this.inFlight.set(urbId, entry);
    if (kind !== 'iso') this.byRedirId.set(pkt.id, urbId);
    this.submitted++;
    let promise: Promise<UrbComplete>;
    try {
      promise = this.dev.submit(req);
    } catch (err) {
      promise = Promise.reject(err);
    }
    this.await(urbId, promise);
  }

  private await(urbId: number, promise: Promise<UrbComplete>): void {
    promise.then(
      (c) => this.h.guard('completion', () => this.onComplete(urbId, c)),
      (err: Error) => this.h.guard('completion', () => this.onSubmitFailed(urbId, err)),
    );
  }

  private onComplete(urbId: number, c: UrbComplete): void {
    if (c.urbId !== urbId) {
      // The SDK assigned a different id than predicted: cancel-by-id would be wrong.
      this.h.log.error({ attachment: this.h.id, predicted: urbId, actual: c.urbId }, 'URB id prediction failed');
    }
    if (this.o.exported()) return;
    const e = this.inFlight.get(urbId);
    if (!e) return;
    this.inFlight.delete(urbId);
    this.completed++;
    if (this.byRedirId.get(e.id) === urbId) this.byRedirId.delete(e.id);
    if (e.cancelled || this.h.closed) {
      this.o.flow();
      return;
    }
    this.reply(e, c.status, c.data, c.actualLength);
    if (e.kind === 'bulk' || e.kind === 'control') this.o.bulkAnswered?.(urbId, e.id, e.kind === 'control' ? 0 : e.endpoint, streamIdOf(e));
    this.o.flow();
  }

  private onSubmitFailed(urbId: number, err: Error): void {
    if (this.o.exported()) return;
    const e = this.inFlight.get(urbId);
    if (!e) return;
    this.inFlight.delete(urbId);
    if (this.byRedirId.get(e.id) === urbId) this.byRedirId.delete(e.id);
    if (e.cancelled || this.h.closed) return;
    this.h.log.debug({ attachment: this.h.id, err: err.message }, 'URB failed on the channel');
    this.reply(e, Status.ioerror, EMPTY, 0);
    if (e.kind === 'bulk' || e.kind === 'control') this.o.bulkAnswered?.(urbId, e.id, e.kind === 'control' ? 0 : e.endpoint, streamIdOf(e));
  }

  /** Answer a data packet (usbredirhost *_packet_complete). */
  private reply(e: InFlight, status: number, data: Uint8Array, actual: number): void {
    const isIn = (e.endpoint & 0x80) !== 0;
    switch (e.kind) {
      case 'control': {
        const p = e.pkt as ControlPacket;
        const d = isIn ? (data.length > actual ? data.subarray(0, actual) : data) : EMPTY;
        this.h.send({ ...p, status, length: isIn ? d.length : actual, data: d });
        return;
      }
      case 'bulk': {
        const p = e.pkt as BulkPacket;
        const d = isIn ? (data.length > actual ? data.subarray(0, actual) : data) : EMPTY;
        this.h.send({ ...p, status, length: isIn ? d.length : actual, data: d });
        return;
      }
      case 'interrupt': {
        const p = e.pkt as InterruptPacket;
        this.h.send({ ...p, status, length: actual, data: EMPTY });
        return;
      }
      case 'iso':
        if (status !== Status.success) {
          this.h.send({ type: 'iso_stream_status', id: e.id, status, endpoint: e.endpoint });
        }
        return;
    }
  }

  onCancel(id: bigint): void {
    const urbId = this.byRedirId.get(id);
    if (urbId === undefined) {
      this.h.log.debug({ attachment: this.h.id, id: id.toString() }, 'cancel for an unknown (completed) packet');
      return;
    }
    this.byRedirId.delete(id);
    const e = this.inFlight.get(urbId);
    if (!e || e.cancelled) return;
    this.cancelEntry(urbId, e);
  }

  /** usbredirhost_cancel_data_packet: answer "cancelled" now, drop the later completion. */
  private cancelEntry(urbId: number, e: InFlight): void {
    e.cancelled = true;
    this.cancelled++;
    const p = e.pkt;
    if (p.type === 'control_packet') this.h.send({ ...p, status: Status.cancelled, length: 0, data: EMPTY });
    else if (p.type === 'bulk_packet') this.h.send({ ...p, status: Status.cancelled, length: 0, data: EMPTY });
    else if (p.type === 'interrupt_packet') this.h.send({ ...p, status: Status.cancelled, length: 0, data: EMPTY });
    try {
      this.dev.cancel(urbId);
    } catch {
      /* channel closed or handed off */
    }
  }

  cancelAll(): void {
    for (const [urbId, e] of this.inFlight) {
      if (e.cancelled) continue;
      if (this.byRedirId.get(e.id) === urbId) this.byRedirId.delete(e.id);
      this.cancelEntry(urbId, e);
    }
  }


  /** usbredirhost_cancel_pending_urbs_on_interface */
  cancelOnInterface(iface: number): void {
    for (const [urbId, e] of this.inFlight) {
      if (e.cancelled || (e.endpoint & 0x0f) === 0) continue;
      const ep = this.dev.device.endpoints.find((x) => x.address === e.endpoint);
      if (ep && ep.interfaceNumber === iface) this.cancelEntry(urbId, e);
    }
  }

  snapshot(): { inFlight: [number, InFlight][]; byRedirId: [bigint, number][] } {
    return { inFlight: [...this.inFlight], byRedirId: [...this.byRedirId] };
  }

  /** Hand-off destination: the source's requests in flight; their completions come to this session. */
  restore(inFlight: readonly [number, InFlight][], byRedirId: readonly [bigint, number][], lastUrbId: number): void {
    this.dev.continueUrbIdsAfter(lastUrbId);
    for (const [urbId, e] of inFlight) {
      e.pkt = { ...e.pkt, data: EMPTY } as InFlight['pkt'];
      this.inFlight.set(urbId, e);
      this.await(urbId, this.dev.adopt(urbId));
    }
    for (const [id, urbId] of byRedirId) this.byRedirId.set(id, urbId);
    this.nextUrbId = this.dev.peekNextUrbId();
  }
}

/** The bulk stream id of a request (0: none, or not bulk). */
function streamIdOf(e: InFlight): number {
  return e.kind === 'bulk' ? ((e.pkt as BulkPacket).streamId ?? 0) : 0;
}
