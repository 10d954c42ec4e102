// The VM side of a live migration, on a source bridge: follow MIGRATION events on our own QMP
// connection; at 'pre-switchover' (pause-before-switchover) freeze every attachment of the VM
// and point QEMU's xHCI at the bulk TDs in flight (xhci-dequeue.ts), then continue the
// migration; at 'completed' hand every attachment's session to the destination bridge; at
// 'failed' / 'cancelled' let them carry on.
import type { Logger } from '../../../common/log.js';
import type { QmpClient } from '../../../qemu/qmp/client.js';
import type { Attachment } from '../attachment.js';
import { HandOffRefusedError, type HandOffInfo } from './state.js';
import { GdbWriter, locateXhciDevice, rewindXhciDequeues, type XhciDeviceLocation } from './xhci-dequeue.js';
import { rewindXhciStreams, type StreamKick } from './xhci-streams.js';
import { oldestUncompletedControlTd, oldestUncompletedTd } from './xhci-event-ring.js';

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
  xhciRewind?: {
    inFlight: number;
    patched: number;
    unchanged: number;
    /** Of the patched, bulk receiving endpoints (their oldest uncompleted TD, from the event ring). */
    receiving?: number;
    /**
     * A control TD in flight in QEMU that the bridge never saw (its request still in usb-redir's
     * write buffer; found from the event ring, xhci-event-ring.ts) was among the patched.
     */
    unseenControl?: boolean;
    skipped: string[];
    tookMs: number;
    error?: string;
  };
  /**
   * Under libvirt (which continues the migration itself): QEMU's migration status when the freeze
   * and the xHCI rewind were done; 'pre-switchover' means they were done before libvirt continued.
   */
  libvirtStatusAfterFreeze?: string;
}

type XhciRewind = NonNullable<HandOffEvent['xhciRewind']>;

/** An attachment of the VM as the migration sees it. */
export interface MigratingAttachment {
  id: string;
  /** The usb-redir device's bus (`xhci.0`). */
  bus: string;
  att: Attachment;
}

export interface VmMigrationOptions {
  log: Logger;
  /** Directory for the gdbstub socket of the xHCI rewind. */
  runDir: string;
  /** See BridgeOptions.pauseBeforeSwitchover. */
  pauseBeforeSwitchover: boolean;
  switchoverFreezeTimeoutMs: number;
  rewindXhciOnSwitchover: boolean;
  qmpOf(vm: string): Promise<QmpClient>;
  /** The attachments of a VM. */
  attachmentsOf(vm: string): MigratingAttachment[];
  /** An attachment handed its session off: forget it without unplugging anything. */
  handedOff(id: string): void;
  emit(ev: HandOffEvent): void;
}

interface VmState {
  /** MIGRATION events are followed on this VM's QMP connection. */
  watching?: Promise<void>;
  /** This QEMU is a migration destination that has not completed its incoming migration. */
  incoming?: boolean;
  /** We turned pause-before-switchover on in this QEMU (and must continue its migrations). */
  pausing?: boolean;
  /**
   * libvirt runs this QEMU (its monitor chardev 'charmonitor' is there): libvirt turns
   * pause-before-switchover on itself for every outgoing migration and sends migrate-continue at
   * 'pre-switchover' (and fails the migration if that errors, as it would after ours). The bridge
   * then freezes at 'pre-switchover' but leaves the continue to libvirt.
   */
  libvirt?: boolean;
  /** Under libvirt: the migration status when the last freeze was done. */
  lastStatusAfterFreeze?: string;
  /** ms of the last pause at pre-switchover. */
  lastSwitchoverPauseMs?: number;
  /** Per attachment: the xHCI rewind done at the last pre-switchover. */
  lastXhciRewind?: Map<string, XhciRewind>;
}

export class VmMigrations {
  private readonly vms = new Map<string, VmState>();

  constructor(private readonly d: VmMigrationOptions) {}

  private vmState(vmName: string): VmState {
    let s = this.vms.get(vmName);
    if (!s) this.vms.set(vmName, (s = {}));
    return s;
  }

  /** This QEMU waits for an incoming migration: its end hands nothing off. */
  markIncoming(vmName: string): void {
    this.vmState(vmName).incoming = true;
  }

