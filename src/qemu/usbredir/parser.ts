// UsbredirParser: a stateful, pure (no I/O) usbredir codec for one connection.
//
// Behaviour follows spice-usbredir `usbredirparser/usbredirparser.c`:
//   - header size (32/64-bit ids) and the layout of device_connect, ep_info and bulk_packet
//     depend on caps both sides advertise (our configured caps + the peer's hello);
//   - packet types are only valid in one direction (usbredirparser_get_type_header_len);
//   - per-type verification (usbredirparser_verify_type_header): endpoint direction vs data,
//     data length == length field, bulk length limits, caps needed for filter / disconnect_ack /
//     bulk receiving packets, interface_count <= 32, NUL-terminated filter string.
// Differences, all stricter: the peer's first packet must be its hello and a second hello is an
// error (the reference logs and ignores it); the type header is verified BEFORE the data buffer
// is allocated; any protocol error is fatal for the parser (the reference skips the packet),
// because after a framing error the byte stream cannot be trusted.

import {
  CAPS_SIZE,
  Cap,
  DEFAULT_MAX_PACKET_SIZE,
  HEADER_SIZE_32BIT_ID,
  HEADER_SIZE_64BIT_ID,
  HELLO_VERSION_SIZE,
  MAX_BULK_TRANSFER_SIZE,
  PacketReceiver,
  PacketType,
  TYPES_WITH_DATA,
  TypeHeaderSize,
  ALL_CAPS,
  capsHas,
  normalizeCaps,
  packetTypeName,
  type CapId,
  type HelloPacket,
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

export interface UsbredirParserOptions {
  /** Our role: 'device' = usbredir usb-host (our bridge), 'host' = usb-guest (QEMU). */
  role: Role;
  /** Our capability words. Default ALL_CAPS (0xff), like QEMU 7.2. Normalized like the C code. */
  caps?: readonly number[];
  /** Version string for helloPacket(). Default "usbroam". At most 63 UTF-8 bytes. */
  version?: string;
  /**
   * Upper bound for the header `length` field (type header + data). Default 128 MiB + 1 KiB, like
   * the reference parser. Bounds the memory held for a partial packet.
   */
  maxPacketSize?: number;
  /**
   * Start without the hello exchange (usbredirparser_fl_no_hello), e.g. on the migration
   * destination: no hello is expected from the peer and none may be sent; both caps are given.
   */
  noHello?: { peerCaps: readonly number[] };
}

const EMPTY = new Uint8Array(0);
const utf8Decoder = new TextDecoder('utf-8');
const utf8Encoder = new TextEncoder();
const MAX_TYPE_HEADER = TypeHeaderSize.ep_info; // 288, the largest type header
const U64_MAX = (1n << 64n) - 1n;

// ---- little-endian helpers (no DataView allocation) ----
function r16(b: Uint8Array, o: number): number {
  return b[o]! | (b[o + 1]! << 8);
}
function r32(b: Uint8Array, o: number): number {
  return (b[o]! | (b[o + 1]! << 8) | (b[o + 2]! << 16) | (b[o + 3]! << 24)) >>> 0;
}
function w16(b: Uint8Array, o: number, v: number): void {
  b[o] = v;
  b[o + 1] = v >>> 8;
}
function w32(b: Uint8Array, o: number, v: number): void {
  b[o] = v;
  b[o + 1] = v >>> 8;
  b[o + 2] = v >>> 16;
  b[o + 3] = v >>> 24;
}
function rArr8(b: Uint8Array, o: number): number[] {
  const a = new Array<number>(32);
  for (let i = 0; i < 32; i++) a[i] = b[o + i]!;
  return a;
}
function rArr16(b: Uint8Array, o: number): number[] {
  const a = new Array<number>(32);
  for (let i = 0; i < 32; i++) a[i] = r16(b, o + 2 * i);
  return a;
}
function rArr32(b: Uint8Array, o: number): number[] {
  const a = new Array<number>(32);
  for (let i = 0; i < 32; i++) a[i] = r32(b, o + 4 * i);
  return a;
}

function encErr(msg: string, code: UsbredirErrorCode = 'invalid_field'): UsbredirProtocolError {
  return new UsbredirProtocolError(code, msg);
}
function chkInt(v: unknown, max: number, name: string): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > max) {
    throw encErr(`${name} must be an integer in 0..${max}, got ${String(v)}`);
  }
  return v;
}
const u8 = (v: unknown, n: string) => chkInt(v, 0xff, n);
const u16 = (v: unknown, n: string) => chkInt(v, 0xffff, n);
const u32 = (v: unknown, n: string) => chkInt(v, 0xffffffff, n);
function wArr(b: Uint8Array, o: number, a: unknown, width: 1 | 2 | 4, name: string): void {
  if (!Array.isArray(a) || a.length > 32) throw encErr(`${name} must be an array of at most 32 numbers`);
  const max = width === 1 ? 0xff : width === 2 ? 0xffff : 0xffffffff;
  for (let i = 0; i < a.length; i++) {
    const v = chkInt(a[i], max, `${name}[${i}]`);
    if (width === 1) b[o + i] = v;
    else if (width === 2) w16(b, o + 2 * i, v);
    else w32(b, o + 4 * i, v);
  }
}

