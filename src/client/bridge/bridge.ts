// Bridge: attachments of remote USB devices to QEMU VMs. For each VM it knows a QMP socket (or
// an already connected QmpClient). attach() opens a URB channel session to the device, hot-plugs
// a usb-redir device (or serves a cold-plugged one), and runs an Attachment; detach() unplugs
// it and closes the session. Methods are shaped for the gRPC control API and CLI to come.
import { EventEmitter } from 'node:events';
import { mkdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { silentLogger, type Logger } from '../../common/log.js';
import { QmpClient } from '../../qemu/qmp/client.js';
import { UsbHostClient, type DeviceSelector } from '../sdk/client.js';
import type { ConnectionOptions } from '../sdk/credentials.js';
import type { RemoteDevice } from '../sdk/remote-device.js';
import { Attachment, HandOffRefusedError, type AttachmentCloseInfo, type AttachmentStats, type HandOffInfo } from './attachment.js';
import { releaseStandby, sourceLostReplug } from './migration.js';
import type { BridgeObserver } from './bridge-metrics.js';
import { GdbWriter, locateXhciDevice, rewindXhciDequeues, type XhciDeviceLocation } from './xhci-dequeue.js';
import { connectChardev, hotplugRedir, qemuArgsFor, redirIds, unplugRedir, type ColdPlugArgs, type RedirPlug } from './qemu-attach.js';

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
}

interface Entry {
  info: Omit<AttachmentInfo, 'state' | 'stats'>;
  att: Attachment;
  device: RemoteDevice;
  chardevId: string;
  detaching: boolean;
}

interface Vm {
  spec: VmSpec;
  qmp?: QmpClient;
  ownsQmp: boolean;
  /** MIGRATION events are followed on this VM's QMP connection. */
  watching?: Promise<void>;
  /** This QEMU is a migration destination that has not completed its incoming migration. */
  incoming?: boolean;
  /** We turned pause-before-switchover on in this QEMU (and must continue its migrations). */
  pausing?: boolean;
  /** ms of the last pause at pre-switchover. */
  lastSwitchoverPauseMs?: number;
  /** Per attachment: the xHCI rewind done at the last pre-switchover. */
  lastXhciRewind?: Map<string, NonNullable<HandOffEvent['xhciRewind']>>;
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

/** Emitted (as 'handOff') for each hand-off attempt at the end of a migration. */
export interface HandOffEvent {
  vm: string;
  attachment: string;
  ok: boolean;
  info?: HandOffInfo;
  error?: string;
  /** ms from the MIGRATION 'completed' event to the server's confirmation. */
  sinceCompletedMs?: number;
  /** ms the migration stayed paused at 'pre-switchover' for the freeze (part of QEMU's downtime). */
  switchoverPauseMs?: number;
  /**
   * Bulk TDs QEMU had in flight at 'pre-switchover' and what was done so that the destination's
   * xHCI fetches them again (see xhci-dequeue.ts): endpoints whose context was rewound, already
   * right, or skipped (with why).
   */
  xhciRewind?: { inFlight: number; patched: number; unchanged: number; skipped: string[]; tookMs: number; error?: string };
}

export interface BridgeOptions {
  log?: Logger;
  /** Directory for the chardev sockets. Default `$TMPDIR/usbroam-bridge-<pid>`. */
  runDir?: string;
  /**
   * Turn QEMU's migration capability pause-before-switchover on in the VMs we serve, and at
   * 'pre-switchover' freeze every attachment (exact position in the host->guest stream) before
   * continuing the migration (migrate-continue). Default true. Without it a hand-off can lose
   * what QEMU reads after saving its state (see Attachment.freeze). The orchestrator must then
   * leave migrate-continue to the bridge; if the bridge is gone, a migration of such a VM waits
   * at 'pre-switchover' until the orchestrator continues or cancels it.
   */
  pauseBeforeSwitchover?: boolean;
  /** Longest pause at 'pre-switchover' before the migration is continued anyway. Default 3000 ms. */
  switchoverFreezeTimeoutMs?: number;
  /**
   * At 'pre-switchover', point the xHCI endpoint contexts of bulk endpoints with TDs in flight
   * at the oldest of them, so that the destination fetches them again (QEMU's xHCI loses them
   * otherwise; see xhci-dequeue.ts). Default true; false only to show what it fixes.
   */
  rewindXhciOnSwitchover?: boolean;
}

export class Bridge extends EventEmitter {
  private readonly log: Logger;
  readonly runDir: string;
  private readonly vms = new Map<string, Vm>();
  private readonly attachments = new Map<string, Entry>();
  private readonly clients = new Map<string, UsbHostClient>();

