// A device on a USB host, used through a URB channel. Shaped after WebUSB
// (controlTransferIn/Out, transferIn/Out, selectConfiguration, ...), plus the
// low-level `submit` the bridge needs.
//
// It survives a lost stream by itself: it reconnects with backoff, resumes
// the session by sequence number, replays the frames the server had not
// acknowledged and drops completions it has already seen, so every URB
// executes once and completes once.
import { EventEmitter } from 'node:events';
import { Status } from 'nice-grpc';
import { silentLogger, type Logger } from '../../common/log.js';
import { SeqChannel } from '../../common/seq-channel.js';
import { ChannelClosedError, FINAL_CODES, StreamState, type StreamOpener } from './channel-call.js';
import { encodeSetup, type ControlSetup } from './control-setup.js';
import {
  TransferType,
  UrbStatus,
  type ClientFrame,
  type Device,
  type DeviceOp,
  type IsoPacket,
  type OpResult,
  type ReceivedData,
  type ServerFrame,
  type StartReceiving,
  type UrbComplete,
  type UrbSubmit,
} from '../../gen/usbroam/v1/usbhost.js';

export { TransferType, UrbStatus };
export { ChannelClosedError, type ChannelCall, type ChannelCallHandlers, type StreamOpener } from './channel-call.js';
export { encodeSetup, type ControlSetup } from './control-setup.js';

export interface RemoteDeviceOptions {
  log?: Logger;
  /** Give up reconnecting after this long (should not exceed the server's grace period). */
  reconnectWindowMs?: number;
  /** Most URBs in flight before submit waits. */
  maxInFlight?: number;
  maxJournalBytes?: number;
}

export type UrbRequest = Omit<UrbSubmit, 'urbId' | 'data' | 'setup' | 'isoPackets' | 'streamId' | 'flags' | 'timeoutMs' | 'length'> &
  Partial<Pick<UrbSubmit, 'data' | 'setup' | 'isoPackets' | 'streamId' | 'flags' | 'timeoutMs' | 'length'>>;

export interface TakeOverInfo {
  /** What the handing-over side passed on (empty when it was lost). */
  state: Uint8Array;
  /** The previous holder was lost without a hand-off. */
  sourceLost: boolean;
  /** Server frames after this seq come to this device. */
  lastServerSeq: number;
}

/** What RemoteDevice.urbObserver hears: cheap, synchronous, on the URB path. */
export interface RemoteUrbObserver {
  submitted(s: UrbSubmit): void;
  /** `seconds`: from submit to completion. */
  completed(s: UrbSubmit, c: UrbComplete, seconds: number): void;
}

export interface TransferResult {
  status: UrbStatus;
  data: Uint8Array;
  actualLength: number;
  isoPackets: IsoPacket[];
}

interface Pending<T> {
  resolve: (v: T) => void;
  reject: (e: Error) => void;
  /** While urbObserver is set: performance.now() at submit, and the submit. */
  t0?: number;
  submit?: UrbSubmit;
}

export class RemoteDevice extends EventEmitter {
  /** The device as the server described it on open (updated by configuration changes). */
  device!: Device;
  sessionId = '';
  /** Told of each URB's submit and completion (the bridge's round-trip metric and capture). */
  urbObserver?: RemoteUrbObserver;
  private readonly log: Logger;
  private readonly channel: SeqChannel<ClientFrame>;
  private readonly urbs = new Map<number, Pending<UrbComplete>>();
  private readonly ops = new Map<number, Pending<OpResult>>();
  private nextUrbId = 1;
  private readonly orphans = new Map<number, UrbComplete>();
  private nextOpId = 1;
  private current?: StreamState;
  private closed = false;
  private closeError?: Error;
  private slotWaiters: (() => void)[] = [];
  private readonly maxInFlight: number;
  private readonly reconnectWindowMs: number;
  private opened?: Pending<void>;
  /** Set on a standby: resolves when this device takes the session over. */
  takeOver?: Promise<TakeOverInfo>;
  private takeOverWaiter?: Pending<TakeOverInfo>;
  private standbyMode = false;
  /** After handOff(): server frames are no longer consumed (they belong to the taker). */
  private frozen = false;
  private handedOff?: Pending<void>;
  /** Reconnections so far (for tests and metrics). */
  reconnects = 0;
  /** pauseReading() is in force (on this stream and any reconnected one). */
  private readingPaused = false;

