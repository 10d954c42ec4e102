// A URB-channel session: one client's exclusive claim on one device, and the
// sequenced exchange of frames that outlives any single gRPC stream.
//
// This file is the session's lifecycle: attach, resume, grace, standby, hand-off
// and take-over, and close. Client data frames are executed exactly once
// (duplicates dropped by seq, SeqChannel) by the UrbExecutor; every server data
// frame is journaled until acknowledged and replayed after a resume. While no
// stream is attached the session keeps executing what is in flight and journals
// the completions, for a grace period. A client that stops reading is held to a byte bound (no new
// URB until it acknowledges) and loses the session when it does not drain within the grace period.
import { EventEmitter } from 'node:events';
import { status as Status } from '@grpc/grpc-js';
import type { Logger } from '../../common/log.js';
import { SeqChannel, type ChannelLink } from '../../common/seq-channel.js';
import { InvalidAckError, JournalOverflowError } from '../../common/seq-journal.js';
import type { ClientFrame, HandOff, ServerFrame } from '../../gen/usbroam/v1/usbhost.js';
import type { DeviceHandle, DeviceInfo } from '../backends/types.js';
import { ChannelProtocolError, type SessionLimits, type SessionStream } from './session-types.js';
import { UrbExecutor, type ExecutorOutput } from './urb-executor.js';
import { ConsumerWatch } from './consumer-watch.js';
import type { SessionObserver } from '../observe/observer.js';

export { ChannelProtocolError, defaultLimits, type SessionLimits, type SessionStream } from './session-types.js';

export type SessionState = 'attached' | 'detached' | 'closed';

export class Session extends EventEmitter {
  readonly createdAt = Date.now();
  detachedAt = 0;
  state: SessionState = 'detached';
  private stream?: SessionStream;
  private readonly channel: SeqChannel<ServerFrame>;
  private readonly urbs: UrbExecutor;
  private graceTimer?: NodeJS.Timeout;
  private takeoverTimer?: NodeJS.Timeout;
  private standby?: { stream: SessionStream; identity: string };
  private closing?: Promise<void>;
  /** Is the attached stream's client reading? (ends the session when it stops for graceMs) */
  private readonly watch: ConsumerWatch;

  constructor(
    readonly id: string,
    public identity: string,
    private readonly handle: DeviceHandle,
    readonly limits: SessionLimits,
    readonly log: Logger,
  ) {
    super();
    this.channel = new SeqChannel({ maxJournalBytes: limits.maxJournalBytes });
    const out: ExecutorOutput = {
      emit: (kind, bytes) => this.appendFrame(kind, bytes),
      error: (code, message, clientSeq) => this.sendError(code, message, clientSeq),
      journalBytes: () => this.channel.journalBytes,
      held: (on) => this.watch.setHeld(on),
    };
    this.watch = new ConsumerWatch(limits.graceMs, () => this.channel.journalBytes > 0, (s) => this.onStalled(s.ms, s.blocked));
    this.urbs = new UrbExecutor(handle, limits, log, out);
    handle.on('gone', this.onGone);
  }

  get device(): DeviceInfo {
    return this.handle.info;
  }
  get stats(): { urbsSubmitted: number; urbsCompleted: number } {
    return this.urbs.stats;
  }
  /** Metrics and capture (observe/): told of every URB that goes to the device and comes back. */
  get observer(): SessionObserver | undefined {
    return this.urbs.observer;
  }
  set observer(o: SessionObserver | undefined) {
    this.urbs.observer = o;
  }
  get inFlightCount(): number {
    return this.urbs.inFlightCount;
  }
  get journalBytes(): number {
    return this.channel.journalBytes;
  }
  get lastClientSeq(): number {
    return this.channel.lastReceived;
  }
  get highestServerSeq(): number {
    return this.channel.highestSeq;
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
    this.switchTo(stream, lastServerSeq, openedFrame(this.channel.highestSeq));
  }

