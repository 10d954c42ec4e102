// usbredir wire protocol: constants and typed packet structs.
//
// Mirrors spice-usbredir `usbredirparser/usbredirproto.h` (+ usbredirproto-compat.h) and
// `docs/usb-redirection-protocol.md` (protocol version 0.7). Pure data, no I/O.
//
// Terminology. The usbredir document calls the side that HAS the USB device the "usb-host"
// (spice's usbredirhost, `usbredirparser_fl_usb_host`) and the side that USES it the
// "usb-guest" (QEMU's `usb-redir` device). In this project those are the roles:
//   - 'device': usbredir "usb-host"  (what our bridge is; receives commands, sends completions)
//   - 'host'  : usbredir "usb-guest" (QEMU, the guest's USB host controller side)
//
// Wire format: little-endian, packed structs. Every packet is
//   struct usb_redir_header { u32 type; u32 length; u32 id | u64 id; }
// followed by a type-specific header and optional data. `length` counts the type-specific
// header plus the data, not the main header. The id is 64 bits only when BOTH sides advertise
// `cap_64bits_ids` (known after the peer's hello); `hello` itself always uses 32-bit ids.
//
// Packet ids are `bigint`: QEMU uses guest memory addresses as ids (EHCI qTD address, xHCI TRB
// address), which with 64-bit ids can be any u64 value. A JS number only represents integers up
// to 2^53 exactly, so a number would silently corrupt high ids and break request/response
// matching. The cost is one small BigInt per packet.

/** usbredir protocol version implemented (USBREDIR_VERSION 0x000701 = 0.7.1). */
export const USBREDIR_VERSION = 0x000701;

/** Size of `char version[64]` in the hello header; at most 63 chars + NUL are sent. */
export const HELLO_VERSION_SIZE = 64;

/** Upper bound on bulk transfer sizes (reference parser MAX_BULK_TRANSFER_SIZE). */
export const MAX_BULK_TRANSFER_SIZE = 128 * 1024 * 1024;
/**
 * Upper bound on the `length` field of a packet (type header + data), reference parser
 * MAX_PACKET_SIZE = 128 MiB + 1 KiB.
 */
export const DEFAULT_MAX_PACKET_SIZE = MAX_BULK_TRANSFER_SIZE + 1024;

/** Main header sizes. */
export const HEADER_SIZE_32BIT_ID = 12;
export const HEADER_SIZE_64BIT_ID = 16;

// ---------------------------------------------------------------------------------------------
// Enums (as plain const objects: isolatedModules forbids const enums across files)

/** Status codes (usb_redir_success ...). Any other value is treated as an error by peers. */
export const Status = {
  success: 0,
  cancelled: 1, // the transfer was cancelled
  inval: 2, // invalid packet type / length / ep, etc.
  ioerror: 3,
  stall: 4,
  timeout: 5,
  babble: 6, // since 0.4.2
} as const;
export type StatusName = keyof typeof Status;

/** Endpoint types (match the USB spec) in ep_info.type[]; 255 = invalid / not present. */
export const EndpointType = {
  control: 0,
  iso: 1,
  bulk: 2,
  interrupt: 3,
  invalid: 255,
} as const;

/** Device speeds in device_connect.speed. */
export const Speed = {
  low: 0,
  full: 1,
  high: 2,
  super: 3,
  unknown: 255,
} as const;

/** Capability bit numbers (bit n of caps word n/32). */
export const Cap = {
  /** Supports USB 3 bulk streams (ep_info gains max_streams). Requires ep_info_max_packet_size. */
  bulk_streams: 0,
  /** device_connect has the device_version_bcd field. */
  connect_device_version: 1,
  /** Supports filter_reject and filter_filter packets. */
  filter: 2,
  /** Supports the device_disconnect_ack packet. */
  device_disconnect_ack: 3,
  /** ep_info has the max_packet_size field. */
  ep_info_max_packet_size: 4,
  /** 64-bit ids in the main header. */
  '64bits_ids': 5,
  /** bulk_packet header has length_high (32-bit lengths). */
  '32bits_bulk_length': 6,
  /** Supports bulk receiving / buffered bulk input. */
  bulk_receiving: 7,
} as const;
export type CapName = keyof typeof Cap;
/** A capability, by bit number or by name. */
export type CapId = number | CapName;

