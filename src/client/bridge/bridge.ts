// Bridge: attachments of remote USB devices to QEMU VMs. For each VM it knows a QMP socket (or
// an already connected QmpClient). attach() opens a URB channel session to the device, hot-plugs
// a usb-redir device (or serves a cold-plugged one), and runs an Attachment; detach() unplugs
// it and closes the session. The gRPC control API (bridge-control/) and the CLI drive it. The
// live-migration hand-off (source and destination) is in handoff/.
import { status as GrpcStatus } from '@grpc/grpc-js';
import { EventEmitter } from 'node:events';
import { mkdirSync } from 'node:fs';
import type net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { silentLogger, type Logger } from '../../common/log.js';
import { QmpClient } from '../../qemu/qmp/client.js';
import { UsbHostClient, type DeviceSelector } from '../sdk/client.js';
import type { ConnectionOptions } from '../sdk/credentials.js';
import type { RemoteDevice, RemoteDeviceOptions } from '../sdk/remote-device.js';
import { Attachment, type AttachmentCloseInfo, type AttachmentStats } from './attachment.js';
import type { AttachmentOrigin, BridgeObserver } from './bridge-metrics.js';
import { BridgeStateFile, type SavedAttachment } from './bridge-state.js';
import { isLostSession, Reattacher } from './reconnect.js';
import { standBy } from './handoff/destination.js';
import type { HeldClaim, IncomingClaim, IncomingClaims } from './held-claim.js';
import { VmMigrations } from './handoff/vm-migration.js';
import { coldPluggedRedir, connectChardev, hotplugRedir, qemuArgsFor, redirIds, unplugRedir, type ColdPlugArgs, type RedirPlug } from './qemu-attach.js';
import { captureXhciStreamArrays, kickXhciStreams } from './handoff/xhci-streams.js';

export interface VmSpec {
  name: string;
  /** QMP unix socket of the VM (the bridge keeps one connection to it). */
  qmpSocket?: string;
  /** Or an already connected client (e.g. in tests). */
  qmp?: QmpClient;
}

export interface AttachRequest {
  vm: string;
  server: ConnectionOptions;
  selector: DeviceSelector;
  /** USB bus. Default `xhci.0`. */
  bus?: string;
  /** usb-redir filter (QEMU syntax). */
  filter?: string;
  /** Attachment id; default `usbroam-<deviceId>`. */
  id?: string;
  /**
   * The usb-redir device is already on QEMU's command line (see qemuArgs): connect to
   * `socketPath` instead of hot-plugging.
   */
  coldPlugged?: { socketPath: string };
  /** A fleet claim on the device: its token is presented at session open; the attachment gives it up when it ends. */
  claim?: HeldClaim & { token: string };
}

export interface AttachmentInfo {
  id: string;
  vm: string;
  deviceId: string;
  sessionId: string;
  server: string;
  bus: string;
  socketPath: string;
  hotPlugged: boolean;
  state: string;
  vendorId: number;
  productId: number;
  product: string;
  serial: string;
  stats: AttachmentStats;
  /** The fleet claim held ("host/device-id"), if any. */
  fleetClaim?: string;
}

interface Entry {
  info: Omit<AttachmentInfo, 'state' | 'stats'>;
  att: Attachment;
  device: RemoteDevice;
  chardevId: string;
  detaching: boolean;
  /** How to take the device again (reconnect.ts, bridge-state.ts). */
  conn: { server: ConnectionOptions; filter?: string };
  /** The session was lost for good (not closed on purpose): re-attach it. */
  lost?: boolean;
  claim?: HeldClaim;
  /** A client of this attachment only (one that presents a claim token), closed with it. */
  ownClient?: UsbHostClient;
}

interface Vm {
  spec: VmSpec;
  qmp?: QmpClient;
  ownsQmp: boolean;
}

export interface PrepareIncomingRequest {
  /** The destination VM (QEMU started with `-incoming defer`, registered with addVm). */
  vm: string;
  server: ConnectionOptions;
  /** The session the source bridge holds (AttachmentInfo.sessionId on the source). */
  sessionId: string;
  /** The attachment id on the source: the same usb-redir / chardev ids are plugged here. */
  id: string;
  /** Same bus (and port) as on the source. Default `xhci.0`. */
  bus?: string;
  port?: string;
  filter?: string;
}

