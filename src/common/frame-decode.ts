// Hand-written protobuf decoders for the URB channel's hot messages (the decoding side of
// frame-codec.ts).
//
// ts-proto decodes every uint64 (seq, URB id) through a string (longToNumber) and keeps a
// recursion counter on its reader per nested message: for a 64 B URB that is most of the decode.
// Here submits, completions, received data and acks of the exact shape our encoders write are
// read straight from the bytes. A message with a frame of any other kind (open, op, cancel, ...:
// rare), or with anything unexpected (an unknown field, a varint out of the fast range, a
// negative enum, a repeated kind, bytes that do not parse) is decoded by ts-proto as a whole, so
// the result and every error are the generated decoder's. (Not frame by frame: ts-proto reads a
// nested message differently from a standalone one when its bytes are damaged.)
import {
  ClientMessage,
  ServerMessage,
  type IsoPacket,
  type ReceivedData,
  type UrbComplete,
  type UrbSubmit,
} from '../gen/usbroam/v1/usbhost.js';

/** Thrown inside the fast path; never escapes this file. */
const SLOW = Symbol('slow path');

/** A cursor over one message's bytes. */
class Cursor {
  pos = 0;
  constructor(readonly buf: Uint8Array) {}

  /** A varint up to 2^49 (7 bytes): seq, URB id, index, uint32 fields. */
  varint(end: number): number {
    const b = this.buf;
    let result = 0;
    let mul = 1;
    for (let i = 0; i < 7; i++) {
      if (this.pos >= end) throw SLOW;
      const byte = b[this.pos++];
      result += (byte & 0x7f) * mul;
      if (byte < 0x80) return result;
      mul *= 128;
    }
    throw SLOW;
  }

  /** A uint32 field (ts-proto: reader.uint32()). */
  u32(end: number): number {
    const v = this.varint(end);
    if (v > 0xffffffff) throw SLOW;
    return v;
  }

  /** An enum (int32): a negative value is a 10-byte varint, left to ts-proto. */
  enum(end: number): number {
    const v = this.varint(end);
    if (v > 0x7fffffff) throw SLOW;
    return v;
  }

  /** End of a length-delimited field that starts here. */
  lenEnd(end: number): number {
    const len = this.varint(end);
    const e = this.pos + len;
    if (e > end) throw SLOW;
    return e;
  }

  /** A bytes field: a view, as ts-proto's reader.bytes() returns. */
  bytes(end: number): Uint8Array {
    const e = this.lenEnd(end);
    const v = this.buf.subarray(this.pos, e);
    this.pos = e;
    return v;
  }
}

function isoPacket(c: Cursor, end: number): IsoPacket {
  const p: IsoPacket = { length: 0, status: 0, actualLength: 0 };
  while (c.pos < end) {
    switch (c.buf[c.pos++]) {
      case 8:
        p.length = c.u32(end);
        break;
      case 16:
        p.status = c.enum(end);
        break;
      case 24:
        p.actualLength = c.u32(end);
        break;
      default:
        throw SLOW;
    }
  }
  return p;
}

function urbSubmit(c: Cursor, end: number): UrbSubmit {
  const s: UrbSubmit = {
    urbId: 0,
    endpoint: 0,
    type: 0,
    setup: new Uint8Array(0),
    data: new Uint8Array(0),
    length: 0,
    streamId: 0,
    flags: 0,
    isoPackets: [],
    timeoutMs: 0,
  };
  while (c.pos < end) {
    switch (c.buf[c.pos++]) {
      case 8:
        s.urbId = c.varint(end);
        break;
      case 16:
        s.endpoint = c.u32(end);
        break;
      case 24:
        s.type = c.enum(end);
        break;
      case 34:
        s.setup = c.bytes(end);
        break;
      case 42:
        s.data = c.bytes(end);
        break;
      case 48:
        s.length = c.u32(end);
        break;
      case 56:
        s.streamId = c.u32(end);
        break;
      case 64:
        s.flags = c.u32(end);
        break;
      case 74: {
        const e = c.lenEnd(end);
        s.isoPackets.push(isoPacket(c, e));
        break;
      }
      case 80:
        s.timeoutMs = c.u32(end);
        break;
      default:
        throw SLOW;
    }
  }
  return s;
}

