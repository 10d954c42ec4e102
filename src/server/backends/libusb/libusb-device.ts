// An opened, claimed real device on libusb (node-usb 2.x): one libusb transfer
// per URB (any number in flight per endpoint), cancel, standard requests that
// change host-side state (SET_CONFIGURATION, SET_INTERFACE, CLEAR_FEATURE(HALT))
// routed to the libusb calls that keep the host in step, kernel drivers
// detached on open and re-attached on close.
import { EventEmitter } from 'node:events';
import { silentLogger, type Logger } from '../../../common/log.js';
import {
  Speed,
  TransferType,
  URB_SHORT_NOT_OK,
  URB_ZERO_PACKET,
  UrbStatus,
  UsbError,
  type DeviceHandle,
  type DeviceInfo,
  type EndpointInfo,
  type Urb,
  type UrbResult,
} from '../types.js';
import type { ConfigDescriptor } from 'usb/dist/usb/descriptors.js';
import { currentSetting, maxStreamsOf, type LibusbErrorLike, type TransferFactory, type UsbOpenDeviceLike, type UsbTransferLike } from './info.js';
import type { IsoDevice, IsoEngine, IsoTransferDone } from './iso-koffi.js';
import type { StreamTransferDone, StreamsDevice, StreamsEngine } from './streams-koffi.js';
import {
  ERROR_ACCESS,
  ERROR_BUSY,
  ERROR_NO_DEVICE,
  ERROR_NOT_FOUND,
  ERROR_NOT_SUPPORTED,
  TRANSFER_COMPLETED,
  TRANSFER_ERROR,
  TRANSFER_NO_DEVICE,
  hexEp,
  isoUnimplemented,
  libusbErrorToUrb,
  streamsUnimplemented,
  transferStatusToUrb,
} from './libusb-status.js';

/** One URB in flight: plain fields, no closures (this runs for every URB). */
class InFlight {
  transfer: UsbTransferLike | undefined = undefined;
  /** URB_ZERO_PACKET emulation: the zero-length transfer queued right behind the data transfer. */
  zlp: UsbTransferLike | undefined = undefined;
  cancelRequested = false;
  completed = false;
  /** The transfer buffer; IN data starts at inOffset (8 for control: after the setup packet); -1: OUT. */
  buf: Buffer = EMPTY_BUFFER;
  inOffset = -1;
  /** IN: the length asked for (URB_SHORT_NOT_OK). */
  wanted = 0;
  /** Transfers still to complete (2 with a zero-length packet). */
  pending = 0;
  errno: number | undefined = undefined;
  zlpErrno: number | undefined = undefined;
  actual = 0;
  constructor(
    readonly urb: Urb,
    readonly done: (r: UrbResult) => void,
  ) {}
}

/**
 * A node-usb Transfer kept for reuse: creating one (a native object, libusb_alloc_transfer, a
 * persistent callback) cost about as much as submitting it in profiles. Its callback is bound
 * once, to the slot; `f` is the URB it currently serves.
 */
interface Slot {
  transfer: UsbTransferLike;
  f: InFlight | undefined;
  zlp: boolean;
  key: number;
}

/** Idle transfers kept per (endpoint, type, timeout); more than this are dropped. */
const POOL_MAX = 64;

const EMPTY_BUFFER = Buffer.alloc(0);

function cancelQuietly(t: UsbTransferLike): void {
  try {
    t.cancel();
  } catch {
    /* already completing */
  }
}

/** How long an isochronous URB takes on the bus: its packets at the endpoint's interval (>= 1 ms, <= 1 s). */
export function isoDurationMs(info: DeviceInfo, urb: Urb): number {
  const ep = info.endpoints.find((e) => e.address === urb.endpoint);
  const frameMs = info.speed >= Speed.High ? 0.125 : 1;
  const period = frameMs * 2 ** Math.min(15, Math.max(0, (ep?.interval ?? 1) - 1));
  const packets = Math.max(1, urb.isoPackets?.length ?? 1);
  return Math.min(1000, Math.max(1, Math.ceil(packets * period)));
}

/** Interface numbers with a stream-capable bulk endpoint (SuperSpeed companion MaxStreams) in any of their alt settings. */
function streamInterfaces(cfg: ConfigDescriptor): Set<number> {
  const out = new Set<number>();
  for (const group of cfg.interfaces) {
    for (const alt of group) if (alt.endpoints.some((e) => (e.bmAttributes & 3) === 2 && maxStreamsOf(e.extra, TransferType.Bulk) > 0)) out.add(alt.bInterfaceNumber);
  }
  return out;
}

/** Interface numbers with an isochronous endpoint in any of their alt settings. */
function isoInterfaces(cfg: ConfigDescriptor): Set<number> {
  const out = new Set<number>();
  for (const group of cfg.interfaces) for (const alt of group) if (alt.endpoints.some((e) => (e.bmAttributes & 3) === 1)) out.add(alt.bInterfaceNumber);
  return out;
}

function errText(err: unknown): string {
  const e = err as LibusbErrorLike;
  return e?.message ?? String(err);
}

