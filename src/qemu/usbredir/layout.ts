// usbredir packet layouts: the type headers of every packet type, decoded, encoded and verified
// against the negotiated caps (usbredirparser.c: usbredirparser_get_type_header_len,
// usbredirparser_verify_type_header and the per-type struct layouts of usbredirproto.h).
// Pure functions on byte arrays; the stateful framing is in parser.ts.
import {
  Cap,
  HELLO_VERSION_SIZE,
  MAX_BULK_TRANSFER_SIZE,
  type Packet,
  type PacketTypeName,
  type Role,
} from './proto.js';

export type UsbredirErrorCode =
  | 'unknown_type' // type number not in the protocol
  | 'wrong_direction' // valid type, but not one this side may receive / send
  | 'bad_length' // header length smaller than the type header for this type
  | 'unexpected_data' // data on a type that carries none, or on a request in the no-data direction
  | 'data_length_mismatch' // data length differs from the packet's own length field
  | 'too_large' // header length over the configured maximum, or a transfer over 128 MiB
  | 'hello_not_first' // a packet before the hello (either direction)
  | 'duplicate_hello'
  | 'missing_cap' // packet needs a capability that is not advertised
  | 'invalid_field' // field value out of range / invalid (encode), or semantically invalid
  | 'parser_failed'; // push() after an earlier fatal error

export class UsbredirProtocolError extends Error {
  override readonly name = 'UsbredirProtocolError';
  /**
   * For errors thrown by push(): the complete packets decoded from the same push() call before
   * the error (they are valid and may be processed). Empty for encode errors.
   */
  packets: Packet[] = [];
  constructor(
    readonly code: UsbredirErrorCode,
    message: string,
    /** Input stream offset of the start of the offending packet (push errors only). */
    readonly streamOffset?: number,
  ) {
    super(message);
  }
}

const utf8Decoder = new TextDecoder('utf-8');
const utf8Encoder = new TextEncoder();
const EMPTY = new Uint8Array(0);

// ---- little-endian helpers (no DataView allocation) ----
export function r16(b: Uint8Array, o: number): number {
  return b[o]! | (b[o + 1]! << 8);
}
export function r32(b: Uint8Array, o: number): number {
  return (b[o]! | (b[o + 1]! << 8) | (b[o + 2]! << 16) | (b[o + 3]! << 24)) >>> 0;
}
export function w16(b: Uint8Array, o: number, v: number): void {
  b[o] = v;
  b[o + 1] = v >>> 8;
}
export function w32(b: Uint8Array, o: number, v: number): void {
  b[o] = v;
  b[o + 1] = v >>> 8;
  b[o + 2] = v >>> 16;
  b[o + 3] = v >>> 24;
}
export function rArr8(b: Uint8Array, o: number): number[] {
  const a = new Array<number>(32);
  for (let i = 0; i < 32; i++) a[i] = b[o + i]!;
  return a;
}
export function rArr16(b: Uint8Array, o: number): number[] {
  const a = new Array<number>(32);
  for (let i = 0; i < 32; i++) a[i] = r16(b, o + 2 * i);
  return a;
}
export function rArr32(b: Uint8Array, o: number): number[] {
  const a = new Array<number>(32);
  for (let i = 0; i < 32; i++) a[i] = r32(b, o + 4 * i);
  return a;
}

export function encErr(msg: string, code: UsbredirErrorCode = 'invalid_field'): UsbredirProtocolError {
  return new UsbredirProtocolError(code, msg);
}
export function chkInt(v: unknown, max: number, name: string): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > max) {
    throw encErr(`${name} must be an integer in 0..${max}, got ${String(v)}`);
  }
  return v;
}
export const u8 = (v: unknown, n: string) => chkInt(v, 0xff, n);
export const u16 = (v: unknown, n: string) => chkInt(v, 0xffff, n);
export const u32 = (v: unknown, n: string) => chkInt(v, 0xffffffff, n);
export function wArr(b: Uint8Array, o: number, a: unknown, width: 1 | 2 | 4, name: string): void {
  if (!Array.isArray(a) || a.length > 32) throw encErr(`${name} must be an array of at most 32 numbers`);
  const max = width === 1 ? 0xff : width === 2 ? 0xffff : 0xffffffff;
  for (let i = 0; i < a.length; i++) {
    const v = chkInt(a[i], max, `${name}[${i}]`);
    if (width === 1) b[o + i] = v;
    else if (width === 2) w16(b, o + 2 * i, v);
    else w32(b, o + 4 * i, v);
  }
}