/** Number of u32 words needed for all known caps (USB_REDIR_CAPS_SIZE). */
export const CAPS_SIZE = 1;
/** Every capability this codec understands (0xff). QEMU 7.2 advertises exactly this. */
export const ALL_CAPS: readonly number[] = Object.freeze([0xff]);

/** Packet type numbers (enum in usbredirproto.h). */
export const PacketType = {
  // control packets
  hello: 0,
  device_connect: 1,
  device_disconnect: 2,
  reset: 3,
  interface_info: 4,
  ep_info: 5,
  set_configuration: 6,
  get_configuration: 7,
  configuration_status: 8,
  set_alt_setting: 9,
  get_alt_setting: 10,
  alt_setting_status: 11,
  start_iso_stream: 12,
  stop_iso_stream: 13,
  iso_stream_status: 14,
  start_interrupt_receiving: 15,
  stop_interrupt_receiving: 16,
  interrupt_receiving_status: 17,
  alloc_bulk_streams: 18,
  free_bulk_streams: 19,
  bulk_streams_status: 20,
  cancel_data_packet: 21,
  filter_reject: 22,
  filter_filter: 23,
  device_disconnect_ack: 24,
  start_bulk_receiving: 25,
  stop_bulk_receiving: 26,
  bulk_receiving_status: 27,
  // data packets
  control_packet: 100,
  bulk_packet: 101,
  iso_packet: 102,
  interrupt_packet: 103,
  buffered_bulk_packet: 104,
} as const;
export type PacketTypeName = keyof typeof PacketType;

const TYPE_NAMES: Map<number, PacketTypeName> = new Map(
  (Object.keys(PacketType) as PacketTypeName[]).map((k) => [PacketType[k], k]),
);
/** Name of a packet type number, or undefined for unknown numbers. */
export function packetTypeName(code: number): PacketTypeName | undefined {
  return TYPE_NAMES.get(code);
}

/** Our role on the connection; see the terminology note at the top of this file. */
export type Role = 'device' | 'host';

/**
 * Which role RECEIVES each packet type ('device' = sent by QEMU/usb-guest, 'host' = sent by the
 * device side/usb-host, 'both'). From usbredirparser_get_type_header_len (`command_for_host`).
 */
export const PacketReceiver: { readonly [K in PacketTypeName]: Role | 'both' } = {
  hello: 'both',
  device_connect: 'host',
  device_disconnect: 'host',
  reset: 'device',
  interface_info: 'host',
  ep_info: 'host',
  set_configuration: 'device',
  get_configuration: 'device',
  configuration_status: 'host',
  set_alt_setting: 'device',
  get_alt_setting: 'device',
  alt_setting_status: 'host',
  start_iso_stream: 'device',
  stop_iso_stream: 'device',
  iso_stream_status: 'host',
  start_interrupt_receiving: 'device',
  stop_interrupt_receiving: 'device',
  interrupt_receiving_status: 'host',
  alloc_bulk_streams: 'device',
  free_bulk_streams: 'device',
  bulk_streams_status: 'host',
  cancel_data_packet: 'device',
  filter_reject: 'device',
  filter_filter: 'both',
  device_disconnect_ack: 'device',
  start_bulk_receiving: 'device',
  stop_bulk_receiving: 'device',
  bulk_receiving_status: 'host',
  control_packet: 'both',
  bulk_packet: 'both',
  iso_packet: 'both',
  interrupt_packet: 'both',
  buffered_bulk_packet: 'host',
};

/**
 * Type-specific header sizes in bytes (packed C structs). Where the size depends on negotiated
 * caps the variants are listed; see `typeHeaderSize` in parser.ts.
 */