  private checkPosition(lastServerSeq: number, what: string): void {
    if (lastServerSeq > this.channel.highestSeq) {
      throw new ChannelProtocolError(
        Status.INVALID_ARGUMENT,
        `${what} of session ${this.id} from server seq ${lastServerSeq}, but the highest seq ever sent is ${this.channel.highestSeq}`,
      );
    }
    if (lastServerSeq < this.channel.ackedSeq) {
      // The client claims less than it acknowledged before: those frames are gone.
      throw new ChannelProtocolError(
        Status.FAILED_PRECONDITION,
        `${what} of session ${this.id} from server seq ${lastServerSeq}, but the client already acknowledged ${this.channel.ackedSeq}`,
      );
    }
  }

  /** Make `stream` the session's stream; it has every server frame up to `lastServerSeq`. */
  private switchTo(stream: SessionStream, lastServerSeq: number, first: ServerFrame): void {
    clearTimeout(this.graceTimer);
    clearTimeout(this.takeoverTimer);
    this.stream = stream;
    this.state = 'attached';
    this.watch.reset();
    stream.write({ frames: [first] });
    this.channel.attach(this.watchedLink(stream), lastServerSeq);
    this.emit('attached');
  }

  /** `stream` as the channel's link, telling the watch when its transport fills and drains. */
  private watchedLink(stream: SessionStream): ChannelLink<ServerFrame> {
    return {
      write: (m) => {
        const ok = stream.write(m);
        if (!ok && this.stream === stream) this.watch.setBlocked(true);
        return ok;
      },
      onceDrain: (cb) =>
        stream.onceDrain(() => {
          if (this.stream === stream) this.watch.setBlocked(false);
          cb();
        }),
    };
  }

