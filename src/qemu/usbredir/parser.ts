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
import {
  UsbredirProtocolError,
  type UsbredirErrorCode,
  type Negotiated,
  decodeHeader,
  encodeHeader,
  verifyPacket,
  r32,
  w32,
  u32,
  encErr,
} from './layout.js';

export { UsbredirProtocolError, type UsbredirErrorCode } from './layout.js';


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
/** First word of a serialized parser state ('URPS'). */
const STATE_MAGIC = 0x53505255;
const utf8Decoder = new TextDecoder('utf-8');
const utf8Encoder = new TextEncoder();
const MAX_TYPE_HEADER = TypeHeaderSize.ep_info; // 288, the largest type header
const U64_MAX = (1n << 64n) - 1n;


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
  /** The cap checks verifyPacket takes, made once rather than per packet. */
  private readonly weHaveCapBound = (cap: number) => this.weHaveCap(cap as CapId);
  private readonly peerHasCapBound = (cap: number) => this.peerHasCap(cap as CapId);
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
  // Serialized state (usbredirparser_serialize / usbredirparser_unserialize)

  /**
   * The parser's share of a migration hand-off, as bytes: our caps, the peer's caps, the input
   * bytes of the packet in progress, and `unreadOutput` (bytes we produced that the peer has not
   * read; the caller knows them, the parser does not own the output queue). Given as parts so
   * the caller need not concatenate them first. Layout (little-endian u32 unless noted):
   * magic, role (0 device / 1 host), our caps count + words, peer caps count + words (0 before
   * the peer's hello), partial length + bytes, unread output length + bytes.
   */
  serialize(unreadOutput: readonly Uint8Array[] = []): Uint8Array {
    if (this.failure) throw new UsbredirProtocolError('parser_failed', `cannot serialize a failed parser: ${this.failure.message}`);
    const peer = this._peerCaps ?? [];
    const partial = this.pendingPartial;
    let unread = 0;
    for (const part of unreadOutput) unread += part.length;
    const out = new Uint8Array(4 * (5 + this.ourCaps.length + peer.length) + 4 + partial + unread);
    let o = 0;
    const put = (v: number) => {
      w32(out, o, v);
      o += 4;
    };
    put(STATE_MAGIC);
    put(this.role === 'device' ? 0 : 1);
    put(this.ourCaps.length);
    for (const c of this.ourCaps) put(c);
    put(peer.length);
    for (const c of peer) put(c);
    put(partial);
    out.set(this.hdr.subarray(0, this.hdrFill), o);
    if (this.data) out.set(this.data.subarray(0, this.dataFill), o + this.hdrFill);
    o += partial;
    put(unread);
    for (const part of unreadOutput) {
      out.set(part, o);
      o += part.length;
    }
    return out;
  }

  /**
   * A parser continuing a serialized one on a new connection (the migration destination): no
   * hello exchange, both caps from the state, the packet in progress primed. Returns it with the
   * output the peer had not read (to be written before anything else; a view into `state`).
   * Throws UsbredirProtocolError ('invalid_field') on a malformed state.
   */
  static fromState(state: Uint8Array, opts: Omit<UsbredirParserOptions, 'caps' | 'noHello' | 'role'> = {}): { parser: UsbredirParser; unreadOutput: Uint8Array } {
    let o = 0;
    const bad = (why: string) => new UsbredirProtocolError('invalid_field', `invalid usbredir parser state: ${why}`);
    const get = (what: string) => {
      if (o + 4 > state.length) throw bad(`truncated at ${what}`);
      const v = r32(state, o);
      o += 4;
      return v;
    };
    const words = (what: string) => {
      const n = get(`${what} count`);
      if (n > 64) throw bad(`${n} ${what} words`);
      const a = new Array<number>(n);
      for (let i = 0; i < n; i++) a[i] = get(what);
      return a;
    };
    const bytes = (what: string) => {
      const n = get(`${what} length`);
      if (n > state.length - o) throw bad(`${what} of ${n} bytes exceeds the state`);
      const b = state.subarray(o, o + n);
      o += n;
      return b;
    };
    if (get('magic') !== STATE_MAGIC) throw bad('bad magic');
    const roleNo = get('role');
    if (roleNo > 1) throw bad(`role ${roleNo}`);
    const caps = words('our caps');
    const peerCaps = words('peer caps');
    const partial = bytes('partial packet');
    const unreadOutput = bytes('unread output');
    if (o !== state.length) throw bad(`${state.length - o} trailing bytes`);
    const parser = new UsbredirParser({ ...opts, role: roleNo === 0 ? 'device' : 'host', caps, noHello: { peerCaps } });
    if (partial.length) {
      let done: Packet[];
      try {
        done = parser.push(partial);
      } catch (err) {
        throw bad(`partial packet: ${(err as Error).message}`);
      }
      if (done.length) throw bad('the partial packet is complete');
      // push() keeps views of a chunk only for whole packets; a partial one is copied.
    }
    return { parser, unreadOutput };
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
              // Most packets carry no data (IN requests, statuses): no view to make for them.
              const data = length === thl ? EMPTY : chunk.subarray(pos + hl + thl, pos + hl + length);
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
    const msg = verifyPacket(p, dataLen, this.role, this.weHaveCapBound);
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
    const msg = verifyPacket(p, data.length, this.peerRole, this.peerHasCapBound);
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
