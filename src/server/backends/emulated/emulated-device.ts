// Base class for emulated USB devices. The device object itself is the
// DeviceHandle returned by EmulatedBackend.open().
//
// URB model
// ---------
// * One FIFO queue per endpoint (0x00/0x80 share the control queue), and on a
//   bulk endpoint with streams allocated one per (endpoint, stream id): each
//   stream is its own pipe, so a URB waiting on one stream never holds up
//   another. URBs on a queue start in submission order and complete in
//   submission order.
//   By default one URB executes at a time per endpoint; a subclass can allow
//   several to execute concurrently (pipelineDepth) - they still complete in
//   order. Endpoints are independent of each other.
// * `done` is always called asynchronously: the queue is pumped from a
//   microtask, never from inside submit().
// * Invalid URBs (endpoint not in the active configuration/alt settings,
//   transfer type mismatch, oversize, duplicate id) complete with Inval.
// * Cancel: a queued URB completes Cancelled without executing; an executing
//   URB is told through its TransferContext and completes Cancelled at once
//   (the device discards its eventual result).
// * Bulk streams: allocBulkStreams(endpoints, n) gives each endpoint stream ids
//   1..n (n at most its companion's MaxStreams); a URB with a stream id on an
//   endpoint without streams, past n, or stream 0 on an endpoint with streams,
//   completes Inval. freeBulkStreams / alt setting / configuration changes and
//   reset drop the allocation (cancelling the streams' URBs).
// * Halt (Linux/real-device semantics): a URB that stalls completes with Stall
//   and halts its endpoint (every stream of it). While halted, every queued and newly submitted URB
//   on that endpoint completes with Stall without executing (what a halted
//   endpoint answers on the wire), until clearHalt() / CLEAR_FEATURE(HALT).
//   Control endpoint stalls are protocol stalls: they affect only that URB.
// * unplug(): emits 'gone'; every pending and future URB completes IoError and
//   every device operation rejects with UsbError(IoError).
// * Execution accounting: `stats.executed` counts every URB whose transfer
//   actually started on the device (URBs cancelled/stalled/failed before
//   executing are not counted); `stats.byEndpoint` counts by endpoint address
//   (control: 0). The 'executed' event (urb) fires for each one.
import { EventEmitter } from 'node:events';
import {
  Speed,
  TransferType,
  UrbStatus,
  UsbError,
  URB_SHORT_NOT_OK,
  type ConfigurationSummary,
  type DeviceHandle,
  type DeviceInfo,
  type EndpointInfo,
  type InterfaceInfo,
  type Urb,
  type UrbResult,
} from '../types.js';
import { silentLogger, type Logger } from '../../../common/log.js';
import {
  altSettingEndpoints,
  buildDescriptors,
  parseConfigDescriptor,
  parseDeviceDescriptor,
  type DescriptorSet,
  type DeviceSpec,
} from './descriptors.js';
import { ACK, STALL, epKey, parseSetup, result, standardRequest, type SetupPacket, type StandardRequestTarget } from './standard-requests.js';

export { ACK, STALL, makeSetup, parseSetup, result, type SetupPacket } from './standard-requests.js';

export const MAX_URB_BYTES = 16 * 1024 * 1024;
export const DEFAULT_MAX_QUEUED_PER_ENDPOINT = 4096;

/** Handed to subclass transfer handlers; lets long-running transfers notice cancellation. */
export interface TransferContext {
  readonly cancelled: boolean;
  /** Called once if the URB is cancelled (or the device reset/closed/gone) while executing. */
  onCancel(cb: () => void): void;
}

export type TransferReturn = UrbResult | Promise<UrbResult>;

export interface EmulatedDeviceOptions {
  /** Stable id; default `emu-<bus>-<port path joined by '.'>`. */
  id?: string;
  bus?: number;
  portPath?: number[];
  speed?: Speed;
  logger?: Logger;
  maxQueuedPerEndpoint?: number;
}

export interface DeviceStats {
  executed: number;
  /** Executed URBs by endpoint address (control endpoint: 0). */
  byEndpoint: Map<number, number>;
}

interface Pending {
  urb: Urb;
  done: (r: UrbResult) => void;
  q: EndpointQueue;
  /** 0 queued, 1 executing, 2 finished (result ready, awaiting in-order delivery). */
  state: 0 | 1 | 2;
  result?: UrbResult;
  ctx?: Ctx;
  timer?: NodeJS.Timeout;
}

