// The hand-off of one attachment at a live migration, both ends: on the source freeze (hold our
// output, drain QEMU's, measure QEMU's position), export (the state, in one synchronous step with
// the freeze of the URB channel) and give up (write what was held, carry on); on the destination
// resume (write what QEMU had not read, continue the partial packet, adopt the URBs in flight).
// One phase (HandOffPhase, state.ts) says where it is.
import type { Socket } from 'node:net';
import type { Logger } from '../../../common/log.js';
import { Device } from '../../../gen/usbroam/v1/usbhost.js';
import type { UsbredirParser } from '../../../qemu/usbredir/index.js';
import type { RedirHost } from '../redir-host.js';
import type { ChardevOutput } from '../socket-output.js';
import { BulkAnswers, hasBulkInFlight, type QemuBulkInFlight } from './bulk-tds.js';
import { encodeHandOffState, HandOffRefusedError, type FrozenPosition, type HandOffInfo, type HandOffPhase, type HandOffState } from './state.js';
import { PacketTrail } from './trail.js';
import type { StreamKick } from './xhci-streams.js';
import { unreadByPeer } from './unix-socket-queue.js';

/** The attachment as the hand-off sees it. */
export interface HandOffParts {
  readonly id: string;
  readonly log: Logger;
  readonly socket: Socket;
  readonly output: ChardevOutput;
  readonly host: RedirHost;
  readonly parser: UsbredirParser;
  readonly device: {
    device: Device;
    peekNextUrbId(): number;
    /** Send the state to the server; from the call on no server frame is consumed here. */
    handOff(state: Uint8Array): Promise<{ lastServerSeq: number }>;
  };
  readonly closed: boolean;
  readonly bytesFromQemu: number;
  /** Stop / start reading QEMU's output (the socket's data listener). */
  stopReading(): void;
  startReading(): void;
  /** Re-evaluate the read flow. */
  flow(): void;
  stats(): object;
  emit(event: string, ...args: unknown[]): boolean;
  /** After the server's confirmation: close without a word to QEMU or the server. */
  closeHandedOff(): void;
}

export class AttachmentHandOff {
  private _phase: HandOffPhase;
  readonly bulk = new BulkAnswers();
  readonly trail: PacketTrail;

  constructor(
    private readonly a: HandOffParts,
    resume?: { state: HandOffState; unreadOutput: Uint8Array },
  ) {
    this._phase = resume ? { kind: 'resuming', ...resume } : { kind: 'live' };
    this.trail = new PacketTrail(a.log.isLevelEnabled?.('debug') ?? false);
  }

  get phase(): HandOffPhase {
    return this._phase;
  }
  /** The state went to the server: nothing here answers QEMU any more. */
  get exported(): boolean {
    return this._phase.kind === 'exported' || this._phase.kind === 'handedOff';
  }
  /** Output is held and QEMU's output is read whatever the backpressure. */
  get draining(): boolean {
    const k = this._phase.kind;
    return k === 'freezing' || k === 'frozen' || k === 'measuring';
  }

  /** Streams rewound at pre-switchover, for the destination's doorbells (set by the VM's migration, sent with the state). */
  xhciStreamKicks: StreamKick[] = [];
  /** Per stream endpoint, its stream context array (read when the streams were allocated, or inherited). */
  readonly xhciStreamArrays = new Map<number, bigint>();

  /** A bulk request was answered (see bulk-tds.ts). */
  noteBulkAnswered(urbId: number, id: bigint, endpoint: number, streamId = 0): void {
    const out = this.a.output;
    this.bulk.note(urbId, id, endpoint, out.bytesWritten, out.bytesWritten - out.retained, streamId);
  }

  hasBulkInFlight(): boolean {
    return hasBulkInFlight(this.a.host.requests());
  }

  /**
   * While frozen at 'pre-switchover': per bulk endpoint, the TDs QEMU has in flight (requests
   * not answered, or answered with bytes QEMU has not read), oldest first.
   */
  qemuBulkInFlight(): QemuBulkInFlight[] {
    if (this._phase.kind !== 'frozen') return [];
    const out = this.a.output;
    return this.bulk.inFlight(out.bytesWritten - out.heldBytes - this._phase.pos.unread, this.a.host.requests());
  }