export interface IncomingInfo {
  id: string;
  vm: string;
  sessionId: string;
  socketPath: string;
  /** Resolves with the attachment's info once the session was handed over. */
  attached: Promise<AttachmentInfo>;
}

export type { HandOffEvent } from './handoff/vm-migration.js';

export interface BridgeOptions {
  log?: Logger;
  /** Directory for the chardev sockets. Default `$TMPDIR/usbroam-bridge-<pid>`. */
  runDir?: string;
  /**
   * Turn QEMU's migration capability pause-before-switchover on in the VMs we serve, and at
   * 'pre-switchover' freeze every attachment (exact position in the host->guest stream) before
   * continuing the migration (migrate-continue). Default true. Without it a hand-off can lose
   * what QEMU reads after saving its state (see AttachmentHandOff.freeze in handoff/). The orchestrator must then
   * leave migrate-continue to the bridge; if the bridge is gone, a migration of such a VM waits
   * at 'pre-switchover' until the orchestrator continues or cancels it.
   */
  pauseBeforeSwitchover?: boolean;
  /** Longest pause at 'pre-switchover' before the migration is continued anyway. Default 3000 ms. */
  switchoverFreezeTimeoutMs?: number;
  /**
   * At 'pre-switchover', point the xHCI endpoint contexts of bulk endpoints with TDs in flight
   * at the oldest of them, so that the destination fetches them again (QEMU's xHCI loses them
   * otherwise; see handoff/xhci-dequeue.ts). Default true; false only to show what it fixes.
   */
  rewindXhciOnSwitchover?: boolean;
  /**
   * Keep a record of the attachments in this directory (bridge-state.ts, written atomically);
   * restore() re-attaches them in a bridge restarted after a crash.
   */
  stateDir?: string;
  /**
   * A session lost for good (server restarted, a cut longer than its grace period): re-attach
   * the device for this long, with backoff (reconnect.ts). 0 (default): unplug and forget it.
   */
  reattachWindowMs?: number;
  /** How long a lost URB channel tries to resume its session before it is lost. Default 25000 ms. */
  resumeWindowMs?: number;
  /** The fleet: a migration destination offers to hold the claim of the session it stands by on. */
  incomingClaims?: IncomingClaims;
  /**
   * prepareIncoming: longest wait for the USB host server to park the standby stream (a server
   * that does not answer, e.g. a TLS handshake that never completes). Default 10000 ms.
   */
  standbyOpenTimeoutMs?: number;
}

/** The standby's server did not answer in time: DEADLINE_EXCEEDED, as the control API passes it on. */
function standbyDeadline(sessionId: string, ms: number): Error {
  const details = `no answer within ${ms} ms to the standby for session ${sessionId}: the server is unreachable or does not complete the TLS handshake`;
  return Object.assign(new Error(details), { code: GrpcStatus.DEADLINE_EXCEEDED, details });
}

export class Bridge extends EventEmitter {
  private readonly log: Logger;
  readonly runDir: string;
  private readonly vms = new Map<string, Vm>();
  private readonly attachments = new Map<string, Entry>();
  private readonly clients = new Map<string, UsbHostClient>();

  /** Metrics and capture (bridge-metrics.ts, bridge-capture.ts): told of each attachment as it starts. */
  observer?: BridgeObserver;

  private readonly standbys = new Map<string, { device: RemoteDevice; release: () => void; coldPlugged: boolean; claim?: IncomingClaim }>();
  private readonly incomingClaims?: IncomingClaims;
  private readonly migrations: VmMigrations;
  private readonly state?: BridgeStateFile;
  private readonly reattacher: Reattacher;
  private readonly deviceOptions: RemoteDeviceOptions;

  private readonly standbyOpenTimeoutMs: number;

