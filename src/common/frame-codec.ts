// Hand-written protobuf encoders for the URB channel's hot messages.
//
// ts-proto's writer grows its buffer by doubling, forks and joins for every
// nested message and concatenates at the end: a 64 KiB URB is copied several
// times. Here a message is measured first and written into one buffer of
// exactly its size, so URB data is copied once. Submits, completions,
// received data and acks take the fast path; any other frame is encoded by
// ts-proto and embedded (a repeated message field is just tag, length and
// the message's bytes), so the output is always the same protobuf the
// generated decoders read.
import {
  ClientFrame,
  ServerFrame,
  type ClientMessage,
  type IsoPacket,
  type ServerMessage,
} from '../gen/usbroam/v1/usbhost.js';
import type { EncodeTarget } from './encode-buffers.js';

const LEN = 2; // wire type: length-delimited
const tag = (field: number, wire: number) => (field << 3) | wire;

function varintSize(n: number): number {
  if (n < 0x80) return 1;
  if (n < 0x4000) return 2;
  if (n < 0x200000) return 3;
  if (n < 0x10000000) return 4;
  let size = 4;
  n = Math.floor(n / 0x10000000);
  while (n > 0) {
    size++;
    n = Math.floor(n / 0x80);
  }
  return size;
}

function writeVarint(buf: Uint8Array, pos: number, n: number): number {
  while (n >= 0x80) {
    buf[pos++] = (n & 0x7f) | 0x80;
    n = n < 0x100000000 ? n >>> 7 : Math.floor(n / 0x80);
  }
  buf[pos++] = n;
  return pos;
}

/** Size of a varint field (tag + value), 0 for the default 0 (proto3 omits it). */
const vField = (n: number) => (n === 0 ? 0 : 1 + varintSize(n));
const bField = (len: number) => (len === 0 ? 0 : 1 + varintSize(len) + len);
const mField = (len: number) => 1 + varintSize(len) + len; // a message field is written even when empty

/** Negative numbers (an unrecognized enum) take ts-proto's path. */
function isoOk(list: IsoPacket[]): boolean {
  for (const p of list) if (p.status < 0) return false;
  return true;
}

function isoSize(p: IsoPacket): number {
  return vField(p.length) + vField(p.status) + vField(p.actualLength);
}
function isoListSize(list: IsoPacket[]): number {
  let n = 0;
  for (const p of list) n += mField(isoSize(p));
  return n;
}
function writeIsoList(buf: Uint8Array, pos: number, field: number, list: IsoPacket[]): number {
  for (const p of list) {
    buf[pos++] = tag(field, LEN);
    pos = writeVarint(buf, pos, isoSize(p));
    pos = writeV(buf, pos, 1, p.length);
    pos = writeV(buf, pos, 2, p.status);
    pos = writeV(buf, pos, 3, p.actualLength);
  }
  return pos;
}

function writeV(buf: Uint8Array, pos: number, field: number, n: number): number {
  if (n === 0) return pos;
  buf[pos++] = field << 3;
  return writeVarint(buf, pos, n);
}
function writeB(buf: Uint8Array, pos: number, field: number, data: Uint8Array): number {
  if (data.length === 0) return pos;
  buf[pos++] = tag(field, LEN);
  pos = writeVarint(buf, pos, data.length);
  buf.set(data, pos);
  return pos + data.length;
}

// ------------------------------------------------------------------ server

type SKind = NonNullable<ServerFrame['kind']>;

/** Size of the frame's kind sub-message (fast kinds), or -1. */
function serverKindSize(k: SKind): number {
  switch (k.$case) {
    case 'complete': {
      const c = k.value;
      if (c.status < 0 || !isoOk(c.isoPackets)) return -1;
      return vField(c.urbId) + vField(c.status) + bField(c.data.length) + vField(c.actualLength) + isoListSize(c.isoPackets);
    }
    case 'received': {
      const r = k.value;
      if (r.status < 0 || !isoOk(r.isoPackets)) return -1;
      return vField(r.endpoint) + vField(r.index) + vField(r.status) + bField(r.data.length) + isoListSize(r.isoPackets);
    }
    case 'ack':
      return vField(k.value.seq);
    default:
      return -1;
  }
}

const SERVER_KIND_FIELD: Partial<Record<SKind['$case'], number>> = { complete: 3, received: 5, ack: 7 };

function writeServerKind(buf: Uint8Array, pos: number, k: SKind): number {
  switch (k.$case) {
    case 'complete': {
      const c = k.value;
      pos = writeV(buf, pos, 1, c.urbId);
      pos = writeV(buf, pos, 2, c.status);
      pos = writeB(buf, pos, 3, c.data);
      pos = writeV(buf, pos, 4, c.actualLength);
      return writeIsoList(buf, pos, 5, c.isoPackets);
    }
    case 'received': {
      const r = k.value;
      pos = writeV(buf, pos, 1, r.endpoint);
      pos = writeV(buf, pos, 2, r.index);
      pos = writeV(buf, pos, 3, r.status);
      pos = writeB(buf, pos, 4, r.data);
      return writeIsoList(buf, pos, 5, r.isoPackets);
    }
    case 'ack':
      return writeV(buf, pos, 1, k.value.seq);
  }
  return pos;
}