export const TypeHeaderSize = {
  hello: 64, // char version[64]; followed by u32 caps[] as data
  device_connect: 10, // u8 speed, class, subclass, protocol; u16 vendor, product, version_bcd
  device_connect_no_device_version: 8,
  device_disconnect: 0,
  reset: 0,
  interface_info: 132, // u32 count; u8 interface[32], class[32], subclass[32], protocol[32]
  ep_info: 288, // u8 type[32], interval[32], interface[32]; u16 max_packet_size[32]; u32 max_streams[32]
  ep_info_no_max_streams: 160,
  ep_info_no_max_pktsz: 96,
  set_configuration: 1, // u8 configuration
  get_configuration: 0,
  configuration_status: 2, // u8 status, configuration
  set_alt_setting: 2, // u8 interface, alt
  get_alt_setting: 1, // u8 interface
  alt_setting_status: 3, // u8 status, interface, alt
  start_iso_stream: 3, // u8 endpoint, pkts_per_urb, no_urbs
  stop_iso_stream: 1, // u8 endpoint
  iso_stream_status: 2, // u8 status, endpoint
  start_interrupt_receiving: 1, // u8 endpoint
  stop_interrupt_receiving: 1, // u8 endpoint
  interrupt_receiving_status: 2, // u8 status, endpoint
  alloc_bulk_streams: 8, // u32 endpoints (bitmask), no_streams
  free_bulk_streams: 4, // u32 endpoints
  bulk_streams_status: 9, // u32 endpoints, no_streams; u8 status
  cancel_data_packet: 0,
  filter_reject: 0,
  filter_filter: 0, // data: NUL-terminated rules string, "," between fields, "|" between rules
  device_disconnect_ack: 0,
  start_bulk_receiving: 10, // u32 stream_id, bytes_per_transfer; u8 endpoint, no_transfers
  stop_bulk_receiving: 5, // u32 stream_id; u8 endpoint
  bulk_receiving_status: 6, // u32 stream_id; u8 endpoint, status
  control_packet: 10, // u8 endpoint, request, requesttype, status; u16 value, index, length
  bulk_packet: 10, // u8 endpoint, status; u16 length; u32 stream_id; u16 length_high
  bulk_packet_16bit_length: 8,
  iso_packet: 4, // u8 endpoint, status; u16 length
  interrupt_packet: 4, // u8 endpoint, status; u16 length
  buffered_bulk_packet: 10, // u32 stream_id, length; u8 endpoint, status
} as const;

/** Types that may carry data after the type header (usbredirparser_expect_extra_data). */
export const TYPES_WITH_DATA: ReadonlySet<PacketTypeName> = new Set<PacketTypeName>([
  'hello',
  'filter_filter',
  'control_packet',
  'bulk_packet',
  'iso_packet',
  'interrupt_packet',
  'buffered_bulk_packet',
]);

// ---------------------------------------------------------------------------------------------
// Packet structs. Field names are camelCase versions of the C field names. Every packet carries
// the header `id` (bigint, see above). Fixed-size arrays are always exactly 32 entries when
// decoded; encode accepts shorter arrays and zero-fills.

interface Base<T extends PacketTypeName> {
  type: T;
  id: bigint;
}