class Ctx implements TransferContext {
  cancelled = false;
  private cbs: (() => void)[] | undefined;
  onCancel(cb: () => void): void {
    if (this.cancelled) {
      cb();
      return;
    }
    (this.cbs ??= []).push(cb);
  }
  fire(): void {
    if (this.cancelled) return;
    this.cancelled = true;
    const cbs = this.cbs;
    this.cbs = undefined;
    if (cbs) for (const cb of cbs) cb();
  }
}

interface EndpointQueue {
  key: number;
  /** epKey of the endpoint (the key without the stream id). */
  ep: number;
  streamId: number;
  entries: Pending[];
  /** Entries [0, nStarted) have started (executing or finished). */
  nStarted: number;
  running: number;
  pumpScheduled: boolean;
}

/** Queue key: endpoint (epKey) in the low byte, stream id above it. */
function queueKey(endpoint: number, streamId: number): number {
  return epKey(endpoint) + streamId * 256;
}


export abstract class EmulatedDevice extends EventEmitter implements DeviceHandle {
  readonly id: string;
  readonly bus: number;
  readonly portPath: number[];
  readonly speed: Speed;
  readonly descriptors: DescriptorSet;
  readonly stats: DeviceStats = { executed: 0, byEndpoint: new Map() };
  protected readonly log: Logger;
  protected readonly spec: DeviceSpec;
  private readonly configSummaries: ConfigurationSummary[];
  private readonly maxQueued: number;

  private activeConfig = 0;
  private readonly altSettings = new Map<number, number>();
  /** Active endpoints (address -> info) for the current config/alt settings. */
  private activeEndpoints = new Map<number, EndpointInfo>();
  private readonly queues = new Map<number, EndpointQueue>();
  /** Halted endpoints (epKey). */
  private readonly halted = new Set<number>();
  /** Endpoints with bulk streams allocated: address -> number of streams (ids 1..n). */
  private readonly streams = new Map<number, number>();
  private readonly byUrbId = new Map<number, Pending>();
  private cachedInfo: DeviceInfo | undefined;
  /** This device as the chapter 9 standard requests see it. */
  private readonly chapter9: StandardRequestTarget = ((d) => ({
    get descriptors() {
      return d.descriptors;
    },
    get configuration() {
      return d.activeConfig;
    },
    selfPowered: () => (d.activeConfigSummary() ?? d.configSummaries[0])?.selfPowered ?? false,
    hasInterface: (n: number) => d.activeConfigSummary()?.interfaces.some((i) => i.number === n) ?? false,
    altSetting: (n: number) => d.altSettings.get(n) ?? 0,
    hasEndpoint: (address: number) => d.activeEndpoints.has(address),
    isHalted: (address: number) => d.isHalted(address),
    halt: (address: number) => d.halt(address),
    clearHalt: (address: number) => void d.doClearHalt(address),
    selectConfiguration: (value: number) => d.applyConfiguration(value),
    selectInterface: (n: number, alt: number) => d.applyInterface(n, alt),
  }))(this);
  private opened = false;
  private goneReason: string | undefined;

  /**
   * @param describe builds the device spec for a speed (endpoint sizes vary by speed).
   */
  constructor(
    describe: (speed: Speed) => DeviceSpec,
    options: EmulatedDeviceOptions = {},
  ) {
    super();
    this.bus = options.bus ?? 1;
    this.portPath = options.portPath ?? [1];
    this.id = options.id ?? `emu-${this.bus}-${this.portPath.join('.')}`;
    this.speed = options.speed ?? Speed.High;
    this.maxQueued = options.maxQueuedPerEndpoint ?? DEFAULT_MAX_QUEUED_PER_ENDPOINT;
    this.log = (options.logger ?? silentLogger).child({ device: this.id });
    this.spec = describe(this.speed);
    let other: DeviceSpec | undefined;
    if (this.speed === Speed.High) other = describe(Speed.Full);
    else if (this.speed === Speed.Full) other = describe(Speed.High);
    this.descriptors = buildDescriptors(this.spec, this.speed, other);
    this.configSummaries = this.descriptors.configs.map((c) => parseConfigDescriptor(c, this.speed));
  }