  /** IN endpoints QEMU serves by usbredir bulk receiving (their TDs are never sent to us). */
  bulkReceivingEndpoints(): number[] {
    return this.a.host.snapshot().streams.filter((s) => s.kind === 'bulk' && s.endpoint & 0x80).map((s) => s.endpoint);
  }

  /**
   * Source side, first half, while the source QEMU is paused before it saves its device state
   * (MIGRATION 'pre-switchover', capability pause-before-switchover): hold our output, read
   * what QEMU wrote, and measure exactly how many of our bytes it has not read.
   *
   * Why then and not at 'completed': QEMU 7.2's chardev arms its fd watch with the read size
   * computed while the VM ran (usbredir_chardev_can_read). When the migration thread stops
   * the VM and saves the device state under the BQL, a main loop that was already polling
   * with that watch reads one more chunk (up to 4096 bytes) right after the BQL is released:
   * after the save. Those bytes are consumed on the source but are not in the migrated parser
   * state, so a measurement at 'completed' counts them as delivered and the destination never
   * gets them (a lost completion: the guest waits 60 s and resets the device; or a packet cut
   * in two: the destination's parser sees garbage). Paused before the save, QEMU reads
   * nothing more once its main loop has iterated with the VM stopped: `barrier` (a QMP round
   * trip) makes sure of that before we measure.
   *
   * Output stays held until handOff() (at 'completed') or unfreeze() (migration failed or
   * cancelled). Idempotent while frozen.
   */
  freeze(opts: { barrier?: () => Promise<unknown>; drainTimeoutMs?: number } = {}): Promise<FrozenPosition> {
    if (this.a.closed) return Promise.reject(new HandOffRefusedError('attachment is closed'));
    const ph = this._phase;
    if (ph.kind === 'freezing' || ph.kind === 'frozen') return ph.measured;
    if (ph.kind !== 'live') return Promise.reject(new HandOffRefusedError('a hand-off is in progress'));
    this.beginDrain();
    const measured: Promise<FrozenPosition> = this.measure(opts).then(
      (pos) => {
        const now = this._phase;
        if (now.kind === 'freezing' && now.measured === measured) this._phase = { kind: 'frozen', measured, pos };
        return pos;
      },
      (err: Error) => {
        const now = this._phase;
        if (now.kind === 'freezing' && now.measured === measured) this.thaw();
        throw err;
      },
    );
    this._phase = { kind: 'freezing', measured };
    measured.catch(() => {});
    return measured;
  }

  /** The migration did not switch over after freeze(): write what was held, carry on. */
  unfreeze(): void {
    const k = this._phase.kind;
    if ((k !== 'freezing' && k !== 'frozen') || this.a.closed) return;
    this.a.log.info({ attachment: this.a.id }, 'migration did not switch over; the attachment carries on');
    this.thaw();
  }