  private constructor(
    private readonly openStream: StreamOpener,
    opts: RemoteDeviceOptions,
  ) {
    super();
    this.log = opts.log ?? silentLogger;
    this.channel = new SeqChannel({ maxJournalBytes: opts.maxJournalBytes ?? 512 * 1024 * 1024 });
    this.maxInFlight = opts.maxInFlight ?? 256;
    this.reconnectWindowMs = opts.reconnectWindowMs ?? 25_000;
  }

  /** Open a session on the device matching `selector`. */
  static async open(openStream: StreamOpener, selector: { id?: string; vidPid?: string; serial?: string; portPath?: string }, opts: RemoteDeviceOptions = {}): Promise<RemoteDevice> {
    const d = new RemoteDevice(openStream, opts);
    await d.connect({ $case: 'device', value: { id: selector.id ?? '', vidPid: selector.vidPid ?? '', serial: selector.serial ?? '', portPath: selector.portPath ?? '' } });
    return d;
  }

  /** Resume an existing session (e.g. another process handing over). */
  static async resume(openStream: StreamOpener, sessionId: string, lastServerSeq: number, opts: RemoteDeviceOptions = {}): Promise<RemoteDevice> {
    const d = new RemoteDevice(openStream, opts);
    d.sessionId = sessionId;
    d.channel.receiveAfter(lastServerSeq);
    await d.connect({ $case: 'resume', value: { sessionId, lastServerSeq } });
    return d;
  }

  /**
   * Stand by to take over `sessionId` from the stream that holds it (the
   * destination of a live migration). Resolves once the server parked this
   * stream; `takeOver` resolves when the session is handed over (or its
   * holder is lost), and from then on this is an ordinary RemoteDevice.
   */
  static async standby(openStream: StreamOpener, sessionId: string, opts: RemoteDeviceOptions = {}): Promise<RemoteDevice> {
    const d = new RemoteDevice(openStream, opts);
    d.sessionId = sessionId;
    d.standbyMode = true;
    d.takeOver = new Promise<TakeOverInfo>((resolve, reject) => (d.takeOverWaiter = { resolve, reject }));
    d.takeOver.catch(() => {});
    await d.connect({ $case: 'standby', value: { sessionId } });
    return d;
  }

  get inFlight(): number {
    return this.urbs.size;
  }
  get lastServerSeq(): number {
    return this.channel.lastReceived;
  }

  // ------------------------------------------------------------ stream lifecycle

  private connect(target: NonNullable<ClientFrame['kind'] & { $case: 'open' }>['value']['target']): Promise<void> {
    const st = new StreamState();
    this.current = st;
    this.channel.detach(); // frames wait in the journal until the session is open on this stream
    const opened = new Promise<void>((resolve, reject) => (this.opened = { resolve, reject }));
    st.call = this.openStream({
      message: (msg) => {
        if (this.current !== st) return;
        for (const f of msg.frames) this.onFrame(f);
      },
      drain: () => {
        if (this.current === st) st.drained();
      },
      end: (error) => {
        if (st.ended) return;
        st.ended = true;
        void this.streamEnded(st, error);
      },
    });
    if (this.readingPaused) st.call.setReading(false);
    st.write({ frames: [{ seq: this.channel.highestSeq, kind: { $case: 'open', value: { target } } }] });
    return opened;
  }

  private async streamEnded(st: StreamState, error?: { code?: number; message: string }): Promise<void> {
    st.call?.end();
    if (this.current !== st) return; // superseded
    this.channel.detach(st);
    if (this.handedOff) {
      const h = this.handedOff;
      this.handedOff = undefined;
      if (error === undefined) {
        this.fail(new ChannelClosedError(`session ${this.sessionId} was handed off`));
        h.resolve();
        return;
      }
      h.reject(new ChannelClosedError(`hand-off of session ${this.sessionId} failed: ${error.message}`));
      this.frozen = false; // resume below replays what arrived while frozen
    }
    if (this.closed) return;
    const code = error?.code as Status | undefined;
    const message = error ? error.message : 'stream ended without close';
    const final = code !== undefined && FINAL_CODES.has(code);
    if (this.opened) {
      // The open (or a resume attempt) failed; whoever called connect() decides.
      const o = this.opened;
      this.opened = undefined;
      const err = new ChannelClosedError(message, code);
      if (!this.sessionId || final) this.fail(err);
      o.reject(err);
      return;
    }
    if (final) {
      this.fail(new ChannelClosedError(`session ${this.sessionId}: ${message}`, code));
      return;
    }
    await this.reconnect(message);
  }