function hex(n: number): string {
  return '0x' + n.toString(16).padStart(2, '0');
}

/** Negotiated layout flags (both sides advertise the cap). */
interface Negotiated {
  ids64: boolean;
  connectVersion: boolean;
  epMaxPacketSize: boolean;
  epMaxStreams: boolean;
  bulk32: boolean;
}

export class UsbredirParser {
  readonly role: Role;
  readonly peerRole: Role;
  /** Our (normalized) capability words. */
  readonly ourCaps: readonly number[];
  readonly maxPacketSize: number;
  readonly version: string;
  /** True if created with noHello (no hello exchange on this connection). */
  readonly noHello: boolean;

  private _peerCaps: number[] | null = null;
  private _helloSent = false;
  private neg: Negotiated;

  // ---- stream accounting ----
  private consumed = 0;
  private encoded = 0;
  private failure: UsbredirProtocolError | null = null;

  // ---- partial packet state ----
  /** Main header + type header bytes of the packet in progress. */
  private readonly hdr = new Uint8Array(HEADER_SIZE_64BIT_ID + MAX_TYPE_HEADER);
  private hdrFill = 0;
  /** Main header size of the packet in progress (fixed when it starts). */
  private curHl = 0;
  /** Type header size of the packet in progress, -1 until the main header is complete. */
  private curThl = -1;
  private curType: PacketTypeName = 'hello';
  private curLength = 0;
  private curId = 0n;
  /** Packet decoded from the headers, waiting for its data. */
  private curPacket: Packet | null = null;
  private data: Uint8Array | null = null;
  private dataFill = 0;

  constructor(opts: UsbredirParserOptions) {
    if (opts.role !== 'device' && opts.role !== 'host') throw new TypeError(`invalid role ${String(opts.role)}`);
    this.role = opts.role;
    this.peerRole = opts.role === 'device' ? 'host' : 'device';
    this.ourCaps = Object.freeze(normalizeCaps(opts.caps ?? ALL_CAPS));
    const max = opts.maxPacketSize ?? DEFAULT_MAX_PACKET_SIZE;
    if (!Number.isInteger(max) || max < 0 || max > 0xffffffff) throw new RangeError(`invalid maxPacketSize ${max}`);
    this.maxPacketSize = max;
    this.version = opts.version ?? 'usbroam';
    if (utf8Encoder.encode(this.version).length >= HELLO_VERSION_SIZE || this.version.includes('\0')) {
      throw new RangeError('version must be at most 63 UTF-8 bytes without NUL');
    }
    this.noHello = opts.noHello !== undefined;
    if (opts.noHello) {
      this._peerCaps = normalizeCaps(opts.noHello.peerCaps);
      this._helloSent = true;
    }
    this.neg = this.computeNeg();
  }

  // ------------------------------------------------------------------------------------------
  // Capabilities / negotiation