  constructor(opts: BridgeOptions = {}) {
    super();
    this.log = opts.log ?? silentLogger;
    this.runDir = opts.runDir ?? path.join(os.tmpdir(), `usbroam-bridge-${process.pid}`);
    this.incomingClaims = opts.incomingClaims;
    this.standbyOpenTimeoutMs = opts.standbyOpenTimeoutMs ?? 10_000;
    mkdirSync(this.runDir, { recursive: true, mode: 0o700 });
    this.deviceOptions = { maxInFlight: 1 << 30, reconnectWindowMs: opts.resumeWindowMs };
    this.state = opts.stateDir ? new BridgeStateFile(opts.stateDir) : undefined;
    this.reattacher = new Reattacher(
      {
        log: this.log,
        clientFor: (s) => this.clientFor(s),
        qmpOf: (vm) => this.qmpOf(vm),
        deviceOptions: { ...this.deviceOptions, log: this.log },
        adopt: (saved, device, socket) => this.adopt(saved, device, socket),
        changed: () => this.persist(),
      },
      { windowMs: opts.reattachWindowMs ?? 0 },
    );
    this.migrations = new VmMigrations({
      log: this.log,
      runDir: this.runDir,
      pauseBeforeSwitchover: opts.pauseBeforeSwitchover ?? true,
      switchoverFreezeTimeoutMs: opts.switchoverFreezeTimeoutMs ?? 3000,
      rewindXhciOnSwitchover: opts.rewindXhciOnSwitchover ?? true,
      qmpOf: (vm) => this.qmpOf(vm),
      attachmentsOf: (vm) => [...this.attachments.values()].filter((e) => e.info.vm === vm).map((e) => ({ id: e.info.id, bus: e.info.bus, att: e.att })),
      handedOff: (id) => {
        const e = this.attachments.get(id);
        this.attachments.delete(id);
        if (e) this.handedOffEntry(e);
        this.persist();
      },
      emit: (ev) => this.emit('handOff', ev),
    });
  }

  /** Register (or replace) a VM. */
  addVm(spec: VmSpec): void {
    if (!spec.qmp && !spec.qmpSocket) throw new Error(`VM ${spec.name}: a QMP socket or client is needed`);
    this.vms.set(spec.name, { spec, qmp: spec.qmp, ownsQmp: !spec.qmp });
  }

  private async qmpOf(vmName: string): Promise<QmpClient> {
    const vm = this.vms.get(vmName);
    if (!vm) throw new Error(`unknown VM ${vmName}`);
    if (!vm.qmp) {
      const q = new QmpClient({ path: vm.spec.qmpSocket!, reconnect: true, logger: this.log.child({ vm: vmName }) });
      await q.connect();
      vm.qmp = q;
    }
    return vm.qmp;
  }