  private async reconnect(why: string): Promise<void> {
    const deadline = Date.now() + this.reconnectWindowMs;
    let delay = 50;
    this.log.warn({ session: this.sessionId, why }, 'URB channel lost; resuming');
    this.emit('reconnecting', why);
    while (!this.closed) {
      await new Promise((r) => setTimeout(r, delay));
      if (this.closed) return;
      try {
        await this.connect({ $case: 'resume', value: { sessionId: this.sessionId, lastServerSeq: this.channel.lastReceived } });
        this.reconnects++;
        this.log.info({ session: this.sessionId, lastServerSeq: this.channel.lastReceived }, 'URB channel resumed');
        this.emit('resumed');
        return;
      } catch (err) {
        if (this.closed) return;
        const e = err as ChannelClosedError;
        if (e.code !== undefined && FINAL_CODES.has(e.code)) return; // fail() already ran
        if (Date.now() > deadline) {
          this.fail(new ChannelClosedError(`session ${this.sessionId}: could not resume within ${this.reconnectWindowMs} ms: ${e.message}`, e.code));
          return;
        }
        delay = Math.min(delay * 2, 1000);
      }
    }
  }

  /** End every pending request with `err`; the device is unusable afterwards. */
  private fail(err: Error): void {
    if (this.closed) return;
    this.closed = true;
    this.closeError = err;
    this.log.warn({ session: this.sessionId, err: err.message }, 'URB channel closed');
    for (const p of this.urbs.values()) p.reject(err);
    for (const p of this.ops.values()) p.reject(err);
    this.urbs.clear();
    this.ops.clear();
    for (const w of this.slotWaiters.splice(0)) w();
    this.current?.call?.cancel();
    this.emit('closed', err);
  }

  /** Break the current stream as a network failure would (for tests and fault injection). */
  dropStream(): void {
    this.current?.call?.cancel();
  }

  /**
   * Test hook: stop reading the gRPC stream, as a client that stops reading its completions
   * would. Submits still go out; completions back up through HTTP/2 flow control to the server,
   * which holds further URBs at its byte bound and ends the session after its grace period.
   * Nothing on the URB path looks at it: it pauses the underlying call.
   */
  pauseReading(): void {
    this.readingPaused = true;
    this.current?.call?.setReading(false);
  }

  /** Test hook: read the stream again after pauseReading(); what waited arrives. */
  resumeReading(): void {
    this.readingPaused = false;
    this.current?.call?.setReading(true);
  }

  // ------------------------------------------------------------ inbound

