// A URB-channel session: one client's exclusive claim on one device, and the
// sequenced exchange of frames that outlives any single gRPC stream.
//
// Client data frames are executed exactly once (duplicates dropped by seq);
// every server data frame is journaled until acknowledged and replayed after
// a resume. While no stream is attached the session keeps executing what is
// in flight and journals the completions, for a grace period.
import { EventEmitter } from 'node:events';
import { status as Status } from '@grpc/grpc-js';
import type { Logger } from '../../common/log.js';
import { AckScheduler } from '../../common/ack-scheduler.js';
import { InvalidAckError, JournalOverflowError, SeqJournal, SeqReceiver } from '../../common/seq-journal.js';
import type {
  ClientFrame,
  DeviceOp,
  HandOff,
  OpResult,
  ServerFrame,
  ServerMessage,
  UrbSubmit,
} from '../../gen/usbroam/v1/usbhost.js';
import {
  TransferType,
  UrbStatus,
  UsbError,
  type DeviceHandle,
  type DeviceInfo,
  type Urb,
  type UrbResult,
} from '../backends/types.js';
import { endpointToProto, interfaceToProto, pbIsoPackets, pbStatus } from '../convert.js';
import { ReceivingStream } from './receiving-stream.js';
import { FlushScheduler } from '../../common/flush-scheduler.js';
import type { SessionObserver } from '../observe/observer.js';

export interface SessionLimits {
  /** Largest OUT payload or IN length of one URB. */
  maxUrbBytes: number;
  /** URBs executing at once; beyond it the session stops reading its stream (flow control). */
  maxInFlight: number;
  /** Unacknowledged server frames, in payload bytes. */
  maxJournalBytes: number;
  /** How long a session without a stream keeps its claim. */
  graceMs: number;
  /** Receiving streams pause (stop resubmitting) while the journal holds more than this. */
  receivingPauseBytes: number;
  /** With a standby waiting, how long a lost stream has to come back before the standby takes over. */
  standbyTakeoverMs: number;
}

export const defaultLimits: SessionLimits = {
  maxUrbBytes: 8 * 1024 * 1024,
  maxInFlight: 512,
  maxJournalBytes: 256 * 1024 * 1024,
  graceMs: 30_000,
  receivingPauseBytes: 8 * 1024 * 1024,
  standbyTakeoverMs: 3000,
};

/** Where a session writes: the attached gRPC stream, seen through a narrow interface. */
export interface SessionStream {
  readonly peer: string;
  /** false: the transport buffer is full; wait for drain. */
  write(msg: ServerMessage): boolean;
  onceDrain(cb: () => void): void;
  /** End the stream: OK, or an error status with a message. */
  end(code: Status, message: string): void;
}

/** A violation of the channel protocol by the client: ends the stream (not the session). */
export class ChannelProtocolError extends Error {
  constructor(
    readonly code: Status,
    message: string,
    readonly clientSeq = 0,
  ) {
    super(message);
    this.name = 'ChannelProtocolError';
  }
}

const MAX_FRAMES_PER_MESSAGE = 1024;
const MAX_BYTES_PER_MESSAGE = 256 * 1024;
const FRAME_OVERHEAD = 32;

export type SessionState = 'attached' | 'detached' | 'closed';

interface InFlight {
  backendId: number;
  endpoint: number;
}

export class Session extends EventEmitter {
  readonly createdAt = Date.now();
  detachedAt = 0;
  state: SessionState = 'detached';
  private stream?: SessionStream;
  private readonly journal: SeqJournal<ServerFrame>;
  private readonly rx = new SeqReceiver();
  private readonly inFlight = new Map<number, InFlight>();
  private readonly receivers = new Map<number, ReceivingStream>();
  /** Endpoints whose URBs the backend cannot execute, already reported to the client (UNIMPLEMENTED). */
  private readonly unsupportedTold = new Set<number>();
  private nextBackendId = 1;
  private readonly acks = new AckScheduler(() => this.scheduleFlush());
  private readonly flusher = new FlushScheduler(() => this.flush());
  private waitingDrain = false;
  private slotWaiters: (() => void)[] = [];
  private graceTimer?: NodeJS.Timeout;
  private takeoverTimer?: NodeJS.Timeout;
  private standby?: { stream: SessionStream; identity: string };
  private closing?: Promise<void>;
  readonly stats = { urbsSubmitted: 0, urbsCompleted: 0 };
  /** Metrics and capture (observe/): told of every URB that goes to the device and comes back. */
  observer?: SessionObserver;

