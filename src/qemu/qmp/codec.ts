// QMP wire codec: pure, no I/O.
//
// QEMU's QMP server writes one compact JSON object per line, terminated by
// CRLF. Every server message is one of:
//   greeting  {"QMP": {"version": {...}, "capabilities": [...]}}
//   return    {"return": <any>, "id"?: <any>}
//   error     {"error": {"class": "...", "desc": "..."}, "id"?: <any>}
//   event     {"event": "NAME", "data"?: {...}, "timestamp": {"seconds": n, "microseconds": n}}
// The client may send commands in any whitespace layout; we send one per line.

export interface QmpVersion {
  qemu: { major: number; minor: number; micro: number };
  package: string;
}

export interface QmpGreeting {
  kind: 'greeting';
  version: QmpVersion;
  /** Capabilities the server offers, e.g. ["oob"]. */
  capabilities: string[];
  raw: Record<string, unknown>;
}

export interface QmpReturn {
  kind: 'return';
  /** The id the command carried (any JSON value), or undefined. */
  id: unknown;
  value: unknown;
  raw: Record<string, unknown>;
}

export interface QmpErrorReply {
  kind: 'error';
  id: unknown;
  /** QEMU's error class, e.g. "GenericError", "CommandNotFound", "DeviceNotFound". */
  errorClass: string;
  desc: string;
  raw: Record<string, unknown>;
}

export interface QmpTimestamp {
  seconds: number;
  microseconds: number;
}

export interface QmpEvent<D extends Record<string, unknown> = Record<string, unknown>> {
  kind: 'event';
  event: string;
  /** The event's data, or {} when QEMU sent none. */
  data: D;
  timestamp: QmpTimestamp;
  raw: Record<string, unknown>;
}

export type QmpMessage = QmpGreeting | QmpReturn | QmpErrorReply | QmpEvent;

/** A line that was not a valid QMP message; the decoder reports it and carries on. */
export interface QmpInvalidLine {
  kind: 'invalid';
  line: string;
  reason: string;
}

export type QmpDecoded = QmpMessage | QmpInvalidLine;

export class QmpProtocolError extends Error {
  override name = 'QmpProtocolError';
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function num(v: unknown, fallback = 0): number {
  return typeof v === 'number' && Number.isFinite(v) ? v : fallback;
}

/** Classify one parsed JSON value as a QMP server message. Throws QmpProtocolError. */
export function classifyMessage(obj: unknown): QmpMessage {
  if (!isObject(obj)) throw new QmpProtocolError('QMP message is not a JSON object');
  if ('QMP' in obj) {
    const g = obj.QMP;
    if (!isObject(g)) throw new QmpProtocolError('QMP greeting: "QMP" is not an object');
    const v = isObject(g.version) ? g.version : {};
    const q = isObject(v.qemu) ? v.qemu : {};
    const caps = Array.isArray(g.capabilities) ? g.capabilities.filter((c): c is string => typeof c === 'string') : [];
    return {
      kind: 'greeting',
      version: {
        qemu: { major: num(q.major), minor: num(q.minor), micro: num(q.micro) },
        package: typeof v.package === 'string' ? v.package : '',
      },
      capabilities: caps,
      raw: obj,
    };
  }
  if ('return' in obj) {
    return { kind: 'return', id: obj.id, value: obj.return, raw: obj };
  }
  if ('error' in obj) {
    const e = obj.error;
    if (!isObject(e)) throw new QmpProtocolError('QMP error reply: "error" is not an object');
    return {
      kind: 'error',
      id: obj.id,
      errorClass: typeof e.class === 'string' ? e.class : 'GenericError',
      desc: typeof e.desc === 'string' ? e.desc : JSON.stringify(e),
      raw: obj,
    };
  }
  if ('event' in obj) {
    if (typeof obj.event !== 'string') throw new QmpProtocolError('QMP event: "event" is not a string');
    const ts = isObject(obj.timestamp) ? obj.timestamp : {};
    return {
      kind: 'event',
      event: obj.event,
      data: isObject(obj.data) ? obj.data : {},
      timestamp: { seconds: num(ts.seconds), microseconds: num(ts.microseconds) },
      raw: obj,
    };
  }
  throw new QmpProtocolError(`unrecognised QMP message with keys [${Object.keys(obj).join(', ')}]`);
}

/** Parse and classify one line (without its terminator). Throws QmpProtocolError. */
export function parseLine(line: string): QmpMessage {
  let obj: unknown;
  try {
    obj = JSON.parse(line);
  } catch (err) {
    throw new QmpProtocolError(`invalid JSON: ${(err as Error).message}`);
  }
  return classifyMessage(obj);
}

export interface QmpDecoderOptions {
  /** Longest line accepted; longer lines are discarded and reported as invalid. Default 64 MiB. */
  maxLineBytes?: number;
}

const LF = 0x0a;

/**
 * Incremental decoder: feed it socket chunks, get complete messages back.
 * Handles lines split across chunks (including inside multi-byte UTF-8
 * sequences), several lines per chunk, CRLF or LF, and blank lines.
 */
export class QmpDecoder {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private discarding = false;
  private readonly maxLineBytes: number;