const SERVER_FRAMES: FrameCodec<ServerFrame, SKind> = {
  kindSize: serverKindSize,
  kindField: SERVER_KIND_FIELD,
  writeKind: writeServerKind,
  slow: (f) => ServerFrame.encode(f).finish(),
};

/** `into`: where the bytes go (encode-buffers.ts: reused memory); default a new buffer. */
export function encodeServerMessage(m: ServerMessage, into?: EncodeTarget): Buffer {
  return encodeFrames(m.frames, SERVER_FRAMES, 'encodeServerMessage', into);
}

// ------------------------------------------------------------------ client

type CKind = NonNullable<ClientFrame['kind']>;

function clientKindSize(k: CKind): number {
  switch (k.$case) {
    case 'submit': {
      const s = k.value;
      if (s.type < 0 || !isoOk(s.isoPackets)) return -1;
      return (
        vField(s.urbId) +
        vField(s.endpoint) +
        vField(s.type) +
        bField(s.setup.length) +
        bField(s.data.length) +
        vField(s.length) +
        vField(s.streamId) +
        vField(s.flags) +
        isoListSize(s.isoPackets) +
        vField(s.timeoutMs)
      );
    }
    case 'ack':
      return vField(k.value.seq);
    default:
      return -1;
  }
}

const CLIENT_KIND_FIELD: Partial<Record<CKind['$case'], number>> = { submit: 3, ack: 6 };

function writeClientKind(buf: Uint8Array, pos: number, k: CKind): number {
  switch (k.$case) {
    case 'submit': {
      const u = k.value;
      pos = writeV(buf, pos, 1, u.urbId);
      pos = writeV(buf, pos, 2, u.endpoint);
      pos = writeV(buf, pos, 3, u.type);
      pos = writeB(buf, pos, 4, u.setup);
      pos = writeB(buf, pos, 5, u.data);
      pos = writeV(buf, pos, 6, u.length);
      pos = writeV(buf, pos, 7, u.streamId);
      pos = writeV(buf, pos, 8, u.flags);
      pos = writeIsoList(buf, pos, 9, u.isoPackets);
      return writeV(buf, pos, 10, u.timeoutMs);
    }
    case 'ack':
      return writeV(buf, pos, 1, k.value.seq);
  }
  return pos;
}

const CLIENT_FRAMES: FrameCodec<ClientFrame, CKind> = {
  kindSize: clientKindSize,
  kindField: CLIENT_KIND_FIELD,
  writeKind: writeClientKind,
  slow: (f) => ClientFrame.encode(f).finish(),
};

export function encodeClientMessage(m: ClientMessage, into?: EncodeTarget): Buffer {
  return encodeFrames(m.frames, CLIENT_FRAMES, 'encodeClientMessage', into);
}

// ------------------------------------------------------------------ framing

/** How one direction's frames are measured and written. */
interface FrameCodec<F extends { seq: number; kind?: K }, K extends { $case: string }> {
  /** Size of a fast kind's sub-message, or -1 for ts-proto's path. */
  kindSize(k: K): number;
  kindField: Partial<Record<K['$case'], number>>;
  writeKind(buf: Uint8Array, pos: number, k: K): number;
  slow(f: F): Uint8Array;
}

/** A ClientMessage / ServerMessage: `repeated frame = 1`, measured first, written once. */
function encodeFrames<F extends { seq: number; kind?: K }, K extends { $case: string }>(frames: F[], c: FrameCodec<F, K>, what: string, into?: EncodeTarget): Buffer {
  const n = frames.length;
  const kindSizes = new Array<number>(n);
  const frameSizes = new Array<number>(n);
  const slow: (Uint8Array | undefined)[] = new Array(n);
  let total = 0;
  for (let i = 0; i < n; i++) {
    const f = frames[i];
    const ks = f.kind ? c.kindSize(f.kind) : -1;
    let size: number;
    if (ks >= 0) {
      kindSizes[i] = ks;
      size = vField(f.seq) + mField(ks);
    } else {
      const b = c.slow(f);
      slow[i] = b;
      size = b.length;
    }
    frameSizes[i] = size;
    total += mField(size);
  }
  const buf = into ? into.take(total) : Buffer.allocUnsafe(total);
  let pos = 0;
  for (let i = 0; i < n; i++) {
    buf[pos++] = tag(1, LEN);
    pos = writeVarint(buf, pos, frameSizes[i]);
    const s = slow[i];
    if (s) {
      buf.set(s, pos);
      pos += s.length;
      continue;
    }
    const f = frames[i];
    const k = f.kind!;
    pos = writeV(buf, pos, 1, f.seq);
    buf[pos++] = tag(c.kindField[k.$case as K['$case']]!, LEN);
    pos = writeVarint(buf, pos, kindSizes[i]);
    pos = c.writeKind(buf, pos, k);
  }
  if (pos !== total) throw new Error(`${what}: wrote ${pos} of ${total} bytes`);
  return buf;
}