export interface HelloPacket extends Base<'hello'> {
  /** Up to 63 bytes (UTF-8); the C struct is char version[64], NUL-terminated. */
  version: string;
  /** Capability words (u32 each), bit n of word n/32 = cap n. */
  caps: number[];
}
export interface DeviceConnectPacket extends Base<'device_connect'> {
  speed: number;
  deviceClass: number;
  deviceSubclass: number;
  deviceProtocol: number;
  vendorId: number;
  productId: number;
  /**
   * Only on the wire when both sides have cap connect_device_version. Decoded only then;
   * required by encode only then (ignored otherwise).
   */
  deviceVersionBcd?: number;
}
export interface DeviceDisconnectPacket extends Base<'device_disconnect'> {}
export interface ResetPacket extends Base<'reset'> {}
export interface InterfaceInfoPacket extends Base<'interface_info'> {
  /** <= 32 */
  interfaceCount: number;
  interface: number[];
  interfaceClass: number[];
  interfaceSubclass: number[];
  interfaceProtocol: number[];
}
export interface EpInfoPacket extends Base<'ep_info'> {
  /** Indexed by ((ep & 0x80) >> 3) | (ep & 0x0f): OUT eps 0-15, IN eps 16-31. */
  epType: number[];
  interval: number[];
  interface: number[];
  /** Present iff both sides have ep_info_max_packet_size. */
  maxPacketSize?: number[];
  /** Present iff both sides have bulk_streams. */
  maxStreams?: number[];
}
export interface SetConfigurationPacket extends Base<'set_configuration'> {
  configuration: number;
}
export interface GetConfigurationPacket extends Base<'get_configuration'> {}
export interface ConfigurationStatusPacket extends Base<'configuration_status'> {
  status: number;
  configuration: number;
}
export interface SetAltSettingPacket extends Base<'set_alt_setting'> {
  interface: number;
  alt: number;
}
export interface GetAltSettingPacket extends Base<'get_alt_setting'> {
  interface: number;
}
export interface AltSettingStatusPacket extends Base<'alt_setting_status'> {
  status: number;
  interface: number;
  alt: number;
}
export interface StartIsoStreamPacket extends Base<'start_iso_stream'> {
  endpoint: number;
  pktsPerUrb: number;
  noUrbs: number;
}
export interface StopIsoStreamPacket extends Base<'stop_iso_stream'> {
  endpoint: number;
}
export interface IsoStreamStatusPacket extends Base<'iso_stream_status'> {
  status: number;
  endpoint: number;
}
export interface StartInterruptReceivingPacket extends Base<'start_interrupt_receiving'> {
  /** Must be an IN endpoint (bit 0x80). */
  endpoint: number;
}
export interface StopInterruptReceivingPacket extends Base<'stop_interrupt_receiving'> {
  endpoint: number;
}
export interface InterruptReceivingStatusPacket extends Base<'interrupt_receiving_status'> {
  status: number;
  endpoint: number;
}
export interface AllocBulkStreamsPacket extends Base<'alloc_bulk_streams'> {
  /** Bitmask of endpoints. */
  endpoints: number;
  noStreams: number;
}
export interface FreeBulkStreamsPacket extends Base<'free_bulk_streams'> {
  endpoints: number;
}
export interface BulkStreamsStatusPacket extends Base<'bulk_streams_status'> {
  endpoints: number;
  noStreams: number;
  status: number;
}
export interface CancelDataPacketPacket extends Base<'cancel_data_packet'> {}
export interface FilterRejectPacket extends Base<'filter_reject'> {}
export interface FilterFilterPacket extends Base<'filter_filter'> {
  /** Rules string (without the NUL terminator): "," between fields, "|" between rules. */
  rules: string;
}
export interface DeviceDisconnectAckPacket extends Base<'device_disconnect_ack'> {}
export interface StartBulkReceivingPacket extends Base<'start_bulk_receiving'> {
  streamId: number;
  bytesPerTransfer: number;
  endpoint: number;
  noTransfers: number;
}
export interface StopBulkReceivingPacket extends Base<'stop_bulk_receiving'> {
  streamId: number;
  endpoint: number;
}
export interface BulkReceivingStatusPacket extends Base<'bulk_receiving_status'> {
  streamId: number;
  endpoint: number;
  status: number;
}

/**
 * Data packets. `data` is present (possibly empty) in the direction data flows: host->device for
 * OUT endpoints, device->host for IN endpoints; then `data.length` must equal the `length` field.
 * In the other direction `data` is empty and `length` is the requested / transferred length.
 * Decoded `data` may be a view into the chunk passed to `push` (no copy).
 */