  /** The peer's (normalized) caps, or null before its hello. */
  get peerCaps(): readonly number[] | null {
    return this._peerCaps;
  }
  /** Whether the peer's hello has been received (always true with noHello). */
  get helloReceived(): boolean {
    return this._peerCaps !== null;
  }
  /** Whether our hello has been encoded (always true with noHello). */
  get helloSent(): boolean {
    return this._helloSent;
  }
  /** We advertise the cap (usbredirparser_have_cap). */
  weHaveCap(cap: CapId): boolean {
    return capsHas(this.ourCaps, cap);
  }
  /** The peer advertised the cap (false before its hello). */
  peerHasCap(cap: CapId): boolean {
    return this._peerCaps !== null && capsHas(this._peerCaps, cap);
  }
  /** Both sides advertise the cap: the cap is in effect. */
  hasCap(cap: CapId): boolean {
    return this.weHaveCap(cap) && this.peerHasCap(cap);
  }
  /** 64-bit ids in effect (for every packet except hello). */
  get using64BitIds(): boolean {
    return this.neg.ids64;
  }
  /** Main header size for packets other than hello: 12 or 16. */
  get headerSize(): number {
    return this.neg.ids64 ? HEADER_SIZE_64BIT_ID : HEADER_SIZE_32BIT_ID;
  }

  private computeNeg(): Negotiated {
    return {
      ids64: this.hasCap(Cap['64bits_ids']),
      connectVersion: this.hasCap(Cap.connect_device_version),
      epMaxPacketSize: this.hasCap(Cap.ep_info_max_packet_size),
      epMaxStreams: this.hasCap(Cap.bulk_streams),
      bulk32: this.hasCap(Cap['32bits_bulk_length']),
    };
  }

  /**
   * Size of the type-specific header of `type` when received by `receiver`, under the current
   * negotiation; -1 if that role never receives this type.
   */
  typeHeaderSize(type: PacketTypeName, receiver: Role): number {
    const r = PacketReceiver[type];
    if (r !== 'both' && r !== receiver) return -1;
    switch (type) {
      case 'device_connect':
        return this.neg.connectVersion ? TypeHeaderSize.device_connect : TypeHeaderSize.device_connect_no_device_version;
      case 'ep_info':
        return this.neg.epMaxStreams
          ? TypeHeaderSize.ep_info
          : this.neg.epMaxPacketSize
            ? TypeHeaderSize.ep_info_no_max_streams
            : TypeHeaderSize.ep_info_no_max_pktsz;
      case 'bulk_packet':
        return this.neg.bulk32 ? TypeHeaderSize.bulk_packet : TypeHeaderSize.bulk_packet_16bit_length;
      default:
        return TypeHeaderSize[type];
    }
  }

  /** A hello packet carrying our caps and version. */
  helloPacket(version: string = this.version): HelloPacket {
    return { type: 'hello', id: 0n, version, caps: [...this.ourCaps] };
  }

  // ------------------------------------------------------------------------------------------
  // Stream accounting (migration hand-off)

  /** Input bytes consumed as whole packets (returned by push) since creation. */
  get bytesConsumed(): number {
    return this.consumed;
  }
  /** Input bytes buffered as the start of an incomplete packet. */
  get pendingPartial(): number {
    return this.hdrFill + this.dataFill;
  }
  /** A copy of the buffered bytes of the incomplete packet (pendingPartial bytes). */
  pendingBytes(): Uint8Array {
    const out = new Uint8Array(this.pendingPartial);
    out.set(this.hdr.subarray(0, this.hdrFill), 0);
    if (this.data) out.set(this.data.subarray(0, this.dataFill), this.hdrFill);
    return out;
  }
  /** Bytes produced by encode() since creation. */
  get bytesEncoded(): number {
    return this.encoded;
  }
  /** The fatal error that stopped this parser, if any. */
  get error(): UsbredirProtocolError | null {
    return this.failure;
  }

  // ------------------------------------------------------------------------------------------
  // Decoding

