// Descriptor builder for emulated devices.
//
// One declarative DeviceSpec (devices build it with descriptor-builder.ts) produces both the raw descriptor bytes answered
// to GET_DESCRIPTOR and (by parsing those very bytes back) the DeviceInfo
// summary, so the two can never disagree.
import {
  Speed,
  TransferType,
  transferTypeOfAttributes,
  type ConfigurationSummary,
  type EndpointInfo,
  type InterfaceInfo,
} from '../types.js';

export const DT_DEVICE = 0x01;
export const DT_CONFIG = 0x02;
export const DT_STRING = 0x03;
export const DT_INTERFACE = 0x04;
export const DT_ENDPOINT = 0x05;
export const DT_DEVICE_QUALIFIER = 0x06;
export const DT_OTHER_SPEED_CONFIG = 0x07;
export const DT_INTERFACE_ASSOCIATION = 0x0b;
export const DT_BOS = 0x0f;
export const DT_DEVICE_CAPABILITY = 0x10;
export const DT_SS_ENDPOINT_COMPANION = 0x30;

export interface EndpointSpec {
  /** bEndpointAddress (| 0x80 for IN). */
  address: number;
  type: TransferType;
  maxPacketSize: number;
  /** Raw bInterval. */
  interval: number;
  /** SuperSpeed companion: bMaxBurst (0..15). */
  maxBurst?: number;
  /** SuperSpeed bulk: log2 of the number of streams (0: none). */
  maxStreamsExp?: number;
  /** SuperSpeed isochronous: Mult (0..2). */
  mult?: number;
  /** SuperSpeed periodic: wBytesPerInterval. */
  bytesPerInterval?: number;
  /** Class-specific descriptors placed after the endpoint (and its SuperSpeed companion), e.g. UAS pipe usage. */
  extra?: Uint8Array;
}

export interface InterfaceSpec {
  number: number;
  alternateSetting: number;
  interfaceClass: number;
  interfaceSubclass: number;
  interfaceProtocol: number;
  name?: string;
  /** Class-specific descriptors placed after the interface descriptor. */
  extra?: Uint8Array;
  endpoints: EndpointSpec[];
}

export interface ConfigurationSpec {
  value: number;
  name?: string;
  maxPowerMa: number;
  selfPowered: boolean;
  remoteWakeup: boolean;
  /** Interface descriptors of every alternate setting, in order. */
  interfaces: InterfaceSpec[];
}

export interface DeviceSpec {
  /** bcdUSB used at full/high speed; SuperSpeed always reports 0x0320. */
  bcdUsb: number;
  deviceClass: number;
  deviceSubclass: number;
  deviceProtocol: number;
  /** Used at full/high speed; SuperSpeed always uses 512 (exponent 9). */
  maxPacketSize0: number;
  vendorId: number;
  productId: number;
  bcdDevice: number;
  manufacturer: string;
  product: string;
  serial: string;
  configurations: ConfigurationSpec[];
}

/** All descriptor bytes of a device at one speed. */
export interface DescriptorSet {
  speed: Speed;
  device: Uint8Array;
  /** Full configuration descriptors (wTotalLength bytes), in configuration order. */
  configs: Uint8Array[];
  /** String descriptors by index (0 = LANGID list). */
  strings: Map<number, Uint8Array>;
  /** Decoded strings by index (for DeviceInfo). */
  stringText: Map<number, string>;
  /** Device qualifier (only for devices running at full or high speed). */
  qualifier?: Uint8Array;
  /** Other-speed configuration descriptors (full <-> high). */
  otherSpeedConfigs?: Uint8Array[];
  /** BOS (SuperSpeed only). */
  bos?: Uint8Array;
}

class ByteWriter {
  private bytes: number[] = [];
  u8(v: number): this {
    this.bytes.push(v & 0xff);
    return this;
  }
  u16(v: number): this {
    this.bytes.push(v & 0xff, (v >> 8) & 0xff);
    return this;
  }
  u32(v: number): this {
    this.bytes.push(v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, (v >>> 24) & 0xff);
    return this;
  }
  raw(b: Uint8Array): this {
    for (const x of b) this.bytes.push(x);
    return this;
  }
  get length(): number {
    return this.bytes.length;
  }
  patchU16(at: number, v: number): void {
    this.bytes[at] = v & 0xff;
    this.bytes[at + 1] = (v >> 8) & 0xff;
  }
  toBytes(): Uint8Array {
    return Uint8Array.from(this.bytes);
  }
}

export function stringDescriptor(text: string): Uint8Array {
  const s = text.slice(0, 126);
  const out = new Uint8Array(2 + s.length * 2);
  out[0] = out.length;
  out[1] = DT_STRING;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    out[2 + i * 2] = c & 0xff;
    out[3 + i * 2] = c >> 8;
  }
  return out;
}

function isSuper(speed: Speed): boolean {
  return speed === Speed.Super || speed === Speed.SuperPlus;
}

