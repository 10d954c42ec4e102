// A model-based fuzzer of the Connect stream (fast-check commands): after a valid open of a
// loopback device, random sequences of valid and invalid frames, each checked against what the
// model says the server must answer: a completion, an error frame, or the end of the stream with
// a named status and a message. Never INTERNAL or UNKNOWN, never a wait past its deadline, and
// after every run the session is gone and the device released.
import * as grpc from '@grpc/grpc-js';
import fc from 'fast-check';
import { randomUUID } from 'node:crypto';
import {
  ClientMessage,
  CloseSessionRequest,
  ListDevicesRequest,
  ListDevicesResponse,
  TransferType,
  UrbStatus,
  type ChannelError,
  type ClientFrame,
  type OpResult,
  type ServerFrame,
  type UrbComplete,
} from '../../gen/usbroam/v1/usbhost.js';
import { isServerDataFrame, RawConnect, rawClient, rawUnary, type TlsPaths } from './raw-calls.js';

const S = grpc.status;
const EMPTY = new Uint8Array(0);
const LOOP_BULK_OUT = 0x01;
const LOOP_BULK_IN = 0x81;
/** Endpoints the loopback device does not have (or that no device can have). */
const MISSING_ENDPOINTS = [0x02, 0x05, 0x0f, 0x84, 0x8f, 0x71, 0xf1];

export interface ConnectFuzzTarget {
  address: string;
  tls(identity: string): TlsPaths;
  /** Owns the sessions and is an admin (may close them). */
  owner: string;
  /** Another identity the server knows but that the ACL does not allow the device. */
  other: string;
  /** The serial of an emulated loopback device. */
  serial: string;
  /** The server's maxUrbBytes. */
  maxUrbBytes: number;
  /** Per expected answer. */
  waitMs?: number;
}

/** What the runs saw: every stream's end, counted by status code. */
export interface ConnectFuzzTally {
  runs: number;
  commands: number;
  streams: number;
  statuses: Record<string, number>;
  internal_count: number;
}

export function newTally(): ConnectFuzzTally {
  return { runs: 0, commands: 0, streams: 0, statuses: {}, internal_count: 0 };
}

interface Model {
  sessionAlive: boolean;
  streamAlive: boolean;
  /** The client's next data seq. */
  nextSeq: number;
  /** The highest server seq acknowledged (and known processed). */
  acked: number;
}

const submitFrame = (seq: number, urbId: number, endpoint: number, length: number, data: Uint8Array = EMPTY): ClientFrame => ({
  seq,
  kind: { $case: 'submit', value: { urbId, endpoint, type: TransferType.TRANSFER_BULK, setup: EMPTY, data, length, streamId: 0, flags: 0, isoPackets: [], timeoutMs: 0 } },
});

/** The server as this client sees it: its streams, and every server data frame once, in order. */
export class ConnectSut {
  stream?: RawConnect;
  sessionId = '';
  /** Highest server data seq received on any stream. */
  highestData = 0;
  readonly completions = new Map<number, UrbComplete>();
  readonly opResults = new Map<number, OpResult>();
  readonly errors: ChannelError[] = [];
  private readonly clients = new Map<string, grpc.Client>();
  private readonly streams: RawConnect[] = [];
  private nextId = 1;
  readonly waitMs: number;

  constructor(
    readonly target: ConnectFuzzTarget,
    private readonly tally: ConnectFuzzTally,
  ) {
    this.waitMs = target.waitMs ?? 10_000;
  }

  id(): number {
    return this.nextId++;
  }

  client(identity: string): grpc.Client {
    let c = this.clients.get(identity);
    if (!c) this.clients.set(identity, (c = rawClient(this.target.address, this.target.tls(identity))));
    return c;
  }

  /** A new stream; every frame it receives is recorded, its end counted. */
  open(identity = this.target.owner): RawConnect {
    const s = new RawConnect(this.client(identity), 120_000, (f) => this.record(f));
    this.streams.push(s);
    this.tally.streams++;
    s.call.on('status', (st) => {
      const name = S[st.code] ?? String(st.code);
      this.tally.statuses[name] = (this.tally.statuses[name] ?? 0) + 1;
      if (st.code === S.INTERNAL || st.code === S.UNKNOWN) this.tally.internal_count++;
    });
    return s;
  }