function cbToPromise(fn: (cb: (err?: LibusbErrorLike) => void) => void): Promise<void> {
  return new Promise((resolve, reject) => {
    try {
      fn((err) => (err ? reject(err) : resolve()));
    } catch (err) {
      reject(err);
    }
  });
}

export class LibusbDeviceHandle extends EventEmitter implements DeviceHandle {
  private _info: DeviceInfo;
  private readonly inflight = new Map<number, InFlight>();
  /** Idle transfers by (timeout, type, endpoint): see takeSlot. */
  private readonly pools = new Map<number, Slot[]>();
  /** Claimed interface numbers, and those whose kernel driver we detached. */
  private readonly claimed = new Set<number>();
  private readonly detached = new Set<number>();
  private readonly alts = new Map<number, number>();
  private activeConfig: number;
  private goneReason: string | undefined;
  private closed = false;
  private readonly log: Logger;
  /** Endpoints already warned about (iso / streams): one log line each, not one per URB. */
  private readonly warnedEndpoints = new Set<string>();

  constructor(
    private readonly device: UsbOpenDeviceLike,
    info: DeviceInfo,
    private readonly newTransfer: TransferFactory,
    opts: { logger?: Logger; onClose?: () => void; iso?: IsoEngine; streams?: StreamsEngine } = {},
  ) {
    super();
    this.isoEngine = opts.iso;
    this.streamsEngine = opts.streams;
    this._info = info;
    this.activeConfig = info.activeConfiguration;
    this.log = (opts.logger ?? silentLogger).child({ device: info.id });
    this.onClose = opts.onClose;
  }
  private readonly onClose: (() => void) | undefined;
  /** Isochronous transfers through koffi (opt-in): a second open of the device for its iso interfaces. */
  private readonly isoEngine: IsoEngine | undefined;
  private isoDev: IsoDevice | undefined;
  /** Interfaces claimed through isoDev (those with an isochronous endpoint in some alt setting). */
  private readonly isoClaimed = new Set<number>();
  /** Bulk streams through koffi (opt-in): a second open of the device for its stream-capable interfaces. */
  private readonly streamsEngine: StreamsEngine | undefined;
  private streamsDev: StreamsDevice | undefined;
  /** Interfaces claimed through streamsDev: every bulk and interrupt URB of theirs goes there. */
  private readonly streamsClaimed = new Set<number>();

  get info(): DeviceInfo {
    return this._info;
  }

  get isGone(): boolean {
    return this.goneReason !== undefined;
  }

  /** Open the device and claim every interface of the active configuration. */
  open(): void {
    try {
      this.device.__open();
    } catch (err) {
      const e = err as LibusbErrorLike;
      if (e.errno === ERROR_ACCESS) throw new UsbError(`cannot open ${this._info.id}: permission denied on its usbfs node (${errText(err)})`, UrbStatus.IoError);
      if (e.errno === ERROR_NO_DEVICE) throw new UsbError(`cannot open ${this._info.id}: the device is gone`, UrbStatus.IoError);
      throw new UsbError(`cannot open ${this._info.id}: ${errText(err)}`, UrbStatus.IoError);
    }
    try {
      this.claimAll(this.refreshActiveConfig(`cannot open ${this._info.id}`));
    } catch (err) {
      this.releaseAllSync();
      try {
        this.device.__close();
      } catch {
        /* pending nothing: ignore */
      }
      throw err;
    }
  }

  /**
   * Re-read the active configuration descriptor (undefined: unconfigured) and take the current
   * interfaces and endpoints from it. A descriptor libusb cannot read (LIBUSB_ERROR_IO: malformed,
   * or the device stopped answering) is a UsbError saying so, prefixed with `what`; the handle keeps
   * what it had.
   */
  private refreshActiveConfig(what: string): ConfigDescriptor | undefined {
    let cfg: ConfigDescriptor | undefined;
    try {
      cfg = this.device.configDescriptor;
    } catch (err) {
      const errno = (err as LibusbErrorLike).errno;
      if (errno === ERROR_NO_DEVICE) this.markGone('device vanished');
      throw new UsbError(`${what}: the active configuration descriptor cannot be read (${errText(err)})`, UrbStatus.IoError);
    }
    this.activeConfig = cfg?.bConfigurationValue ?? 0;
    const cur = currentSetting(cfg, this.alts);
    this._info = { ...this._info, activeConfiguration: this.activeConfig, interfaces: cur.interfaces, endpoints: cur.endpoints };
    return cfg;
  }