function buildConfig(
  cfg: ConfigurationSpec,
  speed: Speed,
  descriptorType: number,
  stringIndex: (s: string | undefined) => number,
): Uint8Array {
  const w = new ByteWriter();
  const numInterfaces = new Set(cfg.interfaces.map((i) => i.number)).size;
  const powerUnit = isSuper(speed) ? 8 : 2;
  w.u8(9).u8(descriptorType).u16(0).u8(numInterfaces).u8(cfg.value).u8(stringIndex(cfg.name));
  w.u8(0x80 | (cfg.selfPowered ? 0x40 : 0) | (cfg.remoteWakeup ? 0x20 : 0));
  w.u8(Math.min(255, Math.ceil(cfg.maxPowerMa / powerUnit)));
  for (const intf of cfg.interfaces) {
    w.u8(9).u8(DT_INTERFACE).u8(intf.number).u8(intf.alternateSetting).u8(intf.endpoints.length);
    w.u8(intf.interfaceClass).u8(intf.interfaceSubclass).u8(intf.interfaceProtocol).u8(stringIndex(intf.name));
    if (intf.extra) w.raw(intf.extra);
    for (const ep of intf.endpoints) {
      w.u8(7).u8(DT_ENDPOINT).u8(ep.address).u8(ep.type).u16(ep.maxPacketSize).u8(ep.interval);
      if (isSuper(speed)) {
        let attrs = 0;
        if (ep.type === TransferType.Bulk) attrs = (ep.maxStreamsExp ?? 0) & 0x1f;
        if (ep.type === TransferType.Isochronous) attrs = (ep.mult ?? 0) & 0x3;
        const periodic = ep.type === TransferType.Isochronous || ep.type === TransferType.Interrupt;
        const bpi = periodic ? (ep.bytesPerInterval ?? ep.maxPacketSize * ((ep.maxBurst ?? 0) + 1)) : 0;
        w.u8(6).u8(DT_SS_ENDPOINT_COMPANION).u8(ep.maxBurst ?? 0).u8(attrs).u16(bpi);
      }
      if (ep.extra) w.raw(ep.extra);
    }
  }
  w.patchU16(2, w.length);
  return w.toBytes();
}

function buildBos(): Uint8Array {
  const w = new ByteWriter();
  w.u8(5).u8(DT_BOS).u16(0).u8(2);
  // USB 2.0 extension: LPM supported.
  w.u8(7).u8(DT_DEVICE_CAPABILITY).u8(0x02).u32(0x00000002);
  // SuperSpeed USB device capability: FS/HS/SS supported, lowest functional FS.
  w.u8(10).u8(DT_DEVICE_CAPABILITY).u8(0x03).u8(0).u16(0x000e).u8(1).u8(0x0a).u16(0x07ff);
  w.patchU16(2, w.length);
  return w.toBytes();
}

/**
 * Build every descriptor of `spec` as seen at `speed`. `otherSpec` (the spec as
 * built for the other of full/high speed) yields the other-speed configurations.
 */
export function buildDescriptors(spec: DeviceSpec, speed: Speed, otherSpec?: DeviceSpec): DescriptorSet {
  const strings = new Map<number, Uint8Array>();
  const stringText = new Map<number, string>();
  strings.set(0, Uint8Array.of(4, DT_STRING, 0x09, 0x04));
  const byText = new Map<string, number>();
  let next = 1;
  const stringIndex = (s: string | undefined): number => {
    if (s === undefined || s === '') return 0;
    const known = byText.get(s);
    if (known !== undefined) return known;
    const idx = next++;
    byText.set(s, idx);
    strings.set(idx, stringDescriptor(s));
    stringText.set(idx, s);
    return idx;
  };
  const iManufacturer = stringIndex(spec.manufacturer);
  const iProduct = stringIndex(spec.product);
  const iSerial = stringIndex(spec.serial);
  const superSpeed = isSuper(speed);
  const bcdUsb = superSpeed ? 0x0320 : spec.bcdUsb;
  const mps0 = superSpeed ? 9 : spec.maxPacketSize0;

  const dev = new ByteWriter();
  dev.u8(18).u8(DT_DEVICE).u16(bcdUsb).u8(spec.deviceClass).u8(spec.deviceSubclass).u8(spec.deviceProtocol);
  dev.u8(mps0).u16(spec.vendorId).u16(spec.productId).u16(spec.bcdDevice);
  dev.u8(iManufacturer).u8(iProduct).u8(iSerial).u8(spec.configurations.length);

  const configs = spec.configurations.map((c) => buildConfig(c, speed, DT_CONFIG, stringIndex));
  const set: DescriptorSet = { speed, device: dev.toBytes(), configs, strings, stringText };
  if (superSpeed) {
    set.bos = buildBos();
  } else if ((speed === Speed.High || speed === Speed.Full) && otherSpec) {
    const q = new ByteWriter();
    q.u8(10).u8(DT_DEVICE_QUALIFIER).u16(spec.bcdUsb).u8(spec.deviceClass).u8(spec.deviceSubclass);
    q.u8(spec.deviceProtocol).u8(otherSpec.maxPacketSize0).u8(otherSpec.configurations.length).u8(0);
    set.qualifier = q.toBytes();
    const otherSpeed = speed === Speed.High ? Speed.Full : Speed.High;
    set.otherSpeedConfigs = otherSpec.configurations.map((c) =>
      buildConfig(c, otherSpeed, DT_OTHER_SPEED_CONFIG, stringIndex),
    );
  }
  return set;
}