  // ---------------------------------------------------------------- info

  get info(): DeviceInfo {
    if (this.cachedInfo) return this.cachedInfo;
    const d = parseDeviceDescriptor(this.descriptors.device);
    const text = this.descriptors.stringText;
    const interfaces: InterfaceInfo[] = [];
    const cfg = this.activeConfigSummary();
    if (cfg) {
      for (const intf of cfg.interfaces) {
        if ((this.altSettings.get(intf.number) ?? 0) === intf.alternateSetting) interfaces.push({ ...intf });
      }
    }
    this.cachedInfo = {
      id: this.id,
      vendorId: d.vendorId,
      productId: d.productId,
      deviceClass: d.deviceClass,
      deviceSubclass: d.deviceSubclass,
      deviceProtocol: d.deviceProtocol,
      bcdUsb: d.bcdUsb,
      bcdDevice: d.bcdDevice,
      speed: this.speed,
      manufacturer: text.get(d.iManufacturer) ?? '',
      product: text.get(d.iProduct) ?? '',
      serial: text.get(d.iSerial) ?? '',
      bus: this.bus,
      portPath: [...this.portPath],
      maxPacketSize0: d.maxPacketSize0,
      configurations: this.configSummaries.map((c) => structuredClone(c)),
      activeConfiguration: this.activeConfig,
      interfaces,
      endpoints: [...this.activeEndpoints.values()].map((e) => ({ ...e })),
      backend: 'emulated',
    };
    return this.cachedInfo;
  }

  get isOpen(): boolean {
    return this.opened;
  }
  get isGone(): boolean {
    return this.goneReason !== undefined;
  }
  get configuration(): number {
    return this.activeConfig;
  }
  isHalted(endpoint: number): boolean {
    return this.halted.has(epKey(endpoint));
  }
  /** Number of URBs queued or executing on an endpoint, every stream of it (not yet delivered). */
  inFlight(endpoint?: number): number {
    if (endpoint === undefined) return this.byUrbId.size;
    let n = 0;
    for (const q of this.queuesOf(epKey(endpoint))) n += q.entries.length;
    return n;
  }
  /** Streams allocated on an endpoint (0: none). */
  streamsOf(endpoint: number): number {
    return this.streams.get(endpoint) ?? 0;
  }

  private *queuesOf(ep: number): Iterable<EndpointQueue> {
    for (const q of this.queues.values()) if (q.ep === ep) yield q;
  }

  private queueFor(key: number, ep: number, streamId: number): EndpointQueue {
    let q = this.queues.get(key);
    if (!q) {
      q = { key, ep, streamId, entries: [], nStarted: 0, running: 0, pumpScheduled: false };
      this.queues.set(key, q);
    }
    return q;
  }

  private activeConfigSummary(): ConfigurationSummary | undefined {
    return this.configSummaries.find((c) => c.value === this.activeConfig);
  }

  // ----------------------------------------------------- subclass hooks

  /** Handle a non-control transfer on an active endpoint. */
  protected abstract transfer(ep: EndpointInfo, urb: Urb, ctx: TransferContext): TransferReturn;

  /**
   * Class/vendor control requests (and standard requests the base does not
   * know). Return data for IN (truncated to wLength by the base), ACK, or STALL.
   */
  protected controlRequest(_setup: SetupPacket, _data: Uint8Array | undefined, _ctx: TransferContext): TransferReturn {
    return STALL;
  }

  /** How many URBs may execute concurrently on an endpoint (they still complete in order). */
  protected pipelineDepth(_ep: EndpointInfo): number {
    return 1;
  }

  protected onConfigurationChanged(_value: number): void {}
  protected onInterfaceChanged(_interfaceNumber: number, _alternateSetting: number): void {}
  protected onHaltCleared(_endpoint: number): void {}
  /** Bulk streams were allocated or freed. */
  protected onStreamsChanged(): void {}
  /** Port reset / close: drop all transient protocol state. */
  protected onReset(): void {}
  protected onGone(): void {}

  // --------------------------------------------------------- lifecycle

  /** Called by the backend when it hands the device out. */
  markOpened(): void {
    if (this.opened) throw new UsbError(`device ${this.id} is already open`, UrbStatus.IoError);
    if (this.goneReason !== undefined) throw new UsbError(`device ${this.id} is gone`, UrbStatus.IoError);
    this.opened = true;
  }

