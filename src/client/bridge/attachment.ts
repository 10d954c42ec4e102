// Attachment: one QEMU usb-redir chardev <-> usbredir device side <-> one URB channel session.
// The composition of:
//   - the chardev socket and the UsbredirParser (bytes <-> packets);
//   - RedirHost (redir-host.ts): the usbredir host state machine, socket-free;
//   - ChardevOutput (socket-output.ts): cork, the sent ring, backpressure;
//   - AttachmentHandOff (handoff/): freeze, measure, export, resume at a live migration.
//
// Byte accounting for the hand-off: every byte read from QEMU is pushed into the parser, so
// bytesFromQemu == parser.bytesConsumed + parser.pendingPartial exactly; every byte we write is
// counted in bytesToQemu (socket.bytesWritten tells what reached the kernel).
import { EventEmitter } from 'node:events';
import type { Socket } from 'node:net';
import type { Logger } from '../../common/log.js';
import type { ReceivedData } from '../../gen/usbroam/v1/usbhost.js';
import type { RemoteDevice } from '../sdk/remote-device.js';
import { ALL_CAPS, UsbredirParser, UsbredirProtocolError, type Packet } from '../../qemu/usbredir/index.js';
import { AttachmentHandOff } from './handoff/attachment-handoff.js';
import type { QemuBulkInFlight } from './handoff/bulk-tds.js';
import { parseHandOffState, type FrozenPosition, type HandOffInfo, type HandOffState } from './handoff/state.js';
import type { StreamKick } from './handoff/xhci-streams.js';
import { warmUpUnixQueues } from './handoff/unix-socket-queue.js';
import { RedirHost, type AttachmentState } from './redir-host.js';
import { ChardevOutput } from './socket-output.js';

export type { AttachmentState } from './redir-host.js';
export { HandOffRefusedError, type HandOffInfo } from './handoff/state.js';
export { buildEpInfo, buildInterfaceInfo, epIndex, filterInfoOf, redirSpeed } from './redir-descriptors.js';

export interface AttachmentOptions {
  /** The open URB channel session. */
  device: RemoteDevice;
  /** A connected duplex socket to QEMU's usb-redir chardev. */
  socket: Socket;
  /** A logger carrying vm and device fields. */
  log: Logger;
  /** Identifier (for logs and the bridge's list). Default: `usbroam-<device id>`. */
  id?: string;
  /** Our usbredir caps. Default: all 8 (0xff). */
  caps?: readonly number[];
  /** Close the RemoteDevice session when the attachment closes. Default true. */
  ownsDevice?: boolean;
  /**
   * Stop reading from QEMU while this many bytes wait in the socket's write buffer (new requests
   * make new completions), resume on 'drain'. Default 8 MiB.
   */
  writeHighWater?: number;
  /**
   * Hard bound of buffered output: stream data (interrupt/bulk receiving) that would exceed it
   * closes the attachment; iso data is dropped above writeHighWater (like usbredirhost). Default 256 MiB.
   */
  maxBufferedBytes?: number;
  /** Stop reading from QEMU while this many URBs are in flight. Default 4096. */
  maxInFlight?: number;
  /** How long to wait for QEMU's device_disconnect_ack. Default 5000 ms. */
  disconnectAckTimeoutMs?: number;
  /** Start without a hello exchange, QEMU's caps known (usbredirparser_fl_no_hello). */
  noHello?: { peerCaps: readonly number[] };
}

export interface AttachmentStats {
  bytesFromQemu: number;
  bytesToQemu: number;
  packetsFromQemu: number;
  packetsToQemu: number;
  urbsSubmitted: number;
  urbsCompleted: number;
  urbsCancelled: number;
  inFlight: number;
}

/** Why an attachment closed. */
export interface AttachmentCloseInfo {
  reason: string;
  error?: Error;
}

/** A state made by fromHandOff, for the constructor. */
interface Resume {
  state: HandOffState;
  parser: UsbredirParser;
  unreadOutput: Uint8Array;
}

/**
 * Events: 'connected' (device_connect sent), 'closed' (AttachmentCloseInfo),
 * 'deviceGone' (reason), 'rejected' (QEMU sent filter_reject or its filter denies the device),
 * 'handedOff' (HandOffInfo).
 */
export class Attachment extends EventEmitter {
  readonly id: string;
  readonly device: RemoteDevice;
  readonly socket: Socket;
  readonly parser: UsbredirParser;
  private readonly log: Logger;
  private readonly ownsDevice: boolean;
  private readonly host: RedirHost;
  private readonly output: ChardevOutput;
  private readonly handoff: AttachmentHandOff;

