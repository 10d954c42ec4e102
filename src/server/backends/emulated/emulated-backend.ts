// A UsbBackend made of emulated devices, for the demo and for tests (hotplug,
// unplug, "each URB executed exactly once").
import { EventEmitter } from 'node:events';
import { join } from 'node:path';
import { tmpdir } from 'node:os';
import { Speed, UrbStatus, UsbError, type DeviceHandle, type DeviceInfo, type UsbBackend } from '../types.js';
import { silentLogger, type Logger } from '../../../common/log.js';
import type { EmulatedDevice } from './emulated-device.js';
import { MassStorageDevice } from './mass-storage.js';
import { LoopbackDevice } from './loopback.js';
import { FtdiDevice } from './ftdi.js';
import { UasDevice } from './uas.js';
import { SerialDevice } from './serial.js';

export class EmulatedBackend extends EventEmitter implements UsbBackend {
  readonly name = 'emulated';
  private readonly devices = new Map<string, EmulatedDevice>();
  private readonly log: Logger;

  constructor(options: { logger?: Logger } = {}) {
    super();
    this.log = (options.logger ?? silentLogger).child({ backend: 'emulated' });
  }

  /**
   * Plug a device in; emits 'added' (DeviceInfo). A device removed earlier with
   * `remove(id, { dispose: false })` can be added again (re-plug).
   */
  add(device: EmulatedDevice): void {
    if (this.devices.has(device.id)) throw new Error(`duplicate emulated device id ${device.id}`);
    device.replug();
    this.devices.set(device.id, device);
    this.log.info({ device: device.id }, 'emulated device added');
    this.emit('added', device.info);
  }

  /**
   * Unplug a device: an opened handle emits 'gone' and fails its URBs with
   * IoError; emits 'removed' (id). Resources (image files) are released
   * unless `dispose: false` (then the same device object can be re-added).
   */
  async remove(id: string, options: { dispose?: boolean } = {}): Promise<boolean> {
    const device = this.devices.get(id);
    if (!device) return false;
    this.devices.delete(id);
    device.unplug('device removed');
    this.log.info({ device: id }, 'emulated device removed');
    this.emit('removed', id);
    if (options.dispose ?? true) await device.dispose();
    return true;
  }

  get(id: string): EmulatedDevice | undefined {
    return this.devices.get(id);
  }

  devicesList(): EmulatedDevice[] {
    return [...this.devices.values()];
  }

  list(): DeviceInfo[] {
    return [...this.devices.values()].map((d) => d.info);
  }

  async open(deviceId: string): Promise<DeviceHandle> {
    const device = this.devices.get(deviceId);
    if (!device) throw new UsbError(`no such device ${deviceId}`, UrbStatus.Inval);
    device.markOpened();
    return device;
  }

  async close(): Promise<void> {
    const devices = [...this.devices.values()];
    this.devices.clear();
    for (const d of devices) {
      await d.close();
      await d.dispose();
    }
  }
}

export interface DefaultEmulatedBackendOptions {
  /** Mass storage image (default: <tmpdir>/usbroam-emu-disk.img). */
  imagePath?: string;
  /** Size when the image is created (default 64 MiB). */
  imageSizeBytes?: number;
  readOnly?: boolean;
  /** Speed of every device (default high speed). */
  speed?: Speed;
  /** Speed of the mass-storage disk only (default `speed`). */
  diskSpeed?: Speed;
  /** Milliseconds each READ/WRITE command of the disk waits before its data moves (default 0). */
  diskLatencyMs?: number;
  logger?: Logger;
  /** Leave out devices. */
  massStorage?: boolean;
  loopback?: boolean;
  /** ms the loopback device takes to answer its slow vendor request (see loopback.ts). */
  controlLatencyMs?: number;
  serial?: boolean;
  /** Add the FTDI FT232R-like echo port (port 4, id emu-1-4; default off). */
  ftdi?: boolean;
  /** Add a SuperSpeed UAS disk on this image (port 5, id emu-1-5; default none). */
  uas?: { imagePath: string; sizeBytes?: number; latencyMs?: number };
}

/** Names of the speeds an emulated device can run at (for flags and config files). */
export const EMULATED_SPEEDS: Readonly<Record<string, Speed>> = Object.freeze({
  full: Speed.Full,
  high: Speed.High,
  super: Speed.Super,
});

/** 'full' | 'high' | 'super' (case-insensitive) -> Speed; throws on anything else. */
export function parseEmulatedSpeed(name: string, what = 'speed'): Speed {
  const s = EMULATED_SPEEDS[name.trim().toLowerCase()];
  if (s === undefined) throw new Error(`${what} must be one of ${Object.keys(EMULATED_SPEEDS).join(', ')}, not "${name}"`);
  return s;
}

/**
 * The demo set on bus 1: mass storage (port 1, id emu-1-1), loopback (port 2,
 * emu-1-2) and CDC-ACM serial echo (port 3, emu-1-3).
 */
export async function createDefaultEmulatedBackend(opts: DefaultEmulatedBackendOptions = {}): Promise<EmulatedBackend> {
  const backend = new EmulatedBackend({ logger: opts.logger });
  const common = { bus: 1, speed: opts.speed, logger: opts.logger };
  if (opts.massStorage ?? true) {
    backend.add(
      await MassStorageDevice.create({
        ...common,
        speed: opts.diskSpeed ?? opts.speed,
        portPath: [1],
        imagePath: opts.imagePath ?? join(tmpdir(), 'usbroam-emu-disk.img'),
        sizeBytes: opts.imageSizeBytes,
        readOnly: opts.readOnly,
        serial: 'USBROAM-MSC-0001',
        latencyMs: opts.diskLatencyMs,
      }),
    );
  }
  if (opts.loopback ?? true) {
    backend.add(new LoopbackDevice({ ...common, portPath: [2], serial: 'USBROAM-LOOP-0001', controlLatencyMs: opts.controlLatencyMs }));
  }
  if (opts.serial ?? true) {
    backend.add(new SerialDevice({ ...common, portPath: [3], serial: 'USBROAM-ACM-0001' }));
  }
  if (opts.ftdi) {
    backend.add(new FtdiDevice({ bus: 1, logger: opts.logger, portPath: [4], serial: 'USBROAM-FTDI-0001' }));
  }
  if (opts.uas) {
    backend.add(await UasDevice.create({ bus: 1, logger: opts.logger, portPath: [5], speed: Speed.Super, imagePath: opts.uas.imagePath, sizeBytes: opts.uas.sizeBytes, readOnly: opts.readOnly, latencyMs: opts.uas.latencyMs }));
  }
  return backend;
}
