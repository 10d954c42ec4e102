// The receiving streams of a usbredir host: interrupt receiving, bulk receiving and iso streams
// run as receiving streams on the server; each ReceivedData becomes interrupt_packet /
// buffered_bulk_packet / iso_packet(s) with the stream's own id counter. A stall is cleared
// and the stream restarted silently (usbredirhost); other errors are reported, then restarted.
import type { Logger } from '../../common/log.js';
import type { DeviceOp, Device, OpResult, ReceivedData } from '../../gen/usbroam/v1/usbhost.js';
import { TransferType, UrbStatus } from '../../gen/usbroam/v1/usbhost.js';
import { EndpointType, Status, type Packet } from '../../qemu/usbredir/index.js';
import { buildEpInfo, epIndex } from './redir-descriptors.js';

export type StreamKind = 'interrupt' | 'bulk' | 'iso';
export interface StreamState {
  kind: StreamKind;
  endpoint: number;
  /** Next usbredir id for stream data. */
  nextId: bigint;
  /** start parameters, for restarts after a stall. */
  transferLength: number;
  transfers: number;
  isoPacketsPerTransfer: number;
  /** bulk receiving stream id. */
  streamId: number;
  restarting: boolean;
}

/** What the streams need of their usbredir host. */
export interface StreamHost {
  readonly log: Logger;
  readonly id: string;
  readonly dev: Device;
  /** The device is gone (or the host is closed): no stream runs. */
  readonly stopped: boolean;
  send(p: Packet): void;
  runOp(op: DeviceOp['op'], done: (r: OpResult) => void): void;
  /** Output bytes not yet taken by QEMU. */
  backlog(): number;
  close(reason: string): void;
}

const EMPTY = new Uint8Array(0);
export const INTERRUPT_TRANSFER_COUNT = 5;

export class ReceivingStreams {
  private readonly map = new Map<number, StreamState>();

  constructor(
    private readonly host: StreamHost,
    private readonly writeHighWater: number,
    private readonly maxBufferedBytes: number,
  ) {}

  get(endpoint: number): StreamState | undefined {
    return this.map.get(endpoint);
  }
  values(): IterableIterator<StreamState> {
    return this.map.values();
  }
  clear(): void {
    this.map.clear();
  }
  /** Forget the streams on endpoints of `iface` (usbredirhost on set_alt_setting). */
  dropInterface(iface: number): void {
    for (const [addr, st] of this.map) {
      const ep = this.host.dev.endpoints.find((x) => x.address === addr);
      if (ep && ep.interfaceNumber === iface) this.map.delete(st.endpoint);
    }
  }
  /** Streams of a hand-off state. */
  restore(list: readonly StreamState[]): void {
    for (const s of list) this.map.set(s.endpoint, { ...s, restarting: false });
  }

  maxPacketSize(endpoint: number): number {
    return buildEpInfo(this.host.dev).maxPacketSize[epIndex(endpoint)] ?? 0;
  }
  endpointType(endpoint: number): number {
    return buildEpInfo(this.host.dev).epType[epIndex(endpoint)] ?? EndpointType.invalid;
  }

  private sendStatus(kind: StreamKind, id: bigint, endpoint: number, status: number, streamId = 0): void {
    if (kind === 'iso') this.host.send({ type: 'iso_stream_status', id, status, endpoint });
    else if (kind === 'interrupt') this.host.send({ type: 'interrupt_receiving_status', id, status, endpoint });
    else this.host.send({ type: 'bulk_receiving_status', id, status, endpoint, streamId });
  }

  /** start_interrupt_receiving / start_bulk_receiving / start_iso_stream. */
  start(id: bigint, s: Omit<StreamState, 'nextId' | 'restarting'>): void {
    const h = this.host;
    const wantType = s.kind === 'iso' ? EndpointType.iso : s.kind === 'bulk' ? EndpointType.bulk : EndpointType.interrupt;
    if (h.stopped || this.endpointType(s.endpoint) !== wantType || s.transferLength <= 0 || s.transfers < 1) {
      h.log.warn({ attachment: h.id, ep: s.endpoint, kind: s.kind }, 'invalid stream start');
      this.sendStatus(s.kind, id, s.endpoint, Status.stall, s.streamId);
      return;
    }
    if (this.map.has(s.endpoint)) {
      this.sendStatus(s.kind, id, s.endpoint, Status.inval, s.streamId);
      return;
    }
    const st: StreamState = { ...s, nextId: 0n, restarting: false };
    this.map.set(s.endpoint, st);
    h.runOp(startOp(st), (r) => {
      if (r.status !== UrbStatus.URB_STATUS_SUCCESS) {
        if (this.map.get(s.endpoint) === st) this.map.delete(s.endpoint);
        h.log.warn({ attachment: h.id, ep: s.endpoint, err: r.message }, 'start receiving failed');
        this.sendStatus(s.kind, id, s.endpoint, Status.stall, s.streamId);
        return;
      }
      this.sendStatus(s.kind, id, s.endpoint, Status.success, s.streamId);
    });
  }

