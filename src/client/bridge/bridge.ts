// Bridge: attachments of remote USB devices to QEMU VMs. For each VM it knows a QMP socket (or
// an already connected QmpClient). attach() opens a URB channel session to the device, hot-plugs
// a usb-redir device (or serves a cold-plugged one), and runs an Attachment; detach() unplugs
// it and closes the session. Methods are shaped for the gRPC control API and CLI to come.
import { mkdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { silentLogger, type Logger } from '../../common/log.js';
import { QmpClient } from '../../qemu/qmp/client.js';
import { UsbHostClient, type DeviceSelector } from '../sdk/client.js';
import type { ConnectionOptions } from '../sdk/credentials.js';
import type { RemoteDevice } from '../sdk/remote-device.js';
import { Attachment, type AttachmentCloseInfo, type AttachmentStats } from './attachment.js';
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
}

export interface BridgeOptions {
  log?: Logger;
  /** Directory for the chardev sockets. Default `$TMPDIR/usbroam-bridge-<pid>`. */
  runDir?: string;
}

export class Bridge {
  private readonly log: Logger;
  readonly runDir: string;
  private readonly vms = new Map<string, Vm>();
  private readonly attachments = new Map<string, Entry>();
  private readonly clients = new Map<string, UsbHostClient>();

  constructor(opts: BridgeOptions = {}) {
    this.log = opts.log ?? silentLogger;
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
    for (const e of [...this.attachments.values()]) {
      await this.detach(e.info.vm, e.info.id).catch((err) => this.log.warn({ attachment: e.info.id, err: (err as Error).message }, 'detach on close failed'));
    }
    for (const vm of this.vms.values()) if (vm.ownsQmp) await vm.qmp?.close().catch(() => {});
    for (const c of this.clients.values()) c.close();
    this.clients.clear();
  }
}
