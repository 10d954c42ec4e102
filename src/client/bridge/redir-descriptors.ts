// What QEMU's usb-redir learns about a device: the usbroam Device descriptor summary turned into
// usbredir's ep_info, interface_info, speed and filter fields (usbredirhost_parse_config /
// usbredirhost_parse_interface).
import { type Device, TransferType } from '../../gen/usbroam/v1/usbhost.js';
import { EndpointType, Speed as RedirSpeed, type FilterDeviceInfo } from '../../qemu/usbredir/index.js';

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
    epType[i] = redirEndpointType(e.type);
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

/** The proto's transfer type as usbredir's ep_info type (both USB's numbering; anything else is invalid). */
export function redirEndpointType(t: TransferType): number {
  switch (t) {
    case TransferType.TRANSFER_CONTROL:
      return EndpointType.control;
    case TransferType.TRANSFER_ISOCHRONOUS:
      return EndpointType.iso;
    case TransferType.TRANSFER_BULK:
      return EndpointType.bulk;
    case TransferType.TRANSFER_INTERRUPT:
      return EndpointType.interrupt;
    default:
      return EndpointType.invalid;
  }
}
