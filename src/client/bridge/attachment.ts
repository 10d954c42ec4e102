// Attachment: one QEMU usb-redir chardev <-> usbredir device side <-> one URB channel session.
//
// We are the usbredir "usb-host" (spice-usbredir's usbredirhost.c): QEMU's usb-redir device is
// the "usb-guest". QEMU sends requests (control/bulk/interrupt/iso data packets, configuration,
// alt setting, reset, stream start/stop, cancel); we turn each into a URB or a device op on the
// RemoteDevice and send the answer back. Behaviour follows usbredirhost.c closely:
//   - hello with all 8 caps at start; on QEMU's hello: interface_info, ep_info, device_connect;
//   - data packets: one URB each, submitted at once (many in flight, no per-packet await);
//     the completion is answered with the same id (length = actual, data for IN);
//   - cancel_data_packet: answered AT ONCE with status cancelled (length 0), the URB is cancelled
//     and its later completion dropped (QEMU may reuse the id right after the cancel);
//   - a CLEAR_FEATURE(ENDPOINT_HALT) control request becomes a clearHalt op;
//   - set_configuration / set_alt_setting: op, then interface_info + ep_info, then the status;
//   - reset: cancel pending URBs (guest told "cancelled"), reset op, no reply;
//   - interrupt receiving, bulk receiving, iso streams: receiving streams on the server; each
//     ReceivedData becomes interrupt_packet / buffered_bulk_packet / iso_packet(s) with the
//     stream's own id counter; a stall is cleared and the stream restarted silently;
//   - iso OUT: every iso_packet is submitted as a one-packet iso URB (errors -> iso_stream_status);
//   - device gone: device_disconnect, then (with device_disconnect_ack) close after QEMU's ack.
//
// Ordering: URB submits and ops are sent on the channel in the order QEMU sent the packets (the
// server runs frames in order). RemoteDevice.submit assigns its URB id after a microtask, so ops
// (which are sent synchronously) wait one macrotask turn before being sent.
//
// Byte accounting for a later live-migration hand-off: every byte read from QEMU is pushed into
// the parser, so bytesFromQemu == parser.bytesConsumed + parser.pendingPartial exactly; every
// byte we write is counted in bytesToQemu (socket.bytesWritten tells what reached the kernel).
import { EventEmitter } from 'node:events';
import type { Socket } from 'node:net';
import type { Logger } from '../../common/log.js';
import type { OpResult, ReceivedData, UrbComplete } from '../../gen/usbroam/v1/usbhost.js';
import { Device, TransferType, UrbStatus } from '../../gen/usbroam/v1/usbhost.js';
import type { RemoteDevice, UrbRequest } from '../sdk/remote-device.js';
import { unreadByPeer, warmUpUnixQueues } from './unix-socket-queue.js';
import {
  ALL_CAPS,
  Cap,
  EndpointType,
  Speed as RedirSpeed,
  Status,
  UsbredirParser,
  UsbredirProtocolError,
  checkDevice,
  parseFilterRules,
  type BulkPacket,
  type ControlPacket,
  type FilterDeviceInfo,
  type InterruptPacket,
  type IsoPacket as RedirIsoPacket,
  type Packet,
} from '../../qemu/usbredir/index.js';

export type AttachmentState = 'starting' | 'connected' | 'disconnecting' | 'closed';

export interface AttachmentOptions {
  /** The open URB channel session. */
  device: RemoteDevice;
  /** A connected duplex socket to QEMU's usb-redir chardev. */
  socket: Socket;
  /** A logger carrying vm and device fields. */
  log: Logger;
  /** Identifier (for logs and the bridge's list). Default: `usbroam-<device id>`. */
  id?: string;
  /** Our usbredir caps. Default: all 8 (0xff). */
  caps?: readonly number[];
  /** Close the RemoteDevice session when the attachment closes. Default true. */
  ownsDevice?: boolean;
  /**
   * Stop reading from QEMU while this many bytes wait in the socket's write buffer (new requests
   * make new completions), resume on 'drain'. Default 8 MiB.
   */
  writeHighWater?: number;
  /**
   * Hard bound of buffered output: stream data (interrupt/bulk receiving) that would exceed it
   * closes the attachment; iso data is dropped above writeHighWater (like usbredirhost). Default 256 MiB.
   */
  maxBufferedBytes?: number;
  /** Stop reading from QEMU while this many URBs are in flight. Default 4096. */
  maxInFlight?: number;
  /** How long to wait for QEMU's device_disconnect_ack. Default 5000 ms. */
  disconnectAckTimeoutMs?: number;
  /**
   * Migration destination (issue 4): start without a hello exchange, QEMU's caps known. Not
   * used yet beyond passing it to the parser.
   */
  noHello?: { peerCaps: readonly number[] };
}

/** What the source bridge learnt at a hand-off (for logs, tests and benchmarks). */
export interface HandOffInfo {
  /** Bytes we wrote that QEMU had not read (re-sent by the destination), incl. held ones. */
  toQemuBytes: number;
  /** Of those, bytes written to the socket (the rest were held after the freeze). */
  unreadInSocket: number;
  /** Partial guest->host packet bytes. */
  fromQemuPartial: number;
  inFlight: number;
  stateBytes: number;
  /** ms spent measuring the socket queues (ss). */
  measureMs: number;
  /**
   * The measurement was taken while QEMU was paused before its device state was saved
   * ('pre-switchover', see freeze()): exact. False: measured after 'completed' (QEMU may have
   * read a last chunk after saving its state; see freeze()).
   */
  frozenBeforeSave: boolean;
  /** ms from freeze() to its measurement (added to the migration downtime). 0 without freeze. */
  freezeBeforeSaveMs: number;
  /** ms from handOff() to the state being sent. */
  freezeMs: number;
  /** ms from handOff() to the server's confirmation. */
  totalMs: number;
}

/** Thrown when the session stays with the source (no standby, or the hand-off failed). */
export class HandOffRefusedError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'HandOffRefusedError';
  }
}

/** Version 1 of the state handed from the source bridge to the destination bridge. */
interface HandOffStateV1 {
  v: 1;
  id: string;
  ourCaps: number[];
  peerCaps: number[];
  /** base64: host->guest bytes QEMU has not consumed, to be written verbatim first. */
  toQemu: string;
  /** base64: the guest->host bytes of the packet in progress. */
  fromQemuPartial: string;
  /** [urbId, entry] with bigints as strings and packet data stripped. */
  inFlight: [number, unknown][];
  byRedirId: [string, number][];
  streams: unknown[];
  activeConfiguration: number;
  connectSent: boolean;
  deviceGone: boolean;
  state: AttachmentState;
  /** The highest URB id the source used. */
  lastUrbId: number;
  /** base64 of usbroam.v1.Device. */
  device: string;
  positions: { bytesFromQemu: number; bytesToQemu: number; consumedByQemu: number };
}

/** Most bytes the kernel can hold in an AF_UNIX stream socket (net.core.wmem_max default 4 MiB). */
const KERNEL_RETAIN = 4 * 1024 * 1024;
/** Bound of the hand-off state (the URB channel's message limit is 64 MiB). */
const MAX_STATE_BYTES = 48 * 1024 * 1024;

function jsonReplacer(_k: string, v: unknown): unknown {
  if (typeof v === 'bigint') return { $big: v.toString() };
  if (v instanceof Uint8Array) return undefined;
  return v;
}
function jsonReviver(_k: string, v: unknown): unknown {
  if (v && typeof v === 'object' && '$big' in (v as object) && Object.keys(v as object).length === 1) return BigInt((v as { $big: string }).$big);
  return v;
}

export interface AttachmentStats {
  bytesFromQemu: number;
  bytesToQemu: number;
  packetsFromQemu: number;
  packetsToQemu: number;
  urbsSubmitted: number;
  urbsCompleted: number;
  urbsCancelled: number;
  inFlight: number;
}

/** Why an attachment closed. */
export interface AttachmentCloseInfo {
  reason: string;
  error?: Error;
}

interface InFlight {
  /** usbredir id of the request. */
  id: bigint;
  kind: 'control' | 'bulk' | 'interrupt' | 'iso';
  endpoint: number;
  cancelled: boolean;
  /** The packet header fields to echo back. */
  pkt: ControlPacket | BulkPacket | InterruptPacket | RedirIsoPacket;
}