  /**
   * Feed input bytes; returns every packet completed by them. Partial input is buffered (copied)
   * across calls. Data of a packet that arrives whole within one chunk is a subarray view of
   * `chunk` (no copy): do not reuse the chunk's memory while packets are alive.
   * Throws UsbredirProtocolError on invalid input; its `packets` holds the packets completed
   * earlier in the same call, and the parser is unusable afterwards.
   */
  push(chunk: Uint8Array): Packet[] {
    if (this.failure) {
      throw new UsbredirProtocolError('parser_failed', `parser already failed: ${this.failure.message}`);
    }
    const out: Packet[] = [];
    const n = chunk.length;
    let pos = 0;
    try {
      while (pos < n) {
        if (this.hdrFill === 0) {
          // At a packet boundary: decode in place when the whole packet is in this chunk.
          const hl = this.headerSize;
          const avail = n - pos;
          if (avail >= hl) {
            const type = r32(chunk, pos);
            const length = r32(chunk, pos + 4);
            if (avail - hl >= length) {
              const name = this.checkMainHeader(type, length);
              const thl = this.curThl;
              const id = this.readId(chunk, pos, hl);
              const p = this.decodeTypeHeader(name, id, chunk, pos + hl, length - thl);
              const data = chunk.subarray(pos + hl + thl, pos + hl + length);
              this.finishPacket(p, data);
              out.push(p);
              this.curThl = -1;
              pos += hl + length;
              this.consumed += hl + length;
              continue;
            }
          }
        }
        pos = this.feedSlow(chunk, pos, out);
      }
    } catch (e) {
      const err =
        e instanceof UsbredirProtocolError
          ? e
          : new UsbredirProtocolError('invalid_field', `internal decode error: ${(e as Error)?.message ?? String(e)}`);
      err.packets = out;
      this.failure = err;
      throw err;
    }
    return out;
  }

  /** Copying path for packets split across chunks. Returns the new position in chunk. */
  private feedSlow(chunk: Uint8Array, pos: number, out: Packet[]): number {
    const n = chunk.length;
    if (this.hdrFill === 0) this.curHl = this.headerSize;
    const hl = this.curHl;
    if (this.curThl < 0) {
      const take = Math.min(hl - this.hdrFill, n - pos);
      this.hdr.set(chunk.subarray(pos, pos + take), this.hdrFill);
      this.hdrFill += take;
      pos += take;
      if (this.hdrFill < hl) return pos;
      this.curLength = r32(this.hdr, 4);
      this.curType = this.checkMainHeader(r32(this.hdr, 0), this.curLength); // sets curThl
      this.curId = this.readId(this.hdr, 0, hl);
    }
    const thEnd = hl + this.curThl;
    if (this.hdrFill < thEnd) {
      const take = Math.min(thEnd - this.hdrFill, n - pos);
      this.hdr.set(chunk.subarray(pos, pos + take), this.hdrFill);
      this.hdrFill += take;
      pos += take;
      if (this.hdrFill < thEnd) return pos;
    }
    const dataLen = this.curLength - this.curThl;
    if (this.curPacket === null) {
      // Type header complete: verify it before allocating the (bounded) data buffer.
      this.curPacket = this.decodeTypeHeader(this.curType, this.curId, this.hdr, hl, dataLen);
      this.data = dataLen > 0 ? new Uint8Array(dataLen) : EMPTY;
      this.dataFill = 0;
    }
    const take = Math.min(dataLen - this.dataFill, n - pos);
    if (take > 0) {
      this.data!.set(chunk.subarray(pos, pos + take), this.dataFill);
      this.dataFill += take;
      pos += take;
    }
    if (this.dataFill === dataLen) {
      const p = this.curPacket;
      const data = this.data!;
      const total = hl + this.curLength;
      this.hdrFill = 0;
      this.curThl = -1;
      this.curPacket = null;
      this.data = null;
      this.dataFill = 0;
      this.finishPacket(p, data); // may switch header size (hello)
      out.push(p);
      this.consumed += total;
    }
    return pos;
  }

  private readId(b: Uint8Array, o: number, hl: number): bigint {
    if (hl === HEADER_SIZE_32BIT_ID) return BigInt(r32(b, o + 8));
    const lo = r32(b, o + 8);
    const hi = r32(b, o + 12);
    return hi === 0 ? BigInt(lo) : (BigInt(hi) << 32n) | BigInt(lo);
  }

  private perr(code: UsbredirErrorCode, msg: string): UsbredirProtocolError {
    return new UsbredirProtocolError(code, msg, this.consumed);
  }

  /** Validate the main header of a received packet; sets curThl; returns the type name. */
  private checkMainHeader(type: number, length: number): PacketTypeName {
    const name = packetTypeName(type);
    if (name === undefined) throw this.perr('unknown_type', `invalid usb-redir packet type: ${type}`);
    if (name === 'hello') {
      if (this._peerCaps !== null) {
        throw this.perr('duplicate_hello', this.noHello ? 'hello received on a no-hello connection' : 'received a second hello');
      }
    } else if (this._peerCaps === null) {
      throw this.perr('hello_not_first', `received ${name} (type ${type}) before the peer's hello`);
    }
    const thl = this.typeHeaderSize(name, this.role);
    if (thl < 0) {
      throw this.perr('wrong_direction', `packet type ${name} (${type}) is not sent to the ${this.role} side`);
    }
    if (length > this.maxPacketSize) {
      throw this.perr('too_large', `packet length of ${length} larger than permitted ${this.maxPacketSize} bytes`);
    }
    if (length < thl) {
      throw this.perr('bad_length', `invalid ${name} length ${length}: type header is ${thl} bytes`);
    }
    if (length > thl && !TYPES_WITH_DATA.has(name)) {
      throw this.perr('unexpected_data', `invalid ${name} length ${length}: ${name} carries no data (header ${thl})`);
    }
    this.curThl = thl;
    return name;
  }