  /** Emulated unplug: emits 'gone'; every pending and future URB completes IoError. */
  unplug(reason = 'unplugged'): void {
    if (this.goneReason !== undefined) return;
    this.goneReason = reason;
    this.failAll(UrbStatus.IoError);
    try {
      this.onGone();
    } catch (err) {
      this.log.warn({ err }, 'onGone failed');
    }
    this.emit('gone', reason);
  }

  /**
   * Plug an unplugged device back in (EmulatedBackend.add does this): not open,
   * unconfigured, stats kept. Resources released by dispose() are not reopened.
   */
  replug(): void {
    if (this.goneReason === undefined) return;
    this.goneReason = undefined;
    this.opened = false;
    this.resetState();
  }

  /** Release resources (files). Subclasses override; the backend calls it on close. */
  async dispose(): Promise<void> {}

  // ----------------------------------------------------------- submit

  submit(urb: Urb, done: (result: UrbResult) => void): void {
    const fail = (status: UrbStatus) => queueMicrotask(() => done({ status, actualLength: 0 }));
    if (this.goneReason !== undefined || !this.opened) return fail(UrbStatus.IoError);
    if (this.byUrbId.has(urb.id)) return fail(UrbStatus.Inval);
    if (urb.length > MAX_URB_BYTES || (urb.data && urb.data.length > MAX_URB_BYTES) || urb.length < 0) {
      return fail(UrbStatus.Inval);
    }
    const ep = epKey(urb.endpoint);
    const streamId = urb.streamId ?? 0;
    if (ep === 0) {
      if (urb.type !== TransferType.Control || !urb.setup || urb.setup.length < 8 || streamId !== 0) return fail(UrbStatus.Inval);
    } else {
      const info = this.activeEndpoints.get(urb.endpoint);
      if (!info || info.type !== urb.type) return fail(UrbStatus.Inval);
      if (urb.type === TransferType.Isochronous && !urb.isoPackets?.length) return fail(UrbStatus.Inval);
      const n = this.streams.get(urb.endpoint);
      if (n === undefined ? streamId !== 0 : streamId < 1 || streamId > n) return fail(UrbStatus.Inval);
    }
    const key = queueKey(ep, streamId);
    const q = this.queueFor(key, ep, streamId);
    if (q.entries.length >= this.maxQueued) return fail(UrbStatus.Inval);
    const p: Pending = { urb, done, q, state: 0 };
    q.entries.push(p);
    this.byUrbId.set(urb.id, p);
    if (urb.timeoutMs > 0) {
      p.timer = setTimeout(() => this.abort(p, UrbStatus.Timeout), urb.timeoutMs);
    }
    this.schedulePump(q);
  }

  cancel(urbId: number): boolean {
    const p = this.byUrbId.get(urbId);
    if (!p) return false;
    this.abort(p, UrbStatus.Cancelled);
    return true;
  }

  /** Complete one pending URB early (cancel/timeout), out of order. */
  private abort(p: Pending, status: UrbStatus): void {
    const q = p.q;
    // Already finished (only awaiting in-order delivery): it keeps its real result.
    if (p.state === 2) return;
    const idx = q.entries.indexOf(p);
    if (idx < 0) return;
    q.entries.splice(idx, 1);
    if (idx < q.nStarted) q.nStarted--;
    if (p.state === 1) q.running--;
    this.byUrbId.delete(p.urb.id);
    if (p.timer) clearTimeout(p.timer);
    p.ctx?.fire();
    p.state = 2;
    const done = p.done;
    queueMicrotask(() => done({ status, actualLength: 0 }));
    this.schedulePump(q);
  }

  private schedulePump(q: EndpointQueue): void {
    if (q.pumpScheduled) return;
    q.pumpScheduled = true;
    queueMicrotask(() => {
      q.pumpScheduled = false;
      this.pump(q);
    });
  }