  private onFrame(f: ServerFrame): void {
    const k = f.kind;
    if (!k) return;
    switch (k.$case) {
      case 'opened': {
        this.sessionId = k.value.sessionId;
        if (k.value.device) this.device = k.value.device;
        // Resend everything the server has not seen (a standby has sent nothing yet).
        if (!k.value.standby) this.channel.attach(this.current!, k.value.lastClientSeq);
        const o = this.opened;
        this.opened = undefined;
        o?.resolve();
        return;
      }
      case 'ack':
        if (k.value.seq <= this.channel.highestSeq) this.channel.peerAcked(k.value.seq);
        return;
      case 'takeOver': {
        const t = k.value;
        this.channel.receiveAfter(t.lastServerSeq);
        this.channel.continueAfter(t.lastClientSeq);
        this.standbyMode = false;
        this.channel.attach(this.current!);
        this.log.info({ session: this.sessionId, lastServerSeq: t.lastServerSeq, lastClientSeq: t.lastClientSeq, sourceLost: t.sourceLost }, 'took the session over');
        this.takeOverWaiter?.resolve({ state: t.state, sourceLost: t.sourceLost, lastServerSeq: t.lastServerSeq });
        this.takeOverWaiter = undefined;
        this.emit('takeOver', t);
        return;
      }
      case 'error':
        this.log.warn({ session: this.sessionId, code: k.value.code, err: k.value.message, clientSeq: k.value.clientSeq }, 'server reported a channel error');
        if (this.handedOff && k.value.code === Status.FAILED_PRECONDITION) {
          // Refused (no standby): keep the session; reconnecting replays what was not consumed.
          const h = this.handedOff;
          this.handedOff = undefined;
          this.frozen = false;
          h.reject(new ChannelClosedError(k.value.message, Status.FAILED_PRECONDITION));
          this.dropStream();
        }
        this.emit('channelError', k.value);
        return;
    }
    if (this.frozen) return; // handed off: the taker gets these frames from the journal
    if (this.channel.receive(f.seq) !== 'new') return; // a replayed duplicate, or out of order
    switch (k.$case) {
      case 'complete': {
        const p = this.urbs.get(k.value.urbId);
        if (!p) {
          // Submitted by the holder this device took over from: kept until adopt().
          if (this.orphans.size < MAX_ORPHANS) this.orphans.set(k.value.urbId, k.value);
          return;
        }
        this.urbs.delete(k.value.urbId);
        if (p.submit) this.urbObserver?.completed(p.submit, k.value, (performance.now() - p.t0!) / 1000);
        const w = this.slotWaiters.shift();
        if (w) w();
        p.resolve(k.value);
        return;
      }
      case 'opResult': {
        const p = this.ops.get(k.value.opId);
        this.ops.delete(k.value.opId);
        if (k.value.endpoints.length || k.value.interfaces.length) {
          this.device = { ...this.device, interfaces: k.value.interfaces, endpoints: k.value.endpoints };
        }
        p?.resolve(k.value);
        return;
      }
      case 'received':
        this.emit('received', k.value as ReceivedData);
        return;
      case 'deviceGone':
        this.emit('deviceGone', k.value.reason);
        return;
      case 'closed':
        this.closed = true;
        this.current?.call?.end();
        this.emit('closed');
        return;
    }
  }

  // ------------------------------------------------------------ outbound

  private send(kind: NonNullable<ClientFrame['kind']>, bytes: number): number {
    if (this.closed) throw this.closeError ?? new ChannelClosedError(`session ${this.sessionId} is closed`);
    if (this.standbyMode) throw new ChannelClosedError(`session ${this.sessionId}: this standby has not taken over yet`);
    if (this.frozen) throw new ChannelClosedError(`session ${this.sessionId} was handed off`);
    return this.channel.send(kind, bytes);
  }

  private async slot(): Promise<void> {
    while (this.urbs.size >= this.maxInFlight && !this.closed) {
      await new Promise<void>((r) => this.slotWaiters.push(r));
    }
  }

  /**
   * Submit one URB; resolves with its completion (whatever its status).
   * When a slot is free the URB gets its id (`peekNextUrbId()` before the
   * call) and is queued for sending synchronously, so submits and ops keep
   * their order; only a full in-flight window makes it wait.
   */
  submit(req: UrbRequest, signal?: AbortSignal): Promise<UrbComplete> {
    if (this.urbs.size >= this.maxInFlight && !this.closed) return this.slot().then(() => this.submit(req, signal));
    const urbId = this.nextUrbId++;
    const s: UrbSubmit = {
      urbId,
      endpoint: req.endpoint,
      type: req.type,
      setup: req.setup ?? EMPTY,
      data: req.data ?? EMPTY,
      length: req.length ?? 0,
      streamId: req.streamId ?? 0,
      flags: req.flags ?? 0,
      isoPackets: req.isoPackets ?? [],
      timeoutMs: req.timeoutMs ?? 0,
    };
    const obs = this.urbObserver;
    const done = new Promise<UrbComplete>((resolve, reject) => this.urbs.set(urbId, obs ? { resolve, reject, t0: performance.now(), submit: s } : { resolve, reject }));
    obs?.submitted(s);
    try {
      this.send({ $case: 'submit', value: s }, s.data.length);
    } catch (err) {
      this.urbs.delete(urbId);
      return Promise.reject(err);
    }
    if (signal) {
      const onAbort = () => this.cancel(urbId);
      if (signal.aborted) onAbort();
      else {
        signal.addEventListener('abort', onAbort, { once: true });
        void done.finally(() => signal.removeEventListener('abort', onAbort)).catch(() => {});
      }
    }
    return done;
  }

