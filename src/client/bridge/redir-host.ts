// RedirHost: the usbredir "usb-host" side of one connection (spice-usbredir's usbredirhost.c);
// QEMU's usb-redir device is the "usb-guest". Like usbredirhost it is opened with callbacks and
// never owns the socket: packets come in through receive(), answers leave through send().
// QEMU sends requests (control/bulk/interrupt/iso data packets, configuration, alt setting,
// reset, stream start/stop, cancel); each becomes a URB or a device op on the RedirDevice and
// its answer goes back. Behaviour follows usbredirhost.c closely:
//   - on QEMU's hello (or at once without a hello exchange): interface_info, ep_info, device_connect;
//   - data packets: one URB each, submitted at once (many in flight, no per-packet await);
//     the completion is answered with the same id (length = actual, data for IN);
//   - cancel_data_packet: answered AT ONCE with status cancelled (length 0), the URB is cancelled
//     and its later completion dropped (QEMU may reuse the id right after the cancel);
//   - a CLEAR_FEATURE(ENDPOINT_HALT) control request becomes a clearHalt op;
//   - set_configuration / set_alt_setting: op, then interface_info + ep_info, then the status;
//   - reset: cancel pending URBs (guest told "cancelled"), reset op, no reply;
//   - receiving streams: see redir-streams.ts;
//   - iso OUT: every iso_packet is submitted as a one-packet iso URB (errors -> iso_stream_status);
//   - device gone: device_disconnect, then (with device_disconnect_ack) close after QEMU's ack.
//
// Ordering: URB submits and ops reach the channel in the order QEMU sent the packets (the server
// runs frames in order). RemoteDevice.submit assigns its URB id after a microtask, so ops (sent
// synchronously) wait one macrotask turn before being sent.
import type { Logger } from '../../common/log.js';
import type { Device, DeviceOp, OpResult, ReceivedData } from '../../gen/usbroam/v1/usbhost.js';
import { UrbStatus } from '../../gen/usbroam/v1/usbhost.js';
import { Cap, Status, checkDevice, parseFilterRules, type CapId, type Packet } from '../../qemu/usbredir/index.js';
import { buildEpInfo, buildInterfaceInfo, filterInfoOf, redirSpeed } from './redir-descriptors.js';
import { DataRequests, type InFlight, type RequestDevice } from './redir-requests.js';
import { INTERRUPT_TRANSFER_COUNT, ReceivingStreams, type StreamHost, type StreamState } from './redir-streams.js';

export type { InFlight } from './redir-requests.js';
export type AttachmentState = 'starting' | 'connected' | 'disconnecting' | 'closed';

/** What the usbredir host uses of a device session (RemoteDevice implements it). */
export interface RedirDevice extends RequestDevice {
  /** The device as last reported by the server (interfaces and endpoints of the active configuration). */
  readonly device: Device;
  rawOp(op: DeviceOp['op']): Promise<OpResult>;
}

/** The usbredir caps of the connection (the connection's UsbredirParser). */
export interface RedirCaps {
  readonly peerCaps: readonly number[] | null;
  readonly noHello: boolean;
  hasCap(cap: CapId): boolean;
  peerHasCap(cap: CapId): boolean;
}

export interface RedirHostOptions {
  device: RedirDevice;
  caps: RedirCaps;
  /** The packet sink: encode and write to QEMU. */
  send: (p: Packet) => void;
  /** Output bytes not yet taken by QEMU (iso data is dropped above writeHighWater). */
  backlog: () => number;
  /** Run fn once the output written so far has left. */
  afterFlush: (fn: () => void) => void;
  /** The host cannot go on: the owner closes the connection (and calls shutdown()). */
  close: (reason: string, err?: Error) => void;
  /** Requests in flight changed or a batch of packets was handled: the owner's read flow. */
  flow: () => void;
  /** The state went to a hand-off: completions and op answers are no longer this host's. */
  exported: () => boolean;
  /** A bulk or control (endpoint 0) request was answered (for the hand-off's view of the TDs QEMU has in flight). */
  bulkAnswered?: (urbId: number, id: bigint, endpoint: number, streamId: number) => void;
  /** 'connected', 'deviceGone' (reason), 'rejected' (why) are emitted here. */
  events: { emit(event: string, ...args: unknown[]): boolean };
  log: Logger;
  id: string;
  writeHighWater?: number;
  maxBufferedBytes?: number;
  disconnectAckTimeoutMs?: number;
}