  /** The client did not drain its stream (or acknowledge at the byte bound) for `ms`: end the session. */
  private onStalled(ms: number, blocked: boolean): void {
    if (this.closing || this.state !== 'attached' || !this.stream) return;
    const journalBytes = this.channel.journalBytes;
    const message =
      `session ${this.id} on device ${this.device.id}: client ${this.stream.peer} did not read completions for ${(ms / 1000).toFixed(1)} s ` +
      `(${journalBytes} bytes unacknowledged, bound ${this.limits.maxBufferedBytes}; ${blocked ? 'its stream does not drain' : 'it does not acknowledge'}); the session is ended and the device released`;
    this.log.error({ stalledMs: ms, journalBytes, maxBufferedBytes: this.limits.maxBufferedBytes, streamBlocked: blocked }, 'client did not read completions within the grace period; ending the session');
    this.sendError(Status.RESOURCE_EXHAUSTED, message, 0);
    void this.close('client did not read completions', { reset: true, code: Status.RESOURCE_EXHAUSTED, message });
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
    stream.write({ frames: [openedFrame(this.channel.highestSeq)] });
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
    this.channel.detach();
    this.identity = standby.identity;
    const lastClientSeq = this.channel.lastReceived;
    this.log.info({ from: old.peer, to: standby.stream.peer, lastServerSeq: h.lastServerSeq, lastClientSeq, stateBytes: h.state.length }, 'session handed over');
    old.end(Status.OK, `session ${this.id} handed over to ${standby.stream.peer}`);
    this.switchTo(standby.stream, h.lastServerSeq, {
      seq: this.channel.highestSeq,
      kind: { $case: 'takeOver', value: { state: h.state, lastServerSeq: h.lastServerSeq, lastClientSeq, sourceLost: false } },
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
      const at = this.channel.ackedSeq;
      this.log.warn({ to: standby.stream.peer, lastServerSeq: at }, "stream lost during a hand-over; the standby takes over without the source's state");
      this.switchTo(standby.stream, at, {
        seq: this.channel.highestSeq,
        kind: { $case: 'takeOver', value: { state: new Uint8Array(0), lastServerSeq: at, lastClientSeq: this.channel.lastReceived, sourceLost: true } },
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
    this.channel.detach(stream);
    this.watch.reset();
    this.state = 'detached';
    this.detachedAt = Date.now();
    this.log.warn({ why, graceMs: this.limits.graceMs, inFlight: this.urbs.inFlightCount }, 'stream lost; session kept for its grace period');
    this.graceTimer = setTimeout(() => {
      this.log.warn({ graceMs: this.limits.graceMs }, 'grace period expired; cancelling, resetting and releasing the device');
      void this.close('grace period expired', { reset: true });
    }, this.limits.graceMs);
    this.graceTimer.unref?.();
    if (this.standby) this.armTakeover();
    this.emit('detached');
  }

  /** For flow control: resolves when another URB may be submitted. */
  waitForSlot(): Promise<void> {
    return this.urbs.waitForSlot();
  }

  /** Another URB may be submitted now (or the session is closed: frames are refused anyway). */
  hasSlot(): boolean {
    return this.urbs.hasSlot();
  }

  /** Call `cb` once when a slot frees up (or the session closes). */
  onSlot(cb: () => void): void {
    this.urbs.onSlot(cb);
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
      const before = this.channel.ackedSeq;
      try {
        this.channel.peerAcked(kind.value.seq);
      } catch (err) {
        if (err instanceof InvalidAckError) throw new ChannelProtocolError(Status.INVALID_ARGUMENT, err.message, frame.seq);
        throw err;
      }
      if (this.channel.ackedSeq === before) return;
      this.watch.progress();
      this.urbs.acked();
      return;
    }
    if (kind.$case === 'open') {
      throw new ChannelProtocolError(Status.INVALID_ARGUMENT, `open sent on session ${this.id}, which is already open`, frame.seq);
    }
    switch (this.channel.receive(frame.seq)) {
      case 'duplicate':
        return; // already executed before a reconnect
      case 'gap':
        throw new ChannelProtocolError(
          Status.INVALID_ARGUMENT,
          `client frame seq ${frame.seq} skips ahead: expected ${this.channel.lastReceived + 1}`,
          frame.seq,
        );
    }
    switch (kind.$case) {
      case 'submit':
        this.urbs.submit(kind.value, frame.seq);
        return;
      case 'cancel':
        this.urbs.cancel(kind.value.urbId);
        return;
      case 'op':
        return this.urbs.runOp(kind.value, frame.seq);
      case 'close':
        return this.close('closed by client', { reset: false });
      case 'handOff':
        this.handOff(kind.value, frame.seq);
        return;
    }
  }

  // A handle can outlive the session (an emulated device is its own handle): the listener goes when the session does.
  private readonly onGone = (reason: string): void => this.onDeviceGone(reason);

  private onDeviceGone(reason: string): void {
    if (this.state === 'closed') return;
    this.log.warn({ reason }, 'device gone');
    this.urbs.dropReceivers();
    this.appendFrame({ $case: 'deviceGone', value: { reason } }, 16);
    this.emit('deviceGone', reason);
  }

  // ------------------------------------------------------------ outbound

  private appendFrame(kind: NonNullable<ServerFrame['kind']>, bytes: number): void {
    try {
      this.channel.send(kind, bytes);
    } catch (err) {
      if (err instanceof JournalOverflowError) {
        this.log.error({ journalBytes: err.bytes, limit: err.limit }, 'journal bound exceeded: the client does not acknowledge; closing the session');
        this.sendError(Status.RESOURCE_EXHAUSTED, `session ${this.id}: ${err.message}; the client does not acknowledge`, 0);
        void this.close('journal bound exceeded', { reset: true, code: Status.RESOURCE_EXHAUSTED, message: err.message });
        return;
      }
      throw err;
    }
  }

  /** A channel-control error frame: informational, not journaled. */
  sendError(code: Status, message: string, clientSeq: number): void {
    this.stream?.write({ frames: [{ seq: this.channel.highestSeq, kind: { $case: 'error', value: { code, message, clientSeq } } }] });
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
      this.watch.reset();
      this.channel.stop();
      this.log.info({ why, inFlight: this.urbs.inFlightCount }, 'closing session');
      await this.urbs.stopAllReceivers();
      await this.urbs.cancelAll();
      if (opts.code === undefined && this.stream) {
        // A clean close: deliver the remaining completions and `closed`.
        this.appendFrame({ $case: 'closed', value: {} }, 0);
        this.channel.flushAll();
      }
      this.state = 'closed';
      this.handle.off('gone', this.onGone);
      this.urbs.markClosed();
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
      this.channel.detach();
      stream?.end(opts.code ?? Status.OK, opts.message ?? why);
      this.standby?.stream.end(Status.ABORTED, `session ${this.id} ended: ${why}`);
      this.standby = undefined;
      clearTimeout(this.takeoverTimer);
      this.emit('closed', why);
    })();
    return this.closing;
  }
}