  /** Detach kernel drivers and claim each interface of `cfg` (the active configuration). */
  private claimAll(cfg: ConfigDescriptor | undefined): void {
    const numbers = cfg ? cfg.interfaces.map((g) => g[0]?.bInterfaceNumber).filter((n): n is number => n !== undefined) : [];
    const iso = this.isoEngine && cfg ? isoInterfaces(cfg) : new Set<number>();
    if (iso.size && !this.isoDev && this.isoEngine) {
      try {
        this.isoDev = this.isoEngine.open(this._info.bus, this._info.portPath);
        this.log.info({ interfaces: [...iso] }, 'isochronous interfaces opened through koffi + libusb');
      } catch (err) {
        this.log.warn({ err: errText(err) }, 'cannot open the device through koffi for isochronous transfers; they stay unimplemented');
      }
    }
    const streams = this.streamsEngine && cfg ? streamInterfaces(cfg) : new Set<number>();
    for (const n of iso) streams.delete(n);
    if (streams.size && !this.streamsDev && this.streamsEngine) {
      try {
        this.streamsDev = this.streamsEngine.open(this._info.bus, this._info.portPath);
        this.log.info({ interfaces: [...streams] }, 'stream-capable interfaces opened through koffi + libusb');
      } catch (err) {
        this.log.warn({ err: errText(err) }, 'cannot open the device through koffi for bulk streams; they stay unimplemented');
      }
    }
    for (const n of numbers) {
      if (this.claimed.has(n) || this.isoClaimed.has(n) || this.streamsClaimed.has(n)) continue;
      if (this.streamsDev && streams.has(n)) {
        try {
          this.streamsDev.claim(n);
        } catch (err) {
          throw new UsbError(`${this._info.id}: cannot claim interface ${n} (bulk streams, through koffi): ${errText(err)}`, UrbStatus.IoError);
        }
        this.streamsClaimed.add(n);
        this.alts.set(n, 0);
        continue;
      }
      if (this.isoDev && iso.has(n)) {
        try {
          this.isoDev.claim(n);
        } catch (err) {
          throw new UsbError(`${this._info.id}: cannot claim interface ${n} (isochronous, through koffi): ${errText(err)}`, UrbStatus.IoError);
        }
        this.isoClaimed.add(n);
        this.alts.set(n, 0);
        continue;
      }
      let active = false;
      try {
        active = this.device.__isKernelDriverActive(n);
      } catch (err) {
        if ((err as LibusbErrorLike).errno !== ERROR_NOT_SUPPORTED) throw new UsbError(`${this._info.id}: cannot query the kernel driver of interface ${n}: ${errText(err)}`);
      }
      if (active) {
        try {
          this.device.__detachKernelDriver(n);
          this.detached.add(n);
          this.log.info({ interface: n }, 'kernel driver detached');
        } catch (err) {
          throw new UsbError(`${this._info.id}: the kernel driver of interface ${n} refuses to detach: ${errText(err)}`, UrbStatus.IoError);
        }
      }
      try {
        this.device.__claimInterface(n);
        this.claimed.add(n);
      } catch (err) {
        const busy = (err as LibusbErrorLike).errno === ERROR_BUSY;
        throw new UsbError(
          `${this._info.id}: cannot claim interface ${n}: ${busy ? 'it is claimed by another program or driver' : errText(err)}`,
          UrbStatus.IoError,
        );
      }
      this.alts.set(n, 0);
    }
  }

  private releaseIso(): void {
    for (const n of [...this.isoClaimed]) {
      try {
        this.isoDev?.release(n);
      } catch (err) {
        if (!this.isGone) this.log.warn({ interface: n, err: errText(err) }, 'release interface (koffi) failed');
      }
      this.isoClaimed.delete(n);
    }
    for (const n of [...this.streamsClaimed]) {
      try {
        this.streamsDev?.release(n);
      } catch (err) {
        if (!this.isGone) this.log.warn({ interface: n, err: errText(err) }, 'release interface (koffi, streams) failed');
      }
      this.streamsClaimed.delete(n);
    }
  }

  private async releaseAll(reattach: boolean): Promise<void> {
    this.releaseIso();
    for (const n of [...this.claimed]) {
      await cbToPromise((cb) => this.device.__releaseInterface(n, cb)).catch((err) => {
        if (!this.isGone) this.log.warn({ interface: n, err: errText(err) }, 'release interface failed');
      });
      this.claimed.delete(n);
    }
    if (reattach) this.reattachDrivers();
  }

  private releaseAllSync(): void {
    this.releaseIso();
    for (const n of [...this.claimed]) {
      try {
        this.device.__releaseInterface(n, () => {});
      } catch {
        /* ignore */
      }
      this.claimed.delete(n);
    }
    this.reattachDrivers();
  }

  private reattachDrivers(): void {
    if (this.isGone) {
      this.detached.clear();
      return;
    }
    for (const n of [...this.detached]) {
      try {
        this.device.__attachKernelDriver(n);
        this.log.info({ interface: n }, 'kernel driver re-attached');
      } catch (err) {
        this.log.warn({ interface: n, err: errText(err) }, 'kernel driver re-attach failed');
      }
      this.detached.delete(n);
    }
  }

  /** The device went away (unplug seen by hotplug, or NO_DEVICE from a transfer). */
  markGone(reason: string): void {
    if (this.goneReason !== undefined || this.closed) return;
    this.goneReason = reason;
    this.log.warn({ reason }, 'device gone');
    // libusb completes the outstanding transfers with NO_DEVICE; make sure they end even if it does not.
    const pending = [...this.inflight.values()];
    setTimeout(() => {
      for (const f of pending) this.finish(f, { status: UrbStatus.IoError, actualLength: 0 });
    }, 2000).unref();
    queueMicrotask(() => this.emit('gone', reason));
  }