/** The host's share of a hand-off state. */
export interface RedirHostSnapshot {
  inFlight: [number, InFlight][];
  byRedirId: [bigint, number][];
  streams: StreamState[];
  activeConfiguration: number;
  connectSent: boolean;
  deviceGone: boolean;
  state: AttachmentState;
  /** Endpoints with bulk streams allocated (the xHCI stream work-around at a switchover needs them all). */
  bulkStreamEndpoints?: number[];
}

export class RedirHost implements StreamHost {
  readonly id: string;
  readonly log: Logger;
  private readonly o: RedirHostOptions;
  private readonly device: RedirDevice;
  private readonly streams: ReceivingStreams;
  private readonly ackTimeoutMs: number;

  private _state: AttachmentState = 'starting';
  private readonly urbs: DataRequests;
  /** The packets received but not yet handled (handling pauses while an op is being queued). */
  private readonly queue: Packet[] = [];
  private dispatching = false;
  private activeConfiguration: number;
  /** Endpoints with bulk streams allocated now (alloc_bulk_streams answered success, not freed since). */
  private readonly bulkStreamEps = new Set<number>();
  private connectSent = false;
  private connectScheduled = false;
  private deviceGone = false;
  private ackTimer?: NodeJS.Timeout;
  /** Set while waiting for QEMU's device_disconnect_ack: the reason to close with. */
  private disconnectReason?: string;
  /** Ops sent and not answered yet. */
  private _pendingOps = 0;

  constructor(opts: RedirHostOptions) {
    this.o = opts;
    this.id = opts.id;
    this.log = opts.log;
    this.device = opts.device;
    this.ackTimeoutMs = opts.disconnectAckTimeoutMs ?? 5000;
    this.streams = new ReceivingStreams(this, opts.writeHighWater ?? 8 * 1024 * 1024, opts.maxBufferedBytes ?? 256 * 1024 * 1024);
    this.urbs = new DataRequests(this, opts.device, opts);
    this.activeConfiguration = this.device.device?.activeConfiguration ?? 0;
  }

  get state(): AttachmentState {
    return this._state;
  }
  get dev(): Device {
    return this.device.device;
  }
  get stopped(): boolean {
    return this.deviceGone || this._state === 'closed';
  }
  get gone(): boolean {
    return this.deviceGone;
  }
  get closed(): boolean {
    return this._state === 'closed';
  }
  get inFlightCount(): number {
    return this.urbs.size;
  }
  get urbsSubmitted(): number {
    return this.urbs.submitted;
  }
  get urbsCompleted(): number {
    return this.urbs.completed;
  }
  get urbsCancelled(): number {
    return this.urbs.cancelled;
  }
  get pendingOps(): number {
    return this._pendingOps;
  }
  /** Every packet received has been handled. */
  get settled(): boolean {
    return this.queue.length === 0 && !this.dispatching;
  }
  get queued(): number {
    return this.queue.length;
  }
  /** The requests in flight at the server (for the hand-off's view of bulk TDs). */
  requests(): ReadonlyMap<number, InFlight> {
    return this.urbs.requests();
  }
  isoStreamOn(endpoint: number): boolean {
    return this.streams.get(endpoint)?.kind === 'iso';
  }

  /** A fresh connection: QEMU's hello leads to device_connect (without a hello exchange: now). */
  start(): void {
    if (this.o.caps.noHello) this.scheduleDeviceConnect();
  }

  /** The owner closed the connection: nothing more is sent or handled. */
  shutdown(): void {
    this._state = 'closed';
    clearTimeout(this.ackTimer);
  }

  send(p: Packet): void {
    this.o.send(p);
  }
  backlog(): number {
    return this.o.backlog();
  }
  close(reason: string, err?: Error): void {
    this.o.close(reason, err);
  }

  // ------------------------------------------------------------------ input from QEMU