type StreamKind = 'interrupt' | 'bulk' | 'iso';
interface StreamState {
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

const EMPTY = new Uint8Array(0);
const INTERRUPT_TRANSFER_COUNT = 5;

/** usbredir endpoint index: OUT eps 0-15, IN eps 16-31. */
export function epIndex(address: number): number {
  return ((address & 0x80) >> 3) | (address & 0x0f);
}

/** proto Speed -> usbredir speed. */
export function redirSpeed(speed: number): number {
  switch (speed) {
    case 1:
      return RedirSpeed.low;
    case 2:
      return RedirSpeed.full;
    case 3:
      return RedirSpeed.high;
    case 4:
    case 5:
      return RedirSpeed.super;
    default:
      return RedirSpeed.unknown;
  }
}

/** What QEMU gets as ep_info for a device (usbredirhost_parse_config / _parse_interface). */
export function buildEpInfo(dev: Device): { epType: number[]; interval: number[]; interface: number[]; maxPacketSize: number[]; maxStreams: number[] } {
  const epType = new Array<number>(32).fill(EndpointType.invalid);
  const interval = new Array<number>(32).fill(0);
  const iface = new Array<number>(32).fill(0);
  const maxPacketSize = new Array<number>(32).fill(0);
  const maxStreams = new Array<number>(32).fill(0);
  epType[0] = EndpointType.control;
  epType[16] = EndpointType.control;
  const high = dev.speed === 3;
  for (const e of dev.endpoints) {
    const i = epIndex(e.address);
    if ((e.address & 0x0f) === 0) continue;
    epType[i] = e.type as number;
    interval[i] = e.interval & 0xff;
    iface[i] = e.interfaceNumber & 0xff;
    const raw = e.maxPacketSize;
    let mps = raw & 0x7ff;
    if (high && e.type === TransferType.TRANSFER_ISOCHRONOUS) mps *= 1 + ((raw >> 11) & 3);
    maxPacketSize[i] = mps;
    maxStreams[i] = e.type === TransferType.TRANSFER_BULK ? e.maxStreams : 0;
  }
  return { epType, interval, interface: iface, maxPacketSize, maxStreams };
}

/** What QEMU gets as interface_info. */
export function buildInterfaceInfo(dev: Device): { interfaceCount: number; interface: number[]; interfaceClass: number[]; interfaceSubclass: number[]; interfaceProtocol: number[] } {
  const list = dev.interfaces.slice(0, 32);
  return {
    interfaceCount: list.length,
    interface: list.map((i) => i.number & 0xff),
    interfaceClass: list.map((i) => i.interfaceClass & 0xff),
    interfaceSubclass: list.map((i) => i.interfaceSubclass & 0xff),
    interfaceProtocol: list.map((i) => i.interfaceProtocol & 0xff),
  };
}

/** Interfaces to check a filter against: the active ones, or (unconfigured) the first configuration's. */
function filterInterfaces(dev: Device): Device['interfaces'] {
  if (dev.interfaces.length) return dev.interfaces;
  const c = dev.configurations.find((x) => x.value === 1) ?? dev.configurations[0];
  return c ? c.interfaces.filter((i) => i.alternateSetting === 0) : [];
}

export function filterInfoOf(dev: Device): FilterDeviceInfo {
  return {
    class: dev.deviceClass,
    subclass: dev.deviceSubclass,
    protocol: dev.deviceProtocol,
    vendorId: dev.vendorId,
    productId: dev.productId,
    bcdDevice: dev.bcdDevice,
    interfaces: filterInterfaces(dev).map((i) => ({ class: i.interfaceClass, subclass: i.interfaceSubclass, protocol: i.interfaceProtocol })),
  };
}

/**
 * Events: 'connected' (device_connect sent), 'closed' (AttachmentCloseInfo),
 * 'deviceGone' (reason), 'rejected' (QEMU sent filter_reject or its filter denies the device).
 */
export class Attachment extends EventEmitter {
  readonly id: string;
  readonly device: RemoteDevice;
  readonly socket: Socket;
  readonly parser: UsbredirParser;
  private readonly log: Logger;
  private readonly ownsDevice: boolean;
  private readonly writeHighWater: number;
  private readonly maxBufferedBytes: number;
  private readonly maxInFlightUrbs: number;
  private readonly ackTimeoutMs: number;

  private _state: AttachmentState = 'starting';
  private closeInfo?: AttachmentCloseInfo;
  private closedPromise: Promise<AttachmentCloseInfo>;
  private resolveClosed!: (i: AttachmentCloseInfo) => void;

  // --- accounting ---
  private _bytesFromQemu = 0;
  private _bytesToQemu = 0;
  private packetsIn = 0;
  private packetsOut = 0;
  private urbsSubmitted = 0;
  private urbsCompleted = 0;
  private urbsCancelled = 0;

  // --- request state ---
  /** client URB id -> request. */
  private readonly inFlight = new Map<number, InFlight>();
  /** usbredir id -> client URB id, for cancel (only requests not cancelled yet). */
  private readonly byRedirId = new Map<bigint, number>();
  /** Our prediction of the URB id the next device.submit gets (see header comment). */
  private nextUrbId: number;
  private readonly streams = new Map<number, StreamState>();
  /** The packets read but not yet dispatched (dispatch pauses while an op is being queued). */
  private readonly queue: Packet[] = [];
  private dispatching = false;
  private activeConfiguration: number;
  private connectSent = false;
  private connectScheduled = false;
  private deviceGone = false;
  private waitingAck = false;
  private ackTimer?: NodeJS.Timeout;

  // --- write batching / backpressure ---
  private corked = false;
  private readPaused = false;

  // --- live-migration hand-off ---
  /** The last bytes written to the socket (at least what QEMU may not have read). */
  private readonly sentRing: Uint8Array[] = [];
  private sentRingBytes = 0;
  /** While freezing for a hand-off: output is held here instead of written. */
  private held: Uint8Array[] | null = null;
  /** Read everything QEMU wrote, whatever the backpressure (hand-off in progress). */
  private draining = false;
  /** The hand-off state was built: nothing here answers QEMU any more. */
  private exported = false;
  /** Ops sent and not answered yet. */
  private pendingOps = 0;
  /** State to resume from (destination of a hand-off). */
  private imported?: HandOffStateV1;
  /** freeze() measured QEMU's position while it was paused before saving its state. */
  private frozen?: { unread: number; measureMs: number; tookMs: number };
  /**
   * Bulk completions written to QEMU, per endpoint, oldest first: {usbredir id, URB id, our
   * output offset after it}. With the requests in flight this tells which TDs QEMU still has in
   * flight at a switchover (see xhci-dequeue.ts). Entries surely read by QEMU are dropped.
   */
  private readonly bulkAnswered = new Map<number, { id: bigint; urbId: number; end: number }[]>();
  /** Per endpoint: the highest URB id of the entries dropped from bulkAnswered. */
  private readonly bulkAnsweredDropped = new Map<number, number>();
  private freezing?: Promise<{ unread: number; measureMs: number; tookMs: number }>;
  /** The last packets in and out (type:id, for the hand-off logs). */
  private readonly trail: string[] = [];
  /** Destination of a hand-off, debug level: the first packets after it. */
  private firstTrail?: string[];
  private readonly trailOn: boolean;
  private trailNote(dir: '<' | '>', p: Packet): void {
    if (!this.trailOn) return;
    const id = (p as { id?: bigint }).id;
    const ep = (p as { endpoint?: number }).endpoint;
    const st = (p as { status?: number }).status;
    const len = (p as { length?: number }).length;
    const entry = `${(performance.now() % 1e6).toFixed(1)}${dir}${p.type}:${id ?? ''}${ep !== undefined ? `@${ep.toString(16)}` : ''}${st !== undefined && dir === '>' ? `/s${st}` : ''}${len !== undefined ? `/${len}` : ''}`;
    this.trail.push(entry);
    if (this.trail.length > 64) this.trail.shift();
    if (this.firstTrail && this.firstTrail.length < 64) this.firstTrail.push(entry);
  }

  private readonly onDataBound = (chunk: Buffer) => this.onData(chunk);
  private readonly onReceivedBound = (r: ReceivedData) => this.guard('received', () => this.onReceived(r));
  private readonly onDeviceGoneBound = (reason: string) => this.guard('deviceGone', () => this.onDeviceGone(String(reason ?? 'device gone')));
  /** The server's channel errors (e.g. UNIMPLEMENTED for iso on a backend without it): logged with this attachment. */
  private readonly onChannelErrorBound = (e: { code: number; message: string; clientSeq: number }) =>
    this.log.warn({ attachment: this.id, device: this.device.device?.id, session: this.device.sessionId, code: e.code, clientSeq: e.clientSeq, err: e.message }, 'URB channel error from the server');
  private readonly onDeviceClosedBound = (err?: Error) =>
    this.guard('closed', () => this.onDeviceGone(`URB channel closed${err ? `: ${err.message}` : ''}`));

  constructor(opts: AttachmentOptions) {
    super();
    this.device = opts.device;
    this.socket = opts.socket;
    this.log = opts.log;
    this.trailOn = opts.log.isLevelEnabled?.('debug') ?? false;
    this.id = opts.id ?? `usbroam-${opts.device.device?.id ?? 'device'}`;
    this.ownsDevice = opts.ownsDevice ?? true;
    this.writeHighWater = opts.writeHighWater ?? 8 * 1024 * 1024;
    this.maxBufferedBytes = opts.maxBufferedBytes ?? 256 * 1024 * 1024;
    this.maxInFlightUrbs = opts.maxInFlight ?? 4096;
    this.ackTimeoutMs = opts.disconnectAckTimeoutMs ?? 5000;
    this.parser = new UsbredirParser({ role: 'device', caps: opts.caps ?? ALL_CAPS, version: 'usbroam bridge', noHello: opts.noHello });
    this.nextUrbId = this.device.peekNextUrbId();
    this.activeConfiguration = this.device.device?.activeConfiguration ?? 0;
    this.closedPromise = new Promise((r) => (this.resolveClosed = r));
  }