  private record(f: ServerFrame): void {
    if (f.kind?.$case === 'error') this.errors.push(f.kind.value);
    if (!isServerDataFrame(f)) return;
    if (f.seq <= this.highestData) return; // replayed after a resume: seen already
    if (f.seq !== this.highestData + 1) throw new Error(`server data frames skip from seq ${this.highestData} to ${f.seq}`);
    this.highestData = f.seq;
    if (f.kind?.$case === 'complete') {
      if (this.completions.has(f.kind.value.urbId)) throw new Error(`URB ${f.kind.value.urbId} completed twice`);
      this.completions.set(f.kind.value.urbId, f.kind.value);
    }
    if (f.kind?.$case === 'opResult') this.opResults.set(f.kind.value.opId, f.kind.value);
  }

  completion(urbId: number, on = this.stream!): Promise<UrbComplete> {
    return on.until(`the completion of URB ${urbId}`, () => this.completions.get(urbId), this.waitMs);
  }

  /** The first error frame for `clientSeq` after the first `from` errors. */
  errorFor(clientSeq: number, from: number, on = this.stream!): Promise<ChannelError> {
    return on.until(`an error frame for client seq ${clientSeq}`, () => this.errors.slice(from).find((e) => e.clientSeq === clientSeq), this.waitMs);
  }

  /** The stream ends with `code` and a message matching `details`. */
  async expectEnd(s: RawConnect, code: grpc.status, details: RegExp, what: string): Promise<void> {
    const st = await s.ending(what, this.waitMs);
    if (st.code !== code || !details.test(st.details)) {
      throw new Error(`${what}: expected ${S[code]} matching ${details}, got ${S[st.code]} "${st.details}"`);
    }
  }

  /** A new session on the loopback device with configuration 1 (seq 1). */
  async openSession(): Promise<void> {
    const s = this.open();
    s.send({ seq: 0, kind: { $case: 'open', value: { target: { $case: 'device', value: { id: '', vidPid: '', serial: this.target.serial, portPath: '' } } } } });
    const opened = await s.until('opened', () => s.frames.find((f) => f.kind?.$case === 'opened'), this.waitMs);
    if (opened.kind?.$case !== 'opened') throw new Error('unreachable');
    this.stream = s;
    this.sessionId = opened.kind.value.sessionId;
    this.highestData = 0;
    this.errors.length = 0; // client seqs start over in a new session
    const opId = this.id();
    s.send({ seq: 1, kind: { $case: 'op', value: { opId, op: { $case: 'setConfiguration', value: { value: 1 } } } } });
    const r = await s.until('set_configuration', () => this.opResults.get(opId), this.waitMs);
    if (r.status !== UrbStatus.URB_STATUS_SUCCESS) throw new Error(`set_configuration 1 failed: ${UrbStatus[r.status]} ${r.message}`);
  }

  /** The stream still serves: a 1-byte bulk OUT completes. */
  async probe(m: Model): Promise<void> {
    const urbId = this.id();
    this.stream!.send(submitFrame(m.nextSeq++, urbId, LOOP_BULK_OUT, 0, Uint8Array.of(0x5a)));
    const c = await this.completion(urbId);
    if (c.status !== UrbStatus.URB_STATUS_SUCCESS) throw new Error(`probe URB ${urbId} ended ${UrbStatus[c.status]}`);
  }

  async deviceClaimed(): Promise<boolean> {
    const r = await rawUnary(this.client(this.target.owner), '/usbroam.v1.UsbHost/ListDevices', ListDevicesRequest.encode({}).finish());
    if (r.status.code !== S.OK || !r.response) throw new Error(`ListDevices: ${S[r.status.code]} ${r.status.details}`);
    const d = ListDevicesResponse.decode(r.response).devices.find((x) => x.serial === this.target.serial);
    return d?.claim?.claimed ?? false;
  }

  /** End the run: close the session (admin call) and see the device released. */
  async teardown(m: Model): Promise<void> {
    if (m.sessionAlive) {
      const r = await rawUnary(this.client(this.target.owner), '/usbroam.v1.UsbHost/CloseSession', CloseSessionRequest.encode({ sessionId: this.sessionId }).finish());
      if (r.status.code !== S.OK) throw new Error(`CloseSession ${this.sessionId}: ${S[r.status.code]} ${r.status.details}`);
    }
    const end = Date.now() + this.waitMs;
    while (await this.deviceClaimed()) {
      if (Date.now() > end) throw new Error(`device ${this.target.serial} still claimed after its session was closed`);
      await new Promise((r) => setTimeout(r, 20));
    }
    for (const s of this.streams) if (!s.ended) s.cancel();
    for (const c of this.clients.values()) c.close();
  }
}