  /**
   * Migration destination: plug the same usb-redir (same ids, bus, port) into the destination
   * QEMU (started with `-incoming defer`; call this before `migrate-incoming`), connect its
   * chardev, and stand by on the session at the server. When the source bridge hands the
   * session off, the attachment continues from the source's exact position. If the source is
   * lost instead, the device is disconnected and reconnected in the guest (a clean replug).
   */
  async prepareIncoming(req: PrepareIncomingRequest): Promise<IncomingInfo> {
    if (!this.vms.has(req.vm)) throw new Error(`unknown VM ${req.vm}`);
    if (this.attachments.has(req.id) || this.standbys.has(req.id)) throw new Error(`attachment ${req.id} exists already`);
    const vmLog = this.log.child({ vm: req.vm });
    const log = vmLog.child({ attachment: req.id, session: req.sessionId });
    const client = this.clientFor(req.server);
    const qmp = await this.qmpOf(req.vm);
    const st = await qmp.execute<{ status: string }>('query-status');
    if (st.status !== 'inmigrate') throw new Error(`VM ${req.vm} is not waiting for an incoming migration (status ${st.status})`);
    this.migrations.markIncoming(req.vm);
    await this.migrations.watch(req.vm);
    const id = req.id;
    const chardevId = `${id}-chr`;
    const bus = req.bus ?? 'xhci.0';
    // Already on the destination's command line (a libvirt <redirdev> in the migrated domain
    // XML): serve its chardev instead of hot-plugging a second one.
    const coldPlugged = await coldPluggedRedir(qmp, id);
    const socketPath = coldPlugged?.socketPath ?? this.socketPathFor(req.vm, id);
    if (!coldPlugged) await hotplugRedir(qmp, { id, chardevId, socketPath, bus, filter: req.filter, port: req.port });
    let standby;
    const pending = standBy({ client, sessionId: req.sessionId, socketPath, id, log, sessionLog: vmLog, onEnd: () => this.standbys.delete(id) });
    let timer: NodeJS.Timeout | undefined;
    try {
      const ms = this.standbyOpenTimeoutMs;
      standby = await Promise.race([pending, new Promise<never>((_, reject) => (timer = setTimeout(() => reject(standbyDeadline(req.sessionId, ms)), ms)))]);
    } catch (err) {
      pending.then((late) => late.release(), () => {}); // parked after the deadline: let it go
      if (!coldPlugged) await unplugRedir(qmp, { id, chardevId }, { timeoutMs: 10_000 }).catch(() => {});
      throw err;
    } finally {
      clearTimeout(timer);
    }
    const dev = standby.device;
    let claim: IncomingClaim | undefined;
    try {
      claim = await this.incomingClaims?.offer(req.sessionId);
    } catch (err) {
      log.warn({ err: (err as Error).message }, 'cannot offer to hold the fleet claim of this session; it stays with the source');
    }
    this.standbys.set(id, { device: dev, release: standby.release, coldPlugged: !!coldPlugged, claim });
    log.info({ bus, socketPath }, 'standing by for the session (migration destination)');
    const attached = standby.takeOver.then(async ({ attachment, origin }) => {
      // UAS and other stream endpoints the source stopped at pre-switchover: their TDs in flight
      // are fetched again now, before the completions that came with the hand-off reach QEMU.
      const kicks = origin === 'takeover' ? attachment.inheritedXhciStreamKicks.filter((k) => k.streams.length) : [];
      if (kicks.length) {
        try {
          const rung = await kickXhciStreams(qmp, { controllerId: bus.replace(/\.\d+$/, ''), deviceId: id, kicks, runDir: this.runDir, log });
          log.info({ kicks, rung }, 'xHCI stream doorbells rung: the TDs in flight at the switchover are fetched again');
        } catch (err) {
          log.error({ kicks, err: (err as Error).message }, 'could not ring the xHCI stream doorbells: stream TDs in flight at the switchover wait for the guest');
        }
      }
      const entry = this.entryOf({ id, vm: req.vm, server: client.address, bus, socketPath, hotPlugged: !coldPlugged }, attachment, dev, coldPlugged?.chardevId ?? chardevId, { server: req.server, filter: req.filter });
      entry.claim = claim?.takenOver();
      this.register(entry, origin);
      return this.infoOf(entry);
    });
    attached.catch((err) => {
      log.warn({ err: (err as Error).message }, 'standby ended without a take-over');
      void claim?.withdraw();
    });
    return { id, vm: req.vm, sessionId: req.sessionId, socketPath, attached };
  }

  /** Drop a standby prepared with prepareIncoming (e.g. the migration was cancelled). */
  async cancelIncoming(vm: string, id: string): Promise<void> {
    const s = this.standbys.get(id);
    if (!s) throw new Error(`no standby ${id}`);
    s.release();
    void s.claim?.withdraw();
    if (s.coldPlugged) return; // QEMU's own device: it stays
    const qmp = await this.qmpOf(vm);
    await unplugRedir(qmp, { id, chardevId: `${id}-chr` }, { timeoutMs: 10_000 }).catch(() => {});
  }

  private clientFor(server: ConnectionOptions): UsbHostClient {
    const key = JSON.stringify([server.address, server.ca, server.cert, server.key, server.insecure]);
    let c = this.clients.get(key);
    if (!c) {
      c = new UsbHostClient({ ...server, log: this.log });
      this.clients.set(key, c);
    }
    return c;
  }