  private finish(f: InFlight, r: UrbResult): void {
    if (f.completed) return;
    f.completed = true;
    this.inflight.delete(f.urb.id);
    try {
      f.done(r);
    } catch (err) {
      this.log.error({ err: errText(err) }, 'URB completion callback threw');
    }
  }

  private finishAsync(f: InFlight, r: UrbResult): void {
    setImmediate(() => this.finish(f, r));
  }

  submit(urb: Urb, done: (result: UrbResult) => void): void {
    const f = new InFlight(urb, done);
    if (this.inflight.has(urb.id)) {
      // Not ours to track twice: complete it on its own, as invalid.
      setImmediate(() => done({ status: UrbStatus.Inval, actualLength: 0 }));
      return;
    }
    this.inflight.set(urb.id, f);
    if (this.closed || this.isGone) return this.finishAsync(f, { status: UrbStatus.IoError, actualLength: 0 });
    switch (urb.type) {
      case TransferType.Control:
        return this.submitControl(f);
      case TransferType.Bulk:
      case TransferType.Interrupt:
        return this.submitData(f);
      case TransferType.Isochronous:
        return this.isoInterfaceOf(urb.endpoint) !== undefined ? this.submitIso(f) : this.refuseIso(f);
      default:
        return this.finishAsync(f, { status: UrbStatus.Inval, actualLength: 0 });
    }
  }

  /** The interface of an isochronous endpoint claimed through koffi, if it is one. */
  private isoInterfaceOf(endpoint: number): number | undefined {
    if (!this.isoDev) return undefined;
    const ep = this.endpoint(endpoint);
    return ep && ep.type === TransferType.Isochronous && this.isoClaimed.has(ep.interfaceNumber) ? ep.interfaceNumber : undefined;
  }

  /** An isochronous URB through koffi + libusb (see iso-koffi.ts). */
  private submitIso(f: InFlight): void {
    const { urb } = f;
    const lengths = (urb.isoPackets ?? []).map((p) => p.length);
    if (!lengths.length) return this.finishAsync(f, { status: UrbStatus.Inval, actualLength: 0 });
    try {
      const s = this.isoDev!.submitIso(urb.endpoint, urb.data, lengths, urb.timeoutMs, (r) => this.isoDone(f, lengths, r));
      f.transfer = { submit: () => undefined, cancel: () => (s.cancel(), true) };
    } catch (err) {
      this.submitFailed(f, urb.endpoint, err);
    }
  }

  private isoDone(f: InFlight, lengths: number[], r: IsoTransferDone): void {
    f.transfer = undefined;
    if (r.status === TRANSFER_NO_DEVICE) this.markGone('device vanished during a transfer');
    let status = transferStatusToUrb(r.status);
    if (this.isGone && status !== UrbStatus.Success && status !== UrbStatus.Cancelled) status = UrbStatus.IoError;
    const isoPackets = r.packets.map((p, i) => ({ length: lengths[i]!, status: transferStatusToUrb(p.status), actualLength: p.actualLength }));
    const actualLength = isoPackets.reduce((a, p) => a + (p.status === UrbStatus.Success ? p.actualLength : 0), 0);
    this.finish(f, r.data ? { status, data: r.data, actualLength, isoPackets } : { status, actualLength, isoPackets });
  }

  /** Isochronous URBs and bulk streams: what usb@2 lacks (see DeviceHandle.unsupported). */
  unsupported(urb: Pick<Urb, 'endpoint' | 'type' | 'streamId'>): string | undefined {
    if (urb.type === TransferType.Isochronous) {
      if (this.isoInterfaceOf(urb.endpoint) !== undefined) return undefined;
      if (this.isoDev && this.isoClaimed.size) return `device ${this._info.id} endpoint ${hexEp(urb.endpoint)}: not an isochronous endpoint of the current alt settings`;
      return isoUnimplemented(this._info.id, urb.endpoint);
    }
    if (urb.streamId && urb.type === TransferType.Bulk && this.streamsInterfaceOf(urb.endpoint) === undefined) {
      return streamsUnimplemented(this._info.id, [urb.endpoint], urb.streamId);
    }
    return undefined;
  }

  private warnOnce(kind: string, endpoint: number, message: string): void {
    const key = `${kind}:${endpoint}`;
    if (this.warnedEndpoints.has(key)) return;
    this.warnedEndpoints.add(key);
    this.log.warn({ endpoint }, message);
  }

  /**
   * Isochronous URBs complete with Inval (the URB completion has no room for a message: the reason
   * is logged once per endpoint, see isoUnimplemented). Each completes after the time the URB
   * would take on the bus (its packets at the endpoint's interval, at least 1 ms), so a receiving
   * stream that resubmits after every completion runs at the endpoint's pace instead of spinning.
   */
  private refuseIso(f: InFlight): void {
    const { urb } = f;
    this.warnOnce('iso', urb.endpoint, isoUnimplemented(this._info.id, urb.endpoint));
    const result: UrbResult = {
      status: UrbStatus.Inval,
      actualLength: 0,
      isoPackets: urb.isoPackets?.map((p) => ({ length: p.length, status: UrbStatus.Inval, actualLength: 0 })),
    };
    const t = setTimeout(() => this.finish(f, result), isoDurationMs(this._info, urb));
    // A cancel (or close) completes it at once.
    f.transfer = {
      submit: () => undefined,
      cancel: () => {
        clearTimeout(t);
        this.finishAsync(f, { ...result, status: UrbStatus.Cancelled });
        return true;
      },
    };
  }