  private pump(q: EndpointQueue): void {
    if (this.queues.get(q.key) !== q) return;
    // Start what may start.
    if (this.halted.has(q.ep)) {
      while (q.nStarted < q.entries.length) {
        const p = q.entries[q.nStarted++]!;
        p.state = 2;
        p.result = STALL;
      }
    } else {
      const ep = q.key === 0 ? undefined : this.activeEndpoints.get(q.entries[q.nStarted]?.urb.endpoint ?? -1);
      const depth = ep ? Math.max(1, this.pipelineDepth(ep)) : 1;
      while (q.nStarted < q.entries.length && q.running < depth && !this.halted.has(q.ep)) {
        const p = q.entries[q.nStarted++]!;
        this.start(p);
      }
      if (this.halted.has(q.ep)) {
        // A synchronous stall halted the endpoint: later queued URBs fail.
        while (q.nStarted < q.entries.length) {
          const p = q.entries[q.nStarted++]!;
          p.state = 2;
          p.result = STALL;
        }
      }
    }
    // Deliver in order.
    let ready: Pending[] | undefined;
    while (q.entries.length > 0 && q.entries[0]!.state === 2) {
      const p = q.entries.shift()!;
      q.nStarted--;
      this.byUrbId.delete(p.urb.id);
      if (p.timer) clearTimeout(p.timer);
      (ready ??= []).push(p);
    }
    if (ready) {
      for (const p of ready) {
        try {
          p.done(p.result!);
        } catch (err) {
          this.log.error({ err }, 'URB completion callback threw');
        }
      }
      // Delivery may have unblocked more work (depth-limited endpoints).
      if (q.nStarted < q.entries.length) this.schedulePump(q);
    }
  }

  private start(p: Pending): void {
    const q = p.q;
    const urb = p.urb;
    p.state = 1;
    q.running++;
    const ctx = new Ctx();
    p.ctx = ctx;
    this.stats.executed++;
    const epAddr = q.key === 0 ? 0 : urb.endpoint;
    this.stats.byEndpoint.set(epAddr, (this.stats.byEndpoint.get(epAddr) ?? 0) + 1);
    if (this.listenerCount('executed') > 0) this.emit('executed', urb);
    let ret: TransferReturn;
    try {
      if (q.key === 0) {
        ret = this.control(urb, ctx);
      } else {
        ret = this.transfer(this.activeEndpoints.get(urb.endpoint)!, urb, ctx);
      }
    } catch (err) {
      this.log.error({ err, endpoint: urb.endpoint }, 'transfer handler threw');
      ret = { status: UrbStatus.IoError, actualLength: 0 };
    }
    if (ret instanceof Promise) {
      ret.then(
        (r) => this.finish(p, r),
        (err) => {
          this.log.error({ err, endpoint: urb.endpoint }, 'transfer handler rejected');
          this.finish(p, { status: UrbStatus.IoError, actualLength: 0 });
        },
      );
    } else {
      this.finishSync(p, ret);
    }
  }

  private fixup(p: Pending, r: UrbResult): UrbResult {
    const urb = p.urb;
    const isIn = (urb.endpoint & 0x80) !== 0;
    if (
      r.status === UrbStatus.Success &&
      isIn &&
      urb.type !== TransferType.Isochronous &&
      (urb.flags & URB_SHORT_NOT_OK) !== 0
    ) {
      const want = urb.type === TransferType.Control ? (urb.setup![6]! | (urb.setup![7]! << 8)) : urb.length;
      if (r.actualLength < want) return { ...r, status: UrbStatus.IoError };
    }
    return r;
  }

  private finishSync(p: Pending, r: UrbResult): void {
    if (p.state !== 1) return;
    p.state = 2;
    p.q.running--;
    p.result = this.fixup(p, r);
    if (r.status === UrbStatus.Stall && p.q.ep !== 0) this.setHalted(p.q.ep);
  }

  private finish(p: Pending, r: UrbResult): void {
    if (p.state !== 1) return; // cancelled / failed meanwhile
    this.finishSync(p, r);
    this.schedulePump(p.q);
  }

  /** Complete every pending URB with `status` (reset/close/gone/config change). */
  private failAll(status: UrbStatus, filter?: (key: number) => boolean): void {
    for (const q of this.queues.values()) {
      if (filter && !filter(q.ep)) continue;
      const entries = q.entries;
      q.entries = [];
      q.nStarted = 0;
      q.running = 0;
      for (const p of entries) {
        this.byUrbId.delete(p.urb.id);
        if (p.timer) clearTimeout(p.timer);
        p.ctx?.fire();
        p.state = 2;
        const done = p.done;
        queueMicrotask(() => done({ status, actualLength: 0 }));
      }
    }
  }