  private closeInfo?: AttachmentCloseInfo;
  private readonly closedPromise: Promise<AttachmentCloseInfo>;
  private resolveClosed!: (i: AttachmentCloseInfo) => void;

  private _bytesFromQemu = 0;
  private packetsIn = 0;
  private packetsOut = 0;

  private readonly onDataBound = (chunk: Buffer) => this.onData(chunk);
  private readonly onReceivedBound = (r: ReceivedData) => this.host.onReceived(r);
  private readonly onDeviceGoneBound = (reason: string) => this.host.onDeviceGone(String(reason ?? 'device gone'));
  /** The server's channel errors (e.g. UNIMPLEMENTED for iso on a backend without it): logged with this attachment. */
  private readonly onChannelErrorBound = (e: { code: number; message: string; clientSeq: number }) =>
    this.log.warn({ attachment: this.id, device: this.device.device?.id, session: this.device.sessionId, code: e.code, clientSeq: e.clientSeq, err: e.message }, 'URB channel error from the server');
  private readonly onDeviceClosedBound = (err?: Error) => this.host.onDeviceGone(`URB channel closed${err ? `: ${err.message}` : ''}`);
  private readonly sendBound = (p: Packet) => this.send(p);
  private readonly flowBound = () => this.flow();

  /** The source's hand-off state this attachment continues from (destination of a migration). */
  private readonly resumedState?: HandOffState;

  constructor(opts: AttachmentOptions, resume?: Resume) {
    super();
    this.resumedState = resume?.state;
    this.device = opts.device;
    this.socket = opts.socket;
    this.log = opts.log;
    this.id = opts.id ?? `usbroam-${opts.device.device?.id ?? 'device'}`;
    this.ownsDevice = opts.ownsDevice ?? true;
    const writeHighWater = opts.writeHighWater ?? 8 * 1024 * 1024;
    this.parser = resume?.parser ?? new UsbredirParser({ role: 'device', caps: opts.caps ?? ALL_CAPS, version: 'usbroam bridge', noHello: opts.noHello });
    this._bytesFromQemu = this.parser.pendingPartial; // the partial packet of a hand-off
    this.output = new ChardevOutput(this.socket, this.flowBound, writeHighWater, opts.maxInFlight ?? 4096);
    const self = this;
    this.handoff = new AttachmentHandOff(
      {
        id: this.id,
        log: this.log,
        socket: this.socket,
        output: this.output,
        get host() {
          return self.host;
        },
        parser: this.parser,
        device: this.device,
        get closed() {
          return self.state === 'closed';
        },
        get bytesFromQemu() {
          return self._bytesFromQemu;
        },
        stopReading: () => {
          this.socket.off('data', this.onDataBound);
          this.socket.pause();
        },
        startReading: () => {
          if (!this.socket.listeners('data').includes(this.onDataBound)) this.socket.on('data', this.onDataBound);
          this.socket.resume();
        },
        flow: this.flowBound,
        stats: () => this.stats,
        emit: (event, ...args) => this.emit(event, ...args),
        closeHandedOff: () => this.closeHandedOff(),
      },
      resume,
    );
    for (const [ep, base] of resume?.state.xhciStreamArrays ?? []) this.handoff.xhciStreamArrays.set(ep, base);
    this.host = new RedirHost({
      device: this.device,
      caps: this.parser,
      send: this.sendBound,
      backlog: () => this.socket.writableLength,
      afterFlush: (fn) => this.output.afterFlush(fn),
      close: (reason, err) => void this.close(reason, err),
      flow: this.flowBound,
      exported: () => this.handoff.exported,
      bulkAnswered: (urbId, id, endpoint, streamId) => this.handoff.noteBulkAnswered(urbId, id, endpoint, streamId),
      events: this,
      log: this.log,
      id: this.id,
      writeHighWater,
      maxBufferedBytes: opts.maxBufferedBytes,
      disconnectAckTimeoutMs: opts.disconnectAckTimeoutMs,
    });
    this.closedPromise = new Promise((r) => (this.resolveClosed = r));
  }