  /**
   * Source side, once QEMU has stopped for good (MIGRATION 'completed'): QEMU neither reads nor
   * writes the chardev any more. With our output held and QEMU's output read (every packet
   * dispatched, device ops answered) and QEMU's position measured (at the freeze, or now), build
   * the state in one synchronous step (the unread bytes + everything held, the partial
   * guest->host packet, the requests in flight, streams, configuration) and
   * RemoteDevice.handOff(state): from there no server frame is consumed here. Resolves when the
   * server has switched the session to the standby; the attachment is then closed ('handed
   * off') without touching the device or QEMU. If the hand-off is refused (no standby) or
   * fails, the held output is written and the attachment carries on; HandOffRefusedError.
   */
  async handOff(opts: { drainTimeoutMs?: number } = {}): Promise<HandOffInfo> {
    const a = this.a;
    if (a.closed) throw new HandOffRefusedError('attachment is closed');
    const t0 = performance.now();
    let pos: FrozenPosition;
    const ph = this._phase;
    if (ph.kind === 'freezing' || ph.kind === 'frozen') {
      try {
        pos = await ph.measured;
      } catch (err) {
        throw new HandOffRefusedError(`hand-off measurement failed: ${(err as Error).message}`);
      }
      if (this._phase.kind !== 'frozen') throw new HandOffRefusedError('the freeze was given up before the hand-off');
    } else if (ph.kind === 'live') {
      // No freeze before QEMU saved its state: measured now. QEMU may have read one more chunk
      // after saving its state (see freeze()); that chunk is lost to the destination.
      a.log.warn({ attachment: a.id }, 'hand-off without a freeze at pre-switchover: the position in the host->guest stream may be off by what QEMU read after saving its state');
      this.beginDrain();
      this._phase = { kind: 'measuring' };
      try {
        pos = await this.measure(opts);
      } catch (err) {
        this.thaw();
        throw new HandOffRefusedError(`hand-off measurement failed: ${(err as Error).message}`);
      }
    } else {
      throw new HandOffRefusedError('a hand-off is in progress');
    }
    const frozen = this._phase.kind === 'frozen' ? pos : undefined;
    if (frozen && a.log.isLevelEnabled?.('debug')) {
      // Diagnosis: nothing may have been read since the freeze.
      const again = await unreadByPeer(a.socket).catch(() => undefined);
      if (again && again.unread !== pos.unread) a.log.error({ attachment: a.id, atFreeze: pos.unread, now: again.unread }, 'QEMU read from the chardev after the freeze');
      else a.log.debug({ attachment: a.id, unread: pos.unread, now: again?.unread }, 'unread bytes unchanged since the freeze');
    }
    // The state and the freeze of the channel in one synchronous step: every completion the
    // RemoteDevice consumed so far has been answered (into the held output), none after.
    let built: { bytes: Uint8Array; toQemuBytes: number; partial: number; inFlight: number } | undefined;
    let sent: Promise<{ lastServerSeq: number }> | undefined;
    let buildErr: Error | undefined;
    await new Promise<void>((resolve) =>
      setImmediate(() => {
        try {
          a.stopReading();
          built = this.exportState(pos.unread);
          this._phase = { kind: 'exported', frozen };
          sent = a.device.handOff(built.bytes);
        } catch (err) {
          buildErr = err as Error;
        }
        resolve();
      }),
    );
    if (buildErr || !built || !sent) {
      this.thaw();
      throw new HandOffRefusedError(`hand-off state: ${buildErr?.message}`);
    }
    const freezeMs = performance.now() - t0;
    try {
      await sent;
    } catch (err) {
      this.thaw();
      a.log.warn({ attachment: a.id, err: (err as Error).message }, 'hand-off refused; the session stays here');
      throw new HandOffRefusedError((err as Error).message);
    }
    const info: HandOffInfo = {
      toQemuBytes: built.toQemuBytes,
      unreadInSocket: pos.unread,
      fromQemuPartial: built.partial,
      inFlight: built.inFlight,
      stateBytes: built.bytes.length,
      measureMs: pos.measureMs,
      frozenBeforeSave: !!frozen,
      freezeBeforeSaveMs: frozen?.tookMs ?? 0,
      freezeMs,
      totalMs: performance.now() - t0,
    };
    a.log.info({ attachment: a.id, ...info, ...a.stats() }, 'session handed off to the migration destination');
    a.log.debug({ attachment: a.id, trail: this.trail.last() }, 'the last usbredir packets before the hand-off');
    a.emit('handedOff', info);
    this._phase = { kind: 'handedOff' };
    a.output.release();
    a.closeHandedOff();
    return info;
  }

  /** Hold our output; read whatever QEMU writes. */
  private beginDrain(): void {
    this.a.output.hold();
    if (this.a.socket.isPaused()) this.a.socket.resume();
  }