  // ------------------------------------------------------------ halt

  /** Device-side halt (e.g. mass storage protocol errors). */
  protected halt(endpoint: number): void {
    const ep = epKey(endpoint);
    if (ep === 0) return;
    this.setHalted(ep);
  }

  /** Halt an endpoint: every stream's queue fails what it has not started. */
  private setHalted(ep: number): void {
    if (this.halted.has(ep)) return;
    this.halted.add(ep);
    for (const q of this.queuesOf(ep)) this.schedulePump(q);
  }

  private doClearHalt(endpoint: number): boolean {
    const ep = epKey(endpoint);
    if (ep === 0) return true;
    if (!this.activeEndpoints.has(endpoint)) return false;
    this.halted.delete(ep);
    for (const q of this.queuesOf(ep)) this.schedulePump(q);
    this.onHaltCleared(endpoint);
    return true;
  }

  // ------------------------------------------------- configuration

  private applyConfiguration(value: number): boolean {
    if (value !== 0 && !this.configSummaries.some((c) => c.value === value)) return false;
    this.failAll(UrbStatus.Cancelled, (k) => k !== 0);
    for (const [k, q] of this.queues) if (q.ep !== 0 && q.entries.length === 0) this.queues.delete(k);
    for (const ep of [...this.halted]) if (ep !== 0) this.halted.delete(ep);
    this.streams.clear();
    this.activeConfig = value;
    this.altSettings.clear();
    this.rebuildEndpoints();
    this.onConfigurationChanged(value);
    return true;
  }

  private applyInterface(interfaceNumber: number, alt: number): boolean {
    const cfg = this.activeConfigSummary();
    if (!cfg) return false;
    const next = altSettingEndpoints(cfg, interfaceNumber, alt);
    if (!next) return false;
    const cur = altSettingEndpoints(cfg, interfaceNumber, this.altSettings.get(interfaceNumber) ?? 0);
    const affected = new Set<number>([...(cur?.endpoints ?? []), ...next.endpoints].map((e) => epKey(e.address)));
    this.failAll(UrbStatus.Cancelled, (k) => affected.has(k));
    for (const [k, q] of this.queues) if (affected.has(q.ep)) this.queues.delete(k);
    for (const ep of affected) this.halted.delete(ep);
    for (const a of [...this.streams.keys()]) if (affected.has(epKey(a))) this.streams.delete(a);
    this.altSettings.set(interfaceNumber, alt);
    this.rebuildEndpoints();
    this.onInterfaceChanged(interfaceNumber, alt);
    return true;
  }

  private rebuildEndpoints(): void {
    this.cachedInfo = undefined;
    this.activeEndpoints = new Map();
    const cfg = this.activeConfigSummary();
    if (!cfg) return;
    const numbers = new Set(cfg.interfaces.map((i) => i.number));
    for (const n of numbers) {
      const alt = altSettingEndpoints(cfg, n, this.altSettings.get(n) ?? 0);
      if (!alt) continue;
      for (const ep of alt.endpoints) this.activeEndpoints.set(ep.address, ep);
    }
  }

  protected activeAltSetting(interfaceNumber: number): number {
    return this.altSettings.get(interfaceNumber) ?? 0;
  }

  // ------------------------------------------------ handle operations

  private check(): void {
    if (this.goneReason !== undefined) throw new UsbError(`device gone: ${this.goneReason}`, UrbStatus.IoError);
    if (!this.opened) throw new UsbError('device not open', UrbStatus.IoError);
  }

  async setConfiguration(value: number): Promise<void> {
    this.check();
    if (!this.applyConfiguration(value)) throw new UsbError(`no configuration ${value}`, UrbStatus.Stall);
  }

  async getConfiguration(): Promise<number> {
    this.check();
    return this.activeConfig;
  }

  async setInterface(interfaceNumber: number, alternateSetting: number): Promise<void> {
    this.check();
    if (!this.applyInterface(interfaceNumber, alternateSetting)) {
      throw new UsbError(`no interface ${interfaceNumber} alt ${alternateSetting}`, UrbStatus.Stall);
    }
  }