  get state(): AttachmentState {
    return this._state;
  }
  /** Exact count of bytes read from QEMU (complete packets + the partial one in the parser). */
  get bytesFromQemu(): number {
    return this._bytesFromQemu;
  }
  /** Bytes handed to the socket for QEMU. */
  get bytesToQemu(): number {
    return this._bytesToQemu;
  }
  get stats(): AttachmentStats {
    return {
      bytesFromQemu: this._bytesFromQemu,
      bytesToQemu: this._bytesToQemu,
      packetsFromQemu: this.packetsIn,
      packetsToQemu: this.packetsOut,
      urbsSubmitted: this.urbsSubmitted,
      urbsCompleted: this.urbsCompleted,
      urbsCancelled: this.urbsCancelled,
      inFlight: this.inFlight.size,
    };
  }
  /** Resolves once the attachment is closed. */
  get closed(): Promise<AttachmentCloseInfo> {
    return this.closedPromise;
  }

  /** Start speaking usbredir: send our hello, read QEMU. */
  start(): this {
    const s = this.socket;
    s.setNoDelay?.(true);
    s.on('data', this.onDataBound);
    s.resume(); // also when paused before (a migration destination's socket waits paused)
    warmUpUnixQueues(); // the first measurement would otherwise load koffi inside a downtime
    s.on('drain', () => this.onDrain());
    s.on('end', () => this.guard('end', () => void this.close('QEMU closed the chardev')));
    s.on('close', () => this.guard('close', () => void this.close('chardev socket closed')));
    s.on('error', (err) => this.guard('socket error', () => void this.close('chardev socket error', err)));
    this.device.on('received', this.onReceivedBound);
    this.device.on('deviceGone', this.onDeviceGoneBound);
    this.device.on('closed', this.onDeviceClosedBound);
    this.device.on('channelError', this.onChannelErrorBound);
    if (this.imported) this.resumeImported(this.imported);
    else if (!this.parser.noHello) this.send(this.parser.helloPacket());
    else this.scheduleDeviceConnect();
    this.log.info({ attachment: this.id, resumed: !!this.imported }, 'usbredir attachment started');
    return this;
  }

  // ------------------------------------------------------------------ input from QEMU

  private onData(chunk: Buffer): void {
    if (this._state === 'closed') return;
    this._bytesFromQemu += chunk.length;
    let packets: Packet[];
    try {
      packets = this.parser.push(chunk);
    } catch (err) {
      if (err instanceof UsbredirProtocolError) {
        for (const p of err.packets) this.queue.push(p);
        this.dispatch();
        this.log.warn({ attachment: this.id, code: err.code, err: err.message, streamOffset: err.streamOffset }, 'malformed usbredir from QEMU; closing this attachment');
        void this.close(`malformed usbredir from QEMU: ${err.message}`, err);
        return;
      }
      this.log.error({ attachment: this.id, err: (err as Error)?.message }, 'usbredir parser failed');
      void this.close('usbredir parser failed', err as Error);
      return;
    }
    this.packetsIn += packets.length;
    for (const p of packets) {
      this.trailNote('<', p);
      this.queue.push(p);
    }
    this.dispatch();
  }

  /** Handle queued packets in order; pauses at ops (see header comment). */
  private dispatch(): void {
    if (this.dispatching) return;
    this.dispatching = true;
    try {
      while (this.queue.length && this._state !== 'closed') {
        const p = this.queue[0]!;
        if (isOp(p)) {
          // Let URB submits issued so far get their ids and reach the channel first.
          this.queue.shift();
          setImmediate(() => {
            this.guard(p.type, () => this.handleOp(p));
            this.dispatching = false;
            this.dispatch();
          });
          return;
        }
        this.queue.shift();
        this.handle(p);
      }
    } catch (err) {
      this.log.error({ attachment: this.id, err: (err as Error)?.message, stack: (err as Error)?.stack }, 'error handling a usbredir packet; closing');
      void this.close('internal error handling a usbredir packet', err as Error);
    }
    this.dispatching = false;
    this.updateReadFlow();
  }

  private handle(p: Packet): void {
    switch (p.type) {
      case 'hello':
        this.log.info({ attachment: this.id, peer: p.version, caps: this.parser.peerCaps }, 'QEMU hello');
        for (const cap of [Cap.ep_info_max_packet_size, Cap['32bits_bulk_length'], Cap['64bits_ids']] as const) {
          if (!this.parser.peerHasCap(cap)) this.log.warn({ attachment: this.id, cap }, 'QEMU lacks a capability xHCI needs');
        }
        this.scheduleDeviceConnect();
        return;
      case 'control_packet':
        return this.onControl(p);
      case 'bulk_packet':
        return this.onBulk(p);
      case 'interrupt_packet':
        return this.onInterruptOut(p);
      case 'iso_packet':
        return this.onIsoOut(p);
      case 'cancel_data_packet':
        return this.onCancel(p.id);
      case 'filter_filter':
        return this.onFilter(p.rules);
      case 'filter_reject':
        this.log.warn({ attachment: this.id }, 'QEMU rejected the device (filter_reject)');
        this.emit('rejected', 'filter_reject from QEMU');
        void this.close('device rejected by the VM (filter_reject)');
        return;
      case 'device_disconnect_ack':
        return this.onDisconnectAck();
      default:
        this.log.warn({ attachment: this.id, type: p.type }, 'unexpected usbredir packet from QEMU; ignored');
    }
  }

  // ------------------------------------------------------------------ connect / disconnect

  private scheduleDeviceConnect(): void {
    if (this.connectSent || this.connectScheduled) return;
    this.connectScheduled = true;
    // A filter_filter in the same read should be seen before we connect.
    setImmediate(() => {
      this.connectScheduled = false;
      this.guard('device_connect', () => this.sendDeviceConnect());
    });
  }

  private sendDeviceConnect(): void {
    if (this._state !== 'starting' || this.connectSent || this.deviceGone || this.waitingAck) return;
    const dev = this.device.device;
    this.sendInterfaceAndEpInfo();
    this.send({
      type: 'device_connect',
      id: 0n,
      speed: redirSpeed(dev.speed),
      deviceClass: dev.deviceClass & 0xff,
      deviceSubclass: dev.deviceSubclass & 0xff,
      deviceProtocol: dev.deviceProtocol & 0xff,
      vendorId: dev.vendorId & 0xffff,
      productId: dev.productId & 0xffff,
      deviceVersionBcd: dev.bcdDevice & 0xffff,
    });
    this.connectSent = true;
    this._state = 'connected';
    this.log.info({ attachment: this.id, vidPid: `${hex4(dev.vendorId)}:${hex4(dev.productId)}`, speed: redirSpeed(dev.speed) }, 'device connected to QEMU');
    this.emit('connected');
  }

  private sendInterfaceAndEpInfo(): void {
    const dev = this.device.device;
    this.send({ type: 'interface_info', id: 0n, ...buildInterfaceInfo(dev) });
    this.send({ type: 'ep_info', id: 0n, ...buildEpInfo(dev) });
  }

  private onFilter(rules: string): void {
    let verdict;
    try {
      verdict = checkDevice(parseFilterRules(rules), filterInfoOf(this.device.device));
    } catch (err) {
      this.log.warn({ attachment: this.id, rules, err: (err as Error).message }, 'invalid usbredir filter from QEMU; ignored');
      return;
    }
    if (verdict.allowed) {
      this.log.info({ attachment: this.id, rules }, 'device passes the VM filter');
      return;
    }
    // filter_reject goes from QEMU to us only; the device side answers a failed filter by
    // not connecting (or disconnecting) and closing.
    this.log.warn({ attachment: this.id, rules, verdict }, 'device does not pass the VM filter; closing');
    this.emit('rejected', 'device does not pass the VM usbredir filter');
    if (this.connectSent) {
      this.beginDisconnect('device does not pass the VM usbredir filter');
    } else {
      this.deviceGone = true;
      void this.close('device does not pass the VM usbredir filter');
    }
  }

  private onDeviceGone(reason: string): void {
    if (this.deviceGone || this._state === 'closed' || this.exported) return;
    this.deviceGone = true;
    this.log.warn({ attachment: this.id, reason }, 'device gone; disconnecting it from QEMU');
    this.emit('deviceGone', reason);
    if (!this.connectSent) {
      void this.close(`device gone before connect: ${reason}`);
      return;
    }
    this.beginDisconnect(`device gone: ${reason}`);
  }