  /**
   * Decode + verify a received type header (b[o...]); data packets get an empty data field that
   * finishPacket() fills in. dataLen = bytes of data that follow.
   */
  private decodeTypeHeader(name: PacketTypeName, id: bigint, b: Uint8Array, o: number, dataLen: number): Packet {
    const p = decodeHeader(name, id, b, o, this.neg);
    const msg = verifyPacket(p, dataLen, this.role, (cap) => this.weHaveCap(cap));
    if (msg) throw this.perr(msg[0], msg[1]);
    return p;
  }

  /** Attach / interpret the data of a received packet. */
  private finishPacket(p: Packet, data: Uint8Array): void {
    switch (p.type) {
      case 'hello': {
        const words = data.length >>> 2;
        const caps = new Array<number>(words);
        for (let i = 0; i < words; i++) caps[i] = r32(data, 4 * i);
        p.caps = caps;
        this._peerCaps = normalizeCaps(caps);
        this.neg = this.computeNeg();
        break;
      }
      case 'filter_filter': {
        if (data.length < 1) throw this.perr('invalid_field', 'filter_filter without data');
        if (data[data.length - 1] !== 0) throw this.perr('invalid_field', 'non 0 terminated filter_filter data');
        const nul = data.indexOf(0);
        p.rules = utf8Decoder.decode(data.subarray(0, nul));
        break;
      }
      case 'control_packet':
      case 'bulk_packet':
      case 'iso_packet':
      case 'interrupt_packet':
      case 'buffered_bulk_packet':
        p.data = data;
        break;
      default:
        break;
    }
  }

  // ------------------------------------------------------------------------------------------
  // Encoding

  /**
   * Encode one packet to send to the peer, into one freshly allocated buffer. Validates field
   * ranges, direction and caps like the reference parser's send path (which checks the PEER's
   * caps for filter / disconnect-ack / bulk-receiving packets). Our hello must be encoded first
   * (unless noHello) and always uses a 32-bit id header.
   */
  encode(p: Packet): Uint8Array {
    return this.encodeImpl(p, false)[0]!;
  }

  /**
   * Like encode(), but does not copy the data of data packets / filter rules into the header
   * buffer: returns [headers] or [headers, data] (data is the packet's own Uint8Array for data
   * packets), for vectored writes (socket.cork() + write() each part, or writev). The parts
   * concatenated are byte-identical to encode(p).
   */
  encodeParts(p: Packet): Uint8Array[] {
    return this.encodeImpl(p, true);
  }

