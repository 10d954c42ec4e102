// A small typed builder for the emulated devices' DeviceSpec: each device declares its
// configurations, interfaces and endpoints (and class-specific descriptors such as CDC's
// functional descriptors) by what they are; descriptors.ts turns the spec into the bytes.
import { Speed, TransferType } from '../types.js';
import type { ConfigurationSpec, DeviceSpec, EndpointSpec, InterfaceSpec } from './descriptors.js';

/** bMaxPacketSize of a bulk endpoint at `speed`: 64 (full), 512 (high), 1024 (SuperSpeed). */
export function bulkMaxPacketSize(speed: Speed): number {
  return speed === Speed.Full ? 64 : speed === Speed.High ? 512 : 1024;
}

/** A bulk endpoint; SuperSpeed companion: bMaxBurst, log2 of the number of streams. */
export function bulkEndpoint(address: number, maxPacketSize: number, ss: { maxBurst?: number; maxStreamsExp?: number; extra?: Uint8Array } = {}): EndpointSpec {
  return { address, type: TransferType.Bulk, maxPacketSize, interval: 0, ...ss };
}

/** An interrupt endpoint polled every `interval` (raw bInterval). */
export function interruptEndpoint(address: number, maxPacketSize: number, interval: number, ss: { maxBurst?: number; bytesPerInterval?: number } = {}): EndpointSpec {
  return { address, type: TransferType.Interrupt, maxPacketSize, interval, ...ss };
}

/** An isochronous endpoint serviced every `interval` (raw bInterval). */
export function isochronousEndpoint(
  address: number,
  maxPacketSize: number,
  interval: number,
  ss: { maxBurst?: number; mult?: number; bytesPerInterval?: number } = {},
): EndpointSpec {
  return { address, type: TransferType.Isochronous, maxPacketSize, interval, ...ss };
}

export interface InterfaceDecl {
  number: number;
  /** Default 0. */
  alternateSetting?: number;
  class: number;
  subclass?: number;
  protocol?: number;
  name?: string;
  /** Class-specific descriptors, placed after the interface descriptor in this order. */
  classDescriptors?: Uint8Array[];
}

export function usbInterface(d: InterfaceDecl, endpoints: EndpointSpec[]): InterfaceSpec {
  const spec: InterfaceSpec = {
    number: d.number,
    alternateSetting: d.alternateSetting ?? 0,
    interfaceClass: d.class,
    interfaceSubclass: d.subclass ?? 0,
    interfaceProtocol: d.protocol ?? 0,
    endpoints,
  };
  if (d.name !== undefined) spec.name = d.name;
  if (d.classDescriptors?.length) spec.extra = Buffer.concat(d.classDescriptors);
  return spec;
}

export interface ConfigurationDecl {
  value: number;
  name?: string;
  maxPowerMa: number;
  /** Default false. */
  selfPowered?: boolean;
  /** Default false. */
  remoteWakeup?: boolean;
}

/** A configuration; `interfaces` lists every alternate setting, in order. */
export function configuration(d: ConfigurationDecl, interfaces: InterfaceSpec[]): ConfigurationSpec {
  const spec: ConfigurationSpec = { value: d.value, maxPowerMa: d.maxPowerMa, selfPowered: d.selfPowered ?? false, remoteWakeup: d.remoteWakeup ?? false, interfaces };
  if (d.name !== undefined) spec.name = d.name;
  return spec;
}

export interface DeviceDecl {
  /** Default 0x0200 (USB 2.0; SuperSpeed always reports 0x0320). */
  bcdUsb?: number;
  /** Default 0: the class is per interface. */
  class?: number;
  subclass?: number;
  protocol?: number;
  /** Default 64 (SuperSpeed always uses 512). */
  maxPacketSize0?: number;
  vendorId: number;
  productId: number;
  /** Default 0x0100. */
  bcdDevice?: number;
  manufacturer: string;
  product: string;
  serial: string;
}

export function usbDevice(d: DeviceDecl, configurations: ConfigurationSpec[]): DeviceSpec {
  return {
    bcdUsb: d.bcdUsb ?? 0x0200,
    deviceClass: d.class ?? 0,
    deviceSubclass: d.subclass ?? 0,
    deviceProtocol: d.protocol ?? 0,
    maxPacketSize0: d.maxPacketSize0 ?? 64,
    vendorId: d.vendorId,
    productId: d.productId,
    bcdDevice: d.bcdDevice ?? 0x0100,
    manufacturer: d.manufacturer,
    product: d.product,
    serial: d.serial,
    configurations,
  };
}

const CS_INTERFACE = 0x24;

/** CDC functional descriptors (CDC 1.2 section 5.2.3, PSTN 1.2 section 5.3). */
export const cdcFunctional = {
  /** Header: the CDC release the functional descriptors follow. */
  header(bcdCdc: number): Uint8Array {
    return Uint8Array.of(5, CS_INTERFACE, 0x00, bcdCdc & 0xff, (bcdCdc >> 8) & 0xff);
  },
  /** Call management: bmCapabilities, and the data interface that carries calls. */
  callManagement(capabilities: number, dataInterface: number): Uint8Array {
    return Uint8Array.of(5, CS_INTERFACE, 0x01, capabilities, dataInterface);
  },
  /** Abstract control management: bmCapabilities (0x02 line coding + serial state, 0x04 send break). */
  acm(capabilities: number): Uint8Array {
    return Uint8Array.of(4, CS_INTERFACE, 0x02, capabilities);
  },
  /** Union: the controlling interface and its subordinate interfaces. */
  union(controlInterface: number, ...subordinates: number[]): Uint8Array {
    return Uint8Array.of(4 + subordinates.length, CS_INTERFACE, 0x06, controlInterface, ...subordinates);
  },
};