  constructor(options: QmpDecoderOptions = {}) {
    this.maxLineBytes = options.maxLineBytes ?? 64 * 1024 * 1024;
  }

  /** Bytes held waiting for the end of a line. */
  get pendingBytes(): number {
    return this.buffered;
  }

  push(chunk: Buffer | Uint8Array | string): QmpDecoded[] {
    let buf = typeof chunk === 'string' ? Buffer.from(chunk, 'utf8') : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    const out: QmpDecoded[] = [];
    for (;;) {
      const nl = buf.indexOf(LF);
      if (nl < 0) {
        if (buf.length > 0) this.hold(buf, out);
        return out;
      }
      const head = buf.subarray(0, nl);
      buf = buf.subarray(nl + 1);
      let line: Buffer;
      if (this.chunks.length === 0) {
        line = head;
      } else {
        this.chunks.push(head);
        line = Buffer.concat(this.chunks, this.buffered + head.length);
        this.chunks = [];
        this.buffered = 0;
      }
      if (this.discarding) {
        this.discarding = false;
        continue;
      }
      this.decodeLine(line, out);
    }
  }

  /** Call at end of stream: reports an unterminated trailing line as invalid, then resets. */
  end(): QmpDecoded[] {
    const out: QmpDecoded[] = [];
    if (this.buffered > 0 && !this.discarding) {
      const text = Buffer.concat(this.chunks).toString('utf8');
      if (text.trim() !== '') out.push({ kind: 'invalid', line: text, reason: 'unterminated line at end of stream' });
    }
    this.reset();
    return out;
  }

  reset(): void {
    this.chunks = [];
    this.buffered = 0;
    this.discarding = false;
  }

  private hold(buf: Buffer, out: QmpDecoded[]): void {
    if (this.discarding) return;
    // Copy: the caller may reuse its buffer.
    this.chunks.push(Buffer.from(buf));
    this.buffered += buf.length;
    if (this.buffered > this.maxLineBytes) {
      out.push({
        kind: 'invalid',
        line: Buffer.concat(this.chunks).subarray(0, 200).toString('utf8'),
        reason: `line longer than ${this.maxLineBytes} bytes`,
      });
      this.chunks = [];
      this.buffered = 0;
      this.discarding = true;
    }
  }

  private decodeLine(line: Buffer, out: QmpDecoded[]): void {
    if (line.length > this.maxLineBytes) {
      out.push({ kind: 'invalid', line: line.subarray(0, 200).toString('utf8'), reason: `line longer than ${this.maxLineBytes} bytes` });
      return;
    }
    const text = line.toString('utf8').trim();
    if (text === '') return;
    try {
      out.push(parseLine(text));
    } catch (err) {
      out.push({ kind: 'invalid', line: text, reason: (err as Error).message });
    }
  }
}

export interface QmpCommand {
  /** Command name. */
  execute: string;
  arguments?: Record<string, unknown>;
  id?: unknown;
  /** Send as out-of-band ("exec-oob"); needs the "oob" capability negotiated. */
  oob?: boolean;
}

/** Encode one command as a line (JSON + CRLF). */
export function encodeCommand(cmd: QmpCommand): string {
  const obj: Record<string, unknown> = cmd.oob ? { 'exec-oob': cmd.execute } : { execute: cmd.execute };
  if (cmd.arguments !== undefined) obj.arguments = cmd.arguments;
  if (cmd.id !== undefined) obj.id = cmd.id;
  return JSON.stringify(obj) + '\r\n';
}