  private submitControl(f: InFlight): void {
    const { urb } = f;
    const setup = urb.setup;
    if (!setup || setup.length !== 8 || (urb.endpoint & 0x7f) !== 0) return this.finishAsync(f, { status: UrbStatus.Inval, actualLength: 0 });
    const bmRequestType = setup[0]!;
    const bRequest = setup[1]!;
    const wValue = setup[2]! | (setup[3]! << 8);
    const wIndex = setup[4]! | (setup[5]! << 8);
    const wLength = setup[6]! | (setup[7]! << 8);
    const isIn = (bmRequestType & 0x80) !== 0;
    // Standard requests that change host-side state go through libusb's own calls.
    const viaOp = (op: () => Promise<void>) => {
      op().then(
        () => this.finish(f, f.cancelRequested ? { status: UrbStatus.Cancelled, actualLength: 0 } : { status: UrbStatus.Success, actualLength: 0 }),
        (err) => this.finish(f, { status: err instanceof UsbError ? err.status : UrbStatus.Stall, actualLength: 0 }),
      );
    };
    if (bmRequestType === 0x00 && bRequest === 0x09) return viaOp(() => this.setConfiguration(wValue & 0xff));
    if (bmRequestType === 0x01 && bRequest === 0x0b) return viaOp(() => this.setInterface(wIndex & 0xff, wValue & 0xff));
    if (bmRequestType === 0x02 && bRequest === 0x01 && wValue === 0) return viaOp(() => this.clearHalt(wIndex & 0xff));
    if (bmRequestType === 0x00 && bRequest === 0x05) return this.finishAsync(f, { status: UrbStatus.Success, actualLength: 0 });
    const dataLen = isIn ? wLength : Math.min(wLength, urb.data?.length ?? 0);
    const buf = Buffer.allocUnsafe(8 + dataLen);
    buf.set(setup, 0);
    buf.writeUInt16LE(dataLen, 6);
    if (!isIn && urb.data) buf.set(urb.data.subarray(0, dataLen), 8);
    f.buf = buf;
    f.inOffset = isIn ? 8 : -1;
    f.wanted = isIn ? wLength : 0;
    this.startTransfer(f, 0, TransferType.Control, false);
  }

  private submitData(f: InFlight): void {
    const { urb } = f;
    const ep = this.endpoint(urb.endpoint);
    if (!ep) return this.finishAsync(f, { status: UrbStatus.Stall, actualLength: 0 });
    if (ep.type !== urb.type) return this.finishAsync(f, { status: UrbStatus.Inval, actualLength: 0 });
    if (this.streamsDev && this.streamsClaimed.has(ep.interfaceNumber)) return this.submitViaStreams(f, ep);
    if (urb.streamId) {
      this.warnOnce('streams', urb.endpoint, streamsUnimplemented(this._info.id, [urb.endpoint], urb.streamId));
      return this.finishAsync(f, { status: UrbStatus.Inval, actualLength: 0 });
    }
    const isIn = (urb.endpoint & 0x80) !== 0;
    if (isIn) {
      f.buf = Buffer.allocUnsafe(urb.length);
      f.inOffset = 0;
      f.wanted = urb.length;
      return this.startTransfer(f, urb.endpoint, urb.type, false);
    }
    const d = urb.data;
    const buf = d ? Buffer.from(d.buffer, d.byteOffset, d.byteLength) : EMPTY_BUFFER;
    f.buf = buf;
    // URB_ZERO_PACKET: usb@2 never sets LIBUSB_TRANSFER_ADD_ZERO_PACKET, so a zero-length transfer
    // is queued right behind the data (same endpoint, submitted back to back: nothing gets between).
    const mps = ep.maxPacketSize & 0x7ff;
    const zlp = (urb.flags & URB_ZERO_PACKET) !== 0 && buf.length > 0 && mps > 0 && buf.length % mps === 0;
    this.startTransfer(f, urb.endpoint, urb.type, zlp);
  }

  /** A bulk or interrupt URB of an interface claimed through koffi for streams (see streams-koffi.ts). */
  private submitViaStreams(f: InFlight, ep: EndpointInfo): void {
    const { urb } = f;
    if (urb.streamId && (ep.type !== TransferType.Bulk || urb.streamId > ep.maxStreams)) return this.finishAsync(f, { status: UrbStatus.Inval, actualLength: 0 });
    const isIn = (urb.endpoint & 0x80) !== 0;
    const mps = ep.maxPacketSize & 0x7ff;
    const len = urb.data?.length ?? 0;
    try {
      const cancel = this.streamsDev!.submit(
        {
          endpoint: urb.endpoint,
          type: ep.type === TransferType.Bulk ? 2 : 3,
          streamId: urb.streamId,
          data: isIn ? undefined : urb.data,
          length: isIn ? urb.length : len,
          shortNotOk: (urb.flags & URB_SHORT_NOT_OK) !== 0,
          zeroPacket: (urb.flags & URB_ZERO_PACKET) !== 0 && len > 0 && mps > 0 && len % mps === 0,
          timeoutMs: urb.timeoutMs,
        },
        (r) => this.streamDone(f, r),
      );
      f.transfer = { submit: () => undefined, cancel: () => (cancel(), true) };
    } catch (err) {
      this.submitFailed(f, urb.endpoint, err);
    }
  }