export function hex(n: number): string {
  return '0x' + n.toString(16).padStart(2, '0');
}

/** Negotiated layout flags (both sides advertise the cap). */
export interface Negotiated {
  ids64: boolean;
  connectVersion: boolean;
  epMaxPacketSize: boolean;
  epMaxStreams: boolean;
  bulk32: boolean;
}
// ---------------------------------------------------------------------------------------------
// Type header decode / encode / verify

export function decodeHeader(name: PacketTypeName, id: bigint, b: Uint8Array, o: number, neg: Negotiated): Packet {
  switch (name) {
    case 'hello': {
      let end = o;
      while (end < o + HELLO_VERSION_SIZE - 1 && b[end] !== 0) end++;
      return { type: name, id, version: utf8Decoder.decode(b.subarray(o, end)), caps: [] };
    }
    case 'device_connect': {
      const p: Packet = {
        type: name,
        id,
        speed: b[o]!,
        deviceClass: b[o + 1]!,
        deviceSubclass: b[o + 2]!,
        deviceProtocol: b[o + 3]!,
        vendorId: r16(b, o + 4),
        productId: r16(b, o + 6),
      };
      if (neg.connectVersion) p.deviceVersionBcd = r16(b, o + 8);
      return p;
    }
    case 'device_disconnect':
    case 'reset':
    case 'get_configuration':
    case 'cancel_data_packet':
    case 'filter_reject':
    case 'device_disconnect_ack':
      return { type: name, id };
    case 'interface_info':
      return {
        type: name,
        id,
        interfaceCount: r32(b, o),
        interface: rArr8(b, o + 4),
        interfaceClass: rArr8(b, o + 36),
        interfaceSubclass: rArr8(b, o + 68),
        interfaceProtocol: rArr8(b, o + 100),
      };
    case 'ep_info': {
      const p: Packet = { type: name, id, epType: rArr8(b, o), interval: rArr8(b, o + 32), interface: rArr8(b, o + 64) };
      if (neg.epMaxPacketSize || neg.epMaxStreams) p.maxPacketSize = rArr16(b, o + 96);
      if (neg.epMaxStreams) p.maxStreams = rArr32(b, o + 160);
      return p;
    }
    case 'set_configuration':
      return { type: name, id, configuration: b[o]! };
    case 'configuration_status':
      return { type: name, id, status: b[o]!, configuration: b[o + 1]! };
    case 'set_alt_setting':
      return { type: name, id, interface: b[o]!, alt: b[o + 1]! };
    case 'get_alt_setting':
      return { type: name, id, interface: b[o]! };
    case 'alt_setting_status':
      return { type: name, id, status: b[o]!, interface: b[o + 1]!, alt: b[o + 2]! };
    case 'start_iso_stream':
      return { type: name, id, endpoint: b[o]!, pktsPerUrb: b[o + 1]!, noUrbs: b[o + 2]! };
    case 'stop_iso_stream':
    case 'start_interrupt_receiving':
    case 'stop_interrupt_receiving':
      return { type: name, id, endpoint: b[o]! };
    case 'iso_stream_status':
    case 'interrupt_receiving_status':
      return { type: name, id, status: b[o]!, endpoint: b[o + 1]! };
    case 'alloc_bulk_streams':
      return { type: name, id, endpoints: r32(b, o), noStreams: r32(b, o + 4) };
    case 'free_bulk_streams':
      return { type: name, id, endpoints: r32(b, o) };
    case 'bulk_streams_status':
      return { type: name, id, endpoints: r32(b, o), noStreams: r32(b, o + 4), status: b[o + 8]! };
    case 'filter_filter':
      return { type: name, id, rules: '' };
    case 'start_bulk_receiving':
      return {
        type: name,
        id,
        streamId: r32(b, o),
        bytesPerTransfer: r32(b, o + 4),
        endpoint: b[o + 8]!,
        noTransfers: b[o + 9]!,
      };
    case 'stop_bulk_receiving':
      return { type: name, id, streamId: r32(b, o), endpoint: b[o + 4]! };
    case 'bulk_receiving_status':
      return { type: name, id, streamId: r32(b, o), endpoint: b[o + 4]!, status: b[o + 5]! };
    case 'control_packet':
      return {
        type: name,
        id,
        endpoint: b[o]!,
        request: b[o + 1]!,
        requesttype: b[o + 2]!,
        status: b[o + 3]!,
        value: r16(b, o + 4),
        index: r16(b, o + 6),
        length: r16(b, o + 8),
        data: EMPTY,
      };
    case 'bulk_packet':
      return {
        type: name,
        id,
        endpoint: b[o]!,
        status: b[o + 1]!,
        length: neg.bulk32 ? (r16(b, o + 2) | (r16(b, o + 8) << 16)) >>> 0 : r16(b, o + 2),
        streamId: r32(b, o + 4),
        data: EMPTY,
      };
    case 'iso_packet':
    case 'interrupt_packet':
      return { type: name, id, endpoint: b[o]!, status: b[o + 1]!, length: r16(b, o + 2), data: EMPTY };
    case 'buffered_bulk_packet':
      return {
        type: name,
        id,
        streamId: r32(b, o),
        length: r32(b, o + 4),
        endpoint: b[o + 8]!,
        status: b[o + 9]!,
        data: EMPTY,
      };
  }
}