  constructor(
    readonly id: string,
    public identity: string,
    private readonly handle: DeviceHandle,
    readonly limits: SessionLimits,
    readonly log: Logger,
  ) {
    super();
    this.journal = new SeqJournal(limits.maxJournalBytes);
    handle.on('gone', (reason: string) => this.onDeviceGone(reason));
  }

  get device(): DeviceInfo {
    return this.handle.info;
  }
  get inFlightCount(): number {
    return this.inFlight.size;
  }
  get journalBytes(): number {
    return this.journal.bytes;
  }
  get lastClientSeq(): number {
    return this.rx.lastSeq;
  }
  get highestServerSeq(): number {
    return this.journal.highestSeq;
  }
  get peer(): string {
    return this.stream?.peer ?? '';
  }

  // ------------------------------------------------------------ streams

  /**
   * Attach a (new) stream. The client has everything up to `lastServerSeq`;
   * the rest of the journal is replayed. A stream already attached is
   * superseded: the newest connection wins.
   */
  attach(stream: SessionStream, lastServerSeq: number, openedFrame: (seq: number) => ServerFrame): void {
    if (this.state === 'closed') throw new ChannelProtocolError(Status.NOT_FOUND, `session ${this.id} is closed`);
    this.checkPosition(lastServerSeq, 'resume');
    if (this.stream) {
      this.log.info({ oldPeer: this.stream.peer, peer: stream.peer }, 'stream superseded by a newer connection');
      this.stream.end(Status.ABORTED, `session ${this.id} was resumed by another stream`);
    }
    this.switchTo(stream, lastServerSeq, openedFrame(this.journal.highestSeq));
  }

  private checkPosition(lastServerSeq: number, what: string): void {
    if (lastServerSeq > this.journal.highestSeq) {
      throw new ChannelProtocolError(
        Status.INVALID_ARGUMENT,
        `${what} of session ${this.id} from server seq ${lastServerSeq}, but the highest seq ever sent is ${this.journal.highestSeq}`,
      );
    }
    if (lastServerSeq < this.journal.ackedSeq) {
      // The client claims less than it acknowledged before: those frames are gone.
      throw new ChannelProtocolError(
        Status.FAILED_PRECONDITION,
        `${what} of session ${this.id} from server seq ${lastServerSeq}, but the client already acknowledged ${this.journal.ackedSeq}`,
      );
    }
  }

  /** Make `stream` the session's stream; it has every server frame up to `lastServerSeq`. */
  private switchTo(stream: SessionStream, lastServerSeq: number, first: ServerFrame): void {
    this.journal.rewindTo(lastServerSeq);
    clearTimeout(this.graceTimer);
    clearTimeout(this.takeoverTimer);
    this.stream = stream;
    this.state = 'attached';
    this.waitingDrain = false;
    this.acks.reset();
    stream.write({ frames: [first] });
    this.scheduleFlush();
    this.emit('attached');
  }

  /**
   * Park a stream that will take the session over (a live migration's
   * destination). The session stays with its current stream until that
   * stream hands off, or is lost and does not come back in time.
   */
  addStandby(stream: SessionStream, identity: string, openedFrame: (seq: number) => ServerFrame): void {
    if (this.state === 'closed') throw new ChannelProtocolError(Status.NOT_FOUND, `session ${this.id} is closed`);
    if (this.standby) {
      this.log.info({ oldPeer: this.standby.stream.peer, peer: stream.peer }, 'standby replaced by a newer one');
      this.standby.stream.end(Status.ABORTED, `standby for session ${this.id} replaced by another`);
    }
    this.standby = { stream, identity };
    stream.write({ frames: [openedFrame(this.journal.highestSeq)] });
    this.log.info({ standbyPeer: stream.peer, standbyIdentity: identity }, 'standby registered');
    if (this.state === 'detached') this.armTakeover();
  }