type Cmd = fc.AsyncCommand<Model, ConnectSut, false>;

/** A command on the session's live stream; checks first that the stream did not end behind the model's back. */
abstract class StreamCommand implements Cmd {
  check(m: Readonly<Model>): boolean {
    return m.sessionAlive && m.streamAlive;
  }
  async run(m: Model, r: ConnectSut): Promise<void> {
    const s = r.stream!;
    if (s.ended) throw new Error(`the stream ended unexpectedly: ${S[s.status!.code]} "${s.status!.details}"`);
    await this.act(m, r, s);
  }
  abstract act(m: Model, r: ConnectSut, s: RawConnect): Promise<void>;
  abstract toString(): string;
}

class SubmitOk extends StreamCommand {
  constructor(
    readonly isIn: boolean,
    readonly len: number,
  ) {
    super();
  }
  async act(m: Model, r: ConnectSut, s: RawConnect) {
    const urbId = r.id();
    const data = this.isIn ? EMPTY : new Uint8Array(this.len).fill(urbId & 0xff);
    s.send(submitFrame(m.nextSeq++, urbId, this.isIn ? LOOP_BULK_IN : LOOP_BULK_OUT, this.isIn ? this.len : 0, data));
    const c = await r.completion(urbId);
    if (c.status !== UrbStatus.URB_STATUS_SUCCESS) throw new Error(`URB ${urbId} ended ${UrbStatus[c.status]}`);
    if (this.isIn && (c.actualLength > this.len || c.data.length !== c.actualLength)) throw new Error(`IN URB ${urbId}: ${c.data.length} bytes, actual ${c.actualLength}, asked ${this.len}`);
    if (!this.isIn && c.actualLength !== this.len) throw new Error(`OUT URB ${urbId}: actual ${c.actualLength} of ${this.len}`);
  }
  toString() {
    return `SubmitOk(${this.isIn ? 'IN' : 'OUT'}, ${this.len})`;
  }
}

/** A URB the device cannot take: an error frame naming it, and an INVAL completion; the stream goes on. */
class SubmitRefused extends StreamCommand {
  constructor(
    readonly kind: 'endpoint' | 'length' | 'data',
    readonly endpoint: number,
    readonly extra: number,
  ) {
    super();
  }
  async act(m: Model, r: ConnectSut, s: RawConnect) {
    const urbId = r.id();
    const seq = m.nextSeq++;
    const from = r.errors.length;
    const max = r.target.maxUrbBytes;
    if (this.kind === 'endpoint') s.send(submitFrame(seq, urbId, this.endpoint, 8));
    else if (this.kind === 'length') s.send(submitFrame(seq, urbId, LOOP_BULK_IN, max + this.extra));
    else s.send(submitFrame(seq, urbId, LOOP_BULK_OUT, 0, new Uint8Array(max + 1 + (this.extra % 4096))));
    const e = await r.errorFor(seq, from);
    const want = this.kind === 'endpoint' ? /no endpoint|not a valid endpoint address/ : /exceeds the limit of/;
    if (e.code !== S.INVALID_ARGUMENT || !want.test(e.message)) throw new Error(`error frame for seq ${seq}: ${S[e.code]} "${e.message}", expected ${want}`);
    const c = await r.completion(urbId);
    if (c.status !== UrbStatus.URB_STATUS_INVAL) throw new Error(`refused URB ${urbId} completed ${UrbStatus[c.status]}, not INVAL`);
  }
  toString() {
    return `SubmitRefused(${this.kind}, ep 0x${this.endpoint.toString(16)}, +${this.extra})`;
  }
}

/** Cancel of an id that is not in flight: nothing to do, the stream goes on. */
class CancelUnknown extends StreamCommand {
  constructor(readonly urbId: number) {
    super();
  }
  async act(m: Model, r: ConnectSut, s: RawConnect) {
    s.send({ seq: m.nextSeq++, kind: { $case: 'cancel', value: { urbId: this.urbId } } });
    await r.probe(m);
  }
  toString() {
    return `CancelUnknown(${this.urbId})`;
  }
}

