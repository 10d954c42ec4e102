// DeviceInfo from what libusb (node-usb 2.x) reports about a device, plus the
// kernel's sysfs where it has something libusb 2.x's binding does not expose
// (the speed) or already cached (the strings).
import { readFileSync } from 'node:fs';
import { Speed, TransferType, transferTypeOfAttributes, type ConfigurationSummary, type DeviceInfo, type EndpointInfo, type InterfaceInfo } from '../types.js';
import type { ConfigDescriptor, DeviceDescriptor, InterfaceDescriptor } from 'usb/dist/usb/descriptors.js';

/** The part of a node-usb `Device` the backend uses (a fake in unit tests). */
export interface UsbDeviceLike {
  busNumber: number;
  deviceAddress: number;
  portNumbers: number[];
  deviceDescriptor: DeviceDescriptor;
  readonly configDescriptor: ConfigDescriptor | undefined;
  readonly allConfigDescriptors: ConfigDescriptor[];
}

/** node-usb's errors: a libusb_error or libusb_transfer_status in errno. */
export interface LibusbErrorLike extends Error {
  errno?: number;
}

/** The node-usb pieces a handle needs (fakes in unit tests). */
export interface UsbTransferLike {
  submit(buffer: Buffer): unknown;
  cancel(): boolean;
}
export interface UsbOpenDeviceLike extends UsbDeviceLike {
  __open(): void;
  __close(): void;
  __claimInterface(n: number): void;
  __releaseInterface(n: number, cb: (err?: LibusbErrorLike) => void): void;
  __detachKernelDriver(n: number): void;
  __attachKernelDriver(n: number): void;
  __isKernelDriverActive(n: number): boolean;
  __setConfiguration(v: number, cb: (err?: LibusbErrorLike) => void): void;
  __setInterface(n: number, alt: number, cb: (err?: LibusbErrorLike) => void): void;
  __clearHalt(ep: number, cb: (err?: LibusbErrorLike) => void): void;
  reset(cb: (err?: LibusbErrorLike) => void): void;
}
export type TransferFactory = (
  device: UsbOpenDeviceLike,
  endpoint: number,
  type: number,
  timeoutMs: number,
  cb: (err: LibusbErrorLike | undefined, buf: Buffer, actual: number) => void,
) => UsbTransferLike;

export interface DeviceStrings {
  manufacturer: string;
  product: string;
  serial: string;
}

const DT_SS_ENDPOINT_COMPANION = 0x30;

/** The sysfs name of a device: "<bus>-<port>.<port>..." (root hubs: "usb<bus>"). */
export function sysfsName(bus: number, portPath: number[]): string {
  return portPath.length ? `${bus}-${portPath.join('.')}` : `usb${bus}`;
}

/** Stable device id: bus, port path and serial (the address changes on every re-plug, these do not). */
export function deviceId(bus: number, portPath: number[], serial: string): string {
  const base = `usb-${sysfsName(bus, portPath)}`;
  const s = serial.replace(/[^A-Za-z0-9._-]/g, '_').slice(0, 64);
  return s ? `${base}-${s}` : base;
}

export function speedFromSysfs(text: string | undefined): Speed {
  switch ((text ?? '').trim()) {
    case '1.5':
      return Speed.Low;
    case '12':
      return Speed.Full;
    case '480':
      return Speed.High;
    case '5000':
      return Speed.Super;
    case '10000':
    case '20000':
      return Speed.SuperPlus;
    default:
      return Speed.Unknown;
  }
}

export function readSysfs(bus: number, portPath: number[], attr: string, root = '/sys/bus/usb/devices'): string | undefined {
  try {
    return readFileSync(`${root}/${sysfsName(bus, portPath)}/${attr}`, 'utf8').replace(/\n$/, '');
  } catch {
    return undefined;
  }
}

/** Max streams from an endpoint's SuperSpeed companion descriptor (in `extra`). */
export function maxStreamsOf(extra: Uint8Array | undefined, type: TransferType): number {
  if (!extra || type !== TransferType.Bulk) return 0;
  let off = 0;
  while (off + 2 <= extra.length) {
    const len = extra[off]!;
    if (len < 2) break;
    if (extra[off + 1] === DT_SS_ENDPOINT_COMPANION && len >= 4) {
      const exp = extra[off + 3]! & 0x1f;
      return exp ? 1 << exp : 0;
    }
    off += len;
  }
  return 0;
}