  get state(): AttachmentState {
    return this.host.state;
  }
  /** Exact count of bytes read from QEMU (complete packets + the partial one in the parser). */
  get bytesFromQemu(): number {
    return this._bytesFromQemu;
  }
  /** Bytes handed to the socket for QEMU. */
  get bytesToQemu(): number {
    return this.output.bytesWritten;
  }
  get stats(): AttachmentStats {
    return {
      bytesFromQemu: this._bytesFromQemu,
      bytesToQemu: this.output.bytesWritten,
      packetsFromQemu: this.packetsIn,
      packetsToQemu: this.packetsOut,
      urbsSubmitted: this.host.urbsSubmitted,
      urbsCompleted: this.host.urbsCompleted,
      urbsCancelled: this.host.urbsCancelled,
      inFlight: this.host.inFlightCount,
    };
  }
  /** Resolves once the attachment is closed. */
  get closed(): Promise<AttachmentCloseInfo> {
    return this.closedPromise;
  }

  /** Start speaking usbredir: send our hello, read QEMU. */
  start(): this {
    const s = this.socket;
    s.setNoDelay?.(true);
    s.on('data', this.onDataBound);
    s.resume(); // also when paused before (a migration destination's socket waits paused)
    warmUpUnixQueues(); // the first measurement would otherwise load koffi inside a downtime
    s.on('drain', this.flowBound);
    s.on('end', () => this.host.guard('end', () => void this.close('QEMU closed the chardev')));
    s.on('close', () => this.host.guard('close', () => void this.close('chardev socket closed')));
    s.on('error', (err) => this.host.guard('socket error', () => void this.close('chardev socket error', err)));
    this.device.on('received', this.onReceivedBound);
    this.device.on('deviceGone', this.onDeviceGoneBound);
    this.device.on('closed', this.onDeviceClosedBound);
    this.device.on('channelError', this.onChannelErrorBound);
    const resumed = this.handoff.resume();
    if (!resumed) {
      if (!this.parser.noHello) this.send(this.parser.helloPacket());
      this.host.start();
    }
    this.log.info({ attachment: this.id, resumed }, 'usbredir attachment started');
    return this;
  }

  private onData(chunk: Buffer): void {
    if (this.host.state === 'closed') return;
    this._bytesFromQemu += chunk.length;
    let packets: Packet[];
    try {
      packets = this.parser.push(chunk);
    } catch (err) {
      if (err instanceof UsbredirProtocolError) {
        this.host.receive(err.packets);
        this.log.warn({ attachment: this.id, code: err.code, err: err.message, streamOffset: err.streamOffset }, 'malformed usbredir from QEMU; closing this attachment');
        void this.close(`malformed usbredir from QEMU: ${err.message}`, err);
        return;
      }
      this.log.error({ attachment: this.id, err: (err as Error)?.message }, 'usbredir parser failed');
      void this.close('usbredir parser failed', err as Error);
      return;
    }
    this.packetsIn += packets.length;
    const trail = this.handoff.trail;
    if (trail.on) for (const p of packets) trail.note('<', p);
    this.host.receive(packets);
  }

  private send(p: Packet): void {
    if (this.host.state === 'closed' || this.socket.destroyed || this.handoff.exported) return;
    let parts: Uint8Array[];
    try {
      parts = this.parser.encodeParts(p);
    } catch (err) {
      this.log.error({ attachment: this.id, type: p.type, err: (err as Error).message }, 'could not encode a usbredir packet');
      return;
    }
    this.packetsOut++;
    const trail = this.handoff.trail;
    if (trail.on) trail.note('>', p);
    this.output.write(parts);
  }

  /** Pause reading requests from QEMU while our output or in-flight URBs are too many. */
  private flow(): void {
    if (this.host.state === 'closed' || this.handoff.exported) return;
    this.output.updateReadFlow(this.host.inFlightCount, this.handoff.draining);
  }

  /**
   * Disconnect the device from QEMU cleanly (device_disconnect, wait for the ack) and close.
   * The guest sees an unplug; the usb-redir device stays in QEMU.
   */
  async disconnect(why = 'disconnected by the bridge'): Promise<AttachmentCloseInfo> {
    if (this.host.state === 'closed') return this.closedPromise;
    if (!this.host.disconnect(why)) return this.close(why);
    return this.closedPromise;
  }

  // ------------------------------------------------------------------ live-migration hand-off (handoff/)