  /** Drain QEMU's output, then (after `barrier`) measure what QEMU has not read. */
  private async measure(opts: { barrier?: () => Promise<unknown>; drainTimeoutMs?: number }): Promise<FrozenPosition> {
    const t0 = performance.now();
    const { host, socket, log, id } = this.a;
    let measureMs = 0;
    let barrierDone = !opts.barrier;
    const deadline = Date.now() + (opts.drainTimeoutMs ?? 2000);
    for (;;) {
      if (!barrierDone) {
        await opts.barrier!();
        barrierDone = true;
      }
      const m0 = performance.now();
      const measured = await unreadByPeer(socket);
      measureMs += performance.now() - m0;
      if (measured.ourUnread === 0 && host.settled && host.pendingOps === 0) {
        return { unread: measured.unread, measureMs, tookMs: performance.now() - t0 };
      }
      if (Date.now() > deadline) {
        if (measured.ourUnread === 0 && host.settled) {
          log.warn({ attachment: id, pendingOps: host.pendingOps }, 'device ops still pending at the hand-off; their answers are lost');
          return { unread: measured.unread, measureMs, tookMs: performance.now() - t0 };
        }
        throw new Error(`QEMU's output was not drained in time (unread ${measured.ourUnread}, queued ${host.queued})`);
      }
      await new Promise((r) => setTimeout(r, 1));
    }
  }

  /** Give up a hand-off: write what was held, read QEMU again. */
  private thaw(): void {
    this._phase = { kind: 'live' };
    const held = this.a.output.release();
    if (this.a.closed) return;
    if (held.length) this.a.output.write(held);
    this.a.startReading();
    this.a.flow();
  }

  private exportState(unreadInSocket: number): { bytes: Uint8Array; toQemuBytes: number; partial: number; inFlight: number } {
    const { output, parser, host, device } = this.a;
    const toQemu = output.unread(unreadInSocket);
    let toQemuBytes = 0;
    for (const part of toQemu) toQemuBytes += part.length;
    const snapshot = host.snapshot();
    const st: HandOffState = {
      v: 2,
      id: this.a.id,
      usbredir: Buffer.from(parser.serialize(toQemu).buffer).toString('base64'),
      ...snapshot,
      lastUrbId: device.peekNextUrbId() - 1,
      device: Buffer.from(Device.encode(device.device).finish()).toString('base64'),
      positions: { bytesFromQemu: this.a.bytesFromQemu, bytesToQemu: output.bytesWritten, consumedByQemu: output.bytesWritten - toQemuBytes },
      ...(this.xhciStreamKicks.length ? { xhciStreamKicks: this.xhciStreamKicks } : {}),
      ...(this.xhciStreamArrays.size ? { xhciStreamArrays: [...this.xhciStreamArrays] } : {}),
    };
    return { bytes: encodeHandOffState(st), toQemuBytes, partial: parser.pendingPartial, inFlight: snapshot.inFlight.length };
  }

  /**
   * Destination side, at start(): the host->guest bytes QEMU had not consumed go out first,
   * verbatim; the host continues the source's requests, streams and configuration (the parser
   * was primed with the partial guest->host packet when it was made from the state).
   */
  resume(): boolean {
    const ph = this._phase;
    if (ph.kind !== 'resuming') return false;
    this._phase = { kind: 'live' };
    const { state: st, unreadOutput } = ph;
    const a = this.a;
    if (!a.device.device && st.device) a.device.device = Device.decode(Buffer.from(st.device, 'base64'));
    if (unreadOutput.length) a.output.write([unreadOutput]);
    a.host.restore(st, st.lastUrbId);
    a.log.info(
      { attachment: a.id, toQemu: unreadOutput.length, partial: a.parser.pendingPartial, inFlight: st.inFlight.length, consumedByQemu: st.positions.consumedByQemu },
      'resumed the usbredir streams from the hand-off state',
    );
    if (a.log.isLevelEnabled?.('debug')) {
      this.trail.recordFirst();
      const t = setTimeout(() => a.log.debug({ attachment: a.id, trail: this.trail.first() }, 'the first usbredir packets after the hand-off'), 3000);
      t.unref?.();
    }
    return true;
  }
}