/** Write the type header of p at buf[o...], validating field ranges. */
export function encodeHeader(p: Packet, buf: Uint8Array, o: number, neg: Negotiated): void {
  switch (p.type) {
    case 'hello': {
      if (typeof p.version !== 'string' || p.version.includes('\0')) throw encErr('hello version must be a string without NUL');
      const v = utf8Encoder.encode(p.version);
      if (v.length > HELLO_VERSION_SIZE - 1) throw encErr(`hello version longer than ${HELLO_VERSION_SIZE - 1} bytes`);
      buf.set(v, o);
      return;
    }
    case 'device_connect':
      buf[o] = u8(p.speed, 'speed');
      buf[o + 1] = u8(p.deviceClass, 'deviceClass');
      buf[o + 2] = u8(p.deviceSubclass, 'deviceSubclass');
      buf[o + 3] = u8(p.deviceProtocol, 'deviceProtocol');
      w16(buf, o + 4, u16(p.vendorId, 'vendorId'));
      w16(buf, o + 6, u16(p.productId, 'productId'));
      if (neg.connectVersion) {
        if (p.deviceVersionBcd === undefined) throw encErr('deviceVersionBcd is required: connect_device_version is negotiated');
        w16(buf, o + 8, u16(p.deviceVersionBcd, 'deviceVersionBcd'));
      }
      return;
    case 'device_disconnect':
    case 'reset':
    case 'get_configuration':
    case 'cancel_data_packet':
    case 'filter_reject':
    case 'device_disconnect_ack':
    case 'filter_filter':
      return;
    case 'interface_info':
      w32(buf, o, u32(p.interfaceCount, 'interfaceCount'));
      wArr(buf, o + 4, p.interface, 1, 'interface');
      wArr(buf, o + 36, p.interfaceClass, 1, 'interfaceClass');
      wArr(buf, o + 68, p.interfaceSubclass, 1, 'interfaceSubclass');
      wArr(buf, o + 100, p.interfaceProtocol, 1, 'interfaceProtocol');
      return;
    case 'ep_info':
      wArr(buf, o, p.epType, 1, 'epType');
      wArr(buf, o + 32, p.interval, 1, 'interval');
      wArr(buf, o + 64, p.interface, 1, 'interface');
      if (neg.epMaxPacketSize || neg.epMaxStreams) {
        if (p.maxPacketSize === undefined) throw encErr('maxPacketSize is required: ep_info_max_packet_size is negotiated');
        wArr(buf, o + 96, p.maxPacketSize, 2, 'maxPacketSize');
      }
      if (neg.epMaxStreams) {
        if (p.maxStreams === undefined) throw encErr('maxStreams is required: bulk_streams is negotiated');
        wArr(buf, o + 160, p.maxStreams, 4, 'maxStreams');
      }
      return;
    case 'set_configuration':
      buf[o] = u8(p.configuration, 'configuration');
      return;
    case 'configuration_status':
      buf[o] = u8(p.status, 'status');
      buf[o + 1] = u8(p.configuration, 'configuration');
      return;
    case 'set_alt_setting':
      buf[o] = u8(p.interface, 'interface');
      buf[o + 1] = u8(p.alt, 'alt');
      return;
    case 'get_alt_setting':
      buf[o] = u8(p.interface, 'interface');
      return;
    case 'alt_setting_status':
      buf[o] = u8(p.status, 'status');
      buf[o + 1] = u8(p.interface, 'interface');
      buf[o + 2] = u8(p.alt, 'alt');
      return;
    case 'start_iso_stream':
      buf[o] = u8(p.endpoint, 'endpoint');
      buf[o + 1] = u8(p.pktsPerUrb, 'pktsPerUrb');
      buf[o + 2] = u8(p.noUrbs, 'noUrbs');
      return;
    case 'stop_iso_stream':
    case 'start_interrupt_receiving':
    case 'stop_interrupt_receiving':
      buf[o] = u8(p.endpoint, 'endpoint');
      return;
    case 'iso_stream_status':
    case 'interrupt_receiving_status':
      buf[o] = u8(p.status, 'status');
      buf[o + 1] = u8(p.endpoint, 'endpoint');
      return;
    case 'alloc_bulk_streams':
      w32(buf, o, u32(p.endpoints, 'endpoints'));
      w32(buf, o + 4, u32(p.noStreams, 'noStreams'));
      return;
    case 'free_bulk_streams':
      w32(buf, o, u32(p.endpoints, 'endpoints'));
      return;
    case 'bulk_streams_status':
      w32(buf, o, u32(p.endpoints, 'endpoints'));
      w32(buf, o + 4, u32(p.noStreams, 'noStreams'));
      buf[o + 8] = u8(p.status, 'status');
      return;
    case 'start_bulk_receiving':
      w32(buf, o, u32(p.streamId, 'streamId'));
      w32(buf, o + 4, u32(p.bytesPerTransfer, 'bytesPerTransfer'));
      buf[o + 8] = u8(p.endpoint, 'endpoint');
      buf[o + 9] = u8(p.noTransfers, 'noTransfers');
      return;
    case 'stop_bulk_receiving':
      w32(buf, o, u32(p.streamId, 'streamId'));
      buf[o + 4] = u8(p.endpoint, 'endpoint');
      return;
    case 'bulk_receiving_status':
      w32(buf, o, u32(p.streamId, 'streamId'));
      buf[o + 4] = u8(p.endpoint, 'endpoint');
      buf[o + 5] = u8(p.status, 'status');
      return;
    case 'control_packet':
      buf[o] = u8(p.endpoint, 'endpoint');
      buf[o + 1] = u8(p.request, 'request');
      buf[o + 2] = u8(p.requesttype, 'requesttype');
      buf[o + 3] = u8(p.status, 'status');
      w16(buf, o + 4, u16(p.value, 'value'));
      w16(buf, o + 6, u16(p.index, 'index'));
      w16(buf, o + 8, u16(p.length, 'length'));
      return;
    case 'bulk_packet': {
      buf[o] = u8(p.endpoint, 'endpoint');
      buf[o + 1] = u8(p.status, 'status');
      const len = neg.bulk32 ? u32(p.length, 'length') : u16(p.length, 'length (no 32bits_bulk_length)');
      w16(buf, o + 2, len & 0xffff);
      w32(buf, o + 4, u32(p.streamId, 'streamId'));
      if (neg.bulk32) w16(buf, o + 8, len >>> 16);
      return;
    }
    case 'iso_packet':
    case 'interrupt_packet':
      buf[o] = u8(p.endpoint, 'endpoint');
      buf[o + 1] = u8(p.status, 'status');
      w16(buf, o + 2, u16(p.length, 'length'));
      return;
    case 'buffered_bulk_packet':
      w32(buf, o, u32(p.streamId, 'streamId'));
      w32(buf, o + 4, u32(p.length, 'length'));
      buf[o + 8] = u8(p.endpoint, 'endpoint');
      buf[o + 9] = u8(p.status, 'status');
      return;
  }
}