  /** The QEMU arguments / libvirt XML for a cold-plugged attachment of `deviceId`. */
  qemuArgs(vm: string, deviceId: string, opts: { bus?: string; filter?: string; socketPath?: string } = {}): ColdPlugArgs & RedirPlug {
    const ids = redirIds(deviceId);
    const plug: RedirPlug = { ...ids, bus: opts.bus ?? 'xhci.0', filter: opts.filter, socketPath: opts.socketPath ?? this.socketPathFor(vm, ids.id) };
    return { ...plug, ...qemuArgsFor(plug) };
  }

  private socketPathFor(vm: string, id: string): string {
    return path.join(this.runDir, `${vm}.${id}.sock`.replace(/[^A-Za-z0-9_.-]/g, '-'));
  }

  /** Attach a remote device to a VM. Resolves once QEMU has the usb-redir device and the session runs. */
  async attach(req: AttachRequest): Promise<AttachmentInfo> {
    const vmLog = this.log.child({ vm: req.vm });
    if (!this.vms.has(req.vm)) throw new Error(`unknown VM ${req.vm}`);
    // A claim token goes in the Connect metadata of every call of a client: one client for this attachment.
    const ownClient = req.claim ? new UsbHostClient({ ...req.server, log: this.log, claimToken: req.claim.token }) : undefined;
    const client = ownClient ?? this.clientFor(req.server);
    let device: RemoteDevice;
    try {
      device = await client.openDevice(req.selector, { ...this.deviceOptions, log: vmLog });
    } catch (err) {
      ownClient?.close();
      throw err;
    }
    const d = device.device;
    const ids = redirIds(d.id);
    const id = req.id ?? ids.id;
    if (this.attachments.has(id)) {
      await device.close();
      ownClient?.close();
      throw new Error(`attachment ${id} exists already`);
    }
    const chardevId = req.id ? `${id}-chr` : ids.chardevId;
    const bus = req.bus ?? 'xhci.0';
    const socketPath = req.coldPlugged?.socketPath ?? this.socketPathFor(req.vm, id);
    const log = vmLog.child({ device: d.id, attachment: id });
    let qmp: QmpClient | undefined;
    try {
      if (!req.coldPlugged) {
        qmp = await this.qmpOf(req.vm);
        await hotplugRedir(qmp, { id, chardevId, socketPath, bus, filter: req.filter });
      }
      await this.migrations.watch(req.vm).catch((err) => log.warn({ err: (err as Error).message }, 'cannot follow migration events of this VM'));
      const socket = await connectChardev(socketPath);
      const att = new Attachment({ device, socket, log, id });
      const entry = this.entryOf({ id, vm: req.vm, server: client.address, bus, socketPath, hotPlugged: !req.coldPlugged }, att, device, chardevId, { server: req.server, filter: req.filter });
      entry.claim = req.claim;
      entry.ownClient = ownClient;
      this.register(entry, 'attach');
      log.info({ bus, socketPath, session: device.sessionId }, 'device attached to VM');
      return this.infoOf(entry);
    } catch (err) {
      log.warn({ err: (err as Error).message }, 'attach failed');
      if (qmp && !req.coldPlugged) await unplugRedir(qmp, { id, chardevId }, { timeoutMs: 10_000 }).catch(() => {});
      await device.close().catch(() => {});
      ownClient?.close();
      throw err;
    }
  }

  /** The session went to a migration destination: nothing to unplug; the claim follows it. */
  private handedOffEntry(e: Entry): void {
    e.detaching = true;
    const claim = e.claim;
    e.claim = undefined;
    void claim?.handedOff(e.info.sessionId).finally(() => e.ownClient?.close());
    if (!claim) e.ownClient?.close();
  }

  /** The attachment ended here: give its claim up and close its own client. Resolves once the claim is given up. */
  private async ended(e: Entry): Promise<void> {
    const claim = e.claim;
    e.claim = undefined;
    const released = claim?.release();
    e.ownClient?.close();
    await released;
  }