  /** device_disconnect, then close after the ack (or at once without the cap). */
  private beginDisconnect(why: string): void {
    if (this._state === 'disconnecting' || this._state === 'closed') return;
    this._state = 'disconnecting';
    this.deviceGone = true;
    // Requests still pending complete with an error; QEMU ignores them after the disconnect.
    this.send({ type: 'device_disconnect', id: 0n });
    if (this.parser.hasCap(Cap.device_disconnect_ack)) {
      this.waitingAck = true;
      this.ackTimer = setTimeout(() => {
        this.log.warn({ attachment: this.id }, 'no device_disconnect_ack from QEMU; closing anyway');
        void this.close(why);
      }, this.ackTimeoutMs);
      this.ackTimer.unref?.();
    } else {
      this.flushSoon(() => void this.close(why));
    }
    this.disconnectReason = why;
  }
  private disconnectReason = '';

  private onDisconnectAck(): void {
    if (!this.waitingAck) {
      this.log.warn({ attachment: this.id }, 'device_disconnect_ack without a disconnect; ignored');
      return;
    }
    this.waitingAck = false;
    clearTimeout(this.ackTimer);
    this.log.info({ attachment: this.id }, 'QEMU acknowledged the disconnect');
    void this.close(this.disconnectReason || 'device disconnected');
  }

  /**
   * Disconnect the device from QEMU cleanly (device_disconnect, wait for the ack) and close.
   * The guest sees an unplug; the usb-redir device stays in QEMU.
   */
  async disconnect(why = 'disconnected by the bridge'): Promise<AttachmentCloseInfo> {
    if (this._state === 'closed') return this.closedPromise;
    if (!this.connectSent) return this.close(why);
    this.beginDisconnect(why);
    return this.closedPromise;
  }

  // ------------------------------------------------------------------ data packets