/**
 * usbredirparser_verify_type_header. `receiver` = role receiving the packet; `capCheck` = the
 * cap test the reference uses (own caps when receiving, peer caps when sending).
 * Returns [code, message] on failure, undefined when valid.
 */
export function verifyPacket(
  p: Packet,
  dataLen: number,
  receiver: Role,
  capCheck: (cap: number) => boolean,
): [UsbredirErrorCode, string] | undefined {
  let length = -1;
  let ep = -1;
  switch (p.type) {
    case 'interface_info':
      if (p.interfaceCount > 32) return ['invalid_field', `interface_count ${p.interfaceCount} > 32`];
      break;
    case 'start_interrupt_receiving':
    case 'stop_interrupt_receiving':
    case 'interrupt_receiving_status':
      if (!(p.endpoint & 0x80)) return ['invalid_field', `${p.type} on non input ep ${hex(p.endpoint)}`];
      break;
    case 'filter_reject':
      return needCap(capCheck, Cap.filter, 'filter_reject');
    case 'filter_filter':
      return needCap(capCheck, Cap.filter, 'filter_filter') ?? (dataLen < 1 ? ['invalid_field', 'filter_filter without data'] : undefined);
    case 'device_disconnect_ack':
      return needCap(capCheck, Cap.device_disconnect_ack, 'device_disconnect_ack');
    case 'start_bulk_receiving': {
      const c = needCap(capCheck, Cap.bulk_receiving, 'start_bulk_receiving');
      if (c) return c;
      if (p.bytesPerTransfer > MAX_BULK_TRANSFER_SIZE) {
        return ['too_large', `start bulk receiving length exceeds limits ${p.bytesPerTransfer} > ${MAX_BULK_TRANSFER_SIZE}`];
      }
      if (!(p.endpoint & 0x80)) return ['invalid_field', `start bulk receiving on non input ep ${hex(p.endpoint)}`];
      break;
    }
    case 'stop_bulk_receiving':
    case 'bulk_receiving_status': {
      const c = needCap(capCheck, Cap.bulk_receiving, p.type);
      if (c) return c;
      if (!(p.endpoint & 0x80)) return ['invalid_field', `${p.type} on non input ep ${hex(p.endpoint)}`];
      break;
    }
    case 'control_packet':
    case 'iso_packet':
    case 'interrupt_packet':
      length = p.length;
      ep = p.endpoint;
      break;
    case 'bulk_packet':
      if (p.length > MAX_BULK_TRANSFER_SIZE) {
        return ['too_large', `bulk transfer length exceeds limits ${p.length} > ${MAX_BULK_TRANSFER_SIZE}`];
      }
      length = p.length;
      ep = p.endpoint;
      break;
    case 'buffered_bulk_packet': {
      const c = needCap(capCheck, Cap.bulk_receiving, 'buffered_bulk_packet');
      if (c) return c;
      if (p.length > MAX_BULK_TRANSFER_SIZE) {
        return ['too_large', `buffered bulk transfer length exceeds limits ${p.length} > ${MAX_BULK_TRANSFER_SIZE}`];
      }
      length = p.length;
      ep = p.endpoint;
      break;
    }
    default:
      break;
  }
  if (ep !== -1) {
    // Data flows host->device on OUT eps and device->host on IN eps.
    const expectData = ep & 0x80 ? receiver === 'host' : receiver === 'device';
    if (expectData) {
      if (dataLen !== length) {
        return ['data_length_mismatch', `${p.type}: data len ${dataLen} != header len ${length} ep ${hex(ep)}`];
      }
    } else {
      if (dataLen !== 0) return ['unexpected_data', `${p.type}: unexpected extra data ep ${hex(ep)}`];
      if (p.type === 'iso_packet') return ['wrong_direction', 'iso packet sent in wrong direction'];
      if (p.type === 'interrupt_packet' && receiver === 'device') {
        return ['wrong_direction', 'interrupt packet sent in wrong direction'];
      }
      if (p.type === 'buffered_bulk_packet') return ['wrong_direction', 'buffered bulk packet sent in wrong direction'];
    }
  }
  return undefined;
}

/** The error for a packet that needs a cap the check says is not in effect. */
function needCap(capCheck: (cap: number) => boolean, cap: number, what: string): [UsbredirErrorCode, string] | undefined {
  return capCheck(cap) ? undefined : ['missing_cap', `${what} without cap ${capName(cap)}`];
}

function capName(cap: number): string {
  for (const [k, v] of Object.entries(Cap)) if (v === cap) return k;
  return String(cap);
}
