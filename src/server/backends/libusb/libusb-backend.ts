// A UsbBackend over the host's real USB devices, through libusb (node-usb 2.x).
//
// Enumeration (descriptors; strings and speed from sysfs where the kernel has
// them, else string descriptors read through libusb), hotplug (libusb hotplug
// events when the build and host support them, and a getDeviceList() poll in
// any case: many hosts and guests have no udev), and the export policy: only
// devices matching an allow rule are listed or claimable, hubs never.
import { EventEmitter } from 'node:events';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { silentLogger, type Logger } from '../../../common/log.js';
import { Speed, UrbStatus, UsbError, type DeviceHandle, type DeviceInfo, type UsbBackend } from '../types.js';
import { buildDeviceInfo, readSysfs, speedFromSysfs, sysfsName, type DeviceStrings } from './info.js';
import { LibusbDeviceHandle } from './libusb-device.js';
import type { TransferFactory, UsbOpenDeviceLike } from './info.js';
import { isExported, isHub, type LibusbAllowRule } from './policy.js';
import { koffiIsoEngine, type IsoEngine } from './iso-koffi.js';
import { koffiStreamsEngine, type StreamsEngine } from './streams-koffi.js';

/** The parts of the `usb` module the backend uses (a fake in unit tests). */
export interface UsbModuleLike {
  getDeviceList(): UsbEnumDeviceLike[];
  newTransfer: TransferFactory;
  /** libusb hotplug: subscribe; returns an unsubscribe function, or undefined when unsupported. */
  watchHotplug?(onChange: () => void): (() => void) | undefined;
}

export interface UsbEnumDeviceLike extends UsbOpenDeviceLike {
  getStringDescriptor?(index: number, cb: (err?: Error, value?: string) => void): void;
}

export interface LibusbBackendOptions {
  allow: LibusbAllowRule[];
  /** Poll interval of getDeviceList() (default 500 ms; 0: no polling). */
  pollMs?: number;
  logger?: Logger;
  /** Default: the `usb` package. */
  usb?: UsbModuleLike;
  /** Default /sys/bus/usb/devices. */
  sysfsRoot?: string;
  /** A device whose descriptors could not be read is described again after this long (default 5000 ms). */
  describeRetryMs?: number;
  /**
   * Isochronous transfers through koffi + libusb-1.0 (experimental; usb@2 has none). Default: on
   * when env USBROAM_LIBUSB_ISO=koffi. An engine may be given (unit tests).
   */
  iso?: boolean | IsoEngine;
  /**
   * Bulk streams through koffi + libusb-1.0 (usb@2 has none): libusb_alloc_streams and stream
   * transfers on a second open that claims the stream-capable interfaces. Default: on when env
   * USBROAM_LIBUSB_STREAMS=koffi. An engine may be given (unit tests).
   */
  streams?: boolean | StreamsEngine;
}

const require = createRequire(import.meta.url);

/** The real `usb` 2.x module, loaded on first use (a native addon: only when the backend is enabled). */
export function loadUsbModule(): UsbModuleLike {
  let mod: typeof import('usb');
  try {
    mod = require('usb') as typeof import('usb');
  } catch (err) {
    throw new Error(`the libusb backend needs the "usb" package and its prebuilt binary: ${(err as Error).message}`);
  }
  const { usb, Transfer } = mod;
  return {
    getDeviceList: () => usb.getDeviceList() as unknown as UsbEnumDeviceLike[],
    newTransfer: (device, endpoint, type, timeoutMs, cb) =>
      new Transfer(device as unknown as import('usb').Device, endpoint, type, timeoutMs, cb as never),
    watchHotplug(onChange) {
      let supported = false;
      try {
        supported = usb._supportedHotplugEvents();
      } catch {
        supported = false;
      }
      if (!supported) return undefined;
      const handler = () => onChange();
      usb.on('attach', handler);
      usb.on('detach', handler);
      try {
        usb.unrefHotplugEvents();
      } catch {
        /* older builds */
      }
      return () => {
        usb.off('attach', handler);
        usb.off('detach', handler);
      };
    },
  };
}

interface Known {
  device: UsbEnumDeviceLike;
  info?: DeviceInfo;
  exported: boolean;
  /** Why it could not be described (then it is not exported), and when to try again. */
  error?: string;
  retryAt?: number;
}

function keyOf(d: UsbEnumDeviceLike): string {
  return `${d.busNumber}:${d.deviceAddress}:${(d.portNumbers ?? []).join('.')}`;
}

