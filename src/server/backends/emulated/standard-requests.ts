// USB 2.0 chapter 9 on the emulated devices' control endpoint: the setup packet, and the
// standard requests every device answers the same way (GET_STATUS, CLEAR/SET_FEATURE,
// GET_DESCRIPTOR, GET/SET_CONFIGURATION, GET/SET_INTERFACE ...), against the narrow view of the
// device that StandardRequestTarget gives. Class and vendor requests stay with each device.
import { UrbStatus, type UrbResult } from '../types.js';
import { DT_BOS, DT_CONFIG, DT_DEVICE, DT_DEVICE_QUALIFIER, DT_OTHER_SPEED_CONFIG, DT_STRING, type DescriptorSet } from './descriptors.js';

export interface SetupPacket {
  bmRequestType: number;
  bRequest: number;
  wValue: number;
  wIndex: number;
  wLength: number;
}

export function parseSetup(b: Uint8Array): SetupPacket {
  return {
    bmRequestType: b[0]!,
    bRequest: b[1]!,
    wValue: b[2]! | (b[3]! << 8),
    wIndex: b[4]! | (b[5]! << 8),
    wLength: b[6]! | (b[7]! << 8),
  };
}

export function makeSetup(s: SetupPacket): Uint8Array {
  return Uint8Array.of(
    s.bmRequestType,
    s.bRequest,
    s.wValue & 0xff,
    s.wValue >> 8,
    s.wIndex & 0xff,
    s.wIndex >> 8,
    s.wLength & 0xff,
    s.wLength >> 8,
  );
}

export function result(status: UrbStatus, data?: Uint8Array, actualLength?: number): UrbResult {
  return { status, data, actualLength: actualLength ?? data?.length ?? 0 };
}
export const STALL: UrbResult = Object.freeze({ status: UrbStatus.Stall, actualLength: 0 }) as UrbResult;
export const ACK: UrbResult = Object.freeze({ status: UrbStatus.Success, actualLength: 0 }) as UrbResult;

/** The queue an endpoint address belongs to: 0x00 and 0x80 share the control endpoint's. */
export function epKey(address: number): number {
  return (address & 0x7f) === 0 ? 0 : address & 0x8f;
}

/** What the standard requests read and change on a device. */
export interface StandardRequestTarget {
  readonly descriptors: DescriptorSet;
  /** The active bConfigurationValue (0: unconfigured). */
  readonly configuration: number;
  /** Self-powered per the active configuration (the first one while unconfigured). */
  selfPowered(): boolean;
  /** Whether the active configuration has interface `n`. */
  hasInterface(n: number): boolean;
  altSetting(n: number): number;
  /** Whether `address` is an endpoint of the active configuration and alternate settings. */
  hasEndpoint(address: number): boolean;
  isHalted(address: number): boolean;
  halt(address: number): void;
  clearHalt(address: number): void;
  /** Applies SET_CONFIGURATION; false for a value the device does not have. */
  selectConfiguration(value: number): boolean;
  /** Applies SET_INTERFACE; false for an interface or alternate setting it does not have. */
  selectInterface(n: number, alt: number): boolean;
}

/** The answer to a standard request, or undefined for one the device itself handles. */
export function standardRequest(dev: StandardRequestTarget, s: SetupPacket, data: Uint8Array | undefined): UrbResult | undefined {
  const recipient = s.bmRequestType & 0x1f;
  const ok = (d?: Uint8Array): UrbResult => (d ? result(UrbStatus.Success, d) : ACK);
  switch (s.bRequest) {
    case 0x00: {
      // GET_STATUS
      if (recipient === 0) {
        return ok(Uint8Array.of(dev.selfPowered() ? 1 : 0, 0));
      }
      if (recipient === 1) return ok(Uint8Array.of(0, 0));
      if (recipient === 2) {
        if (epKey(s.wIndex) !== 0 && !dev.hasEndpoint(s.wIndex & 0xff)) return STALL;
        return ok(Uint8Array.of(dev.isHalted(s.wIndex & 0xff) ? 1 : 0, 0));
      }
      return STALL;
    }
    case 0x01: // CLEAR_FEATURE
    case 0x03: {
      // SET_FEATURE
      if (recipient === 2 && s.wValue === 0) {
        const ep = s.wIndex & 0xff;
        if (epKey(ep) === 0) return ACK;
        if (!dev.hasEndpoint(ep)) return STALL;
        if (s.bRequest === 0x01) dev.clearHalt(ep);
        else dev.halt(ep);
        return ACK;
      }
      return ACK; // remote wakeup, U1/U2, function suspend, test mode: accepted, no effect
    }
    case 0x05: // SET_ADDRESS
      return ACK;
    case 0x06: {
      // GET_DESCRIPTOR
      if (recipient !== 0) return undefined; // interface-specific (e.g. HID report): subclass
      const dtype = s.wValue >> 8;
      const index = s.wValue & 0xff;
      const ds = dev.descriptors;
      switch (dtype) {
        case DT_DEVICE:
          return ok(ds.device);
        case DT_CONFIG:
          return ds.configs[index] ? ok(ds.configs[index]) : STALL;
        case DT_STRING: {
          const str = ds.strings.get(index);
          return str ? ok(str) : STALL;
        }
        case DT_DEVICE_QUALIFIER:
          return ds.qualifier ? ok(ds.qualifier) : STALL;
        case DT_OTHER_SPEED_CONFIG: {
          const o = ds.otherSpeedConfigs?.[index];
          return o ? ok(o) : STALL;
        }
        case DT_BOS:
          return ds.bos ? ok(ds.bos) : STALL;
        default:
          return STALL;
      }
    }
    case 0x07: // SET_DESCRIPTOR
      return STALL;
    case 0x08: // GET_CONFIGURATION
      return ok(Uint8Array.of(dev.configuration));
    case 0x09: // SET_CONFIGURATION
      return dev.selectConfiguration(s.wValue & 0xff) ? ACK : STALL;
    case 0x0a: {
      // GET_INTERFACE
      if (!dev.hasInterface(s.wIndex)) return STALL;
      return ok(Uint8Array.of(dev.altSetting(s.wIndex)));
    }
    case 0x0b: // SET_INTERFACE
      return dev.selectInterface(s.wIndex & 0xff, s.wValue) ? ACK : STALL;
    case 0x0c: // SYNCH_FRAME
      return STALL;
    case 0x30: // SET_SEL
    case 0x31: // SET_ISOCH_DELAY
      return ACK;
    default:
      void data;
      return undefined;
  }
}