  /** The standby stream went away (a cancelled migration): forget it. */
  dropStandby(stream: SessionStream): void {
    if (this.standby?.stream !== stream) return;
    this.standby = undefined;
    clearTimeout(this.takeoverTimer);
    this.log.info({ standbyPeer: stream.peer }, 'standby released');
  }

  isCurrent(stream: SessionStream): boolean {
    return this.stream === stream;
  }

  isStandby(stream: SessionStream): boolean {
    return this.standby?.stream === stream;
  }

  get hasStandby(): boolean {
    return this.standby !== undefined;
  }

  /** The current stream hands the session to the standby at `lastServerSeq`, with opaque state. */
  private handOff(h: HandOff, seq: number): void {
    const standby = this.standby;
    if (!standby) {
      this.sendError(Status.FAILED_PRECONDITION, `hand-off of session ${this.id} but no standby is waiting; the session stays with this stream`, seq);
      return;
    }
    this.checkPosition(h.lastServerSeq, 'hand-off');
    const old = this.stream!;
    this.standby = undefined;
    this.stream = undefined;
    this.identity = standby.identity;
    this.log.info({ from: old.peer, to: standby.stream.peer, lastServerSeq: h.lastServerSeq, lastClientSeq: this.rx.lastSeq, stateBytes: h.state.length }, 'session handed over');
    old.end(Status.OK, `session ${this.id} handed over to ${standby.stream.peer}`);
    this.switchTo(standby.stream, h.lastServerSeq, {
      seq: this.journal.highestSeq,
      kind: { $case: 'takeOver', value: { state: h.state, lastServerSeq: h.lastServerSeq, lastClientSeq: this.rx.lastSeq, sourceLost: false } },
    });
    this.emit('handedOver', standby.identity);
  }

  /** The stream is lost with a standby waiting: give the source a moment to resume, then promote the standby. */
  private armTakeover(): void {
    clearTimeout(this.takeoverTimer);
    this.takeoverTimer = setTimeout(() => {
      const standby = this.standby;
      if (!standby || this.state !== 'detached') return;
      this.standby = undefined;
      this.identity = standby.identity;
      const at = this.journal.ackedSeq;
      this.log.warn({ to: standby.stream.peer, lastServerSeq: at }, 'stream lost during a hand-over; the standby takes over without the source\'s state');
      this.switchTo(standby.stream, at, {
        seq: this.journal.highestSeq,
        kind: { $case: 'takeOver', value: { state: new Uint8Array(0), lastServerSeq: at, lastClientSeq: this.rx.lastSeq, sourceLost: true } },
      });
      this.emit('handedOver', standby.identity);
    }, this.limits.standbyTakeoverMs);
    this.takeoverTimer.unref?.();
  }

  /** The stream ended without a close: keep the session for the grace period. */
  detach(stream: SessionStream, why: string): void {
    if (this.standby?.stream === stream) return this.dropStandby(stream);
    if (this.stream !== stream || this.state === 'closed') return;
    this.stream = undefined;
    this.state = 'detached';
    this.detachedAt = Date.now();
    this.log.warn({ why, graceMs: this.limits.graceMs, inFlight: this.inFlight.size }, 'stream lost; session kept for its grace period');
    this.graceTimer = setTimeout(() => {
      this.log.warn({ graceMs: this.limits.graceMs }, 'grace period expired; cancelling, resetting and releasing the device');
      void this.close('grace period expired', { reset: true });
    }, this.limits.graceMs);
    this.graceTimer.unref?.();
    if (this.standby) this.armTakeover();
    this.emit('detached');
  }

  /** For flow control: resolves when another URB may be submitted. */
  async waitForSlot(): Promise<void> {
    while (!this.hasSlot()) {
      await new Promise<void>((resolve) => this.slotWaiters.push(resolve));
    }
  }