  private encodeImpl(p: Packet, split: boolean): Uint8Array[] {
    const name = p.type;
    if (PacketType[name] === undefined) throw encErr(`unknown packet type ${String(name)}`, 'unknown_type');
    if (name === 'hello') {
      if (this._helloSent) throw encErr(this.noHello ? 'no hello may be sent on a no-hello connection' : 'hello already sent', 'duplicate_hello');
    } else if (!this._helloSent) {
      throw encErr(`cannot send ${name} before our hello`, 'hello_not_first');
    }
    const thl = this.typeHeaderSize(name, this.peerRole);
    if (thl < 0) throw encErr(`packet type ${name} is not sent by the ${this.role} side`, 'wrong_direction');
    const hl = name === 'hello' ? HEADER_SIZE_32BIT_ID : this.headerSize;

    // Variable data
    let data: Uint8Array = EMPTY;
    switch (name) {
      case 'hello': {
        const caps = normalizeCaps(p.caps.map((c, i) => u32(c, `caps[${i}]`)));
        const len = Math.max(caps.length, this.ourCaps.length, CAPS_SIZE);
        for (let i = 0; i < len; i++) {
          if ((caps[i] ?? 0) !== (this.ourCaps[i] ?? 0)) {
            throw encErr('hello caps differ from the caps this parser was configured with');
          }
        }
        data = new Uint8Array(4 * caps.length);
        for (let i = 0; i < caps.length; i++) w32(data, 4 * i, caps[i]!);
        break;
      }
      case 'filter_filter': {
        if (typeof p.rules !== 'string' || p.rules.includes('\0')) throw encErr('filter rules must be a string without NUL');
        const s = utf8Encoder.encode(p.rules);
        data = new Uint8Array(s.length + 1);
        data.set(s, 0);
        break;
      }
      case 'control_packet':
      case 'bulk_packet':
      case 'iso_packet':
      case 'interrupt_packet':
      case 'buffered_bulk_packet':
        if (!(p.data instanceof Uint8Array)) throw encErr(`${name}.data must be a Uint8Array`);
        data = p.data;
        break;
      default:
        break;
    }

    const length = thl + data.length;
    if (length > 0xffffffff) throw encErr(`${name} too large`, 'too_large');
    if (typeof p.id !== 'bigint' || p.id < 0n || p.id > (hl === HEADER_SIZE_32BIT_ID ? 0xffffffffn : U64_MAX)) {
      throw encErr(`id ${String(p.id)} does not fit a ${hl === HEADER_SIZE_32BIT_ID ? 32 : 64}-bit id header`);
    }
    const msg = verifyPacket(p, data.length, this.peerRole, (cap) => this.peerHasCap(cap));
    if (msg) throw encErr(msg[1], msg[0]);

    const buf = new Uint8Array(split ? hl + thl : hl + length);
    w32(buf, 0, PacketType[name]);
    w32(buf, 4, length);
    if (hl === HEADER_SIZE_32BIT_ID) {
      w32(buf, 8, Number(p.id));
    } else {
      w32(buf, 8, Number(p.id & 0xffffffffn));
      w32(buf, 12, Number(p.id >> 32n));
    }
    encodeHeader(p, buf, hl, this.neg);
    if (name === 'hello') this._helloSent = true;
    this.encoded += hl + length;
    if (split) return data.length > 0 ? [buf, data] : [buf];
    if (data.length > 0) buf.set(data, hl + thl);
    return [buf];
  }
}

// ---------------------------------------------------------------------------------------------
// Type header decode / encode / verify

function decodeHeader(name: PacketTypeName, id: bigint, b: Uint8Array, o: number, neg: Negotiated): Packet {
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
function encodeHeader(p: Packet, buf: Uint8Array, o: number, neg: Negotiated): void {
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
function verifyPacket(
  p: Packet,
  dataLen: number,
  receiver: Role,
  capCheck: (cap: number) => boolean,
): [UsbredirErrorCode, string] | undefined {
  let length = -1;
  let ep = -1;
  const needCap = (cap: number, what: string): [UsbredirErrorCode, string] | undefined =>
    capCheck(cap) ? undefined : ['missing_cap', `${what} without cap ${capName(cap)}`];
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
      return needCap(Cap.filter, 'filter_reject');
    case 'filter_filter':
      return needCap(Cap.filter, 'filter_filter') ?? (dataLen < 1 ? ['invalid_field', 'filter_filter without data'] : undefined);
    case 'device_disconnect_ack':
      return needCap(Cap.device_disconnect_ack, 'device_disconnect_ack');
    case 'start_bulk_receiving': {
      const c = needCap(Cap.bulk_receiving, 'start_bulk_receiving');
      if (c) return c;
      if (p.bytesPerTransfer > MAX_BULK_TRANSFER_SIZE) {
        return ['too_large', `start bulk receiving length exceeds limits ${p.bytesPerTransfer} > ${MAX_BULK_TRANSFER_SIZE}`];
      }
      if (!(p.endpoint & 0x80)) return ['invalid_field', `start bulk receiving on non input ep ${hex(p.endpoint)}`];
      break;
    }
    case 'stop_bulk_receiving':
    case 'bulk_receiving_status': {
      const c = needCap(Cap.bulk_receiving, p.type);
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
      const c = needCap(Cap.bulk_receiving, 'buffered_bulk_packet');
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

function capName(cap: number): string {
  for (const [k, v] of Object.entries(Cap)) if (v === cap) return k;
  return String(cap);
}