  private streamDone(f: InFlight, r: StreamTransferDone): void {
    f.transfer = undefined;
    if (r.status === TRANSFER_NO_DEVICE) this.markGone('device vanished during a transfer');
    let status = transferStatusToUrb(r.status);
    if (this.isGone && status !== UrbStatus.Success && status !== UrbStatus.Cancelled) status = UrbStatus.IoError;
    if (f.cancelRequested && status === UrbStatus.Success && r.actualLength === 0) status = UrbStatus.Cancelled;
    const result: UrbResult = r.data ? { status, data: r.data, actualLength: r.actualLength } : { status, actualLength: r.actualLength };
    if (r.status === TRANSFER_NO_DEVICE) queueMicrotask(() => this.finish(f, result));
    else this.finish(f, result);
  }

  /** The interface of an endpoint of the current alt settings claimed through koffi for streams, if it is one. */
  private streamsInterfaceOf(endpoint: number): number | undefined {
    if (!this.streamsDev) return undefined;
    const ep = this.endpoint(endpoint);
    return ep && this.streamsClaimed.has(ep.interfaceNumber) ? ep.interfaceNumber : undefined;
  }

  /** The active setting's endpoint with this address (the list is short: a loop, no closure). */
  private endpoint(address: number): EndpointInfo | undefined {
    const eps = this._info.endpoints;
    for (let i = 0; i < eps.length; i++) if (eps[i]!.address === address) return eps[i];
    return undefined;
  }

  /** A transfer for (endpoint, type, this URB's timeout): an idle one from the pool, or a new one. */
  private takeSlot(endpoint: number, type: TransferType, timeoutMs: number): Slot {
    // timeout (ms, < 2^32) * 1024 + type * 256 + endpoint: exact in a double.
    const key = timeoutMs * 1024 + type * 256 + endpoint;
    const idle = this.pools.get(key)?.pop();
    if (idle) return idle;
    const slot: Slot = { transfer: undefined as unknown as UsbTransferLike, f: undefined, zlp: false, key };
    slot.transfer = this.newTransfer(this.device, endpoint, type, timeoutMs, (err, _b, actual) => this.onTransferDone(slot, err, actual));
    return slot;
  }

  private releaseSlot(slot: Slot): void {
    if (this.closed) return;
    let pool = this.pools.get(slot.key);
    if (!pool) this.pools.set(slot.key, (pool = []));
    if (pool.length < POOL_MAX) pool.push(slot);
  }

  /**
   * Submit one libusb transfer for `f` (buffer and IN/OUT shape already in f), and with `zlp` a
   * zero-length transfer right behind it.
   */
  private startTransfer(f: InFlight, endpoint: number, type: TransferType, zlp: boolean): void {
    f.pending = zlp ? 2 : 1;
    let slot: Slot;
    try {
      slot = this.takeSlot(endpoint, type, f.urb.timeoutMs);
      slot.f = f;
      slot.zlp = false;
      f.transfer = slot.transfer;
      slot.transfer.submit(f.buf);
    } catch (err) {
      // A slot whose submit threw is not reused (its state is unknown).
      return this.submitFailed(f, endpoint, err);
    }
    if (!zlp) return;
    try {
      const z = this.takeSlot(endpoint, type, f.urb.timeoutMs);
      z.f = f;
      z.zlp = true;
      f.zlp = z.transfer;
      z.transfer.submit(EMPTY_BUFFER);
    } catch (err) {
      // The data is on its way; without its zero-length packet the URB fails once the data is done.
      f.zlp = undefined;
      const errno = (err as LibusbErrorLike).errno;
      if (errno === ERROR_NO_DEVICE) this.markGone('device vanished');
      this.log.debug({ endpoint, err: errText(err) }, 'zero-length packet submit failed');
      f.zlpErrno = TRANSFER_ERROR;
      if (--f.pending === 0) this.settle(f);
    }
  }

  /** A libusb transfer completed (node-usb's callback): back to the pool, then to its URB. */
  private onTransferDone(slot: Slot, err: LibusbErrorLike | undefined, actual: number): void {
    const f = slot.f;
    slot.f = undefined;
    this.releaseSlot(slot);
    if (!f) return;
    if (slot.zlp) {
      f.zlp = undefined;
      f.zlpErrno = err?.errno;
    } else {
      f.transfer = undefined;
      f.errno = err?.errno;
      f.actual = actual ?? 0;
      // The data transfer failed: the zero-length one behind it must not go out on its own.
      if (f.zlp && err && err.errno !== TRANSFER_COMPLETED) cancelQuietly(f.zlp);
    }
    if (--f.pending === 0) this.settle(f);
  }