/** A data frame with a seq already executed: dropped (a replay), the URB does not run. */
class SeqOld extends StreamCommand {
  constructor(readonly back: number) {
    super();
  }
  override check(m: Readonly<Model>) {
    return super.check(m) && m.nextSeq > 1;
  }
  async act(m: Model, r: ConnectSut, s: RawConnect) {
    const urbId = r.id();
    s.send(submitFrame(Math.max(1, m.nextSeq - this.back), urbId, LOOP_BULK_OUT, 0, Uint8Array.of(1)));
    await r.probe(m);
    if (r.completions.has(urbId)) throw new Error(`URB ${urbId} with an old seq was executed`);
  }
  toString() {
    return `SeqOld(-${this.back})`;
  }
}

class AckValid extends StreamCommand {
  async act(m: Model, r: ConnectSut, s: RawConnect) {
    const at = r.highestData;
    s.send({ seq: 0, kind: { $case: 'ack', value: { seq: at } } });
    await r.probe(m); // the ack is processed before the probe
    m.acked = Math.max(m.acked, at);
  }
  toString() {
    return 'AckValid';
  }
}

class HandOffWithoutStandby extends StreamCommand {
  async act(m: Model, r: ConnectSut, s: RawConnect) {
    const seq = m.nextSeq++;
    const from = r.errors.length;
    s.send({ seq, kind: { $case: 'handOff', value: { state: Uint8Array.of(1, 2, 3), lastServerSeq: r.highestData } } });
    const e = await r.errorFor(seq, from);
    if (e.code !== S.FAILED_PRECONDITION || !/no standby is waiting/.test(e.message)) throw new Error(`hand-off without standby: ${S[e.code]} "${e.message}"`);
  }
  toString() {
    return 'HandOffWithoutStandby';
  }
}

class OpAnyEndpoint extends StreamCommand {
  constructor(readonly endpoint: number) {
    super();
  }
  async act(m: Model, r: ConnectSut, s: RawConnect) {
    const opId = r.id();
    s.send({ seq: m.nextSeq++, kind: { $case: 'op', value: { opId, op: { $case: 'clearHalt', value: { endpoint: this.endpoint } } } } });
    await s.until(`the result of op ${opId}`, () => r.opResults.get(opId), r.waitMs);
  }
  toString() {
    return `ClearHalt(0x${this.endpoint.toString(16)})`;
  }
}

/** Frames that end the stream with INVALID_ARGUMENT; the session waits for a resume. */
class Fatal extends StreamCommand {
  constructor(
    readonly kind: 'ackBeyond' | 'gap' | 'garbage' | 'unsafeSeq' | 'unknownKind' | 'openAgain',
    readonly n: number,
    readonly bytes: Uint8Array,
  ) {
    super();
  }
  async act(m: Model, r: ConnectSut, s: RawConnect) {
    let want: RegExp;
    switch (this.kind) {
      case 'ackBeyond':
        s.send({ seq: 0, kind: { $case: 'ack', value: { seq: r.highestData + 100_000 + this.n } } });
        want = /ack for seq \d+, but the highest seq ever sent is \d+/;
        break;
      case 'gap':
        s.send(submitFrame(m.nextSeq + this.n, r.id(), LOOP_BULK_OUT, 0, Uint8Array.of(1)));
        want = new RegExp(`skips ahead: expected ${m.nextSeq}`);
        break;
      case 'garbage':
        s.sendRaw(this.bytes);
        want = /Connect \(\d+ bytes\) is not a valid protobuf message/;
        break;
      case 'unsafeSeq': {
        // ClientFrame{seq: 2^60 + n}: valid protobuf, but no JavaScript number holds it exactly.
        const v = (1n << 60n) + BigInt(this.n);
        const varint: number[] = [];
        for (let x = v; ; x >>= 7n) {
          if (x < 0x80n) {
            varint.push(Number(x));
            break;
          }
          varint.push(Number(x & 0x7fn) | 0x80);
        }
        s.sendRaw(Uint8Array.of(0x0a, varint.length + 1, 0x08, ...varint));
        want = /is not a valid protobuf message.*MAX_SAFE_INTEGER/;
        break;
      }
      case 'unknownKind':
        s.sendRaw(Uint8Array.of(0x0a, 4, 0x08, m.nextSeq & 0x7f, 0x78, this.n & 0x7f));
        want = /has no known kind/;
        break;
      case 'openAgain':
        s.send({ seq: 0, kind: { $case: 'open', value: { target: { $case: 'resume', value: { sessionId: r.sessionId, lastServerSeq: 0 } } } } });
        want = /already open/;
        break;
    }
    m.streamAlive = false;
    await r.expectEnd(s, S.INVALID_ARGUMENT, want, this.toString());
  }
  toString() {
    return `Fatal(${this.kind}, ${this.n}${this.kind === 'garbage' ? `, ${Buffer.from(this.bytes).toString('hex').slice(0, 32)}` : ''})`;
  }
}