  private entryOf(
    where: Pick<AttachmentInfo, 'id' | 'vm' | 'server' | 'bus' | 'socketPath' | 'hotPlugged'>,
    att: Attachment,
    device: RemoteDevice,
    chardevId: string,
    conn: Entry['conn'],
  ): Entry {
    const d = device.device;
    const info = { ...where, deviceId: d.id, sessionId: device.sessionId, vendorId: d.vendorId, productId: d.productId, product: d.product, serial: d.serial };
    return { info, att, device, chardevId, detaching: false, conn };
  }

  /** Track a new attachment and start it. */
  private register(entry: Entry, origin: AttachmentOrigin): void {
    this.attachments.set(entry.info.id, entry);
    entry.att.on('closed', (ci: AttachmentCloseInfo) => void this.onAttachmentClosed(entry, ci));
    // QEMU allocates bulk streams (a UAS disk binding): read their xHCI stream context arrays at once.
    entry.att.on('bulkStreamsAllocating', (eps: number[], numStreams: number) => {
      const { vm, id, bus } = entry.info;
      const log = this.log.child({ vm, attachment: id });
      void this.qmpOf(vm).then(
        (qmp) => captureXhciStreamArrays(qmp, { controllerId: bus.replace(/\.\d+$/, ''), deviceId: id, endpoints: eps, numStreams, att: entry.att, log }),
        (err: Error) => log.warn({ err: err.message }, 'no QMP connection to read the xHCI stream context arrays'),
      );
    });
    entry.device.once('closed', (err?: Error) => (entry.lost = isLostSession(err)));
    this.observer?.attachmentStarted(entry.att, entry.device, origin);
    entry.att.start();
    this.persist();
  }

  /** A session re-attached by reconnect.ts becomes the attachment again (the guest sees a replug). */
  private adopt(s: SavedAttachment, device: RemoteDevice, socket: net.Socket): void {
    const log = this.log.child({ vm: s.vm, device: s.deviceId, attachment: s.id });
    const att = new Attachment({ device, socket, log, id: s.id });
    const where = { id: s.id, vm: s.vm, server: this.clientFor(s.server).address, bus: s.bus, socketPath: s.socketPath, hotPlugged: s.hotPlugged };
    this.register(this.entryOf(where, att, device, s.chardevId, { server: s.server, filter: s.filter }), 'replug');
    void this.migrations.watch(s.vm).catch((err) => log.warn({ err: (err as Error).message }, 'cannot follow migration events of this VM'));
  }

  private savedOf(e: Entry): SavedAttachment {
    const i = e.info;
    const qmpSocket = this.vms.get(i.vm)?.spec.qmpSocket;
    return { id: i.id, vm: i.vm, qmpSocket, server: e.conn.server, deviceId: i.deviceId, bus: i.bus, filter: e.conn.filter, chardevId: e.chardevId, socketPath: i.socketPath, hotPlugged: i.hotPlugged, sessionId: i.sessionId, savedAt: new Date().toISOString() };
  }

  /** Rewrite the state file: live attachments and those being re-attached. */
  private persist(): void {
    if (!this.state) return;
    const records = [...this.attachments.values()].filter((e) => !e.detaching).map((e) => this.savedOf(e));
    for (const r of this.reattacher.records()) if (!records.some((x) => x.id === r.id)) records.push(r);
    try {
      this.state.save(records);
    } catch (err) {
      this.log.error({ file: this.state.file, err: (err as Error).message }, 'cannot write the bridge state file');
    }
  }

  /**
   * A restarted bridge: re-attach every attachment its state file records (closing the sessions
   * the previous bridge held). Resolves when each is attached again or given up.
   */
  async restore(opts: { windowMs?: number } = {}): Promise<{ id: string; vm: string; ok: boolean }[]> {
    if (!this.state) return [];
    const saved = this.state.load();
    if (saved.length) this.log.info({ file: this.state.file, attachments: saved.map((s) => s.id) }, 'restoring the attachments of a previous bridge');
    return Promise.all(
      saved.map(async (s) => {
        if (!this.vms.has(s.vm) && s.qmpSocket) this.addVm({ name: s.vm, qmpSocket: s.qmpSocket });
        if (!this.vms.has(s.vm)) {
          this.log.warn({ vm: s.vm, attachment: s.id }, 'state file names a VM this bridge does not know; not restored');
          return { id: s.id, vm: s.vm, ok: false };
        }
        const ok = await this.reattacher.start(s, 'restored from the state file of a previous bridge', { closeOldSession: true, windowMs: opts.windowMs });
        return { id: s.id, vm: s.vm, ok };
      }),
    );
  }