  private settle(f: InFlight): void {
    const errno = f.errno ?? f.zlpErrno;
    const actual = f.actual;
    if (errno === TRANSFER_NO_DEVICE) this.markGone('device vanished during a transfer');
    let status = transferStatusToUrb(errno);
    if (this.isGone && status !== UrbStatus.Success && status !== UrbStatus.Cancelled) status = UrbStatus.IoError;
    if (f.cancelRequested && status === UrbStatus.Success && actual === 0) status = UrbStatus.Cancelled;
    if (status === UrbStatus.Success && f.inOffset >= 0 && actual < f.wanted && (f.urb.flags & URB_SHORT_NOT_OK) !== 0) status = UrbStatus.IoError;
    const buf = f.buf;
    const result: UrbResult =
      f.inOffset >= 0 ? { status, data: new Uint8Array(buf.buffer, buf.byteOffset + f.inOffset, actual), actualLength: actual } : { status, actualLength: actual };
    // The URB that found the device gone completes after 'gone' (emitted on a microtask): the client
    // learns of the unplug before the error, and its guest sees a disconnect rather than an I/O error.
    if (errno === TRANSFER_NO_DEVICE) queueMicrotask(() => this.finish(f, result));
    else this.finish(f, result);
  }

  private submitFailed(f: InFlight, endpoint: number, err: unknown): void {
    const errno = (err as LibusbErrorLike).errno;
    if (errno === ERROR_NO_DEVICE) this.markGone('device vanished');
    const status = this.isGone ? UrbStatus.IoError : libusbErrorToUrb(errno);
    this.log.debug({ endpoint, err: errText(err) }, 'submit failed');
    f.transfer = undefined;
    this.finishAsync(f, { status, actualLength: 0 });
  }

  cancel(urbId: number): boolean {
    const f = this.inflight.get(urbId);
    if (!f || f.completed) return false;
    f.cancelRequested = true;
    if (f.transfer) {
      try {
        f.transfer.cancel();
      } catch (err) {
        // Already completing (or the device is gone): its completion follows.
        this.log.debug({ urb: urbId, err: errText(err) }, 'cancel failed');
      }
    }
    if (f.zlp) cancelQuietly(f.zlp);
    return true;
  }

  private cancelAll(): InFlight[] {
    const all = [...this.inflight.values()];
    for (const f of all) this.cancel(f.urb.id);
    return all;
  }