  /** Another URB may be submitted now (or the session is closed: frames are refused anyway). */
  hasSlot(): boolean {
    return this.inFlight.size < this.limits.maxInFlight || this.state === 'closed';
  }

  /** Call `cb` once when a slot frees up (or the session closes). */
  onSlot(cb: () => void): void {
    this.slotWaiters.push(cb);
  }

  // ------------------------------------------------------------ inbound

  /**
   * Process one client frame. Throws ChannelProtocolError for protocol
   * violations. Submits, cancels and acks are handled synchronously; device
   * ops and close return a promise (the next frame waits for it).
   */
  handleFrame(frame: ClientFrame): void | Promise<void> {
    const kind = frame.kind;
    if (!kind) {
      throw new ChannelProtocolError(Status.INVALID_ARGUMENT, `client frame seq ${frame.seq} has no known kind`, frame.seq);
    }
    if (kind.$case === 'ack') {
      try {
        this.journal.ack(kind.value.seq);
      } catch (err) {
        if (err instanceof InvalidAckError) throw new ChannelProtocolError(Status.INVALID_ARGUMENT, err.message, frame.seq);
        throw err;
      }
      this.maybeResumeReceivers();
      return;
    }
    if (kind.$case === 'open') {
      throw new ChannelProtocolError(Status.INVALID_ARGUMENT, `open sent on session ${this.id}, which is already open`, frame.seq);
    }
    switch (this.rx.accept(frame.seq)) {
      case 'duplicate':
        return; // already executed before a reconnect
      case 'gap':
        throw new ChannelProtocolError(
          Status.INVALID_ARGUMENT,
          `client frame seq ${frame.seq} skips ahead: expected ${this.rx.lastSeq + 1}`,
          frame.seq,
        );
    }
    this.scheduleFlush(); // an ack may be due
    switch (kind.$case) {
      case 'submit':
        this.submit(kind.value, frame.seq);
        return;
      case 'cancel': {
        const f = this.inFlight.get(kind.value.urbId);
        if (f) this.handle.cancel(f.backendId);
        return; // an unknown id already completed: nothing to do
      }
      case 'op':
        return this.runOp(kind.value, frame.seq);
      case 'close':
        return this.close('closed by client', { reset: false });
      case 'handOff':
        this.handOff(kind.value, frame.seq);
        return;
    }
  }