  /** Source, at MIGRATION 'pre-switchover': hold output, drain QEMU, measure (see AttachmentHandOff.freeze). */
  freeze(opts: { barrier?: () => Promise<unknown>; drainTimeoutMs?: number } = {}): Promise<FrozenPosition> {
    return this.handoff.freeze(opts);
  }
  /** The migration did not switch over after freeze(): write what was held, carry on. */
  unfreeze(): void {
    this.handoff.unfreeze();
  }
  /** Source, at MIGRATION 'completed': hand the session to the destination (see AttachmentHandOff.handOff). */
  handOff(opts: { drainTimeoutMs?: number } = {}): Promise<HandOffInfo> {
    return this.handoff.handOff(opts);
  }
  /** Bulk requests of QEMU in flight at the server now (a hint that qemuBulkInFlight() will have some). */
  hasBulkInFlight(): boolean {
    return this.handoff.hasBulkInFlight();
  }
  /** IN endpoints served by usbredir bulk receiving (see AttachmentHandOff). */
  bulkReceivingEndpoints(): number[] {
    return this.handoff.bulkReceivingEndpoints();
  }
  /** Endpoints with bulk streams allocated (UAS pipes). */
  bulkStreamEndpoints(): number[] {
    return this.host.bulkStreamEndpoints();
  }
  /** Source: the xHCI streams rewound at pre-switchover, sent with the hand-off state. */
  setXhciStreamKicks(kicks: StreamKick[]): void {
    this.handoff.xhciStreamKicks = kicks;
  }
  /** The guest-physical address of the xHCI stream context array of `endpoint`, if known. */
  xhciStreamArray(endpoint: number): bigint | undefined {
    return this.handoff.xhciStreamArrays.get(endpoint);
  }
  setXhciStreamArray(endpoint: number, base: bigint): void {
    this.handoff.xhciStreamArrays.set(endpoint, base);
  }
  /** Destination: the xHCI streams whose doorbells must be rung once this attachment continues (from the source's state). */
  get inheritedXhciStreamKicks(): StreamKick[] {
    return this.resumedState?.xhciStreamKicks ?? [];
  }
  /** While frozen: per bulk endpoint, the TDs QEMU has in flight, oldest first (for the xHCI rewind). */
  qemuBulkInFlight(): QemuBulkInFlight[] {
    return this.handoff.qemuBulkInFlight();
  }

  /**
   * Destination side: an attachment that continues the source's usbredir streams on the
   * migrated QEMU (no hello; QEMU's parser state came with the migration). start() writes the
   * host->guest bytes QEMU had not consumed, the parser continues the partial guest->host
   * packet, the URBs in flight are adopted, and it carries on.
   */
  static fromHandOff(opts: Omit<AttachmentOptions, 'noHello' | 'caps'> & { state: Uint8Array }): Attachment {
    const state = parseHandOffState(opts.state);
    const { parser, unreadOutput } = UsbredirParser.fromState(Buffer.from(state.usbredir, 'base64'), { version: 'usbroam bridge' });
    return new Attachment({ ...opts, id: opts.id ?? state.id }, { state, parser, unreadOutput });
  }

  // ------------------------------------------------------------------ close

  /** Stop hearing from the session and from QEMU (closing or handed off). */
  private stopListening(): void {
    this.device.off('received', this.onReceivedBound);
    this.device.off('deviceGone', this.onDeviceGoneBound);
    this.device.off('closed', this.onDeviceClosedBound);
    this.device.off('channelError', this.onChannelErrorBound);
    this.socket.off('data', this.onDataBound);
  }

  /** After a hand-off: close without a word to QEMU or the server (the session moved on). */
  private closeHandedOff(): void {
    this.host.shutdown();
    this.closeInfo = { reason: 'handed off' };
    this.stopListening();
    this.socket.destroy();
    this.resolveClosed(this.closeInfo);
    this.emit('closed', this.closeInfo);
  }

  /** Close the attachment (socket; the session too if ownsDevice). Idempotent. */
  async close(reason = 'closed', error?: Error): Promise<AttachmentCloseInfo> {
    if (this.host.state === 'closed') return this.closedPromise;
    this.host.shutdown();
    this.closeInfo = { reason, error };
    this.stopListening();
    const s = this.socket;
    if (!s.destroyed) {
      this.output.flushCork();
      if (error) s.destroy();
      else {
        s.end();
        const t = setTimeout(() => s.destroy(), 2000);
        t.unref?.();
        s.once('close', () => clearTimeout(t));
      }
    }
    const level = error ? 'warn' : 'info';
    this.log[level]({ attachment: this.id, reason, err: error?.message, ...this.stats }, 'usbredir attachment closed');
    if (this.ownsDevice) {
      try {
        await this.device.close();
      } catch (err) {
        this.log.warn({ attachment: this.id, err: (err as Error).message }, 'closing the URB channel session failed');
      }
    }
    this.resolveClosed(this.closeInfo);
    this.emit('closed', this.closeInfo);
    return this.closeInfo;
  }
}