export class LibusbBackend extends EventEmitter implements UsbBackend {
  readonly name = 'libusb';
  private readonly usb: UsbModuleLike;
  private readonly log: Logger;
  private readonly known = new Map<string, Known>();
  private readonly handles = new Map<string, LibusbDeviceHandle>();
  private pollTimer: NodeJS.Timeout | undefined;
  private unwatch: (() => void) | undefined;
  private scanning: Promise<void> = Promise.resolve();
  private rescanQueued = false;
  private closed = false;

  constructor(private readonly opts: LibusbBackendOptions) {
    super();
    this.usb = opts.usb ?? loadUsbModule();
    this.log = (opts.logger ?? silentLogger).child({ backend: 'libusb' });
  }

  /** Create, enumerate once (so list() is complete when the server starts), then watch for hotplug. */
  static async create(opts: LibusbBackendOptions): Promise<LibusbBackend> {
    const b = new LibusbBackend(opts);
    await b.rescan();
    b.startWatching();
    return b;
  }

  get hotplugMode(): 'libusb' | 'poll' | 'none' {
    if (this.unwatch) return 'libusb';
    return this.pollTimer ? 'poll' : 'none';
  }

  private startWatching(): void {
    try {
      this.unwatch = this.usb.watchHotplug?.(() => void this.rescan());
    } catch (err) {
      this.log.warn({ err: (err as Error).message }, 'libusb hotplug unavailable; polling');
    }
    const pollMs = this.opts.pollMs ?? 500;
    // Poll even with libusb hotplug: without udev its events may never come.
    if (pollMs > 0) {
      const tick = () => {
        if (this.closed) return;
        this.rescan().finally(() => {
          if (!this.closed) this.pollTimer = setTimeout(tick, this.unwatch ? Math.max(pollMs, 2000) : pollMs);
          this.pollTimer?.unref();
        });
      };
      this.pollTimer = setTimeout(tick, pollMs);
      this.pollTimer.unref();
    }
    this.log.info({ hotplug: this.unwatch ? 'libusb events + poll' : 'poll', pollMs }, 'libusb backend watching for devices');
  }

  /** Re-enumerate: emits 'added' / 'removed' for exported devices. Serialised. */
  rescan(): Promise<void> {
    if (this.rescanQueued) return this.scanning;
    this.rescanQueued = true;
    this.scanning = this.scanning.then(async () => {
      this.rescanQueued = false;
      if (this.closed) return;
      try {
        await this.scanOnce();
      } catch (err) {
        this.log.warn({ err: (err as Error).message }, 'device enumeration failed');
      }
    });
    return this.scanning;
  }

  private async scanOnce(): Promise<void> {
    const list = this.usb.getDeviceList();
    const seen = new Set<string>();
    for (const device of list) {
      const key = keyOf(device);
      seen.add(key);
      const old = this.known.get(key);
      if (old) {
        old.device = device;
        // A device that could not be described (descriptor errors) is tried again, every few seconds.
        if (old.error === undefined || Date.now() < (old.retryAt ?? 0)) continue;
      }
      const entry: Known = old ?? { device, exported: false };
      this.known.set(key, entry);
      try {
        const strings = await this.readStrings(device);
        const info = buildDeviceInfo(device, strings, this.speedOf(device));
        entry.error = undefined;
        entry.info = info;
        entry.exported = isExported(this.opts.allow, info);
        if (entry.exported) {
          if (this.findExported(info.id) && this.findExported(info.id) !== entry) {
            // Two devices with the same port path and serial cannot both be; keep the first.
            this.log.warn({ id: info.id }, 'duplicate device id; not exported twice');
            entry.exported = false;
            continue;
          }
          this.log.info({ id: info.id, vid: hex(info.vendorId), pid: hex(info.productId), product: info.product }, 'libusb device added');
          this.emit('added', info);
        } else {
          this.log.debug({ id: info.id, hub: isHub(info) }, 'libusb device not exported');
        }
      } catch (err) {
        const msg = (err as Error).message;
        if (entry.error !== msg) this.log.warn({ bus: device.busNumber, address: device.deviceAddress, err: msg }, 'cannot describe device; not exported (tried again every few seconds)');
        entry.error = msg;
        entry.retryAt = Date.now() + (this.opts.describeRetryMs ?? 5000);
      }
    }
    for (const [key, entry] of [...this.known]) {
      if (seen.has(key)) continue;
      this.known.delete(key);
      if (entry.info && entry.exported) {
        const handle = this.handles.get(entry.info.id);
        handle?.markGone('device unplugged');
        this.log.info({ id: entry.info.id }, 'libusb device removed');
        this.emit('removed', entry.info.id);
      }
    }
  }