export interface ParsedDevice {
  bcdUsb: number;
  deviceClass: number;
  deviceSubclass: number;
  deviceProtocol: number;
  maxPacketSize0: number;
  vendorId: number;
  productId: number;
  bcdDevice: number;
  iManufacturer: number;
  iProduct: number;
  iSerial: number;
  numConfigurations: number;
}

export function parseDeviceDescriptor(d: Uint8Array): ParsedDevice {
  if (d.length < 18 || d[0] !== 18 || d[1] !== DT_DEVICE) throw new Error('bad device descriptor');
  const u16 = (o: number) => d[o]! | (d[o + 1]! << 8);
  return {
    bcdUsb: u16(2),
    deviceClass: d[4]!,
    deviceSubclass: d[5]!,
    deviceProtocol: d[6]!,
    maxPacketSize0: d[7]!,
    vendorId: u16(8),
    productId: u16(10),
    bcdDevice: u16(12),
    iManufacturer: d[14]!,
    iProduct: d[15]!,
    iSerial: d[16]!,
    numConfigurations: d[17]!,
  };
}

/** Parse a full configuration descriptor (as returned by GET_DESCRIPTOR) into a summary. */
export function parseConfigDescriptor(d: Uint8Array, speed: Speed): ConfigurationSummary {
  if (d.length < 9 || d[0] !== 9 || (d[1] !== DT_CONFIG && d[1] !== DT_OTHER_SPEED_CONFIG)) {
    throw new Error('bad configuration descriptor');
  }
  const total = d[2]! | (d[3]! << 8);
  if (total !== d.length) throw new Error(`wTotalLength ${total} != ${d.length}`);
  const powerUnit = isSuper(speed) ? 8 : 2;
  const summary: ConfigurationSummary = {
    value: d[5]!,
    maxPowerMa: d[8]! * powerUnit,
    selfPowered: (d[7]! & 0x40) !== 0,
    remoteWakeup: (d[7]! & 0x20) !== 0,
    interfaces: [],
    endpoints: [],
  };
  let off = d[0]!;
  let current: InterfaceInfo | undefined;
  let lastEp: EndpointInfo | undefined;
  while (off < d.length) {
    const len = d[off]!;
    const type = d[off + 1]!;
    if (len < 2 || off + len > d.length) throw new Error(`bad descriptor length at ${off}`);
    if (type === DT_INTERFACE) {
      current = {
        number: d[off + 2]!,
        alternateSetting: d[off + 3]!,
        numEndpoints: d[off + 4]!,
        interfaceClass: d[off + 5]!,
        interfaceSubclass: d[off + 6]!,
        interfaceProtocol: d[off + 7]!,
      };
      summary.interfaces.push(current);
      lastEp = undefined;
    } else if (type === DT_ENDPOINT) {
      if (!current) throw new Error('endpoint outside interface');
      lastEp = {
        address: d[off + 2]!,
        type: transferTypeOfAttributes(d[off + 3]!),
        maxPacketSize: d[off + 4]! | (d[off + 5]! << 8),
        interval: d[off + 6]!,
        maxStreams: 0,
        interfaceNumber: current.number,
      };
      summary.endpoints.push(lastEp);
    } else if (type === DT_SS_ENDPOINT_COMPANION && lastEp) {
      if (lastEp.type === TransferType.Bulk) {
        const exp = d[off + 3]! & 0x1f;
        lastEp.maxStreams = exp ? 1 << exp : 0;
      }
    }
    off += len;
  }
  return summary;
}

/** Endpoints of one interface alternate setting, from a configuration summary. */
export function altSettingEndpoints(
  cfg: ConfigurationSummary,
  interfaceNumber: number,
  alternateSetting: number,
): { intf: InterfaceInfo; endpoints: EndpointInfo[] } | undefined {
  // The summary's endpoints follow their interface descriptors in order; walk both.
  let epIdx = 0;
  for (const intf of cfg.interfaces) {
    const eps = cfg.endpoints.slice(epIdx, epIdx + intf.numEndpoints);
    epIdx += intf.numEndpoints;
    if (intf.number === interfaceNumber && intf.alternateSetting === alternateSetting) {
      return { intf, endpoints: eps };
    }
  }
  return undefined;
}