export interface ControlPacket extends Base<'control_packet'> {
  endpoint: number;
  request: number;
  requesttype: number;
  status: number;
  value: number;
  index: number;
  length: number;
  data: Uint8Array;
}
export interface BulkPacket extends Base<'bulk_packet'> {
  endpoint: number;
  status: number;
  /**
   * Full length: `length | length_high << 16` on the wire. length_high exists only when both
   * sides have 32bits_bulk_length; without it the length must be <= 0xffff.
   */
  length: number;
  streamId: number;
  data: Uint8Array;
}
export interface IsoPacket extends Base<'iso_packet'> {
  endpoint: number;
  status: number;
  length: number;
  data: Uint8Array;
}
export interface InterruptPacket extends Base<'interrupt_packet'> {
  endpoint: number;
  status: number;
  length: number;
  data: Uint8Array;
}
export interface BufferedBulkPacket extends Base<'buffered_bulk_packet'> {
  streamId: number;
  length: number;
  endpoint: number;
  status: number;
  data: Uint8Array;
}

export type Packet =
  | HelloPacket
  | DeviceConnectPacket
  | DeviceDisconnectPacket
  | ResetPacket
  | InterfaceInfoPacket
  | EpInfoPacket
  | SetConfigurationPacket
  | GetConfigurationPacket
  | ConfigurationStatusPacket
  | SetAltSettingPacket
  | GetAltSettingPacket
  | AltSettingStatusPacket
  | StartIsoStreamPacket
  | StopIsoStreamPacket
  | IsoStreamStatusPacket
  | StartInterruptReceivingPacket
  | StopInterruptReceivingPacket
  | InterruptReceivingStatusPacket
  | AllocBulkStreamsPacket
  | FreeBulkStreamsPacket
  | BulkStreamsStatusPacket
  | CancelDataPacketPacket
  | FilterRejectPacket
  | FilterFilterPacket
  | DeviceDisconnectAckPacket
  | StartBulkReceivingPacket
  | StopBulkReceivingPacket
  | BulkReceivingStatusPacket
  | ControlPacket
  | BulkPacket
  | IsoPacket
  | InterruptPacket
  | BufferedBulkPacket;

/** The packet struct for a given type name. */
export type PacketOf<T extends PacketTypeName> = Extract<Packet, { type: T }>;

export type DataPacket = ControlPacket | BulkPacket | IsoPacket | InterruptPacket | BufferedBulkPacket;

export function isDataPacket(p: Packet): p is DataPacket {
  return PacketType[p.type] >= 100;
}

// ---------------------------------------------------------------------------------------------
// Capability word helpers (usbredirparser_caps_set_cap / caps_get_cap)

export function capBit(cap: CapId): number {
  const n = typeof cap === 'number' ? cap : Cap[cap];
  if (!Number.isInteger(n) || n < 0) throw new RangeError(`invalid capability ${String(cap)}`);
  return n;
}

/** Whether a caps word array has a capability. */
export function capsHas(caps: readonly number[], cap: CapId): boolean {
  const n = capBit(cap);
  const w = caps[n >>> 5];
  return w !== undefined && ((w >>> (n & 31)) & 1) === 1;
}

/** Build a caps word array from capability names / numbers. */
export function makeCaps(...caps: CapId[]): number[] {
  const out: number[] = [];
  for (const c of caps) {
    const n = capBit(c);
    const i = n >>> 5;
    while (out.length <= i) out.push(0);
    out[i] = (out[i]! | (1 << (n & 31))) >>> 0;
  }
  if (out.length === 0) out.push(0);
  return out;
}

/**
 * usbredirparser_verify_caps: bulk_streams without ep_info_max_packet_size is invalid and is
 * dropped (the ep_info layout could not carry max_streams otherwise). Returns a new array of
 * u32 words (at least one).
 */
export function normalizeCaps(caps: readonly number[]): number[] {
  const out = caps.length === 0 ? [0] : caps.map((w) => w >>> 0);
  if (capsHas(out, Cap.bulk_streams) && !capsHas(out, Cap.ep_info_max_packet_size)) {
    out[0] = (out[0]! & ~(1 << Cap.bulk_streams)) >>> 0;
  }
  return out;
}