  private submit(s: UrbSubmit, seq: number): void {
    const reject = (message: string) => {
      this.log.warn({ urbId: s.urbId, endpoint: s.endpoint, seq }, message);
      this.sendError(Status.INVALID_ARGUMENT, message, seq);
      this.appendFrame({ $case: 'complete', value: { urbId: s.urbId, status: pbStatus(UrbStatus.Inval), data: new Uint8Array(0), actualLength: 0, isoPackets: [] } }, 0);
    };
    if (this.inFlight.has(s.urbId)) return reject(`URB id ${s.urbId} is already in flight`);
    const isIn = (s.endpoint & 0x80) !== 0;
    const epNum = s.endpoint & 0x0f;
    if (s.endpoint & 0x70) return reject(`endpoint 0x${s.endpoint.toString(16)} is not a valid endpoint address`);
    const type = s.type as number as TransferType;
    if (epNum === 0) {
      if (type !== TransferType.Control) return reject(`endpoint 0 takes control transfers only`);
      if (!s.setup || s.setup.length !== 8) return reject(`control URB ${s.urbId} needs an 8-byte setup packet`);
    } else {
      const ep = this.handle.info.endpoints.find((e) => e.address === s.endpoint);
      if (!ep) return reject(`device ${this.device.id} has no endpoint 0x${s.endpoint.toString(16)} in its active configuration`);
      if (ep.type !== type) return reject(`endpoint 0x${s.endpoint.toString(16)} is ${TransferType[ep.type]}, not ${TransferType[type] ?? type}`);
    }
    const outLen = s.data?.length ?? 0;
    if (outLen > this.limits.maxUrbBytes || s.length > this.limits.maxUrbBytes) {
      return reject(`URB ${s.urbId} of ${Math.max(outLen, s.length)} bytes exceeds the limit of ${this.limits.maxUrbBytes}`);
    }
    if (type === TransferType.Isochronous && s.isoPackets.length === 0) return reject(`isochronous URB ${s.urbId} has no packets`);
    // A backend that cannot execute such URBs at all (e.g. iso or bulk streams on usb@2): the URB
    // still goes to it (it completes INVAL at the bus pace), and the client hears why, once per
    // endpoint, as UNIMPLEMENTED: a URB completion has no room for a message.
    const why = this.handle.unsupported?.({ endpoint: s.endpoint, type, streamId: s.streamId });
    if (why && !this.unsupportedTold.has(s.endpoint)) {
      this.unsupportedTold.add(s.endpoint);
      this.log.warn({ urbId: s.urbId, endpoint: s.endpoint, seq }, why);
      this.sendError(Status.UNIMPLEMENTED, why, seq);
    }
    const backendId = this.nextBackendId++;
    const urb: Urb = {
      id: backendId,
      endpoint: s.endpoint,
      type,
      setup: s.setup,
      data: isIn && epNum !== 0 ? undefined : s.data,
      length: s.length,
      streamId: s.streamId,
      flags: s.flags,
      isoPackets: s.isoPackets.length ? s.isoPackets.map((p) => ({ length: p.length, status: UrbStatus.Success, actualLength: 0 })) : undefined,
      timeoutMs: s.timeoutMs,
    };
    this.inFlight.set(s.urbId, { backendId, endpoint: s.endpoint });
    this.stats.urbsSubmitted++;
    this.observer?.urbSubmitted(urb); // observe: metrics and capture
    this.handle.submit(urb, (r) => {
      this.observer?.urbCompleted(urb, r); // observe: metrics and capture
      this.completed(s.urbId, r);
    });
  }

  private completed(urbId: number, r: UrbResult): void {
    this.inFlight.delete(urbId);
    this.stats.urbsCompleted++;
    if (this.state === 'closed') return;
    const data = r.data ?? EMPTY;
    this.appendFrame(
      {
        $case: 'complete',
        value: {
          urbId,
          status: pbStatus(r.status),
          data,
          actualLength: r.actualLength,
          isoPackets: pbIsoPackets(r.isoPackets),
        },
      },
      data.length,
    );
    const w = this.slotWaiters.shift();
    if (w) w();
  }

  private async runOp(op: DeviceOp, seq: number): Promise<void> {
    const result: OpResult = { opId: op.opId, status: pbStatus(UrbStatus.Success), value: 0, message: '', interfaces: [], endpoints: [] };
    const withLayout = () => {
      result.interfaces = this.handle.info.interfaces.map(interfaceToProto);
      result.endpoints = this.handle.info.endpoints.map(endpointToProto);
    };
    const o = op.op;
    try {
      switch (o?.$case) {
        case 'setConfiguration':
          await this.stopAllReceivers();
          await this.handle.setConfiguration(o.value.value);
          withLayout();
          break;
        case 'getConfiguration':
          result.value = await this.handle.getConfiguration();
          break;
        case 'setInterface':
          await this.stopReceiversOfInterface(o.value.interfaceNumber);
          await this.handle.setInterface(o.value.interfaceNumber, o.value.alternateSetting);
          withLayout();
          break;
        case 'getInterface':
          result.value = await this.handle.getInterface(o.value.interfaceNumber);
          break;
        case 'clearHalt':
          await this.handle.clearHalt(o.value.endpoint);
          break;
        case 'reset':
          await this.stopAllReceivers();
          await this.handle.reset();
          withLayout();
          break;
        case 'startReceiving':
          this.startReceiving(o.value);
          break;
        case 'stopReceiving':
          await this.receivers.get(o.value.endpoint)?.stop();
          this.receivers.delete(o.value.endpoint);
          break;
        case 'allocBulkStreams':
          result.value = await this.handle.allocBulkStreams(o.value.endpoints, o.value.numStreams);
          break;
        case 'freeBulkStreams':
          await this.handle.freeBulkStreams(o.value.endpoints);
          break;
        default:
          result.status = pbStatus(UrbStatus.Inval);
          result.message = `device op ${op.opId} (seq ${seq}) has no known operation`;
          this.sendError(Status.INVALID_ARGUMENT, result.message, seq);
      }
    } catch (err) {
      result.status = pbStatus(err instanceof UsbError ? err.status : UrbStatus.IoError);
      result.message = (err as Error).message;
      this.log.warn({ op: o?.$case, err: result.message }, 'device op failed');
    }
    this.appendFrame({ $case: 'opResult', value: result }, 64);
  }