  private onControl(p: ControlPacket): void {
    const reply = (status: number, data: Uint8Array = EMPTY, length = data.length) =>
      this.send({ ...p, status, length, data: p.endpoint & 0x80 ? data : EMPTY });
    if (this.deviceGone) return reply(Status.ioerror);
    if ((p.endpoint & 0x0f) !== 0) {
      this.log.warn({ attachment: this.id, ep: p.endpoint }, 'control packet on a non-control endpoint');
      return reply(Status.inval);
    }
    // CLEAR_FEATURE(ENDPOINT_HALT): a real clear halt, so the host stack knows (usbredirhost).
    if (p.requesttype === 0x02 && p.request === 0x01 && p.value === 0 && p.data.length === 0) {
      const ep = p.index & 0xff;
      this.runOp({ $case: 'clearHalt', value: { endpoint: ep } }, (r) => reply(r.status));
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

  private onBulk(p: BulkPacket): void {
    if (this.deviceGone) return this.send({ ...p, status: Status.ioerror, length: 0, data: EMPTY });
    const isIn = (p.endpoint & 0x80) !== 0;
    this.submit(p, 'bulk', {
      endpoint: p.endpoint,
      type: TransferType.TRANSFER_BULK,
      data: isIn ? EMPTY : p.data,
      length: isIn ? p.length : p.data.length,
      streamId: p.streamId,
    });
  }

  private onInterruptOut(p: InterruptPacket): void {
    // The parser only lets OUT interrupt packets through (IN data comes by interrupt receiving).
    if (this.deviceGone) return this.send({ ...p, status: Status.ioerror, length: 0, data: EMPTY });
    this.submit(p, 'interrupt', { endpoint: p.endpoint, type: TransferType.TRANSFER_INTERRUPT, data: p.data, length: p.data.length });
  }

  private onIsoOut(p: RedirIsoPacket): void {
    // iso OUT: submit each packet as a one-packet iso URB; errors go back as iso_stream_status.
    if (this.deviceGone) return;
    const st = this.streams.get(p.endpoint);
    if (!st || st.kind !== 'iso') {
      this.send({ type: 'iso_stream_status', id: p.id, status: Status.inval, endpoint: p.endpoint });
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
    this.urbsSubmitted++;
    let promise: Promise<UrbComplete>;
    try {
      promise = this.device.submit(req);
    } catch (err) {
      promise = Promise.reject(err);
    }
    promise.then(
      (c) => this.guard('completion', () => this.onComplete(urbId, c)),
      (err: Error) => this.guard('completion', () => this.onSubmitFailed(urbId, err)),
    );
  }

  private onComplete(urbId: number, c: UrbComplete): void {
    if (c.urbId !== urbId) {
      // The SDK assigned a different id than predicted: cancel-by-id would be wrong.
      this.log.error({ attachment: this.id, predicted: urbId, actual: c.urbId }, 'URB id prediction failed');
    }
    if (this.exported) return;
    const e = this.inFlight.get(urbId);
    if (!e) return;
    this.inFlight.delete(urbId);
    this.urbsCompleted++;
    if (this.byRedirId.get(e.id) === urbId) this.byRedirId.delete(e.id);
    if (e.cancelled || this._state === 'closed') {
      this.updateReadFlow();
      return;
    }
    this.reply(e, c.status, c.data, c.actualLength);
    if (e.kind === 'bulk') this.noteBulkAnswered(urbId, e);
    this.updateReadFlow();
  }

  private onSubmitFailed(urbId: number, err: Error): void {
    if (this.exported) return;
    const e = this.inFlight.get(urbId);
    if (!e) return;
    this.inFlight.delete(urbId);
    if (this.byRedirId.get(e.id) === urbId) this.byRedirId.delete(e.id);
    if (e.cancelled || this._state === 'closed') return;
    this.log.debug({ attachment: this.id, err: err.message }, 'URB failed on the channel');
    this.reply(e, Status.ioerror, EMPTY, 0);
    if (e.kind === 'bulk') this.noteBulkAnswered(urbId, e);
  }

  private noteBulkAnswered(urbId: number, e: InFlight): void {
    let list = this.bulkAnswered.get(e.endpoint);
    if (!list) this.bulkAnswered.set(e.endpoint, (list = []));
    list.push({ id: e.id, urbId, end: this._bytesToQemu });
    // QEMU has read everything but (at most) what the sent ring keeps.
    const read = this._bytesToQemu - this.sentRingBytes;
    while (list.length && (list[0]!.end <= read || list.length > 4096)) {
      const d = list.shift()!;
      this.bulkAnsweredDropped.set(e.endpoint, Math.max(this.bulkAnsweredDropped.get(e.endpoint) ?? 0, d.urbId));
    }
  }

  /** Bulk requests of QEMU in flight at the server now (a hint that qemuBulkInFlight() will have some). */
  hasBulkInFlight(): boolean {
    for (const e of this.inFlight.values()) if (e.kind === 'bulk' && !e.cancelled) return true;
    return false;
  }

  /**
   * While frozen at 'pre-switchover': per bulk endpoint, the TDs QEMU has in flight (requests
   * not answered, or answered with bytes QEMU has not read), oldest first, with whether they are
   * the newest ones on the endpoint (everything older was answered and read). Used to point
   * xHCI's endpoint context at the oldest (xhci-dequeue.ts).
   */
  qemuBulkInFlight(): { endpoint: number; ids: bigint[]; contiguous: boolean; streams: boolean }[] {
    if (!this.frozen) return [];
    const heldBytes = (this.held ?? []).reduce((a, p) => a + p.length, 0);
    const consumed = this._bytesToQemu - heldBytes - this.frozen.unread;
    const per = new Map<number, { urbId: number; id: bigint; streamId: number }[]>();
    for (const [ep, list] of this.bulkAnswered) for (const x of list) if (x.end > consumed) (per.get(ep) ?? per.set(ep, []).get(ep)!).push({ urbId: x.urbId, id: x.id, streamId: 0 });
    for (const [urbId, e] of this.inFlight) {
      if (e.kind !== 'bulk' || e.cancelled) continue;
      (per.get(e.endpoint) ?? per.set(e.endpoint, []).get(e.endpoint)!).push({ urbId, id: e.id, streamId: (e.pkt as BulkPacket).streamId ?? 0 });
    }
    const out: { endpoint: number; ids: bigint[]; contiguous: boolean; streams: boolean }[] = [];
    for (const [ep, xs] of per) {
      xs.sort((a, b) => a.urbId - b.urbId);
      const minOut = xs[0]!.urbId;
      let maxRead = this.bulkAnsweredDropped.get(ep) ?? 0;
      for (const x of this.bulkAnswered.get(ep) ?? []) if (x.end <= consumed) maxRead = Math.max(maxRead, x.urbId);
      out.push({ endpoint: ep, ids: xs.map((x) => x.id), contiguous: maxRead < minOut, streams: xs.some((x) => x.streamId !== 0) });
    }
    return out;
  }

  /** Answer a data packet (usbredirhost *_packet_complete). */
  private reply(e: InFlight, status: number, data: Uint8Array, actual: number): void {
    const isIn = (e.endpoint & 0x80) !== 0;
    switch (e.kind) {
      case 'control': {
        const p = e.pkt as ControlPacket;
        const d = isIn ? (data.length > actual ? data.subarray(0, actual) : data) : EMPTY;
        this.send({ ...p, status, length: isIn ? d.length : actual, data: d });
        return;
      }
      case 'bulk': {
        const p = e.pkt as BulkPacket;
        const d = isIn ? (data.length > actual ? data.subarray(0, actual) : data) : EMPTY;
        this.send({ ...p, status, length: isIn ? d.length : actual, data: d });
        return;
      }
      case 'interrupt': {
        const p = e.pkt as InterruptPacket;
        this.send({ ...p, status, length: actual, data: EMPTY });
        return;
      }
      case 'iso':
        if (status !== Status.success) {
          this.send({ type: 'iso_stream_status', id: e.id, status, endpoint: e.endpoint });
        }
        return;
    }
  }

  private onCancel(id: bigint): void {
    const urbId = this.byRedirId.get(id);
    if (urbId === undefined) {
      this.log.debug({ attachment: this.id, id: id.toString() }, 'cancel for an unknown (completed) packet');
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
    this.urbsCancelled++;
    const p = e.pkt;
    if (p.type === 'control_packet') this.send({ ...p, status: Status.cancelled, length: 0, data: EMPTY });
    else if (p.type === 'bulk_packet') this.send({ ...p, status: Status.cancelled, length: 0, data: EMPTY });
    else if (p.type === 'interrupt_packet') this.send({ ...p, status: Status.cancelled, length: 0, data: EMPTY });
    try {
      this.device.cancel(urbId);
    } catch {
      /* channel closed or handed off */
    }
  }

  // ------------------------------------------------------------------ control ops

  private handleOp(p: Packet): void {
    if (this._state === 'closed') return;
    switch (p.type) {
      case 'set_configuration':
        return this.onSetConfiguration(p.id, p.configuration);
      case 'get_configuration':
        this.send({ type: 'configuration_status', id: p.id, status: this.deviceGone ? Status.ioerror : Status.success, configuration: this.activeConfiguration });
        return;
      case 'set_alt_setting':
        return this.onSetAlt(p.id, p.interface, p.alt);
      case 'get_alt_setting': {
        const i = this.device.device.interfaces.find((x) => x.number === p.interface);
        if (this.deviceGone) this.send({ type: 'alt_setting_status', id: p.id, status: Status.ioerror, interface: p.interface, alt: 0xff });
        else if (!i) this.send({ type: 'alt_setting_status', id: p.id, status: Status.inval, interface: p.interface, alt: 0xff });
        else this.send({ type: 'alt_setting_status', id: p.id, status: Status.success, interface: p.interface, alt: i.alternateSetting & 0xff });
        return;
      }
      case 'reset':
        return this.onReset();
      case 'start_interrupt_receiving': {
        const mps = this.maxPacketSize(p.endpoint);
        return this.startStream(p.id, { kind: 'interrupt', endpoint: p.endpoint, transferLength: mps, transfers: INTERRUPT_TRANSFER_COUNT, isoPacketsPerTransfer: 0, streamId: 0 });
      }
      case 'stop_interrupt_receiving':
      case 'stop_iso_stream':
        return this.stopStream(p.id, p.endpoint, p.type === 'stop_iso_stream' ? 'iso' : 'interrupt', 0);
      case 'start_bulk_receiving':
        return this.startStream(p.id, {
          kind: 'bulk',
          endpoint: p.endpoint,
          transferLength: p.bytesPerTransfer,
          transfers: p.noTransfers,
          isoPacketsPerTransfer: 0,
          streamId: p.streamId,
        });
      case 'stop_bulk_receiving':
        return this.stopStream(p.id, p.endpoint, 'bulk', p.streamId);
      case 'start_iso_stream': {
        const mps = this.maxPacketSize(p.endpoint);
        if (!(p.endpoint & 0x80)) {
          // iso OUT: nothing to start on the server; packets are submitted as they come.
          if (this.endpointType(p.endpoint) !== EndpointType.iso || this.deviceGone) {
            this.send({ type: 'iso_stream_status', id: p.id, status: Status.stall, endpoint: p.endpoint });
            return;
          }
          this.streams.set(p.endpoint, { kind: 'iso', endpoint: p.endpoint, nextId: 0n, transferLength: mps, transfers: p.noUrbs, isoPacketsPerTransfer: p.pktsPerUrb, streamId: 0, restarting: false });
          this.send({ type: 'iso_stream_status', id: p.id, status: Status.success, endpoint: p.endpoint });
          return;
        }
        return this.startStream(p.id, { kind: 'iso', endpoint: p.endpoint, transferLength: mps, transfers: p.noUrbs, isoPacketsPerTransfer: p.pktsPerUrb, streamId: 0 });
      }
      case 'alloc_bulk_streams':
      case 'free_bulk_streams': {
        const eps: number[] = [];
        for (let i = 0; i < 32; i++) if (p.endpoints & (1 << i)) eps.push(((i & 0x10) << 3) | (i & 0x0f));
        const noStreams = p.type === 'alloc_bulk_streams' ? p.noStreams : 0;
        const op: Parameters<RemoteDevice['rawOp']>[0] =
          p.type === 'alloc_bulk_streams' ? { $case: 'allocBulkStreams', value: { endpoints: eps, numStreams: p.noStreams } } : { $case: 'freeBulkStreams', value: { endpoints: eps } };
        this.runOp(op, (r) => {
          let status = r.status as number;
          if (status === Status.success && p.type === 'alloc_bulk_streams' && r.value < noStreams) status = Status.ioerror;
          this.send({ type: 'bulk_streams_status', id: p.id, endpoints: p.endpoints >>> 0, noStreams, status });
        });
        return;
      }
    }
  }

  private runOp(op: Parameters<RemoteDevice['rawOp']>[0], done: (r: OpResult) => void): void {
    let pr: Promise<OpResult>;
    try {
      pr = this.device.rawOp(op);
    } catch (err) {
      pr = Promise.reject(err);
    }
    this.pendingOps++;
    pr.then(
      (r) => {
        this.pendingOps--;
        this.guard(op?.$case ?? 'op', () => this._state !== 'closed' && !this.exported && done(r));
      },
      (err: Error) =>
        this.guard(op?.$case ?? 'op', () => {
          this.pendingOps--;
          if (this._state === 'closed' || this.exported) return;
          done({ opId: 0, status: UrbStatus.URB_STATUS_IOERROR, value: 0, message: err.message, interfaces: [], endpoints: [] });
        }),
    );
  }

  private onSetConfiguration(id: bigint, configuration: number): void {
    if (this.deviceGone) {
      this.send({ type: 'configuration_status', id, status: Status.ioerror, configuration: this.activeConfiguration });
      return;
    }
    if (configuration === this.activeConfiguration && this.activeConfiguration !== 0) {
      this.send({ type: 'configuration_status', id, status: Status.success, configuration });
      return;
    }
    this.cancelAllPending();
    this.streams.clear();
    this.runOp({ $case: 'setConfiguration', value: { value: configuration } }, (r) => {
      if (r.status === UrbStatus.URB_STATUS_SUCCESS) {
        this.activeConfiguration = configuration;
        this.sendInterfaceAndEpInfo();
      } else {
        this.log.warn({ attachment: this.id, configuration, err: r.message }, 'set configuration failed');
      }
      this.send({ type: 'configuration_status', id, status: r.status, configuration: this.activeConfiguration });
    });
  }

  private onSetAlt(id: bigint, iface: number, alt: number): void {
    if (this.deviceGone) {
      this.send({ type: 'alt_setting_status', id, status: Status.ioerror, interface: iface, alt: 0xff });
      return;
    }
    const cur = this.device.device.interfaces.find((x) => x.number === iface);
    if (!cur) {
      this.send({ type: 'alt_setting_status', id, status: Status.inval, interface: iface, alt: 0xff });
      return;
    }
    // usbredirhost_cancel_pending_urbs_on_interface
    for (const [urbId, e] of this.inFlight) {
      if (e.cancelled || (e.endpoint & 0x0f) === 0) continue;
      const ep = this.device.device.endpoints.find((x) => x.address === e.endpoint);
      if (ep && ep.interfaceNumber === iface) this.cancelEntry(urbId, e);
    }
    for (const [addr, st] of this.streams) {
      const ep = this.device.device.endpoints.find((x) => x.address === addr);
      if (ep && ep.interfaceNumber === iface) this.streams.delete(st.endpoint);
    }
    this.runOp({ $case: 'setInterface', value: { interfaceNumber: iface, alternateSetting: alt } }, (r) => {
      if (r.status === UrbStatus.URB_STATUS_SUCCESS) this.sendInterfaceAndEpInfo();
      else this.log.warn({ attachment: this.id, iface, alt, err: r.message }, 'set alt setting failed');
      const now = this.device.device.interfaces.find((x) => x.number === iface);
      this.send({ type: 'alt_setting_status', id, status: r.status, interface: iface, alt: (now?.alternateSetting ?? alt) & 0xff });
    });
  }

  private onReset(): void {
    if (this.deviceGone) return;
    // usbredirhost_reset: cancel pending URBs (telling the guest), stop streams, reset.
    this.cancelAllPending();
    this.streams.clear();
    this.runOp({ $case: 'reset', value: {} }, (r) => {
      if (r.status !== UrbStatus.URB_STATUS_SUCCESS) {
        this.log.warn({ attachment: this.id, err: r.message }, 'device reset failed; disconnecting');
        this.onDeviceGone(`reset failed: ${r.message}`);
        return;
      }
      this.activeConfiguration = this.device.device.activeConfiguration ?? 0;
      // The server reports the layout after reset; it is the default (unconfigured) state.
      if (r.endpoints.length === 0 && r.interfaces.length === 0) this.activeConfiguration = 0;
    });
  }

  private cancelAllPending(): void {
    for (const [urbId, e] of this.inFlight) {
      if (e.cancelled) continue;
      if (this.byRedirId.get(e.id) === urbId) this.byRedirId.delete(e.id);
      this.cancelEntry(urbId, e);
    }
  }

  // ------------------------------------------------------------------ receiving streams

  private maxPacketSize(endpoint: number): number {
    return buildEpInfo(this.device.device).maxPacketSize[epIndex(endpoint)] ?? 0;
  }
  private endpointType(endpoint: number): number {
    return buildEpInfo(this.device.device).epType[epIndex(endpoint)] ?? EndpointType.invalid;
  }

  private sendStreamStatus(kind: StreamKind, id: bigint, endpoint: number, status: number, streamId = 0): void {
    if (kind === 'iso') this.send({ type: 'iso_stream_status', id, status, endpoint });
    else if (kind === 'interrupt') this.send({ type: 'interrupt_receiving_status', id, status, endpoint });
    else this.send({ type: 'bulk_receiving_status', id, status, endpoint, streamId });
  }

  private startStream(id: bigint, s: Omit<StreamState, 'nextId' | 'restarting'>): void {
    const wantType = s.kind === 'iso' ? EndpointType.iso : s.kind === 'bulk' ? EndpointType.bulk : EndpointType.interrupt;
    if (this.deviceGone || this.endpointType(s.endpoint) !== wantType || s.transferLength <= 0 || s.transfers < 1) {
      this.log.warn({ attachment: this.id, ep: s.endpoint, kind: s.kind }, 'invalid stream start');
      this.sendStreamStatus(s.kind, id, s.endpoint, Status.stall, s.streamId);
      return;
    }
    if (this.streams.has(s.endpoint)) {
      this.sendStreamStatus(s.kind, id, s.endpoint, Status.inval, s.streamId);
      return;
    }
    const st: StreamState = { ...s, nextId: 0n, restarting: false };
    this.streams.set(s.endpoint, st);
    this.runOp(this.startOp(st), (r) => {
      if (r.status !== UrbStatus.URB_STATUS_SUCCESS) {
        if (this.streams.get(s.endpoint) === st) this.streams.delete(s.endpoint);
        this.log.warn({ attachment: this.id, ep: s.endpoint, err: r.message }, 'start receiving failed');
        this.sendStreamStatus(s.kind, id, s.endpoint, Status.stall, s.streamId);
        return;
      }
      this.sendStreamStatus(s.kind, id, s.endpoint, Status.success, s.streamId);
    });
  }

  private startOp(st: StreamState): Parameters<RemoteDevice['rawOp']>[0] {
    const type = st.kind === 'iso' ? TransferType.TRANSFER_ISOCHRONOUS : st.kind === 'bulk' ? TransferType.TRANSFER_BULK : TransferType.TRANSFER_INTERRUPT;
    return {
      $case: 'startReceiving',
      value: { endpoint: st.endpoint, type, transferLength: st.transferLength, transfers: st.transfers, isoPacketsPerTransfer: st.isoPacketsPerTransfer },
    };
  }

  private stopStream(id: bigint, endpoint: number, kind: StreamKind, streamId: number): void {
    if (this.deviceGone) return;
    const st = this.streams.get(endpoint);
    this.streams.delete(endpoint);
    if (!st || !(endpoint & 0x80)) {
      this.sendStreamStatus(kind, id, endpoint, Status.success, streamId);
      return;
    }
    this.runOp({ $case: 'stopReceiving', value: { endpoint } }, () => this.sendStreamStatus(kind, id, endpoint, Status.success, streamId));
  }

  private onReceived(r: ReceivedData): void {
    if (this._state === 'closed' || this.deviceGone) return;
    const st = this.streams.get(r.endpoint);
    if (!st || st.restarting) return; // stopped meanwhile
    const status = r.status as number;
    if (st.kind === 'iso') {
      this.deliverIso(st, r);
      return;
    }
    if (status === Status.stall || (status !== Status.success && status !== Status.cancelled)) {
      // The server ended the stream. usbredirhost clears a stall and restarts silently; other
      // errors are reported in a data packet, then the stream is restarted.
      if (status !== Status.stall) this.sendStreamData(st, status, EMPTY);
      this.restartStream(st, status === Status.stall);
      return;
    }
    if (status === Status.cancelled) return;
    if (this.socket.writableLength + r.data.length > this.maxBufferedBytes) {
      this.log.error({ attachment: this.id, ep: r.endpoint, buffered: this.socket.writableLength }, 'QEMU does not read stream data; closing');
      void this.close('output buffer limit exceeded');
      return;
    }
    this.sendStreamData(st, status, r.data);
  }

  private sendStreamData(st: StreamState, status: number, data: Uint8Array): void {
    const id = st.nextId++;
    if (st.kind === 'interrupt') this.send({ type: 'interrupt_packet', id, endpoint: st.endpoint, status, length: data.length, data });
    else this.send({ type: 'buffered_bulk_packet', id, endpoint: st.endpoint, status, streamId: st.streamId, length: data.length, data });
  }

  private deliverIso(st: StreamState, r: ReceivedData): void {
    const drop = this.socket.writableLength > this.writeHighWater;
    const pk = r.isoPackets;
    if (pk.length === 0) {
      const id = st.nextId++;
      if (!drop) this.send({ type: 'iso_packet', id, endpoint: st.endpoint, status: r.status, length: r.data.length, data: r.data });
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
      if (!drop) this.send({ type: 'iso_packet', id, endpoint: st.endpoint, status: p.status, length: data.length, data });
    }
  }

  private restartStream(st: StreamState, clearHalt: boolean): void {
    st.restarting = true;
    const ep = st.endpoint;
    const fail = () => {
      if (this.streams.get(ep) === st) this.streams.delete(ep);
      this.sendStreamStatus(st.kind, 0n, ep, Status.stall, st.streamId);
    };
    this.runOp({ $case: 'stopReceiving', value: { endpoint: ep } }, () => {
      const start = () =>
        this.runOp(this.startOp(st), (r) => {
          if (this.streams.get(ep) !== st) return;
          if (r.status !== UrbStatus.URB_STATUS_SUCCESS) return fail();
          st.nextId = 0n;
          st.restarting = false;
        });
      if (this.streams.get(ep) !== st) return;
      if (clearHalt) this.runOp({ $case: 'clearHalt', value: { endpoint: ep } }, (r) => (r.status === UrbStatus.URB_STATUS_SUCCESS ? start() : fail()));
      else start();
    });
  }

  // ------------------------------------------------------------------ output to QEMU

  private send(p: Packet): void {
    if (this._state === 'closed' || this.socket.destroyed || this.exported) return;
    let parts: Uint8Array[];
    try {
      parts = this.parser.encodeParts(p);
    } catch (err) {
      this.log.error({ attachment: this.id, type: p.type, err: (err as Error).message }, 'could not encode a usbredir packet');
      return;
    }
    this.packetsOut++;
    this.trailNote('>', p);
    this.writeRaw(parts);
  }

  /** Write encoded bytes to QEMU (held during a hand-off freeze), remembering the tail. */
  private writeRaw(parts: Uint8Array[]): void {
    if (this.held) {
      for (const part of parts) {
        this._bytesToQemu += part.length;
        this.held.push(part);
      }
      return;
    }
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      // Uncork at the end of this turn: packets produced together leave in one write, without waiting a loop turn.
      queueMicrotask(() => {
        this.corked = false;
        if (!this.socket.destroyed) this.socket.uncork();
      });
    }
    for (const part of parts) {
      this._bytesToQemu += part.length;
      this.socket.write(part);
      this.sentRing.push(part);
      this.sentRingBytes += part.length;
    }
    // Keep at least what Node buffers plus what the kernel can hold.
    const keep = this.socket.writableLength + KERNEL_RETAIN;
    while (this.sentRing.length > 1 && this.sentRingBytes - this.sentRing[0]!.length >= keep) this.sentRingBytes -= this.sentRing.shift()!.length;
    this.updateReadFlow();
  }

  /** The last `n` bytes written to the socket. */
  private sentTail(n: number): Uint8Array {
    if (n > this.sentRingBytes) throw new Error(`QEMU has ${n} unread bytes but only ${this.sentRingBytes} are remembered`);
    const out = new Uint8Array(n);
    let o = n;
    for (let i = this.sentRing.length - 1; i >= 0 && o > 0; i--) {
      const part = this.sentRing[i]!;
      const take = Math.min(part.length, o);
      out.set(part.subarray(part.length - take), o - take);
      o -= take;
    }
    return out;
  }

  /** Run fn once what is queued has been handed to the kernel. */
  private flushSoon(fn: () => void): void {
    setImmediate(() => {
      if (this.socket.writableLength === 0 || this.socket.destroyed) fn();
      else this.socket.once('drain', fn);
    });
  }

  private onDrain(): void {
    this.updateReadFlow();
  }

  /** Pause reading requests from QEMU while our output or in-flight URBs are too many. */
  private updateReadFlow(): void {
    if (this._state === 'closed' || this.exported) return;
    const tooMuch = !this.draining && this.socket.writableLength > this.writeHighWater || this.inFlight.size >= this.maxInFlightUrbs;
    if (tooMuch && !this.readPaused) {
      this.readPaused = true;
      this.socket.pause();
    } else if (!tooMuch && this.readPaused) {
      this.readPaused = false;
      this.socket.resume();
    }
  }

  // ------------------------------------------------------------------ live-migration hand-off

  /**
   * Source side of a live-migration hand-off, once QEMU has stopped for good (MIGRATION
   * 'completed'): QEMU neither reads nor writes the chardev any more. From this call our output
   * is held; we read whatever QEMU wrote before it stopped (our receive queue empty, every
   * packet dispatched, device ops answered), measure exactly how many of our bytes QEMU has not
   * read (its Recv-Q + what Node still buffers), then, in one synchronous step, build the state
   * (those unread bytes + everything held, the partial guest->host packet, the requests in
   * flight, streams, configuration) and RemoteDevice.handOff(state): from there no server frame
   * is consumed here. Resolves when the server has switched the session to the standby; the
   * attachment is then closed ('handed off') without touching the device or QEMU. If the
   * hand-off is refused (no standby) or fails, the held output is written and the attachment
   * carries on; HandOffRefusedError is thrown.
   */
  async handOff(opts: { drainTimeoutMs?: number } = {}): Promise<HandOffInfo> {
    if (this._state === 'closed') throw new HandOffRefusedError('attachment is closed');
    if (this.exported) throw new HandOffRefusedError('a hand-off is in progress');
    const t0 = performance.now();
    let pos: { unread: number; measureMs: number; tookMs: number };
    if (this.freezing) {
      try {
        pos = await this.freezing;
      } catch (err) {
        throw new HandOffRefusedError(`hand-off measurement failed: ${(err as Error).message}`);
      }
    } else {
      if (this.held) throw new HandOffRefusedError('a hand-off is in progress');
      // No freeze before QEMU saved its state: measured now. QEMU may have read one more chunk
      // after saving its state (see freeze()); that chunk is lost to the destination.
      this.log.warn({ attachment: this.id }, 'hand-off without a freeze at pre-switchover: the position in the host->guest stream may be off by what QEMU read after saving its state');
      try {
        pos = await this.measureFrozen(opts);
      } catch (err) {
        this.thaw();
        throw new HandOffRefusedError(`hand-off measurement failed: ${(err as Error).message}`);
      }
    }
    const unread = pos.unread;
    const measureMs = pos.measureMs;
    if (this.frozen && this.log.isLevelEnabled?.('debug')) {
      // Diagnosis: nothing may have been read since the freeze.
      const again = await unreadByPeer(this.socket).catch(() => undefined);
      if (again && again.unread !== unread) this.log.error({ attachment: this.id, atFreeze: unread, now: again.unread }, 'QEMU read from the chardev after the freeze');
      else this.log.debug({ attachment: this.id, unread, now: again?.unread }, 'unread bytes unchanged since the freeze');
    }
    // The state and the freeze of the channel in one synchronous step: every completion the
    // RemoteDevice consumed so far has been answered (into `held`), none after.
    let built: { bytes: Uint8Array; toQemuBytes: number; partial: number; inFlight: number } | undefined;
    let sent: Promise<{ lastServerSeq: number }> | undefined;
    let buildErr: Error | undefined;
    await new Promise<void>((resolve) =>
      setImmediate(() => {
        try {
          this.socket.off('data', this.onDataBound);
          this.socket.pause();
          built = this.exportState(unread);
          this.exported = true;
          sent = this.device.handOff(built.bytes);
        } catch (err) {
          buildErr = err as Error;
        }
        resolve();
      }),
    );
    if (buildErr || !built || !sent) {
      this.exported = false;
      this.thaw();
      throw new HandOffRefusedError(`hand-off state: ${buildErr?.message}`);
    }
    const freezeMs = performance.now() - t0;
    try {
      await sent;
    } catch (err) {
      this.exported = false;
      this.thaw();
      this.log.warn({ attachment: this.id, err: (err as Error).message }, 'hand-off refused; the session stays here');
      throw new HandOffRefusedError((err as Error).message);
    }
    const info: HandOffInfo = {
      toQemuBytes: built.toQemuBytes,
      unreadInSocket: unread,
      fromQemuPartial: built.partial,
      inFlight: built.inFlight,
      stateBytes: built.bytes.length,
      measureMs,
      frozenBeforeSave: !!this.frozen,
      freezeBeforeSaveMs: this.frozen?.tookMs ?? 0,
      freezeMs,
      totalMs: performance.now() - t0,
    };
    this.log.info({ attachment: this.id, ...info, ...this.stats }, 'session handed off to the migration destination');
    this.log.debug({ attachment: this.id, trail: this.trail.join(' ') }, 'the last usbredir packets before the hand-off');
    this.emit('handedOff', info);
    await this.closeHandedOff();
    return info;
  }

  /**
   * First half of a hand-off, while the source QEMU is paused before it saves its device state
   * (MIGRATION 'pre-switchover', capability pause-before-switchover): hold our output, read
   * what QEMU wrote, and measure exactly how many of our bytes it has not read.
   *
   * Why then and not at 'completed': QEMU 7.2's chardev arms its fd watch with the read size
   * computed while the VM ran (usbredir_chardev_can_read). When the migration thread stops
   * the VM and saves the device state under the BQL, a main loop that was already polling
   * with that watch reads one more chunk (up to 4096 bytes) right after the BQL is released:
   * after the save. Those bytes are consumed on the source but are not in the migrated parser
   * state, so a measurement at 'completed' counts them as delivered and the destination never
   * gets them (a lost completion: the guest waits 60 s and resets the device; or a packet cut
   * in two: the destination's parser sees garbage). Paused before the save, QEMU reads
   * nothing more once its main loop has iterated with the VM stopped: `barrier` (a QMP round
   * trip) makes sure of that before we measure.
   *
   * Output stays held until handOff() (at 'completed') or unfreeze() (migration failed or
   * cancelled). Idempotent while frozen.
   */
  freeze(opts: { barrier?: () => Promise<unknown>; drainTimeoutMs?: number } = {}): Promise<{ unread: number; measureMs: number; tookMs: number }> {
    if (this._state === 'closed') return Promise.reject(new HandOffRefusedError('attachment is closed'));
    if (this.freezing) return this.freezing;
    if (this.held || this.exported) return Promise.reject(new HandOffRefusedError('a hand-off is in progress'));
    const p = this.measureFrozen(opts).then(
      (pos) => {
        if (this.freezing === p) this.frozen = pos;
        return pos;
      },
      (err: Error) => {
        if (this.freezing === p) this.thaw();
        throw err;
      },
    );
    this.freezing = p;
    p.catch(() => {});
    return p;
  }

  /** The migration did not switch over after freeze(): write what was held, carry on. */
  unfreeze(): void {
    if (!this.freezing || this.exported || this._state === 'closed') return;
    this.log.info({ attachment: this.id }, 'migration did not switch over; the attachment carries on');
    this.thaw();
  }

  /** Hold output, drain QEMU's output, then (after `barrier`) measure what QEMU has not read. */
  private async measureFrozen(opts: { barrier?: () => Promise<unknown>; drainTimeoutMs?: number }): Promise<{ unread: number; measureMs: number; tookMs: number }> {
    const t0 = performance.now();
    this.held = [];
    this.draining = true;
    if (this.readPaused) {
      this.readPaused = false;
      this.socket.resume();
    }
    let measureMs = 0;
    let barrierDone = !opts.barrier;
    const deadline = Date.now() + (opts.drainTimeoutMs ?? 2000);
    for (;;) {
      if (!barrierDone) {
        await opts.barrier!();
        barrierDone = true;
      }
      const m0 = performance.now();
      const measured = await unreadByPeer(this.socket);
      measureMs += performance.now() - m0;
      if (measured.ourUnread === 0 && this.queue.length === 0 && !this.dispatching && this.pendingOps === 0) {
        return { unread: measured.unread, measureMs, tookMs: performance.now() - t0 };
      }
      if (Date.now() > deadline) {
        if (measured.ourUnread === 0 && this.queue.length === 0 && !this.dispatching) {
          this.log.warn({ attachment: this.id, pendingOps: this.pendingOps }, 'device ops still pending at the hand-off; their answers are lost');
          return { unread: measured.unread, measureMs, tookMs: performance.now() - t0 };
        }
        throw new Error(`QEMU's output was not drained in time (unread ${measured.ourUnread}, queued ${this.queue.length})`);
      }
      await new Promise((r) => setTimeout(r, 1));
    }
  }

  /** Give up a hand-off: write what was held, read QEMU again. */
  private thaw(): void {
    const held = this.held;
    this.held = null;
    this.frozen = undefined;
    this.freezing = undefined;
    this.draining = false;
    if (this._state === 'closed') return;
    if (held?.length) this.writeRaw(held.splice(0));
    if (this.socket.listenerCount('data') === 0 || !this.socket.listeners('data').includes(this.onDataBound)) this.socket.on('data', this.onDataBound);
    this.socket.resume();
    this.updateReadFlow();
  }

  private exportState(unreadInSocket: number): { bytes: Uint8Array; toQemuBytes: number; partial: number; inFlight: number } {
    const toQemu = Buffer.concat([this.sentTail(unreadInSocket), ...(this.held ?? [])]);
    const partial = this.parser.pendingBytes();
    const st: HandOffStateV1 = {
      v: 1,
      id: this.id,
      ourCaps: [...this.parser.ourCaps],
      peerCaps: [...(this.parser.peerCaps ?? [])],
      toQemu: toQemu.toString('base64'),
      fromQemuPartial: Buffer.from(partial).toString('base64'),
      inFlight: [...this.inFlight].map(([urbId, e]) => [urbId, JSON.parse(JSON.stringify(e, jsonReplacer))]),
      byRedirId: [...this.byRedirId].map(([id, urbId]) => [id.toString(), urbId]),
      streams: [...this.streams.values()].map((x) => JSON.parse(JSON.stringify(x, jsonReplacer))),
      activeConfiguration: this.activeConfiguration,
      connectSent: this.connectSent,
      deviceGone: this.deviceGone,
      state: this._state,
      lastUrbId: this.device.peekNextUrbId() - 1,
      device: Buffer.from(Device.encode(this.device.device).finish()).toString('base64'),
      positions: { bytesFromQemu: this._bytesFromQemu, bytesToQemu: this._bytesToQemu, consumedByQemu: this._bytesToQemu - toQemu.length },
    };
    const bytes = new TextEncoder().encode(JSON.stringify(st));
    if (bytes.length > MAX_STATE_BYTES) throw new Error(`hand-off state of ${bytes.length} bytes exceeds ${MAX_STATE_BYTES}`);
    return { bytes, toQemuBytes: toQemu.length, partial: partial.length, inFlight: this.inFlight.size };
  }

  /** Stop hearing from the session and from QEMU (closing or handed off). */
  private stopListening(): void {
    this.device.off('received', this.onReceivedBound);
    this.device.off('deviceGone', this.onDeviceGoneBound);
    this.device.off('closed', this.onDeviceClosedBound);
    this.device.off('channelError', this.onChannelErrorBound);
    this.socket.off('data', this.onDataBound);
  }

  /** After a hand-off: close without a word to QEMU or the server (the session moved on). */
  private async closeHandedOff(): Promise<void> {
    this.held = null;
    this._state = 'closed';
    this.closeInfo = { reason: 'handed off' };
    clearTimeout(this.ackTimer);
    this.stopListening();
    this.socket.destroy();
    this.resolveClosed(this.closeInfo);
    this.emit('closed', this.closeInfo);
  }

  /** Parse a hand-off state (throws on a malformed or unknown one). */
  static parseHandOffState(state: Uint8Array): HandOffStateV1 {
    const st = JSON.parse(new TextDecoder().decode(state), jsonReviver) as HandOffStateV1;
    if (!st || st.v !== 1 || !Array.isArray(st.ourCaps) || !Array.isArray(st.peerCaps) || typeof st.toQemu !== 'string') throw new Error('unknown hand-off state');
    return st;
  }

  /**
   * Destination side: an attachment that continues the source's usbredir streams on the
   * migrated QEMU (no hello; QEMU's parser state came with the migration). start() writes the
   * host->guest bytes QEMU had not consumed, primes the parser with the partial guest->host
   * packet, adopts the URBs in flight and carries on.
   */
  static fromHandOff(opts: Omit<AttachmentOptions, 'noHello' | 'caps'> & { state: Uint8Array }): Attachment {
    const st = Attachment.parseHandOffState(opts.state);
    const att = new Attachment({ ...opts, id: opts.id ?? st.id, caps: st.ourCaps, noHello: { peerCaps: st.peerCaps } });
    att.imported = st;
    return att;
  }

  private resumeImported(st: HandOffStateV1): void {
    if (!this.device.device && st.device) this.device.device = Device.decode(Buffer.from(st.device, 'base64'));
    this.activeConfiguration = st.activeConfiguration;
    this.connectSent = st.connectSent;
    this.deviceGone = st.deviceGone;
    for (const x of st.streams) {
      const s = x as StreamState;
      this.streams.set(s.endpoint, { ...s, restarting: false });
    }
    // 1. The host->guest bytes QEMU had not consumed, verbatim, before anything else.
    const toQemu = Buffer.from(st.toQemu, 'base64');
    if (toQemu.length) this.writeRaw([new Uint8Array(toQemu.buffer, toQemu.byteOffset, toQemu.length)]);
    // 2. The guest->host stream continues inside the packet the source had started reading.
    const partial = Buffer.from(st.fromQemuPartial, 'base64');
    if (partial.length) {
      this._bytesFromQemu += partial.length;
      const pk = this.parser.push(new Uint8Array(partial));
      if (pk.length) throw new Error('the partial guest->host packet of the hand-off state is complete');
    }
    // 3. URBs in flight at the switchover: their completions come to this session.
    this.device.continueUrbIdsAfter(st.lastUrbId);
    for (const [urbId, raw] of st.inFlight) {
      const e = raw as InFlight;
      e.pkt = { ...(e.pkt as object), data: EMPTY } as InFlight['pkt'];
      this.inFlight.set(urbId, e);
      this.device.adopt(urbId).then(
        (c) => this.guard('completion', () => this.onComplete(urbId, c)),
        (err: Error) => this.guard('completion', () => this.onSubmitFailed(urbId, err)),
      );
    }
    for (const [id, urbId] of st.byRedirId) this.byRedirId.set(BigInt(id), urbId);
    this.nextUrbId = this.device.peekNextUrbId();
    if (st.connectSent) {
      this._state = st.state === 'disconnecting' ? 'disconnecting' : 'connected';
      this.emit('connected');
    } else {
      this.scheduleDeviceConnect();
    }
    this.log.info(
      { attachment: this.id, toQemu: toQemu.length, partial: partial.length, inFlight: st.inFlight.length, consumedByQemu: st.positions.consumedByQemu },
      'resumed the usbredir streams from the hand-off state',
    );
    if (this.log.isLevelEnabled?.('debug')) {
      const first = (this.firstTrail = []);
      const t = setTimeout(() => this.log.debug({ attachment: this.id, trail: first.join(' ') }, 'the first usbredir packets after the hand-off'), 3000);
      t.unref?.();
    }
  }

  // ------------------------------------------------------------------ close

  /** Close the attachment (socket; the session too if ownsDevice). Idempotent. */
  async close(reason = 'closed', error?: Error): Promise<AttachmentCloseInfo> {
    if (this._state === 'closed') return this.closedPromise;
    this._state = 'closed';
    this.closeInfo = { reason, error };
    clearTimeout(this.ackTimer);
    this.stopListening();
    const s = this.socket;
    if (!s.destroyed) {
      if (this.corked) {
        this.corked = false;
        s.uncork();
      }
      if (error) s.destroy();
      else {
        s.end();
        const t = setTimeout(() => s.destroy(), 2000);
        t.unref?.();
        s.once('close', () => clearTimeout(t));
      }
    }
    const level = error ? 'warn' : 'info';
    this.log[level]({ attachment: this.id, reason, err: error?.message, ...this.stats }, 'usbredir attachment closed');
    if (this.ownsDevice) {
      try {
        await this.device.close();
      } catch (err) {
        this.log.warn({ attachment: this.id, err: (err as Error).message }, 'closing the URB channel session failed');
      }
    }
    this.resolveClosed(this.closeInfo);
    this.emit('closed', this.closeInfo);
    return this.closeInfo;
  }

  /** Run a handler; an exception closes this attachment only (never escapes into the socket). */
  private guard(what: string, fn: () => unknown): void {
    try {
      fn();
    } catch (err) {
      this.log.error({ attachment: this.id, in: what, err: (err as Error)?.message, stack: (err as Error)?.stack }, 'attachment handler failed; closing');
      void this.close(`internal error in ${what}`, err as Error);
    }
  }
}

function isOp(p: Packet): boolean {
  switch (p.type) {
    case 'set_configuration':
    case 'get_configuration':
    case 'set_alt_setting':
    case 'get_alt_setting':
    case 'reset':
    case 'start_iso_stream':
    case 'stop_iso_stream':
    case 'start_interrupt_receiving':
    case 'stop_interrupt_receiving':
    case 'alloc_bulk_streams':
    case 'free_bulk_streams':
    case 'start_bulk_receiving':
    case 'stop_bulk_receiving':
      return true;
    default:
      return false;
  }
}

function hex4(n: number): string {
  return n.toString(16).padStart(4, '0');
}