  /** Packets decoded from QEMU, in order. */
  receive(packets: readonly Packet[]): void {
    for (const p of packets) this.queue.push(p);
    this.dispatch();
  }

  /** Data of a receiving stream, from the server. */
  onReceived(r: ReceivedData): void {
    this.guard('received', () => this.streams.onReceived(r));
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
      this.close('internal error handling a usbredir packet', err as Error);
    }
    this.dispatching = false;
    this.o.flow();
  }

  private handle(p: Packet): void {
    switch (p.type) {
      case 'hello':
        this.log.info({ attachment: this.id, peer: p.version, caps: this.o.caps.peerCaps }, 'QEMU hello');
        for (const cap of [Cap.ep_info_max_packet_size, Cap['32bits_bulk_length'], Cap['64bits_ids']] as const) {
          if (!this.o.caps.peerHasCap(cap)) this.log.warn({ attachment: this.id, cap }, 'QEMU lacks a capability xHCI needs');
        }
        this.scheduleDeviceConnect();
        return;
      case 'control_packet':
        return this.urbs.onControl(p);
      case 'bulk_packet':
        return this.urbs.onBulk(p);
      case 'interrupt_packet':
        return this.urbs.onInterruptOut(p);
      case 'iso_packet':
        return this.urbs.onIsoOut(p);
      case 'cancel_data_packet':
        return this.urbs.onCancel(p.id);
      case 'filter_filter':
        return this.onFilter(p.rules);
      case 'filter_reject':
        this.log.warn({ attachment: this.id }, 'QEMU rejected the device (filter_reject)');
        this.o.events.emit('rejected', 'filter_reject from QEMU');
        this.close('device rejected by the VM (filter_reject)');
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
    if (this._state !== 'starting' || this.connectSent || this.deviceGone || this.disconnectReason !== undefined) return;
    const dev = this.dev;
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
    this.o.events.emit('connected');
  }

  private sendInterfaceAndEpInfo(): void {
    const dev = this.dev;
    this.send({ type: 'interface_info', id: 0n, ...buildInterfaceInfo(dev) });
    this.send({ type: 'ep_info', id: 0n, ...buildEpInfo(dev) });
  }

  private onFilter(rules: string): void {
    let verdict;
    try {
      verdict = checkDevice(parseFilterRules(rules), filterInfoOf(this.dev));
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
    this.o.events.emit('rejected', 'device does not pass the VM usbredir filter');
    if (this.connectSent) {
      this.beginDisconnect('device does not pass the VM usbredir filter');
    } else {
      this.deviceGone = true;
      this.close('device does not pass the VM usbredir filter');
    }
  }

  /** The device went away at the server (or the channel closed). */
  onDeviceGone(reason: string): void {
    this.guard('deviceGone', () => {
      if (this.deviceGone || this._state === 'closed' || this.o.exported()) return;
      this.deviceGone = true;
      this.log.warn({ attachment: this.id, reason }, 'device gone; disconnecting it from QEMU');
      this.o.events.emit('deviceGone', reason);
      if (!this.connectSent) {
        this.close(`device gone before connect: ${reason}`);
        return;
      }
      this.beginDisconnect(`device gone: ${reason}`);
    });
  }

  /** device_disconnect, then close after the ack (or at once without the cap). */
  private beginDisconnect(why: string): void {
    if (this._state === 'disconnecting' || this._state === 'closed') return;
    this._state = 'disconnecting';
    this.deviceGone = true;
    // Requests still pending complete with an error; QEMU ignores them after the disconnect.
    this.send({ type: 'device_disconnect', id: 0n });
    if (this.o.caps.hasCap(Cap.device_disconnect_ack)) {
      this.disconnectReason = why;
      this.ackTimer = setTimeout(() => {
        this.log.warn({ attachment: this.id }, 'no device_disconnect_ack from QEMU; closing anyway');
        this.close(why);
      }, this.ackTimeoutMs);
      this.ackTimer.unref?.();
    } else {
      this.o.afterFlush(() => this.close(why));
    }
  }

  private onDisconnectAck(): void {
    const why = this.disconnectReason;
    if (why === undefined) {
      this.log.warn({ attachment: this.id }, 'device_disconnect_ack without a disconnect; ignored');
      return;
    }
    this.disconnectReason = undefined;
    clearTimeout(this.ackTimer);
    this.log.info({ attachment: this.id }, 'QEMU acknowledged the disconnect');
    this.close(why || 'device disconnected');
  }

  /**
   * Disconnect the device from QEMU cleanly (device_disconnect, then close on the ack).
   * Returns false if the device was never connected (the owner closes at once).
   */
  disconnect(why: string): boolean {
    if (!this.connectSent) return false;
    this.beginDisconnect(why);
    return true;
  }

  // ------------------------------------------------------------------ data packets

  // (data packets: redir-requests.ts)

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
        const i = this.dev.interfaces.find((x) => x.number === p.interface);
        if (this.deviceGone) this.send({ type: 'alt_setting_status', id: p.id, status: Status.ioerror, interface: p.interface, alt: 0xff });
        else if (!i) this.send({ type: 'alt_setting_status', id: p.id, status: Status.inval, interface: p.interface, alt: 0xff });
        else this.send({ type: 'alt_setting_status', id: p.id, status: Status.success, interface: p.interface, alt: i.alternateSetting & 0xff });
        return;
      }
      case 'reset':
        return this.onReset();
      case 'start_interrupt_receiving':
        return this.streams.start(p.id, { kind: 'interrupt', endpoint: p.endpoint, transferLength: this.streams.maxPacketSize(p.endpoint), transfers: INTERRUPT_TRANSFER_COUNT, isoPacketsPerTransfer: 0, streamId: 0 });
      case 'stop_interrupt_receiving':
      case 'stop_iso_stream':
        return this.streams.stop(p.id, p.endpoint, p.type === 'stop_iso_stream' ? 'iso' : 'interrupt', 0);
      case 'start_bulk_receiving':
        return this.streams.start(p.id, { kind: 'bulk', endpoint: p.endpoint, transferLength: p.bytesPerTransfer, transfers: p.noTransfers, isoPacketsPerTransfer: 0, streamId: p.streamId });
      case 'stop_bulk_receiving':
        return this.streams.stop(p.id, p.endpoint, 'bulk', p.streamId);
      case 'start_iso_stream':
        if (!(p.endpoint & 0x80)) return this.streams.startIsoOut(p.id, p.endpoint, p.noUrbs, p.pktsPerUrb);
        return this.streams.start(p.id, { kind: 'iso', endpoint: p.endpoint, transferLength: this.streams.maxPacketSize(p.endpoint), transfers: p.noUrbs, isoPacketsPerTransfer: p.pktsPerUrb, streamId: 0 });
      case 'alloc_bulk_streams':
      case 'free_bulk_streams': {
        const eps: number[] = [];
        for (let i = 0; i < 32; i++) if (p.endpoints & (1 << i)) eps.push(((i & 0x10) << 3) | (i & 0x0f));
        const noStreams = p.type === 'alloc_bulk_streams' ? p.noStreams : 0;
        // At once, not after the server answers: the bridge reads the xHCI stream context array
        // pointers before QEMU's first stream kick overwrites them (xhci-streams.ts).
        if (p.type === 'alloc_bulk_streams') this.o.events.emit('bulkStreamsAllocating', eps, p.noStreams);
        const op: DeviceOp['op'] =
          p.type === 'alloc_bulk_streams' ? { $case: 'allocBulkStreams', value: { endpoints: eps, numStreams: p.noStreams } } : { $case: 'freeBulkStreams', value: { endpoints: eps } };
        this.runOp(op, (r) => {
          let status = r.status as number;
          if (status === Status.success && p.type === 'alloc_bulk_streams' && r.value < noStreams) status = Status.ioerror;
          if (status === Status.success) for (const ep of eps) p.type === 'alloc_bulk_streams' ? this.bulkStreamEps.add(ep) : this.bulkStreamEps.delete(ep);
          this.send({ type: 'bulk_streams_status', id: p.id, endpoints: p.endpoints >>> 0, noStreams, status });
        });
        return;
      }
    }
  }

  runOp(op: DeviceOp['op'], done: (r: OpResult) => void): void {
    let pr: Promise<OpResult>;
    try {
      pr = this.device.rawOp(op);
    } catch (err) {
      pr = Promise.reject(err);
    }
    this._pendingOps++;
    pr.then(
      (r) => {
        this._pendingOps--;
        this.guard(op?.$case ?? 'op', () => this._state !== 'closed' && !this.o.exported() && done(r));
      },
      (err: Error) =>
        this.guard(op?.$case ?? 'op', () => {
          this._pendingOps--;
          if (this._state === 'closed' || this.o.exported()) return;
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
    this.urbs.cancelAll();
    this.streams.clear();
    this.bulkStreamEps.clear();
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
    const cur = this.dev.interfaces.find((x) => x.number === iface);
    if (!cur) {
      this.send({ type: 'alt_setting_status', id, status: Status.inval, interface: iface, alt: 0xff });
      return;
    }
    this.urbs.cancelOnInterface(iface);
    this.streams.dropInterface(iface);
    this.runOp({ $case: 'setInterface', value: { interfaceNumber: iface, alternateSetting: alt } }, (r) => {
      if (r.status === UrbStatus.URB_STATUS_SUCCESS) this.sendInterfaceAndEpInfo();
      else this.log.warn({ attachment: this.id, iface, alt, err: r.message }, 'set alt setting failed');
      const now = this.dev.interfaces.find((x) => x.number === iface);
      this.send({ type: 'alt_setting_status', id, status: r.status, interface: iface, alt: (now?.alternateSetting ?? alt) & 0xff });
    });
  }

  private onReset(): void {
    if (this.deviceGone) return;
    // usbredirhost_reset: cancel pending URBs (telling the guest), stop streams, reset.
    this.urbs.cancelAll();
    this.streams.clear();
    this.bulkStreamEps.clear();
    this.runOp({ $case: 'reset', value: {} }, (r) => {
      if (r.status !== UrbStatus.URB_STATUS_SUCCESS) {
        this.log.warn({ attachment: this.id, err: r.message }, 'device reset failed; disconnecting');
        this.onDeviceGone(`reset failed: ${r.message}`);
        return;
      }
      this.activeConfiguration = this.dev.activeConfiguration ?? 0;
      // The server reports the layout after reset; it is the default (unconfigured) state.
      if (r.endpoints.length === 0 && r.interfaces.length === 0) this.activeConfiguration = 0;
    });
  }

  // ------------------------------------------------------------------ hand-off

  /** The host's share of a hand-off state (references: encode it before anything else runs). */
  /** Endpoints with bulk streams allocated now. */
  bulkStreamEndpoints(): number[] {
    return [...this.bulkStreamEps];
  }

  snapshot(): RedirHostSnapshot {
    return {
      ...this.urbs.snapshot(),
      streams: [...this.streams.values()],
      activeConfiguration: this.activeConfiguration,
      connectSent: this.connectSent,
      deviceGone: this.deviceGone,
      state: this._state,
      bulkStreamEndpoints: [...this.bulkStreamEps],
    };
  }

  /**
   * Continue a source host's state (hand-off destination): streams, configuration, and the URBs
   * in flight at the switchover, whose completions now come to this session.
   */
  restore(st: RedirHostSnapshot, lastUrbId: number): void {
    this.activeConfiguration = st.activeConfiguration;
    this.connectSent = st.connectSent;
    this.deviceGone = st.deviceGone;
    for (const ep of st.bulkStreamEndpoints ?? []) this.bulkStreamEps.add(ep);
    this.streams.restore(st.streams);
    this.urbs.restore(st.inFlight, st.byRedirId, lastUrbId);
    if (st.connectSent) {
      this._state = st.state === 'disconnecting' ? 'disconnecting' : 'connected';
      this.o.events.emit('connected');
    } else {
      this.scheduleDeviceConnect();
    }
  }

  /** Run a handler; an exception closes this connection only. */
  guard(what: string, fn: () => unknown): void {
    try {
      fn();
    } catch (err) {
      this.log.error({ attachment: this.id, in: what, err: (err as Error)?.message, stack: (err as Error)?.stack }, 'attachment handler failed; closing');
      this.close(`internal error in ${what}`, err as Error);
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