  /** start_iso_stream on an OUT endpoint: nothing runs on the server; packets are submitted as they come. */
  startIsoOut(id: bigint, endpoint: number, noUrbs: number, pktsPerUrb: number): void {
    if (this.endpointType(endpoint) !== EndpointType.iso || this.host.stopped) {
      this.host.send({ type: 'iso_stream_status', id, status: Status.stall, endpoint });
      return;
    }
    this.map.set(endpoint, { kind: 'iso', endpoint, nextId: 0n, transferLength: this.maxPacketSize(endpoint), transfers: noUrbs, isoPacketsPerTransfer: pktsPerUrb, streamId: 0, restarting: false });
    this.host.send({ type: 'iso_stream_status', id, status: Status.success, endpoint });
  }

  stop(id: bigint, endpoint: number, kind: StreamKind, streamId: number): void {
    if (this.host.stopped) return;
    const st = this.map.get(endpoint);
    this.map.delete(endpoint);
    if (!st || !(endpoint & 0x80)) {
      this.sendStatus(kind, id, endpoint, Status.success, streamId);
      return;
    }
    this.host.runOp({ $case: 'stopReceiving', value: { endpoint } }, () => this.sendStatus(kind, id, endpoint, Status.success, streamId));
  }

  /** Data (or the end) of a receiving stream from the server. */
  onReceived(r: ReceivedData): void {
    const h = this.host;
    if (h.stopped) return;
    const st = this.map.get(r.endpoint);
    if (!st || st.restarting) return; // stopped meanwhile
    const status = r.status as number;
    if (st.kind === 'iso') {
      this.deliverIso(st, r);
      return;
    }
    if (status === Status.stall || (status !== Status.success && status !== Status.cancelled)) {
      // The server ended the stream. usbredirhost clears a stall and restarts silently; other
      // errors are reported in a data packet, then the stream is restarted.
      if (status !== Status.stall) this.sendData(st, status, EMPTY);
      this.restart(st, status === Status.stall);
      return;
    }
    if (status === Status.cancelled) return;
    const backlog = h.backlog();
    if (backlog + r.data.length > this.maxBufferedBytes) {
      h.log.error({ attachment: h.id, ep: r.endpoint, buffered: backlog }, 'QEMU does not read stream data; closing');
      h.close('output buffer limit exceeded');
      return;
    }
    this.sendData(st, status, r.data);
  }

  private sendData(st: StreamState, status: number, data: Uint8Array): void {
    const id = st.nextId++;
    if (st.kind === 'interrupt') this.host.send({ type: 'interrupt_packet', id, endpoint: st.endpoint, status, length: data.length, data });
    else this.host.send({ type: 'buffered_bulk_packet', id, endpoint: st.endpoint, status, streamId: st.streamId, length: data.length, data });
  }

  private deliverIso(st: StreamState, r: ReceivedData): void {
    const drop = this.host.backlog() > this.writeHighWater;
    const pk = r.isoPackets;
    if (pk.length === 0) {
      const id = st.nextId++;
      if (!drop) this.host.send({ type: 'iso_packet', id, endpoint: st.endpoint, status: r.status, length: r.data.length, data: r.data });
      return;
    }
    // Data is either packed (sum of actual lengths) or at fixed offsets (libusb layout).
    const packed = r.data.length === pk.reduce((a, p) => a + p.actualLength, 0);
    let off = 0;
    for (const p of pk) {
      const id = st.nextId++;
      const len = p.status === UrbStatus.URB_STATUS_SUCCESS ? p.actualLength : 0;
      const data = r.data.subarray(off, off + len);
      off += packed ? p.actualLength : p.length;
      if (!drop) this.host.send({ type: 'iso_packet', id, endpoint: st.endpoint, status: p.status, length: data.length, data });
    }
  }

  private restart(st: StreamState, clearHalt: boolean): void {
    const h = this.host;
    st.restarting = true;
    const ep = st.endpoint;
    const fail = () => {
      if (this.map.get(ep) === st) this.map.delete(ep);
      this.sendStatus(st.kind, 0n, ep, Status.stall, st.streamId);
    };
    h.runOp({ $case: 'stopReceiving', value: { endpoint: ep } }, () => {
      const start = () =>
        h.runOp(startOp(st), (r) => {
          if (this.map.get(ep) !== st) return;
          if (r.status !== UrbStatus.URB_STATUS_SUCCESS) return fail();
          st.nextId = 0n;
          st.restarting = false;
        });
      if (this.map.get(ep) !== st) return;
      if (clearHalt) h.runOp({ $case: 'clearHalt', value: { endpoint: ep } }, (r) => (r.status === UrbStatus.URB_STATUS_SUCCESS ? start() : fail()));
      else start();
    });
  }
}

function startOp(st: StreamState): DeviceOp['op'] {
  const type = st.kind === 'iso' ? TransferType.TRANSFER_ISOCHRONOUS : st.kind === 'bulk' ? TransferType.TRANSFER_BULK : TransferType.TRANSFER_INTERRUPT;
  return {
    $case: 'startReceiving',
    value: { endpoint: st.endpoint, type, transferLength: st.transferLength, transfers: st.transfers, isoPacketsPerTransfer: st.isoPacketsPerTransfer },
  };
}