  /** Migrations of this VM must not wait for a bridge that is gone: pause-before-switchover off. */
  async release(vmName: string, qmp: QmpClient | undefined): Promise<void> {
    const vm = this.vms.get(vmName);
    if (!vm) return;
    if (vm.pausing && qmp?.state === 'ready') {
      await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'pause-before-switchover', state: false }] }, { timeoutMs: 2000 }).catch(() => {});
    }
    vm.pausing = false;
  }

  /**
   * Follow live migration of a VM on our own QMP connection (MIGRATION events enabled here):
   * at 'completed' on a source, every connected attachment of the VM hands its session off.
   */
  watch(vmName: string): Promise<void> {
    const vm = this.vmState(vmName);
    if (vm.watching) return vm.watching;
    vm.watching = (async () => {
      const qmp = await this.d.qmpOf(vmName);
      const chardevs = await qmp.execute<{ label: string }[]>('query-chardev').catch(() => []);
      vm.libvirt = chardevs.some((c) => c.label === 'charmonitor');
      if (vm.libvirt) this.d.log.info({ vm: vmName }, 'QEMU run by libvirt: libvirt pauses its migrations before the switchover and continues them; the bridge freezes there without continuing');
      const enable = async () => {
        await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
        if (!this.d.pauseBeforeSwitchover || vm.libvirt) return;
        try {
          await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'pause-before-switchover', state: true }] });
          vm.pausing = true;
        } catch (err) {
          this.d.log.warn({ vm: vmName, err: (err as Error).message }, 'cannot turn pause-before-switchover on: a hand-off may lose what QEMU reads after saving its state');
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
            if (status === 'completed') void enable().catch((err) => this.d.log.warn({ vm: vmName, err: (err as Error).message }, 'cannot set migration capabilities'));
            return;
          }
          if (status === 'completed') void this.handOffVm(vmName, performance.now());
          else {
            this.d.log.info({ vm: vmName, status }, 'migration ended without switchover; attachments carry on');
            for (const e of this.d.attachmentsOf(vmName)) e.att.unfreeze();
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
    const vm = this.vmState(vmName);
    if (vm.incoming) return;
    const t0 = performance.now();
    const entries = this.d.attachmentsOf(vmName).filter((e) => e.att.state !== 'closed');
    // One QMP round trip after the VM stopped: QEMU's main loop has iterated since, so a read
    // armed while the VM ran has happened (see AttachmentHandOff.freeze).
    let barrier: Promise<unknown> | undefined;
    const once = () => (barrier ??= qmp.execute('query-status'));
    // Sent before the xHCI lookups below: QMP runs commands in order, and the freeze waits for
    // this one only, not for them.
    if (entries.length) once().catch(() => {});
    const timeout = new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), this.d.switchoverFreezeTimeoutMs).unref?.());
    // The xHCI lookups (and the gdbstub, if bulk requests are in flight) run while the freeze
    // drains: the rewind after it then costs a read and a write.
    const xhci = new Map<string, Promise<XhciDeviceLocation>>();
    let gdbP: Promise<GdbWriter> | undefined;
    const gdb = () => (gdbP ??= GdbWriter.open(qmp, this.d.runDir));
    if (this.d.rewindXhciOnSwitchover) {
      for (const e of entries) {
        const p = locateXhciDevice(qmp, e.bus.replace(/\.\d+$/, ''), e.id);
        p.catch(() => {});
        xhci.set(e.id, p);
      }
      if (entries.some((e) => e.att.hasBulkInFlight())) gdb().catch(() => {});
    }
    const frozen = Promise.allSettled(entries.map((e) => e.att.freeze({ barrier: once })));
    const r = await Promise.race([frozen, timeout]);
    if (r === 'timeout') this.d.log.error({ vm: vmName }, 'freeze at pre-switchover timed out; continuing the migration');
    else
      r.forEach((x, i) => {
        if (x.status === 'rejected') this.d.log.error({ vm: vmName, attachment: entries[i]!.id, err: (x.reason as Error)?.message }, 'freeze at pre-switchover failed');
      });
    vm.lastXhciRewind = new Map();
    if (r !== 'timeout' && this.d.rewindXhciOnSwitchover) {
      const ok = entries.filter((_, i) => r[i]!.status === 'fulfilled');
      const left = this.d.switchoverFreezeTimeoutMs - (performance.now() - t0);
      const rewound = Promise.allSettled(ok.map((e) => this.rewindXhci(vmName, qmp, e, vm.lastXhciRewind!, xhci.get(e.id), gdb)));
      if ((await Promise.race([rewound, new Promise<'timeout'>((res) => setTimeout(() => res('timeout'), Math.max(left, 500)).unref?.())])) === 'timeout') {
        this.d.log.error({ vm: vmName }, 'xHCI endpoint rewind at pre-switchover timed out; continuing the migration');
      }
    }
    const pauseMs = performance.now() - t0;
    vm.lastSwitchoverPauseMs = pauseMs;
    if (vm.libvirt) {
      const st = await qmp.execute<{ status: string }>('query-migrate').then((x) => x.status, () => 'unknown');
      vm.lastStatusAfterFreeze = st;
      this.d.log.info({ vm: vmName, attachments: entries.length, pauseMs: Number(pauseMs.toFixed(1)), migration: st }, 'attachments frozen at pre-switchover (libvirt continues the migration)');
    } else try {
      await qmp.execute('migrate-continue', { state: 'pre-switchover' });
      this.d.log.info({ vm: vmName, attachments: entries.length, pauseMs: Number(pauseMs.toFixed(1)) }, 'attachments frozen at pre-switchover; migration continued');
    } catch (err) {
      this.d.log.warn({ vm: vmName, err: (err as Error).message }, 'migrate-continue failed (continued by someone else?)');
    }
    if (gdbP) void gdbP.then((g) => g.close()).catch((err: Error) => this.d.log.warn({ vm: vmName, err: err.message }, 'gdbstub for the xHCI rewind failed'));
  }

  /**
   * At 'pre-switchover', after the freeze: point the xHCI endpoint context of each bulk endpoint
   * with TDs in flight at the oldest of them, so the destination fetches them again instead of
   * losing them (QEMU's xHCI does not migrate its transfers; see xhci-dequeue.ts). Never throws.
   */
  private async rewindXhci(
    vmName: string,
    qmp: QmpClient,
    e: MigratingAttachment,
    out: Map<string, NonNullable<HandOffEvent['xhciRewind']>>,
    location: Promise<XhciDeviceLocation> | undefined,
    gdb: () => Promise<GdbWriter>,
  ): Promise<void> {
    const log = this.d.log.child({ vm: vmName, attachment: e.id });
    let eps: ReturnType<Attachment['qemuBulkInFlight']>;
    try {
      eps = e.att.qemuBulkInFlight();
    } catch (err) {
      log.error({ err: (err as Error).message }, 'cannot tell which bulk TDs QEMU has in flight');
      return;
    }
    const rec: NonNullable<HandOffEvent['xhciRewind']> = { inFlight: eps.reduce((a, x) => a + x.ids.length, 0), patched: 0, unchanged: 0, skipped: [], tookMs: 0 };
    // The device's contexts, looked up once (while the VM is paused) for every endpoint below.
    let located = location;
    const locate = () => (located ??= locateXhciDevice(qmp, e.bus.replace(/\.\d+$/, ''), e.id));
    out.set(e.id, rec);
    // Every endpoint with streams, also those with nothing in flight: a Running one aborts the destination.
    const withStreams = eps.filter((x) => x.streams);
    for (const ep of e.att.bulkStreamEndpoints()) if (!withStreams.some((x) => x.endpoint === ep)) withStreams.push({ endpoint: ep, ids: [], streamIds: [], contiguous: true, streams: true });
    const usable = eps.filter((x) => {
      if (x.streams) return false; // below, stream context by stream context
      else if (!x.contiguous) rec.skipped.push(`ep ${x.endpoint.toString(16)}: TDs in flight are not the newest on the endpoint`);
      else return true;
      return false;
    });
    // The control endpoint with nothing in flight that we know of: QEMU may still have a control
    // TD in flight whose request we never got (xhci-event-ring.ts); the event ring tells.
    if (!eps.some((x) => x.endpoint === 0)) {
      try {
        const loc = await locate();
        if (loc.bar !== undefined && loc.capLength !== undefined) {
          const td = await oldestUncompletedControlTd(qmp, { ...loc, bar: loc.bar, capLength: loc.capLength });
          if (td.id !== undefined && td.id !== td.dequeue) {
            usable.push({ endpoint: 0, ids: [td.id], streamIds: [0], contiguous: true, streams: false });
            rec.inFlight += 1;
            rec.unseenControl = true;
            log.warn(
              { td: `0x${td.id.toString(16)}`, dequeue: `0x${td.dequeue.toString(16)}` },
              'a control TD QEMU has in flight whose request we never got (QEMU read a completion after the VM stopped; the request waits in its usb-redir write buffer): rewinding ep0 to it',
            );
          } else if (td.why) log.debug({ why: td.why }, 'ep0: the event ring does not tell the oldest uncompleted control TD');
        }
      } catch (err) {
        rec.skipped.push(`ep 0 (event ring): ${(err as Error).message}`);
      }
    }
    // Bulk streams (UAS): each stream context to its oldest TD in flight, the endpoint Stopped;
    // the destination rings their doorbells (xhci-streams.ts).
    const kicks: StreamKick[] = [];
    for (const x of withStreams) {
      try {
        const loc = await locate();
        const r = await rewindXhciStreams(qmp, { location: loc, endpoint: x.endpoint, ids: x.ids, streamIds: x.streamIds, arrayBase: e.att.xhciStreamArray(x.endpoint), gdb });
        if (r.skipped) rec.skipped.push(`ep ${x.endpoint.toString(16)} (streams): ${r.skipped}`);
        if (r.kick) {
          kicks.push(r.kick);
          rec.patched += r.patched.length;
          rec.unchanged += r.kick.streams.filter((st) => !r.patched.some((p) => p.stream === st)).length;
          log.info(
            { ep: x.endpoint.toString(16), streams: r.kick.streams, patched: r.patched.map((p) => ({ stream: p.stream, from: p.before.map((w) => w.toString(16)), to: p.after.map((w) => w.toString(16)), ...(p.link !== undefined ? { link: p.link.toString(16) } : {}) })) },
            'xHCI stream contexts pointed at the oldest TD in flight (cycle state 0 behind a Link TRB), endpoint stopped (the destination rings their doorbells)',
          );
        }
      } catch (err) {
        rec.skipped.push(`ep ${x.endpoint.toString(16)} (streams): ${(err as Error).message}`);
      }
    }
    e.att.setXhciStreamKicks(kicks);
    // Bulk receiving endpoints: their oldest uncompleted TD from the event ring (xhci-event-ring.ts).
    // QEMU does not count these TDs as in flight (usbredir_fill_already_in_flight skips bulk
    // receiving endpoints) and migrates its buffered data (bufpq): the destination serves a TD it
    // fetches again like a new one, from that buffer or the next buffered_bulk_packet. So the
    // context only has to point at the oldest uncompleted TD; nothing is sent for it. (A
    // completion for its id would find the TD the destination fetched and complete it behind
    // usb-redir's back, leaving pending_async_packet set: QEMU aborts on the next TD.)
    const receiving: { endpoint: number; id: bigint }[] = [];
    for (const endpoint of e.att.bulkReceivingEndpoints()) {
      try {
        const loc = await locate();
        if (loc.bar === undefined || loc.capLength === undefined) continue;
        const td = await oldestUncompletedTd(qmp, { ...loc, bar: loc.bar, capLength: loc.capLength }, endpoint);
        if (td.why) rec.skipped.push(`ep ${endpoint.toString(16)} (bulk receiving): ${td.why}`);
        // At the context's dequeue pointer: fetched at QEMU's last kick (or not written yet), the destination fetches it anyway.
        else if (td.id !== undefined && td.id !== td.dequeue) receiving.push({ endpoint, id: td.id });
      } catch (err) {
        rec.skipped.push(`ep ${endpoint.toString(16)} (bulk receiving): ${(err as Error).message}`);
      }
    }
    rec.inFlight += receiving.length;
    if (!usable.length && !receiving.length) {
      if (rec.skipped.length) log.warn({ skipped: rec.skipped }, 'bulk TDs in flight at the switchover that the destination xHCI may not fetch again');
      return;
    }
    const controllerId = e.bus.replace(/\.\d+$/, '');
    try {
      const res = await rewindXhciDequeues(qmp, {
        controllerId,
        deviceId: e.id,
        endpoints: [...usable.map((x) => ({ endpoint: x.endpoint, oldestId: x.ids[0]!, count: x.ids.length })), ...receiving.map((x) => ({ endpoint: x.endpoint, oldestId: x.id, count: 1 }))],
        runDir: this.d.runDir,
        log,
        location: located,
        gdb,
      });
      rec.receiving = receiving.filter((r) => res.patched.some((p) => p.endpoint === r.endpoint)).length;
      rec.patched += res.patched.length;
      rec.unchanged += res.unchanged.length;
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
    const entries = this.d.attachmentsOf(vmName).filter((e) => e.att.state !== 'closed');
    await Promise.all(
      entries.map(async (e) => {
        try {
          const info = await e.att.handOff();
          this.d.handedOff(e.id);
          this.d.emit({
            vm: vmName,
            attachment: e.id,
            ok: true,
            info,
            sinceCompletedMs: performance.now() - tCompleted,
            switchoverPauseMs: this.vmState(vmName).lastSwitchoverPauseMs,
            xhciRewind: this.vmState(vmName).lastXhciRewind?.get(e.id),
            libvirtStatusAfterFreeze: this.vmState(vmName).lastStatusAfterFreeze,
          } satisfies HandOffEvent);
        } catch (err) {
          const msg = (err as Error).message;
          if (!(err instanceof HandOffRefusedError)) this.d.log.error({ vm: vmName, attachment: e.id, err: msg }, 'hand-off failed');
          else this.d.log.warn({ vm: vmName, attachment: e.id, err: msg }, 'no hand-off; the attachment stays here');
          this.d.emit({ vm: vmName, attachment: e.id, ok: false, error: msg } satisfies HandOffEvent);
        }
      }),
    );
  }
}