  private async onAttachmentClosed(e: Entry, ci: AttachmentCloseInfo): Promise<void> {
    if (ci.reason === 'handed off') {
      // The session (and the guest's device) moved to the migration destination.
      this.attachments.delete(e.info.id);
      this.persist();
      if (!e.detaching) this.handedOffEntry(e);
      return;
    }
    if (e.detaching) return;
    void this.ended(e);
    // Closed by itself (device gone, malformed input, QEMU closed the chardev): drop the
    // usb-redir device we hot-plugged so the VM is left clean.
    this.attachments.delete(e.info.id);
    this.log.info({ vm: e.info.vm, attachment: e.info.id, session: e.info.sessionId, reason: ci.reason }, 'attachment ended');
    if (e.lost && this.reattacher.enabled) {
      // The session is lost, the device not: keep the usb-redir device for the replug.
      void this.reattacher.start(this.savedOf(e), ci.reason, { closeOldSession: true });
      return;
    }
    this.persist();
    if (e.info.hotPlugged) {
      try {
        const qmp = await this.qmpOf(e.info.vm);
        await unplugRedir(qmp, { id: e.info.id, chardevId: e.chardevId }, { timeoutMs: 10_000 });
      } catch (err) {
        this.log.warn({ vm: e.info.vm, attachment: e.info.id, err: (err as Error).message }, 'could not remove the usb-redir device');
      }
    }
  }

  /** Detach: device_del (the guest sees an unplug), then a clean session close. */
  async detach(vm: string, attachmentId: string): Promise<void> {
    const e = this.attachments.get(attachmentId);
    const waiting = this.reattacher.records().find((r) => r.id === attachmentId && r.vm === vm);
    if (!e && waiting && this.reattacher.cancel(attachmentId)) {
      if (waiting.hotPlugged) await unplugRedir(await this.qmpOf(vm), { id: waiting.id, chardevId: waiting.chardevId });
      return;
    }
    if (!e || e.info.vm !== vm) throw new Error(`no attachment ${attachmentId} on VM ${vm}`);
    e.detaching = true;
    this.attachments.delete(attachmentId);
    this.persist();
    try {
      if (e.info.hotPlugged) {
        const qmp = await this.qmpOf(vm);
        await unplugRedir(qmp, { id: e.info.id, chardevId: e.chardevId });
      } else {
        await e.att.disconnect('detached');
      }
    } finally {
      await e.att.close('detached');
      await this.ended(e); // detach returns with the device free in the fleet
    }
  }

  list(vm?: string): AttachmentInfo[] {
    return [...this.attachments.values()].filter((e) => !vm || e.info.vm === vm).map((e) => this.infoOf(e));
  }

  get(attachmentId: string): Attachment | undefined {
    return this.attachments.get(attachmentId)?.att;
  }

  private infoOf(e: Entry): AttachmentInfo {
    return { ...e.info, state: e.att.state, stats: e.att.stats, fleetClaim: e.claim?.label };
  }

  /** Detach everything, close QMP connections and server channels. */
  async close(): Promise<void> {
    await this.reattacher.close();
    for (const s of [...this.standbys.values()]) s.release();
    for (const e of [...this.attachments.values()]) {
      await this.detach(e.info.vm, e.info.id).catch((err) => this.log.warn({ attachment: e.info.id, err: (err as Error).message }, 'detach on close failed'));
    }
    for (const [name, vm] of this.vms) await this.migrations.release(name, vm.qmp);
    for (const vm of this.vms.values()) if (vm.ownsQmp) await vm.qmp?.close().catch(() => {});
    for (const c of this.clients.values()) c.close();
    this.clients.clear();
  }
}