/** Another stream tries to take the session and is refused; the session's own stream goes on. */
class ResumeRefused implements Cmd {
  constructor(readonly kind: 'ahead' | 'unknown' | 'otherIdentity' | 'behindAck' | 'standbyOther' | 'standbyHandOff') {}
  check(m: Readonly<Model>) {
    if (!m.sessionAlive) return false;
    if (this.kind === 'behindAck') return m.acked > 0;
    if (this.kind === 'standbyHandOff') return m.streamAlive; // a standby on a lost stream would take over
    return true;
  }
  async run(m: Model, r: ConnectSut) {
    const identity = this.kind === 'otherIdentity' || this.kind === 'standbyOther' ? r.target.other : r.target.owner;
    const s = r.open(identity);
    const resume = (sessionId: string, lastServerSeq: number): ClientFrame => ({ seq: 0, kind: { $case: 'open', value: { target: { $case: 'resume', value: { sessionId, lastServerSeq } } } } });
    const standby: ClientFrame = { seq: 0, kind: { $case: 'open', value: { target: { $case: 'standby', value: { sessionId: r.sessionId } } } } };
    switch (this.kind) {
      case 'ahead':
        s.send(resume(r.sessionId, r.highestData + 100_000));
        await r.expectEnd(s, S.INVALID_ARGUMENT, /from server seq \d+, but the highest seq ever sent is/, 'resume ahead');
        break;
      case 'unknown':
        s.send(resume(randomUUID(), 0));
        await r.expectEnd(s, S.NOT_FOUND, /unknown or has expired/, 'resume of an unknown session');
        break;
      case 'otherIdentity':
        s.send(resume(r.sessionId, r.highestData));
        await r.expectEnd(s, S.PERMISSION_DENIED, /belongs to another identity/, 'resume by another identity');
        break;
      case 'behindAck':
        s.send(resume(r.sessionId, m.acked - 1));
        await r.expectEnd(s, S.FAILED_PRECONDITION, /already acknowledged/, 'resume behind the ack');
        break;
      case 'standbyOther':
        s.send(standby);
        await r.expectEnd(s, S.PERMISSION_DENIED, /may not use device/, 'standby by an identity the ACL refuses');
        break;
      case 'standbyHandOff':
        s.send(standby);
        await s.until('opened (standby)', () => s.frames.find((f) => f.kind?.$case === 'opened'), r.waitMs);
        s.send({ seq: 1, kind: { $case: 'handOff', value: { state: EMPTY, lastServerSeq: 0 } } });
        await r.expectEnd(s, S.FAILED_PRECONDITION, /standby for session .* may not send handOff/, 'hand-off from the standby');
        break;
    }
    if (m.streamAlive) await r.probe(m);
  }
  toString() {
    return `ResumeRefused(${this.kind})`;
  }
}

/** A resume from where the client is: the server knows every client frame, an old stream is superseded. */
class ResumeValid implements Cmd {
  check(m: Readonly<Model>) {
    return m.sessionAlive;
  }
  async run(m: Model, r: ConnectSut) {
    const old = r.stream!;
    const s = r.open();
    s.send({ seq: 0, kind: { $case: 'open', value: { target: { $case: 'resume', value: { sessionId: r.sessionId, lastServerSeq: r.highestData } } } } });
    const f = await s.until('opened (resume)', () => s.frames.find((x) => x.kind?.$case === 'opened'), r.waitMs);
    if (f.kind?.$case !== 'opened' || !f.kind.value.resumed) throw new Error('resume not answered with opened{resumed}');
    if (f.kind.value.lastClientSeq !== m.nextSeq - 1) throw new Error(`resume: the server has client seq ${f.kind.value.lastClientSeq}, the client sent up to ${m.nextSeq - 1}`);
    if (m.streamAlive) await r.expectEnd(old, S.ABORTED, /resumed by another stream/, 'the superseded stream');
    r.stream = s;
    m.streamAlive = true;
  }
  toString() {
    return 'ResumeValid';
  }
}

class CloseSession extends StreamCommand {
  async act(m: Model, r: ConnectSut, s: RawConnect) {
    s.send({ seq: m.nextSeq++, kind: { $case: 'close', value: {} } });
    await s.until('closed', () => s.frames.find((f) => f.kind?.$case === 'closed'), r.waitMs);
    await r.expectEnd(s, S.OK, /.*/, 'close');
    m.sessionAlive = false;
    m.streamAlive = false;
    const end = Date.now() + r.waitMs;
    while (await r.deviceClaimed()) {
      if (Date.now() > end) throw new Error('device still claimed after close');
      await new Promise((x) => setTimeout(x, 10));
    }
  }
  toString() {
    return 'Close';
  }
}