  private speedOf(d: UsbEnumDeviceLike): Speed {
    const s = speedFromSysfs(readSysfs(d.busNumber, d.portNumbers ?? [], 'speed', this.opts.sysfsRoot));
    if (s !== Speed.Unknown) return s;
    const bcd = d.deviceDescriptor?.bcdUSB ?? 0;
    return bcd >= 0x0300 ? Speed.Super : bcd >= 0x0200 ? Speed.High : Speed.Full;
  }

  private async readStrings(d: UsbEnumDeviceLike): Promise<DeviceStrings> {
    const root = this.opts.sysfsRoot ?? '/sys/bus/usb/devices';
    const ports = d.portNumbers ?? [];
    if (existsSync(`${root}/${sysfsName(d.busNumber, ports)}/idVendor`)) {
      return {
        manufacturer: readSysfs(d.busNumber, ports, 'manufacturer', root) ?? '',
        product: readSysfs(d.busNumber, ports, 'product', root) ?? '',
        serial: readSysfs(d.busNumber, ports, 'serial', root) ?? '',
      };
    }
    // No sysfs: ask the device (it must not be in use by someone else's claim for this to be harmless).
    const dd = d.deviceDescriptor;
    const none = { manufacturer: '', product: '', serial: '' };
    if (!dd || !d.getStringDescriptor || !(dd.iManufacturer || dd.iProduct || dd.iSerialNumber)) return none;
    try {
      d.__open();
    } catch (err) {
      this.log.debug({ err: (err as Error).message }, 'cannot open device to read its strings');
      return none;
    }
    const get = (i: number) =>
      new Promise<string>((resolve) => {
        if (!i) return resolve('');
        d.getStringDescriptor!(i, (err, v) => resolve(err ? '' : (v ?? '')));
      });
    try {
      return { manufacturer: await get(dd.iManufacturer), product: await get(dd.iProduct), serial: await get(dd.iSerialNumber) };
    } finally {
      try {
        d.__close();
      } catch {
        /* pending request: closed later */
      }
    }
  }

  private findExported(id: string): Known | undefined {
    for (const k of this.known.values()) if (k.exported && k.info?.id === id) return k;
    return undefined;
  }

  list(): DeviceInfo[] {
    return [...this.known.values()].filter((k) => k.exported && k.info).map((k) => this.handles.get(k.info!.id)?.info ?? k.info!);
  }

  private isoEngine(): IsoEngine | undefined {
    const want = this.opts.iso ?? process.env.USBROAM_LIBUSB_ISO === 'koffi';
    if (!want) return undefined;
    if (typeof want === 'object') return want;
    const { engine, error } = koffiIsoEngine();
    if (!engine && !this.isoWarned) {
      this.isoWarned = true;
      this.log.warn({ err: error }, 'isochronous transfers through koffi unavailable');
    }
    return engine;
  }
  private isoWarned = false;

  private streamsEngine(): StreamsEngine | undefined {
    const want = this.opts.streams ?? process.env.USBROAM_LIBUSB_STREAMS === 'koffi';
    if (!want) return undefined;
    if (typeof want === 'object') return want;
    const { engine, error } = koffiStreamsEngine();
    if (!engine && !this.streamsWarned) {
      this.streamsWarned = true;
      this.log.warn({ err: error }, 'bulk streams through koffi unavailable');
    }
    return engine;
  }
  private streamsWarned = false;

  async open(deviceId: string): Promise<DeviceHandle> {
    if (this.closed) throw new UsbError('libusb backend closed', UrbStatus.IoError);
    const entry = this.findExported(deviceId);
    if (!entry || !entry.info) throw new UsbError(`no such device ${deviceId} (or it is not exported by the libusb allow rules)`, UrbStatus.Inval);
    if (this.handles.has(deviceId)) throw new UsbError(`device ${deviceId} is already open`, UrbStatus.Inval);
    const handle = new LibusbDeviceHandle(entry.device, entry.info, this.usb.newTransfer, {
      logger: this.log,
      iso: this.isoEngine(),
      streams: this.streamsEngine(),
      onClose: () => {
        if (this.handles.get(deviceId) === handle) this.handles.delete(deviceId);
      },
    });
    handle.open();
    this.handles.set(deviceId, handle);
    this.log.info({ id: deviceId }, 'libusb device opened and claimed');
    return handle;
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.pollTimer) clearTimeout(this.pollTimer);
    this.unwatch?.();
    this.unwatch = undefined;
    await Promise.all([...this.handles.values()].map((h) => h.close().catch(() => {})));
    this.handles.clear();
    await this.scanning.catch(() => {});
  }
}

function hex(n: number): string {
  return n.toString(16).padStart(4, '0');
}