function urbComplete(c: Cursor, end: number): UrbComplete {
  const u: UrbComplete = { urbId: 0, status: 0, data: new Uint8Array(0), actualLength: 0, isoPackets: [] };
  while (c.pos < end) {
    switch (c.buf[c.pos++]) {
      case 8:
        u.urbId = c.varint(end);
        break;
      case 16:
        u.status = c.enum(end);
        break;
      case 26:
        u.data = c.bytes(end);
        break;
      case 32:
        u.actualLength = c.u32(end);
        break;
      case 42: {
        const e = c.lenEnd(end);
        u.isoPackets.push(isoPacket(c, e));
        break;
      }
      default:
        throw SLOW;
    }
  }
  return u;
}

function receivedData(c: Cursor, end: number): ReceivedData {
  const r: ReceivedData = { endpoint: 0, index: 0, status: 0, data: new Uint8Array(0), isoPackets: [] };
  while (c.pos < end) {
    switch (c.buf[c.pos++]) {
      case 8:
        r.endpoint = c.u32(end);
        break;
      case 16:
        r.index = c.varint(end);
        break;
      case 24:
        r.status = c.enum(end);
        break;
      case 34:
        r.data = c.bytes(end);
        break;
      case 42: {
        const e = c.lenEnd(end);
        r.isoPackets.push(isoPacket(c, e));
        break;
      }
      default:
        throw SLOW;
    }
  }
  return r;
}

function ack(c: Cursor, end: number): { seq: number } {
  const a = { seq: 0 };
  while (c.pos < end) {
    if (c.buf[c.pos++] !== 8) throw SLOW;
    a.seq = c.varint(end);
  }
  return a;
}

/** A frame's kind: its field number's tag byte, the $case and how its sub-message is read. */
type KindReader = [tag: number, $case: string, read: (c: Cursor, end: number) => unknown];

/** Frames of `repeated frame = 1`, each of a kind `kinds` knows and of the exact fast shape. */
function decodeFrames<F>(bytes: Uint8Array, kinds: readonly KindReader[]): F[] {
  const c = new Cursor(bytes);
  const n = bytes.length;
  const frames: F[] = [];
  while (c.pos < n) {
    if (bytes[c.pos++] !== 10) throw SLOW; // field 1, length-delimited
    const end = c.lenEnd(n);
    frames.push(fastFrame(c, end, kinds) as F);
    c.pos = end;
  }
  return frames;
}

function fastFrame(c: Cursor, end: number, kinds: readonly KindReader[]): { seq: number; kind: { $case: string; value: unknown } | undefined } {
  const f: { seq: number; kind: { $case: string; value: unknown } | undefined } = { seq: 0, kind: undefined };
  while (c.pos < end) {
    const tag = c.buf[c.pos++];
    if (tag === 8) {
      f.seq = c.varint(end);
      continue;
    }
    let k: KindReader | undefined;
    for (const x of kinds) if (x[0] === tag) k = x;
    if (!k || f.kind) throw SLOW;
    const e = c.lenEnd(end);
    f.kind = { $case: k[1], value: k[2](c, e) };
    c.pos = e;
  }
  return f;
}

const CLIENT_KINDS: readonly KindReader[] = [
  [(3 << 3) | 2, 'submit', urbSubmit],
  [(6 << 3) | 2, 'ack', ack],
];

const SERVER_KINDS: readonly KindReader[] = [
  [(3 << 3) | 2, 'complete', urbComplete],
  [(5 << 3) | 2, 'received', receivedData],
  [(7 << 3) | 2, 'ack', ack],
];

/** ClientMessage.decode, faster for submits and acks. */
export function decodeClientMessage(bytes: Uint8Array): ClientMessage {
  try {
    return { frames: decodeFrames(bytes, CLIENT_KINDS) };
  } catch (err) {
    if (err !== SLOW) throw err;
    return ClientMessage.decode(bytes);
  }
}

/** ServerMessage.decode, faster for completions, received data and acks. */
export function decodeServerMessage(bytes: Uint8Array): ServerMessage {
  try {
    return { frames: decodeFrames(bytes, SERVER_KINDS) };
  } catch (err) {
    if (err !== SLOW) throw err;
    return ServerMessage.decode(bytes);
  }
}