  async getInterface(interfaceNumber: number): Promise<number> {
    this.check();
    const cfg = this.activeConfigSummary();
    if (!cfg || !cfg.interfaces.some((i) => i.number === interfaceNumber)) {
      throw new UsbError(`no interface ${interfaceNumber}`, UrbStatus.Stall);
    }
    return this.altSettings.get(interfaceNumber) ?? 0;
  }

  async clearHalt(endpoint: number): Promise<void> {
    this.check();
    if (!this.doClearHalt(endpoint)) throw new UsbError(`no endpoint 0x${endpoint.toString(16)}`, UrbStatus.Inval);
  }

  async reset(): Promise<void> {
    this.check();
    this.resetState();
  }

  private resetState(): void {
    this.failAll(UrbStatus.Cancelled);
    this.queues.clear();
    this.halted.clear();
    this.streams.clear();
    this.activeConfig = 0;
    this.altSettings.clear();
    this.rebuildEndpoints();
    this.onReset();
  }

  /**
   * Give each endpoint stream ids 1..numStreams (what usbfs USBDEVFS_ALLOC_STREAMS does); every
   * endpoint must be an active bulk endpoint whose companion allows that many streams.
   */
  async allocBulkStreams(endpoints: number[], numStreams: number): Promise<number> {
    this.check();
    if (endpoints.length === 0) throw new UsbError(`device ${this.id}: alloc streams without endpoints`, UrbStatus.Inval);
    if (!Number.isInteger(numStreams) || numStreams < 1) throw new UsbError(`device ${this.id}: cannot allocate ${numStreams} streams`, UrbStatus.Inval);
    for (const address of endpoints) {
      const ep = this.activeEndpoints.get(address);
      const hex = `0x${address.toString(16)}`;
      if (!ep || ep.type !== TransferType.Bulk) throw new UsbError(`device ${this.id}: endpoint ${hex} is not an active bulk endpoint`, UrbStatus.Inval);
      if (ep.maxStreams < numStreams) {
        throw new UsbError(`device ${this.id}: endpoint ${hex} supports ${ep.maxStreams} streams, ${numStreams} asked`, UrbStatus.Inval);
      }
      if (this.streams.has(address)) throw new UsbError(`device ${this.id}: endpoint ${hex} already has streams`, UrbStatus.Inval);
      if (this.inFlight(address) > 0) throw new UsbError(`device ${this.id}: endpoint ${hex} has URBs in flight`, UrbStatus.Inval);
    }
    for (const address of endpoints) this.streams.set(address, numStreams);
    this.onStreamsChanged();
    return numStreams;
  }

  async freeBulkStreams(endpoints: number[]): Promise<void> {
    this.check();
    for (const address of endpoints) {
      if (!this.streams.has(address)) throw new UsbError(`device ${this.id}: endpoint 0x${address.toString(16)} has no streams`, UrbStatus.Inval);
    }
    const eps = new Set(endpoints.map(epKey));
    this.failAll(UrbStatus.Cancelled, (k) => eps.has(k));
    for (const [k, q] of this.queues) if (eps.has(q.ep)) this.queues.delete(k);
    for (const address of endpoints) this.streams.delete(address);
    this.onStreamsChanged();
  }

  /** Cancel everything and release the device; it can be opened again through the backend. */
  async close(): Promise<void> {
    if (!this.opened) return;
    this.failAll(UrbStatus.Cancelled);
    this.queues.clear();
    this.opened = false;
  }

  // ------------------------------------------------- control endpoint

  private control(urb: Urb, ctx: TransferContext): TransferReturn {
    const setup = parseSetup(urb.setup!);
    const isIn = (setup.bmRequestType & 0x80) !== 0;
    const data = isIn ? undefined : (urb.data ?? new Uint8Array(0)).subarray(0, setup.wLength);
    const type = (setup.bmRequestType >> 5) & 3;
    const clip = (r: UrbResult): UrbResult => {
      if (isIn && r.data && r.data.length > setup.wLength) {
        const d = r.data.subarray(0, setup.wLength);
        return { ...r, data: d, actualLength: d.length };
      }
      if (!isIn && r.status === UrbStatus.Success) return { ...r, actualLength: data!.length };
      return r;
    };
    if (type === 0) {
      const r = standardRequest(this.chapter9, setup, data);
      if (r) return clip(r);
    }
    const r = this.controlRequest(setup, data, ctx);
    return r instanceof Promise ? r.then(clip) : clip(r);
  }

}