  /** Ask the server to cancel a URB; it completes with Cancelled unless it already finished. */
  cancel(urbId: number): void {
    if (this.urbs.has(urbId) && !this.closed) this.send({ $case: 'cancel', value: { urbId } }, 0);
  }

  /**
   * After a take-over: the completion of a URB the previous holder submitted
   * (its id comes with the handed-over state). Also continues URB numbering
   * after it, so ids never collide.
   */
  adopt(urbId: number): Promise<UrbComplete> {
    if (urbId >= this.nextUrbId) this.nextUrbId = urbId + 1;
    const c = this.orphans.get(urbId);
    if (c) {
      this.orphans.delete(urbId);
      return Promise.resolve(c);
    }
    return new Promise<UrbComplete>((resolve, reject) => this.urbs.set(urbId, { resolve, reject }));
  }

  /** Continue URB numbering after the previous holder's (see adopt). */
  continueUrbIdsAfter(urbId: number): void {
    if (urbId >= this.nextUrbId) this.nextUrbId = urbId + 1;
  }

  /** The id the next submit will get (for callers that cancel by id). */
  peekNextUrbId(): number {
    return this.nextUrbId;
  }

  private async op(op: DeviceOp['op']): Promise<OpResult> {
    const opId = this.nextOpId++;
    const done = new Promise<OpResult>((resolve, reject) => this.ops.set(opId, { resolve, reject }));
    this.send({ $case: 'op', value: { opId, op } }, 0);
    return done;
  }

  private async checkedOp(op: DeviceOp['op'], what: string): Promise<OpResult> {
    const r = await this.op(op);
    if (r.status !== UrbStatus.URB_STATUS_SUCCESS) throw new Error(`${what} on device ${this.device?.id} failed: ${UrbStatus[r.status]} ${r.message}`);
    return r;
  }

  // ------------------------------------------------------------ WebUSB-shaped API

  private endpointType(address: number): TransferType {
    const ep = this.device.endpoints.find((e) => e.address === address);
    if (!ep) throw new Error(`device ${this.device.id} has no endpoint 0x${address.toString(16)}`);
    return ep.type;
  }

  private static result(c: UrbComplete): TransferResult {
    return { status: c.status, data: c.data, actualLength: c.actualLength, isoPackets: c.isoPackets };
  }

  async controlTransferIn(setup: ControlSetup, length: number, signal?: AbortSignal): Promise<TransferResult> {
    const c = await this.submit({ endpoint: 0x80, type: TransferType.TRANSFER_CONTROL, setup: encodeSetup(setup, true, length), length }, signal);
    return RemoteDevice.result(c);
  }

  async controlTransferOut(setup: ControlSetup, data: Uint8Array = EMPTY, signal?: AbortSignal): Promise<TransferResult> {
    const c = await this.submit({ endpoint: 0x00, type: TransferType.TRANSFER_CONTROL, setup: encodeSetup(setup, false, data.length), data }, signal);
    return RemoteDevice.result(c);
  }

  /** Bulk or interrupt IN on endpoint number `ep` (1-15). */
  async transferIn(ep: number, length: number, signal?: AbortSignal): Promise<TransferResult> {
    const address = 0x80 | ep;
    const c = await this.submit({ endpoint: address, type: this.endpointType(address), length }, signal);
    return RemoteDevice.result(c);
  }

  /** Bulk or interrupt OUT on endpoint number `ep` (1-15). */
  async transferOut(ep: number, data: Uint8Array, signal?: AbortSignal): Promise<TransferResult> {
    const c = await this.submit({ endpoint: ep, type: this.endpointType(ep), data }, signal);
    return RemoteDevice.result(c);
  }

  async isochronousTransferIn(ep: number, packetLengths: number[]): Promise<TransferResult> {
    const total = packetLengths.reduce((a, b) => a + b, 0);
    const c = await this.submit({
      endpoint: 0x80 | ep,
      type: TransferType.TRANSFER_ISOCHRONOUS,
      length: total,
      isoPackets: packetLengths.map((length) => ({ length, status: UrbStatus.URB_STATUS_SUCCESS, actualLength: 0 })),
    });
    return RemoteDevice.result(c);
  }