class OpenNew implements Cmd {
  check(m: Readonly<Model>) {
    return !m.sessionAlive;
  }
  async run(m: Model, r: ConnectSut) {
    await r.openSession();
    Object.assign(m, { sessionAlive: true, streamAlive: true, nextSeq: 2, acked: 0 });
  }
  toString() {
    return 'OpenNew';
  }
}

/** Bytes no protobuf parser accepts as a ClientMessage. */
export function undecodableBytes(): fc.Arbitrary<Uint8Array> {
  const invalidWireType = fc.uint8Array({ maxLength: 64 }).map((b) => Uint8Array.of(0x0f, ...b)); // field 1, wire type 7
  const truncated = fc.uint8Array({ maxLength: 40 }).map((b) => Uint8Array.of(0x0a, b.length + 5 + (b.length % 100), ...b)); // length past the end
  const random = fc.uint8Array({ minLength: 1, maxLength: 256 });
  return fc.oneof(invalidWireType, truncated, random).filter((b) => {
    try {
      ClientMessage.decode(b);
      return false;
    } catch {
      return true;
    }
  });
}

export function connectCommands(maxCommands: number): fc.Arbitrary<Iterable<Cmd>> {
  const cmds: fc.Arbitrary<Cmd>[] = [
    fc.tuple(fc.boolean(), fc.integer({ min: 0, max: 2048 })).map(([i, n]) => new SubmitOk(i, n)),
    fc
      .tuple(fc.constantFrom<'endpoint' | 'length' | 'data'>('endpoint', 'length', 'data'), fc.constantFrom(...MISSING_ENDPOINTS), fc.integer({ min: 1, max: 0x7fffffff }))
      .map(([k, ep, x]) => new SubmitRefused(k, ep, x)),
    fc.integer({ min: 1_000_000, max: Number.MAX_SAFE_INTEGER }).map((id) => new CancelUnknown(id)),
    fc.integer({ min: 1, max: 50 }).map((b) => new SeqOld(b)),
    fc.constant(new AckValid()),
    fc.constant(new HandOffWithoutStandby()),
    fc.integer({ min: 0, max: 0xff }).map((ep) => new OpAnyEndpoint(ep)),
    fc
      .tuple(fc.constantFrom<Fatal['kind']>('ackBeyond', 'gap', 'garbage', 'unsafeSeq', 'unknownKind', 'openAgain'), fc.integer({ min: 1, max: 1000 }), undecodableBytes())
      .map(([k, n, b]) => new Fatal(k, n, b)),
    fc.constantFrom<ResumeRefused['kind']>('ahead', 'unknown', 'otherIdentity', 'behindAck', 'standbyOther', 'standbyHandOff').map((k) => new ResumeRefused(k)),
    fc.constant(new ResumeValid()),
    fc.constant(new CloseSession()),
    fc.constant(new OpenNew()),
  ];
  return fc.commands(cmds, { maxCommands, size: 'max' });
}

/** One property: valid open, then the commands; the session closed and the device free at the end. */
export function connectProperty(target: ConnectFuzzTarget, tally: ConnectFuzzTally, maxCommands = 25): fc.IAsyncPropertyWithHooks<[Iterable<Cmd>]> {
  return fc.asyncProperty(connectCommands(maxCommands), async (cmds) => {
    tally.runs++;
    const r = new ConnectSut(target, tally);
    const model: Model = { sessionAlive: true, streamAlive: true, nextSeq: 2, acked: 0 };
    try {
      await fc.asyncModelRun(async () => {
        await r.openSession();
        return { model, real: r };
      }, countCommands(cmds, tally));
    } finally {
      await r.teardown(model);
    }
    if (tally.internal_count) throw new Error(`${tally.internal_count} stream(s) ended INTERNAL or UNKNOWN`);
  });
}

function* countCommands(cmds: Iterable<Cmd>, tally: ConnectFuzzTally): Iterable<Cmd> {
  for (const c of cmds) {
    yield {
      check: (m) => c.check(m),
      run: async (m, r) => {
        tally.commands++;
        await c.run(m, r);
      },
      toString: () => c.toString(),
    };
  }
}