  private startReceiving(s: { endpoint: number; type: number; transferLength: number; transfers: number; isoPacketsPerTransfer: number }): void {
    const ep = this.handle.info.endpoints.find((e) => e.address === s.endpoint);
    if (!ep || (s.endpoint & 0x80) === 0) throw new UsbError(`device ${this.device.id} has no IN endpoint 0x${s.endpoint.toString(16)}`, UrbStatus.Inval);
    if (ep.type === TransferType.Control) throw new UsbError(`endpoint 0x${s.endpoint.toString(16)} is a control endpoint`, UrbStatus.Inval);
    if (this.receivers.has(s.endpoint)) throw new UsbError(`endpoint 0x${s.endpoint.toString(16)} is already receiving`, UrbStatus.Inval);
    const why = this.handle.unsupported?.({ endpoint: s.endpoint, type: ep.type, streamId: 0 });
    if (why) throw new UsbError(why, UrbStatus.Inval);
    const length = s.transferLength || ep.maxPacketSize;
    const iso = ep.type === TransferType.Isochronous ? Math.max(1, s.isoPacketsPerTransfer || 8) : 0;
    if (length * Math.max(1, iso) > this.limits.maxUrbBytes) throw new UsbError(`receiving transfer size exceeds ${this.limits.maxUrbBytes}`, UrbStatus.Inval);
    const transfers = Math.min(Math.max(1, s.transfers || 3), 32);
    const r = new ReceivingStream(this.handle, ep.type, s.endpoint, length, transfers, iso, () => this.nextBackendId++, (rd) => {
      this.appendFrame({ $case: 'received', value: rd }, rd.data.length);
    }, () => this.journal.bytes > this.limits.receivingPauseBytes);
    this.receivers.set(s.endpoint, r);
    r.start();
  }

  private maybeResumeReceivers(): void {
    if (this.journal.bytes > this.limits.receivingPauseBytes) return;
    for (const r of this.receivers.values()) r.resumeIfPaused();
  }

  private async stopAllReceivers(): Promise<void> {
    const all = [...this.receivers.values()];
    this.receivers.clear();
    await Promise.all(all.map((r) => r.stop()));
  }

  private async stopReceiversOfInterface(iface: number): Promise<void> {
    for (const [addr, r] of this.receivers) {
      const ep = this.handle.info.endpoints.find((e) => e.address === addr);
      if (!ep || ep.interfaceNumber === iface) {
        this.receivers.delete(addr);
        await r.stop();
      }
    }
  }

  private onDeviceGone(reason: string): void {
    if (this.state === 'closed') return;
    this.log.warn({ reason }, 'device gone');
    for (const r of this.receivers.values()) void r.stop();
    this.receivers.clear();
    this.appendFrame({ $case: 'deviceGone', value: { reason } }, 16);
    this.emit('deviceGone', reason);
  }

  // ------------------------------------------------------------ outbound

  private appendFrame(kind: NonNullable<ServerFrame['kind']>, bytes: number): void {
    try {
      this.journal.append((seq) => ({ seq, kind }), bytes + FRAME_OVERHEAD);
    } catch (err) {
      if (err instanceof JournalOverflowError) {
        this.log.error({ journalBytes: err.bytes, limit: err.limit }, 'journal bound exceeded: the client does not acknowledge; closing the session');
        this.sendError(Status.RESOURCE_EXHAUSTED, `session ${this.id}: ${err.message}; the client does not acknowledge`, 0);
        void this.close('journal bound exceeded', { reset: true, code: Status.RESOURCE_EXHAUSTED, message: err.message });
        return;
      }
      throw err;
    }
    this.scheduleFlush();
  }