  private async drain(timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (this.inflight.size && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    for (const f of [...this.inflight.values()]) this.finish(f, { status: UrbStatus.Cancelled, actualLength: 0 });
  }

  private checkUsable(what: string): void {
    if (this.closed) throw new UsbError(`${what}: handle closed`, UrbStatus.IoError);
    if (this.isGone) throw new UsbError(`${what}: device gone (${this.goneReason})`, UrbStatus.IoError);
  }

  private opError(what: string, err: unknown): UsbError {
    const errno = (err as LibusbErrorLike).errno;
    if (errno === ERROR_NO_DEVICE) this.markGone('device vanished');
    return new UsbError(`${this._info.id}: ${what}: ${errText(err)}`, this.isGone ? UrbStatus.IoError : libusbErrorToUrb(errno));
  }

  async setConfiguration(value: number): Promise<void> {
    this.checkUsable('set configuration');
    const same = value === this.activeConfig;
    await this.releaseAll(false);
    try {
      await cbToPromise((cb) => this.device.__setConfiguration(value === 0 ? -1 : value, cb));
    } catch (err) {
      if (!same) {
        this.claimAll(this.refreshActiveConfig(`${this._info.id}: set configuration ${value}`));
        throw this.opError(`set configuration ${value}`, err);
      }
      // Same configuration: libusb's "lightweight reset" is refused by some kernels; the state is what was asked.
      this.log.debug({ value, err: errText(err) }, 'set configuration (same value) refused; keeping the configuration');
    }
    this.alts.clear();
    this.claimAll(this.refreshActiveConfig(`${this._info.id}: set configuration ${value}`));
  }

  async getConfiguration(): Promise<number> {
    this.checkUsable('get configuration');
    return this.activeConfig;
  }

  async setInterface(interfaceNumber: number, alternateSetting: number): Promise<void> {
    this.checkUsable('set interface');
    if (!this.claimed.has(interfaceNumber) && !this.isoClaimed.has(interfaceNumber) && !this.streamsClaimed.has(interfaceNumber)) {
      throw new UsbError(`${this._info.id}: interface ${interfaceNumber} is not in the active configuration`, UrbStatus.Inval);
    }
    try {
      if (this.isoClaimed.has(interfaceNumber)) this.isoDev!.setAlt(interfaceNumber, alternateSetting);
      else if (this.streamsClaimed.has(interfaceNumber)) this.streamsDev!.setAlt(interfaceNumber, alternateSetting);
      else await cbToPromise((cb) => this.device.__setInterface(interfaceNumber, alternateSetting, cb));
    } catch (err) {
      throw this.opError(`set interface ${interfaceNumber} alt ${alternateSetting}`, err);
    }
    this.alts.set(interfaceNumber, alternateSetting);
    this.refreshActiveConfig(`${this._info.id}: set interface ${interfaceNumber} alt ${alternateSetting}`);
  }

  async getInterface(interfaceNumber: number): Promise<number> {
    this.checkUsable('get interface');
    if (!this.claimed.has(interfaceNumber) && !this.isoClaimed.has(interfaceNumber) && !this.streamsClaimed.has(interfaceNumber)) {
      throw new UsbError(`${this._info.id}: interface ${interfaceNumber} is not in the active configuration`, UrbStatus.Inval);
    }
    return this.alts.get(interfaceNumber) ?? 0;
  }

  async clearHalt(endpoint: number): Promise<void> {
    this.checkUsable('clear halt');
    try {
      const iface = this.endpoint(endpoint)?.interfaceNumber;
      if (iface !== undefined && this.isoClaimed.has(iface)) this.isoDev!.clearHalt(endpoint);
      else if (iface !== undefined && this.streamsClaimed.has(iface)) this.streamsDev!.clearHalt(endpoint);
      else await cbToPromise((cb) => this.device.__clearHalt(endpoint, cb));
    } catch (err) {
      throw this.opError(`clear halt of endpoint 0x${endpoint.toString(16)}`, err);
    }
  }

  async reset(): Promise<void> {
    this.checkUsable('reset');
    this.cancelAll();
    await this.drain(2000);
    try {
      await cbToPromise((cb) => this.device.reset(cb));
    } catch (err) {
      const errno = (err as LibusbErrorLike).errno;
      if (errno === ERROR_NOT_FOUND) {
        // The device re-enumerated with other descriptors: this handle is over.
        this.markGone('device re-enumerated after reset');
      }
      throw this.opError('reset', err);
    }
    this.alts.clear();
    this.refreshActiveConfig(`${this._info.id}: reset`);
  }

  /**
   * libusb_alloc_streams through koffi, when every endpoint is a stream-capable bulk endpoint of
   * an interface claimed there; the number of streams the host controller gave (ids 1..n).
   */
  async allocBulkStreams(endpoints: number[], numStreams: number): Promise<number> {
    this.checkUsable('alloc bulk streams');
    const dev = this.streamsEndpoints(endpoints);
    if (!Number.isInteger(numStreams) || numStreams < 1 || numStreams > 65533) {
      throw new UsbError(`${this._info.id}: alloc bulk streams: ${numStreams} streams asked for (1-65533)`, UrbStatus.Inval);
    }
    try {
      const n = dev.allocStreams(endpoints, numStreams);
      this.log.info({ endpoints: endpoints.map(hexEp), asked: numStreams, allocated: n }, 'bulk streams allocated');
      return n;
    } catch (err) {
      throw this.opError(`alloc ${numStreams} bulk streams on endpoints ${endpoints.map(hexEp).join(', ')}`, err);
    }
  }

  async freeBulkStreams(endpoints: number[]): Promise<void> {
    this.checkUsable('free bulk streams');
    const dev = this.streamsEndpoints(endpoints);
    try {
      dev.freeStreams(endpoints);
    } catch (err) {
      throw this.opError(`free bulk streams on endpoints ${endpoints.map(hexEp).join(', ')}`, err);
    }
  }

  /** The koffi open that holds these endpoints' interfaces, or the UsbError saying why there is none. */
  private streamsEndpoints(endpoints: number[]): StreamsDevice {
    if (!this.streamsDev || !this.streamsClaimed.size) throw new UsbError(streamsUnimplemented(this._info.id, endpoints), UrbStatus.Inval);
    if (!endpoints.length) throw new UsbError(`${this._info.id}: bulk streams: no endpoints given`, UrbStatus.Inval);
    for (const address of endpoints) {
      const ep = this.endpoint(address);
      if (!ep || ep.type !== TransferType.Bulk || !this.streamsClaimed.has(ep.interfaceNumber) || ep.maxStreams === 0) {
        throw new UsbError(`${this._info.id}: bulk streams: endpoint ${hexEp(address)} is not a stream-capable bulk endpoint of the current alt settings`, UrbStatus.Inval);
      }
    }
    return this.streamsDev;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.cancelAll();
    await this.drain(2000);
    this.closed = true;
    this.pools.clear();
    await this.releaseAll(true);
    try {
      this.isoDev?.close();
    } catch (err) {
      this.log.warn({ err: errText(err) }, 'close (koffi) failed');
    }
    this.isoDev = undefined;
    try {
      this.streamsDev?.close();
    } catch (err) {
      this.log.warn({ err: errText(err) }, 'close (koffi, streams) failed');
    }
    this.streamsDev = undefined;
    // node-usb refuses to close while a request is pending; give late completions a moment.
    for (let i = 0; i < 50; i++) {
      try {
        this.device.__close();
        break;
      } catch (err) {
        if (i === 49) this.log.warn({ err: errText(err) }, 'close failed');
        await new Promise((r) => setTimeout(r, 20));
      }
    }
    this.onClose?.();
  }
}
