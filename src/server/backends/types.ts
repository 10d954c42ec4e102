// The contract every device backend (emulated, libusb) implements.
//
// It is shaped after libusb's asynchronous model: any number of URBs may be in
// flight per endpoint, each completes exactly once through its callback
// (success, error or cancelled), URBs on one endpoint complete in submission
// order, and a stalled endpoint fails its queued URBs until clear-halt.
import type { EventEmitter } from 'node:events';

export enum Speed {
  Unknown = 0,
  Low = 1,
  Full = 2,
  High = 3,
  Super = 4,
  SuperPlus = 5,
}

/** USB's numbering (bmAttributes bits 1..0), which the proto's TransferType and usbredir's ep_info type share. */
export enum TransferType {
  Control = 0,
  Isochronous = 1,
  Bulk = 2,
  Interrupt = 3,
}

/** The transfer type an endpoint descriptor's bmAttributes names. */
export const transferTypeOfAttributes = (bmAttributes: number): TransferType => (bmAttributes & 3) as TransferType;

/** The same numbering as usbredir's status codes and the proto's UrbStatus. */
export enum UrbStatus {
  Success = 0,
  Cancelled = 1,
  Inval = 2,
  IoError = 3,
  Stall = 4,
  Timeout = 5,
  Babble = 6,
}

export const URB_SHORT_NOT_OK = 1;
export const URB_ZERO_PACKET = 2;

export interface EndpointInfo {
  /** bEndpointAddress: number | 0x80 for IN. */
  address: number;
  type: TransferType;
  interval: number;
  maxPacketSize: number;
  maxStreams: number;
  interfaceNumber: number;
}

export interface InterfaceInfo {
  number: number;
  alternateSetting: number;
  interfaceClass: number;
  interfaceSubclass: number;
  interfaceProtocol: number;
  numEndpoints: number;
}

export interface ConfigurationSummary {
  value: number;
  maxPowerMa: number;
  selfPowered: boolean;
  remoteWakeup: boolean;
  interfaces: InterfaceInfo[];
  endpoints: EndpointInfo[];
}

/** What a backend knows about a device, before anyone opens it. */
export interface DeviceInfo {
  /** Stable id: from bus/port path and serial. */
  id: string;
  vendorId: number;
  productId: number;
  deviceClass: number;
  deviceSubclass: number;
  deviceProtocol: number;
  bcdUsb: number;
  bcdDevice: number;
  speed: Speed;
  manufacturer: string;
  product: string;
  serial: string;
  bus: number;
  portPath: number[];
  maxPacketSize0: number;
  configurations: ConfigurationSummary[];
  /** Active configuration value (0: unconfigured). */
  activeConfiguration: number;
  /** Interfaces/endpoints of the active configuration's current alt settings. */
  interfaces: InterfaceInfo[];
  endpoints: EndpointInfo[];
  backend: string;
}

export interface IsoPacket {
  length: number;
  status: UrbStatus;
  actualLength: number;
}

export interface Urb {
  /** Unique among this handle's in-flight URBs; used by cancel. */
  id: number;
  /** bEndpointAddress; 0x00/0x80 are the control endpoint. */
  endpoint: number;
  type: TransferType;
  /** Control: the 8-byte setup packet. Its wLength gives the data stage length. */
  setup?: Uint8Array;
  /** OUT data (OUT transfers, control OUT data stage). */
  data?: Uint8Array;
  /** IN: the number of bytes requested. */
  length: number;
  streamId: number;
  /** URB_SHORT_NOT_OK | URB_ZERO_PACKET */
  flags: number;
  /** Isochronous packets: lengths; OUT data is their concatenation. */
  isoPackets?: IsoPacket[];
  /** 0: none. */
  timeoutMs: number;
}

export interface UrbResult {
  status: UrbStatus;
  /** IN data; its length is the actual length. */
  data?: Uint8Array;
  /** Bytes transferred (OUT: bytes accepted). */
  actualLength: number;
  isoPackets?: IsoPacket[];
}

/** Raised by the async device operations; `status` maps onto UrbStatus. */
export class UsbError extends Error {
  constructor(
    message: string,
    readonly status: UrbStatus = UrbStatus.IoError,
  ) {
    super(message);
    this.name = 'UsbError';
  }
}

/**
 * An open, claimed device. Emits 'gone' (reason: string) when the device
 * disappears; after that every URB completes with IoError.
 */
export interface DeviceHandle extends EventEmitter {
  readonly info: DeviceInfo;
  /**
   * Queue a URB. `done` is called exactly once, asynchronously (never from
   * inside submit). Invalid URBs (unknown endpoint, wrong type) complete with
   * Inval or Stall, they do not throw.
   */
  submit(urb: Urb, done: (result: UrbResult) => void): void;
  /** Cancel an in-flight URB: it completes with Cancelled if it had not completed. Returns false if unknown. */
  cancel(urbId: number): boolean;
  setConfiguration(value: number): Promise<void>;
  getConfiguration(): Promise<number>;
  setInterface(interfaceNumber: number, alternateSetting: number): Promise<void>;
  getInterface(interfaceNumber: number): Promise<number>;
  clearHalt(endpoint: number): Promise<void>;
  /** Port reset: cancels everything in flight, back to the default state. */
  reset(): Promise<void>;
  /**
   * Optional: why this backend cannot execute such a URB at all (isochronous, bulk streams...),
   * naming device, endpoint and what is missing; undefined when it can. A session may refuse
   * such URBs (and receiving streams) up front with that message instead of submitting them.
   */
  unsupported?(urb: Pick<Urb, 'endpoint' | 'type' | 'streamId'>): string | undefined;
  allocBulkStreams(endpoints: number[], numStreams: number): Promise<number>;
  freeBulkStreams(endpoints: number[]): Promise<void>;
  /** Cancel everything, release interfaces; the handle is unusable afterwards. */
  close(): Promise<void>;
}

/**
 * A source of devices. Emits 'added' (DeviceInfo) and 'removed' (id: string).
 */
export interface UsbBackend extends EventEmitter {
  readonly name: string;
  list(): DeviceInfo[];
  open(deviceId: string): Promise<DeviceHandle>;
  close(): Promise<void>;
}