  /** A channel-control error frame: informational, not journaled. */
  sendError(code: Status, message: string, clientSeq: number): void {
    this.stream?.write({ frames: [{ seq: this.journal.highestSeq, kind: { $case: 'error', value: { code, message, clientSeq } } }] });
  }

  /** Send the queued frames soon (batching policy: FlushScheduler). */
  private scheduleFlush(): void {
    this.flusher.schedule();
  }

  /** Sends what is due; true when a message went out. */
  private flush(): boolean {
    const stream = this.stream;
    if (!stream || this.waitingDrain) return false;
    let wrote = false;
    for (;;) {
      const frames = this.journal.takeUnsent(MAX_FRAMES_PER_MESSAGE, MAX_BYTES_PER_MESSAGE);
      const ack = this.acks.take(this.rx.lastSeq, frames.length > 0);
      if (ack !== undefined) frames.push({ seq: this.journal.highestSeq, kind: { $case: 'ack', value: { seq: ack } } });
      if (frames.length === 0) return wrote;
      wrote = true;
      if (!stream.write({ frames })) {
        this.waitingDrain = true;
        stream.onceDrain(() => {
          this.waitingDrain = false;
          if (this.stream === stream) this.flush();
        });
        return wrote;
      }
    }
  }

  // ------------------------------------------------------------ ending

  /**
   * End the session: cancel what is in flight, stop receiving streams,
   * optionally reset the device, release the claim. Idempotent.
   */
  close(why: string, opts: { reset: boolean; code?: Status; message?: string }): Promise<void> {
    if (this.closing) return this.closing;
    this.closing = (async () => {
      clearTimeout(this.graceTimer);
      this.acks.stop();
      this.log.info({ why, inFlight: this.inFlight.size }, 'closing session');
      await this.stopAllReceivers();
      const pending = [...this.inFlight.values()];
      if (pending.length) {
        const settled = new Promise<void>((resolve) => {
          const check = () => (this.inFlight.size === 0 ? resolve() : setTimeout(check, 5));
          check();
        });
        for (const f of pending) this.handle.cancel(f.backendId);
        await Promise.race([settled, new Promise((r) => setTimeout(r, 2000))]);
      }
      if (opts.code === undefined && this.stream) {
        // A clean close: deliver the remaining completions and `closed`.
        this.appendFrame({ $case: 'closed', value: {} }, 0);
        this.flushNow();
      }
      this.state = 'closed';
      for (const w of this.slotWaiters.splice(0)) w();
      try {
        if (opts.reset) await this.handle.reset();
      } catch (err) {
        this.log.warn({ err: (err as Error).message }, 'device reset failed while closing');
      }
      try {
        await this.handle.close();
      } catch (err) {
        this.log.warn({ err: (err as Error).message }, 'device close failed');
      }
      const stream = this.stream;
      this.stream = undefined;
      stream?.end(opts.code ?? Status.OK, opts.message ?? why);
      this.standby?.stream.end(Status.ABORTED, `session ${this.id} ended: ${why}`);
      this.standby = undefined;
      clearTimeout(this.takeoverTimer);
      this.emit('closed', why);
    })();
    return this.closing;
  }

  private flushNow(): void {
    this.waitingDrain = false;
    const stream = this.stream;
    if (!stream) return;
    for (;;) {
      const frames = this.journal.takeUnsent(MAX_FRAMES_PER_MESSAGE, MAX_BYTES_PER_MESSAGE);
      const ack = this.acks.take(this.rx.lastSeq, true);
      if (ack !== undefined) frames.push({ seq: this.journal.highestSeq, kind: { $case: 'ack', value: { seq: ack } } });
      if (!frames.length) return;
      stream.write({ frames });
    }
  }
}

const EMPTY = new Uint8Array(0);