  async isochronousTransferOut(ep: number, data: Uint8Array, packetLengths: number[]): Promise<TransferResult> {
    const c = await this.submit({
      endpoint: ep,
      type: TransferType.TRANSFER_ISOCHRONOUS,
      data,
      isoPackets: packetLengths.map((length) => ({ length, status: UrbStatus.URB_STATUS_SUCCESS, actualLength: 0 })),
    });
    return RemoteDevice.result(c);
  }

  async selectConfiguration(value: number): Promise<void> {
    await this.checkedOp({ $case: 'setConfiguration', value: { value } }, `set configuration ${value}`);
  }
  async getConfiguration(): Promise<number> {
    return (await this.checkedOp({ $case: 'getConfiguration', value: {} }, 'get configuration')).value;
  }
  async selectAlternateInterface(interfaceNumber: number, alternateSetting: number): Promise<void> {
    await this.checkedOp({ $case: 'setInterface', value: { interfaceNumber, alternateSetting } }, `set interface ${interfaceNumber} alt ${alternateSetting}`);
  }
  async getInterface(interfaceNumber: number): Promise<number> {
    return (await this.checkedOp({ $case: 'getInterface', value: { interfaceNumber } }, `get interface ${interfaceNumber}`)).value;
  }
  /** endpoint: bEndpointAddress (with 0x80 for IN). */
  async clearHalt(endpoint: number): Promise<void> {
    await this.checkedOp({ $case: 'clearHalt', value: { endpoint } }, `clear halt 0x${endpoint.toString(16)}`);
  }
  async reset(): Promise<void> {
    await this.checkedOp({ $case: 'reset', value: {} }, 'reset');
  }
  /** Start a receiving stream; data arrives as 'received' events. */
  async startReceiving(s: Partial<StartReceiving> & { endpoint: number }): Promise<void> {
    await this.checkedOp(
      { $case: 'startReceiving', value: { endpoint: s.endpoint, type: s.type ?? this.endpointType(s.endpoint), transferLength: s.transferLength ?? 0, transfers: s.transfers ?? 0, isoPacketsPerTransfer: s.isoPacketsPerTransfer ?? 0 } },
      `start receiving 0x${s.endpoint.toString(16)}`,
    );
  }
  async stopReceiving(endpoint: number): Promise<void> {
    await this.checkedOp({ $case: 'stopReceiving', value: { endpoint } }, `stop receiving 0x${endpoint.toString(16)}`);
  }
  async allocBulkStreams(endpoints: number[], numStreams: number): Promise<number> {
    return (await this.checkedOp({ $case: 'allocBulkStreams', value: { endpoints, numStreams } }, 'alloc bulk streams')).value;
  }
  async freeBulkStreams(endpoints: number[]): Promise<void> {
    await this.checkedOp({ $case: 'freeBulkStreams', value: { endpoints } }, 'free bulk streams');
  }
  /** Raw op, for callers that want the status rather than an exception (the bridge). */
  rawOp(op: DeviceOp['op']): Promise<OpResult> {
    return this.op(op);
  }

  /**
   * Hand the session to the standby waiting on it, with opaque `state` for it.
   * From this call on no server frame is consumed here: the last one consumed
   * is the position handed over, and what follows goes to the taker. Resolves
   * when the server confirmed (it ends this stream); pending URBs here are
   * then rejected with a ChannelClosedError (their completions go to the taker).
   */
  handOff(state: Uint8Array): Promise<{ lastServerSeq: number }> {
    this.frozen = true;
    const lastServerSeq = this.channel.lastReceived;
    const done = new Promise<void>((resolve, reject) => (this.handedOff = { resolve, reject }));
    this.channel.send({ $case: 'handOff', value: { state, lastServerSeq } }, state.length);
    this.channel.flush();
    return done.then(() => ({ lastServerSeq }));
  }

  /** Close the session: in-flight URBs are cancelled, the claim released. */
  async close(): Promise<void> {
    if (this.closed) return;
    const closed = new Promise<void>((resolve) => this.once('closed', () => resolve()));
    this.send({ $case: 'close', value: {} }, 0);
    await Promise.race([closed, new Promise((r) => setTimeout(r, 5000))]);
    this.closed = true;
    for (const p of this.urbs.values()) p.reject(new ChannelClosedError('closed'));
    this.urbs.clear();
    this.current?.call?.end();
  }
}

const EMPTY = new Uint8Array(0);
const MAX_ORPHANS = 65536;