function interfaceInfo(i: InterfaceDescriptor): InterfaceInfo {
  return {
    number: i.bInterfaceNumber,
    alternateSetting: i.bAlternateSetting,
    interfaceClass: i.bInterfaceClass,
    interfaceSubclass: i.bInterfaceSubClass,
    interfaceProtocol: i.bInterfaceProtocol,
    numEndpoints: i.bNumEndpoints,
  };
}

function endpointInfos(i: InterfaceDescriptor): EndpointInfo[] {
  return i.endpoints.map((e) => {
    const type = transferTypeOfAttributes(e.bmAttributes);
    return {
      address: e.bEndpointAddress,
      type,
      interval: e.bInterval,
      maxPacketSize: e.wMaxPacketSize,
      maxStreams: maxStreamsOf(e.extra, type),
      interfaceNumber: i.bInterfaceNumber,
    };
  });
}

/** A configuration summary: every interface alt setting, endpoints following their interface. */
export function configSummary(c: ConfigDescriptor, speed: Speed): ConfigurationSummary {
  const powerUnit = speed === Speed.Super || speed === Speed.SuperPlus ? 8 : 2;
  const interfaces: InterfaceInfo[] = [];
  const endpoints: EndpointInfo[] = [];
  for (const alts of c.interfaces) {
    for (const alt of alts) {
      interfaces.push(interfaceInfo(alt));
      endpoints.push(...endpointInfos(alt));
    }
  }
  return {
    value: c.bConfigurationValue,
    maxPowerMa: c.bMaxPower * powerUnit,
    selfPowered: (c.bmAttributes & 0x40) !== 0,
    remoteWakeup: (c.bmAttributes & 0x20) !== 0,
    interfaces,
    endpoints,
  };
}

/** Interfaces and endpoints of `config` with the given alt settings (default 0). */
export function currentSetting(c: ConfigDescriptor | undefined, alts: Map<number, number> = new Map()): { interfaces: InterfaceInfo[]; endpoints: EndpointInfo[] } {
  const interfaces: InterfaceInfo[] = [];
  const endpoints: EndpointInfo[] = [];
  if (!c) return { interfaces, endpoints };
  for (const group of c.interfaces) {
    const number = group[0]?.bInterfaceNumber;
    if (number === undefined) continue;
    const want = alts.get(number) ?? 0;
    const alt = group.find((a) => a.bAlternateSetting === want) ?? group[0]!;
    interfaces.push(interfaceInfo(alt));
    endpoints.push(...endpointInfos(alt));
  }
  return { interfaces, endpoints };
}

/**
 * Build the DeviceInfo; throws a descriptive Error when the device descriptor is unusable or a
 * configuration descriptor cannot be read (libusb: LIBUSB_ERROR_IO for a malformed one).
 */
export function buildDeviceInfo(d: UsbDeviceLike, strings: DeviceStrings, speed: Speed, backend = 'libusb'): DeviceInfo {
  const dd = d.deviceDescriptor;
  if (!dd || dd.bLength !== 18 || dd.bDescriptorType !== 1) {
    throw new Error(`bad device descriptor (bLength ${dd?.bLength}, type ${dd?.bDescriptorType})`);
  }
  const portPath = [...(d.portNumbers ?? [])];
  let configs: ConfigDescriptor[];
  let active: ConfigDescriptor | undefined;
  try {
    configs = d.allConfigDescriptors;
    active = d.configDescriptor;
  } catch (err) {
    throw new Error(`configuration descriptors cannot be read (${(err as Error).message})`);
  }
  const cur = currentSetting(active);
  return {
    id: deviceId(d.busNumber, portPath, strings.serial),
    vendorId: dd.idVendor,
    productId: dd.idProduct,
    deviceClass: dd.bDeviceClass,
    deviceSubclass: dd.bDeviceSubClass,
    deviceProtocol: dd.bDeviceProtocol,
    bcdUsb: dd.bcdUSB,
    bcdDevice: dd.bcdDevice,
    speed,
    manufacturer: strings.manufacturer,
    product: strings.product,
    serial: strings.serial,
    bus: d.busNumber,
    portPath,
    maxPacketSize0: dd.bMaxPacketSize0,
    configurations: configs.map((c) => configSummary(c, speed)),
    activeConfiguration: active?.bConfigurationValue ?? 0,
    interfaces: cur.interfaces,
    endpoints: cur.endpoints,
    backend,
  };
}