  /** Metrics (bridge-metrics.ts): told of each attachment as it starts. */
  observer?: BridgeObserver;

  private readonly standbys = new Map<string, { device: RemoteDevice; release: () => Promise<void> }>();

  private readonly pauseBeforeSwitchover: boolean;
  private readonly switchoverFreezeTimeoutMs: number;
  private readonly rewindXhciOnSwitchover: boolean;

  constructor(opts: BridgeOptions = {}) {
    super();
    this.log = opts.log ?? silentLogger;
    this.pauseBeforeSwitchover = opts.pauseBeforeSwitchover ?? true;
    this.switchoverFreezeTimeoutMs = opts.switchoverFreezeTimeoutMs ?? 3000;
    this.rewindXhciOnSwitchover = opts.rewindXhciOnSwitchover ?? true;
    this.runDir = opts.runDir ?? path.join(os.tmpdir(), `usbroam-bridge-${process.pid}`);
    mkdirSync(this.runDir, { recursive: true, mode: 0o700 });
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
   * Follow live migration of a VM on our own QMP connection (MIGRATION events enabled here):
   * at 'completed' on a source, every connected attachment of the VM hands its session off.
   */
  private watchMigration(vmName: string): Promise<void> {
    const vm = this.vms.get(vmName)!;
    if (vm.watching) return vm.watching;
    vm.watching = (async () => {
      const qmp = await this.qmpOf(vmName);
      const enable = async () => {
        await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
        if (!this.pauseBeforeSwitchover) return;
        try {
          await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'pause-before-switchover', state: true }] });
          vm.pausing = true;
        } catch (err) {
          this.log.warn({ vm: vmName, err: (err as Error).message }, 'cannot turn pause-before-switchover on: a hand-off may lose what QEMU reads after saving its state');
        }
      };
      await enable();
      qmp.on('reconnect', () => void enable().catch(() => {}));
      qmp.on('event:MIGRATION', (ev: { data?: { status?: string } }) => {
        const status = ev.data?.status;
        if (status === 'pre-switchover') {
          void this.freezeVm(vmName, qmp);
          return;
        }
        if (status === 'completed' || status === 'failed' || status === 'cancelled') {
          if (vm.incoming) {
            // Our own incoming migration ended (we are its destination): nothing to hand off.
            vm.incoming = false;
            // This QEMU is a migration source from now on.
            if (status === 'completed') void enable().catch((err) => this.log.warn({ vm: vmName, err: (err as Error).message }, 'cannot set migration capabilities'));
            return;
          }
          if (status === 'completed') void this.handOffVm(vmName, performance.now());
          else {
            this.log.info({ vm: vmName, status }, 'migration ended without switchover; attachments carry on');
            for (const e of this.attachments.values()) if (e.info.vm === vmName) e.att.unfreeze();
          }
        }
      });
    })();
    vm.watching.catch(() => (vm.watching = undefined));
    return vm.watching;
  }

  /**
   * MIGRATION 'pre-switchover' on a source (pause-before-switchover): QEMU has stopped the VM
   * and waits before saving its device state. Freeze every attachment of the VM (exact
   * position), then let the migration continue. Always continues, also on errors.
   */
  private async freezeVm(vmName: string, qmp: QmpClient): Promise<void> {
    const vm = this.vms.get(vmName);
    if (!vm || vm.incoming) return;
    const t0 = performance.now();
    const entries = [...this.attachments.values()].filter((e) => e.info.vm === vmName && e.att.state !== 'closed');
    // One QMP round trip after the VM stopped: QEMU's main loop has iterated since, so a read
    // armed while the VM ran has happened (see Attachment.freeze).
    let barrier: Promise<unknown> | undefined;
    const once = () => (barrier ??= qmp.execute('query-status'));
    const timeout = new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), this.switchoverFreezeTimeoutMs).unref?.());
    // The xHCI lookups (and the gdbstub, if bulk requests are in flight) run while the freeze
    // drains: the rewind after it then costs a read and a write.
    const xhci = new Map<string, Promise<XhciDeviceLocation>>();
    let gdbP: Promise<GdbWriter> | undefined;
    const gdb = () => (gdbP ??= GdbWriter.open(qmp, this.runDir));
    if (this.rewindXhciOnSwitchover) {
      for (const e of entries) {
        const p = locateXhciDevice(qmp, e.info.bus.replace(/\.\d+$/, ''), e.info.id);
        p.catch(() => {});
        xhci.set(e.info.id, p);
      }
      if (entries.some((e) => e.att.hasBulkInFlight())) gdb().catch(() => {});
    }
    const frozen = Promise.allSettled(entries.map((e) => e.att.freeze({ barrier: once })));
    const r = await Promise.race([frozen, timeout]);
    if (r === 'timeout') this.log.error({ vm: vmName }, 'freeze at pre-switchover timed out; continuing the migration');
    else
      r.forEach((x, i) => {
        if (x.status === 'rejected') this.log.error({ vm: vmName, attachment: entries[i]!.info.id, err: (x.reason as Error)?.message }, 'freeze at pre-switchover failed');
      });
    vm.lastXhciRewind = new Map();
    if (r !== 'timeout' && this.rewindXhciOnSwitchover) {
      const ok = entries.filter((_, i) => r[i]!.status === 'fulfilled');
      const left = this.switchoverFreezeTimeoutMs - (performance.now() - t0);
      const rewound = Promise.allSettled(ok.map((e) => this.rewindXhci(vmName, qmp, e, vm.lastXhciRewind!, xhci.get(e.info.id), gdb)));
      if ((await Promise.race([rewound, new Promise<'timeout'>((res) => setTimeout(() => res('timeout'), Math.max(left, 500)).unref?.())])) === 'timeout') {
        this.log.error({ vm: vmName }, 'xHCI endpoint rewind at pre-switchover timed out; continuing the migration');
      }
    }
    const pauseMs = performance.now() - t0;
    vm.lastSwitchoverPauseMs = pauseMs;
    try {
      await qmp.execute('migrate-continue', { state: 'pre-switchover' });
      this.log.info({ vm: vmName, attachments: entries.length, pauseMs: Number(pauseMs.toFixed(1)) }, 'attachments frozen at pre-switchover; migration continued');
    } catch (err) {
      this.log.warn({ vm: vmName, err: (err as Error).message }, 'migrate-continue failed (continued by someone else?)');
    }
    if (gdbP) void gdbP.then((g) => g.close()).catch((err: Error) => this.log.warn({ vm: vmName, err: err.message }, 'gdbstub for the xHCI rewind failed'));
  }

  /**
   * At 'pre-switchover', after the freeze: point the xHCI endpoint context of each bulk endpoint
   * with TDs in flight at the oldest of them, so the destination fetches them again instead of
   * losing them (QEMU's xHCI does not migrate its transfers; see xhci-dequeue.ts). Never throws.
   */
  private async rewindXhci(
    vmName: string,
    qmp: QmpClient,
    e: Entry,
    out: Map<string, NonNullable<HandOffEvent['xhciRewind']>>,
    location: Promise<XhciDeviceLocation> | undefined,
    gdb: () => Promise<GdbWriter>,
  ): Promise<void> {
    const log = this.log.child({ vm: vmName, attachment: e.info.id });
    let eps: ReturnType<Attachment['qemuBulkInFlight']>;
    try {
      eps = e.att.qemuBulkInFlight();
    } catch (err) {
      log.error({ err: (err as Error).message }, 'cannot tell which bulk TDs QEMU has in flight');
      return;
    }
    const rec: NonNullable<HandOffEvent['xhciRewind']> = { inFlight: eps.reduce((a, x) => a + x.ids.length, 0), patched: 0, unchanged: 0, skipped: [], tookMs: 0 };
    out.set(e.info.id, rec);
    const usable = eps.filter((x) => {
      if (x.streams) rec.skipped.push(`ep ${x.endpoint.toString(16)}: bulk streams`);
      else if (!x.contiguous) rec.skipped.push(`ep ${x.endpoint.toString(16)}: TDs in flight are not the newest on the endpoint`);
      else return true;
      return false;
    });
    if (!usable.length) {
      if (rec.skipped.length) log.warn({ skipped: rec.skipped }, 'bulk TDs in flight at the switchover that the destination xHCI may not fetch again');
      return;
    }
    const controllerId = e.info.bus.replace(/\.\d+$/, '');
    try {
      const res = await rewindXhciDequeues(qmp, {
        controllerId,
        deviceId: e.info.id,
        endpoints: usable.map((x) => ({ endpoint: x.endpoint, oldestId: x.ids[0]!, count: x.ids.length })),
        runDir: this.runDir,
        log,
        location,
        gdb,
      });
      rec.patched = res.patched.length;
      rec.unchanged = res.unchanged.length;
      rec.skipped.push(...res.skipped.map((s) => `ep ${s.endpoint.toString(16)}: ${s.why}`));
      rec.tookMs = res.tookMs;
      const level = res.skipped.length ? 'warn' : 'info';
      log[level](
        {
          inFlight: rec.inFlight,
          patched: res.patched.map((p) => ({ ep: p.endpoint.toString(16), slot: p.slot, from: `0x${p.before[1].toString(16)}${p.before[0].toString(16).padStart(8, '0')}`, to: `0x${p.after[1].toString(16)}${p.after[0].toString(16).padStart(8, '0')}` })),
          unchanged: res.unchanged.map((x) => x.toString(16)),
          skipped: rec.skipped,
          tookMs: Number(res.tookMs.toFixed(1)),
        },
        'xHCI endpoint contexts pointed at the oldest TD in flight (the destination fetches them again)',
      );
    } catch (err) {
      rec.error = (err as Error).message;
      // Not an xHCI bus (EHCI walks its schedule again on the destination) or a lookup failed.
      const level = /not an xHCI controller/.test(rec.error) ? 'debug' : 'error';
      log[level]({ err: rec.error, inFlight: rec.inFlight }, 'could not point the xHCI endpoint contexts at the TDs in flight');
    }
  }

  private async handOffVm(vmName: string, tCompleted: number): Promise<void> {
    const entries = [...this.attachments.values()].filter((e) => e.info.vm === vmName && e.att.state !== 'closed');
    await Promise.all(
      entries.map(async (e) => {
        try {
          const info = await e.att.handOff();
          e.detaching = true; // handed off: do not unplug anything
          this.attachments.delete(e.info.id);
          this.emit('handOff', {
            vm: vmName,
            attachment: e.info.id,
            ok: true,
            info,
            sinceCompletedMs: performance.now() - tCompleted,
            switchoverPauseMs: this.vms.get(vmName)?.lastSwitchoverPauseMs,
            xhciRewind: this.vms.get(vmName)?.lastXhciRewind?.get(e.info.id),
          } satisfies HandOffEvent);
        } catch (err) {
          const msg = (err as Error).message;
          if (!(err instanceof HandOffRefusedError)) this.log.error({ vm: vmName, attachment: e.info.id, err: msg }, 'hand-off failed');
          else this.log.warn({ vm: vmName, attachment: e.info.id, err: msg }, 'no hand-off; the attachment stays here');
          this.emit('handOff', { vm: vmName, attachment: e.info.id, ok: false, error: msg } satisfies HandOffEvent);
        }
      }),
    );
  }

  /**
   * Migration destination: plug the same usb-redir (same ids, bus, port) into the destination
   * QEMU (started with `-incoming defer`; call this before `migrate-incoming`), connect its
   * chardev, and stand by on the session at the server. When the source bridge hands the
   * session off, the attachment continues from the source's exact position. If the source is
   * lost instead, the device is disconnected and reconnected in the guest (a clean replug).
   */
  async prepareIncoming(req: PrepareIncomingRequest): Promise<IncomingInfo> {
    const vm = this.vms.get(req.vm);
    if (!vm) throw new Error(`unknown VM ${req.vm}`);
    if (this.attachments.has(req.id) || this.standbys.has(req.id)) throw new Error(`attachment ${req.id} exists already`);
    const vmLog = this.log.child({ vm: req.vm });
    const log = vmLog.child({ attachment: req.id, session: req.sessionId });
    const client = this.clientFor(req.server);
    const qmp = await this.qmpOf(req.vm);
    const st = await qmp.execute<{ status: string }>('query-status');
    if (st.status !== 'inmigrate') throw new Error(`VM ${req.vm} is not waiting for an incoming migration (status ${st.status})`);
    vm.incoming = true;
    await this.watchMigration(req.vm);
    const id = req.id;
    const chardevId = `${id}-chr`;
    const bus = req.bus ?? 'xhci.0';
    const socketPath = this.socketPathFor(req.vm, id);
    await hotplugRedir(qmp, { id, chardevId, socketPath, bus, filter: req.filter, port: req.port });
    let device: RemoteDevice | undefined;
    let socket: import('node:net').Socket | undefined;
    try {
      // Connected before the device state loads (QEMU requires it); not read until take-over.
      socket = await connectChardev(socketPath);
      socket.pause();
      device = await client.standbySession(req.sessionId, { log: vmLog, maxInFlight: 1 << 30 });
    } catch (err) {
      socket?.destroy();
      await unplugRedir(qmp, { id, chardevId }, { timeoutMs: 10_000 }).catch(() => {});
      throw err;
    }
    const dev = device;
    const sock = socket;
    let released = false;
    const release = async () => {
      if (released) return;
      released = true;
      this.standbys.delete(id);
      releaseStandby(dev);
    };
    this.standbys.set(id, { device: dev, release });
    const onSocketGone = () => {
      if (!released) {
        log.info('destination QEMU closed the chardev before the hand-off; standby released');
        void release();
      }
    };
    sock.once('close', onSocketGone);
    log.info({ bus, socketPath }, 'standing by for the session (migration destination)');
    const attached = (async (): Promise<AttachmentInfo> => {
      const t = await dev.takeOver!;
      sock.off('close', onSocketGone);
      this.standbys.delete(id);
      released = true;
      const d = dev.device;
      let att: Attachment;
      if (t.sourceLost || t.state.length === 0) {
        log.warn(
          { lastServerSeq: t.lastServerSeq },
          'the source bridge was lost before handing off: the position in the usbredir streams is unknown and no usbredir parser state migrated; clean replug (closing and reconnecting the chardev, device reset, full usbredir handshake)',
        );
        att = await sourceLostReplug({ device: dev, socket: sock, socketPath, log, id });
      } else {
        att = Attachment.fromHandOff({ device: dev, socket: sock, log, id, state: t.state });
      }
      const entry: Entry = {
        info: {
          id,
          vm: req.vm,
          deviceId: d.id,
          sessionId: dev.sessionId,
          server: client.address,
          bus,
          socketPath,
          hotPlugged: true,
          vendorId: d.vendorId,
          productId: d.productId,
          product: d.product,
          serial: d.serial,
        },
        att,
        device: dev,
        chardevId,
        detaching: false,
      };
      this.attachments.set(id, entry);
      att.on('closed', (ci: AttachmentCloseInfo) => void this.onAttachmentClosed(entry, ci));
      this.observer?.attachmentStarted(att, dev, t.sourceLost || t.state.length === 0 ? 'replug' : 'takeover'); // observe: metrics
      att.start();
      return this.infoOf(entry);
    })();
    attached.catch((err) => log.warn({ err: (err as Error).message }, 'standby ended without a take-over'));
    return { id, vm: req.vm, sessionId: req.sessionId, socketPath, attached };
  }

  /** Drop a standby prepared with prepareIncoming (e.g. the migration was cancelled). */
  async cancelIncoming(vm: string, id: string): Promise<void> {
    const s = this.standbys.get(id);
    if (!s) throw new Error(`no standby ${id}`);
    await s.release();
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
    const client = this.clientFor(req.server);
    const device = await client.openDevice(req.selector, { log: vmLog, maxInFlight: 1 << 30 });
    const d = device.device;
    const ids = redirIds(d.id);
    const id = req.id ?? ids.id;
    if (this.attachments.has(id)) {
      await device.close();
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
      await this.watchMigration(req.vm).catch((err) => log.warn({ err: (err as Error).message }, 'cannot follow migration events of this VM'));
      const socket = await connectChardev(socketPath);
      const att = new Attachment({ device, socket, log, id });
      const entry: Entry = {
        info: {
          id,
          vm: req.vm,
          deviceId: d.id,
          sessionId: device.sessionId,
          server: client.address,
          bus,
          socketPath,
          hotPlugged: !req.coldPlugged,
          vendorId: d.vendorId,
          productId: d.productId,
          product: d.product,
          serial: d.serial,
        },
        att,
        device,
        chardevId,
        detaching: false,
      };
      this.attachments.set(id, entry);
      att.on('closed', (ci: AttachmentCloseInfo) => void this.onAttachmentClosed(entry, ci));
      this.observer?.attachmentStarted(att, device, 'attach'); // observe: metrics
      att.start();
      log.info({ bus, socketPath, session: device.sessionId }, 'device attached to VM');
      return this.infoOf(entry);
    } catch (err) {
      log.warn({ err: (err as Error).message }, 'attach failed');
      if (qmp && !req.coldPlugged) await unplugRedir(qmp, { id, chardevId }, { timeoutMs: 10_000 }).catch(() => {});
      await device.close().catch(() => {});
      throw err;
    }
  }

  private async onAttachmentClosed(e: Entry, ci: AttachmentCloseInfo): Promise<void> {
    if (ci.reason === 'handed off') {
      // The session (and the guest's device) moved to the migration destination.
      e.detaching = true;
      this.attachments.delete(e.info.id);
      return;
    }
    if (e.detaching) return;
    // Closed by itself (device gone, malformed input, QEMU closed the chardev): drop the
    // usb-redir device we hot-plugged so the VM is left clean.
    this.attachments.delete(e.info.id);
    this.log.info({ vm: e.info.vm, attachment: e.info.id, reason: ci.reason }, 'attachment ended');
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
    if (!e || e.info.vm !== vm) throw new Error(`no attachment ${attachmentId} on VM ${vm}`);
    e.detaching = true;
    this.attachments.delete(attachmentId);
    try {
      if (e.info.hotPlugged) {
        const qmp = await this.qmpOf(vm);
        await unplugRedir(qmp, { id: e.info.id, chardevId: e.chardevId });
      } else {
        await e.att.disconnect('detached');
      }
    } finally {
      await e.att.close('detached');
    }
  }

  list(vm?: string): AttachmentInfo[] {
    return [...this.attachments.values()].filter((e) => !vm || e.info.vm === vm).map((e) => this.infoOf(e));
  }

  get(attachmentId: string): Attachment | undefined {
    return this.attachments.get(attachmentId)?.att;
  }

  private infoOf(e: Entry): AttachmentInfo {
    return { ...e.info, state: e.att.state, stats: e.att.stats };
  }

  /** Detach everything, close QMP connections and server channels. */
  async close(): Promise<void> {
    for (const s of [...this.standbys.values()]) await s.release();
    for (const e of [...this.attachments.values()]) {
      await this.detach(e.info.vm, e.info.id).catch((err) => this.log.warn({ attachment: e.info.id, err: (err as Error).message }, 'detach on close failed'));
    }
    for (const vm of this.vms.values()) {
      // Migrations of this VM must not wait for a bridge that is gone.
      if (vm.pausing && vm.qmp?.state === 'ready') {
        await vm.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'pause-before-switchover', state: false }] }, { timeoutMs: 2000 }).catch(() => {});
      }
      vm.pausing = false;
    }
    for (const vm of this.vms.values()) if (vm.ownsQmp) await vm.qmp?.close().catch(() => {});
    for (const c of this.clients.values()) c.close();
    this.clients.clear();
  }
}
