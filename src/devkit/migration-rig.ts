// Live-migration rig for e2e tests and bench:migrate: a USB host server process with a disk,
// guests under QEMU, one Bridge per "host", and a migrate() that runs QEMU's migration from
// the current guest to a fresh destination with the bridge hand-off.
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import { Bridge, type AttachmentInfo, type HandOffEvent, type PrepareIncomingRequest } from '../client/bridge/bridge.js';
import type { Logger } from '../common/log.js';
import { startGuest, type Guest, type GuestImage } from './guest/guest.js';

export const XHCI = ['-device', 'qemu-xhci,id=xhci'];

export interface MigrationResult {
  totalMs: number;
  downtimeMs: number;
  status: string;
  handOff?: HandOffEvent;
  /** ms from migrate to the destination attachment running. */
  attachedMs?: number;
  dst: Guest;
}

export interface Host {
  name: string;
  bridge: Bridge;
}

/** What the migration rig needs of a bridge: the in-process Bridge or one in a child process (BridgeChild.host()). */
export interface HostBridge {
  addVm(spec: { name: string; qmpSocket: string }): void | Promise<unknown>;
  prepareIncoming(req: PrepareIncomingRequest): Promise<{ attached: Promise<AttachmentInfo> }>;
  on(event: 'handOff', fn: (ev: HandOffEvent) => void): unknown;
  off(event: 'handOff', fn: (ev: HandOffEvent) => void): unknown;
}

export interface MigrationHost {
  name: string;
  bridge: HostBridge;
}

let seq = 0;

/**
 * USBROAM_QEMU_TRACE=1: QEMU traces xHCI, USB packet and migration events (with timestamps) to
 * trace-<name>.log in the test dir, and error_report lines get timestamps (usb-redir's debug
 * output: USBROAM_REDIR_DEBUG=4).
 */
function traceArgs(dir: string, name: string): string[] {
  if (process.env.USBROAM_QEMU_TRACE !== '1') return [];
  const events = path.join(dir, 'trace-events');
  writeFileSync(events, [...(process.env.USBROAM_QEMU_TRACE_EVENTS?.split(',') ?? []), 'usb_xhci_xfer_*', 'usb_xhci_ep_*', 'usb_packet_*', 'migration_completion_*', 'vm_state_notify', 'runstate_set', 'savevm_section_start', 'savevm_state_complete_precopy', 'migrate_set_state'].join('\n') + '\n');
  return ['-msg', 'timestamp=on', '-trace', `events=${events}`, '-D', path.join(dir, `trace-${name}.log`)];
}

/** Start a guest whose QMP has a second socket for its bridge. */
export async function startVmGuest(opts: { image: GuestImage; dir: string; name: string; incoming?: boolean; memoryMb?: number }): Promise<{ guest: Guest; bridgeQmp: string }> {
  for (let attempt = 1; ; attempt++) {
    const bridgeQmp = path.join(opts.dir, `bq-${opts.name}-${++seq}.sock`);
    try {
      const guest = await startGuest({
        name: opts.name,
        image: opts.image,
        memoryMb: opts.memoryMb ?? 128,
        extraArgs: [...XHCI, ...traceArgs(opts.dir, opts.name), '-qmp', `unix:${bridgeQmp},server=on,wait=off`, ...(opts.incoming ? ['-incoming', 'defer'] : [])],
      });
      return { guest, bridgeQmp };
    } catch (err) {
      // TCG on a loaded machine: the guest kernel sometimes panics early ("IO-APIC + timer
      // doesn't work"); boot again.
      if (attempt >= 3 || opts.incoming) throw err;
    }
  }
}

/**
 * Migrate `src` (attached through `srcHost`) to a fresh destination QEMU served by `dstHost`.
 * The orchestrator tells the source bridge nothing; the destination bridge gets
 * prepareIncoming before migrate-incoming.
 */
export async function migrateWithHandOff(opts: {
  image: GuestImage;
  dir: string;
  src: Guest;
  srcVm: string;
  srcHost: MigrationHost;
  dstHost: MigrationHost;
  dstVm: string;
  /** The attachment, or several (all on this VM: each is prepared on the destination and handed off). */
  attachment: AttachmentInfo | AttachmentInfo[];
  server: { address: string; ca: string; cert: string; key: string };
  memoryMb?: number;
  cancelAfterMs?: number;
  log?: Logger;
}): Promise<MigrationResult & { attached?: AttachmentInfo; handOffs?: HandOffEvent[]; attachedAll?: AttachmentInfo[] }> {
  const atts = Array.isArray(opts.attachment) ? opts.attachment : [opts.attachment];
  const { guest: dst, bridgeQmp } = await startVmGuest({ image: opts.image, dir: opts.dir, name: opts.dstVm, incoming: true, memoryMb: opts.memoryMb });
  await opts.dstHost.bridge.addVm({ name: opts.dstVm, qmpSocket: bridgeQmp });
  const incs: { attached: Promise<AttachmentInfo> }[] = [];
  for (const a of atts) {
    incs.push(await opts.dstHost.bridge.prepareIncoming({ vm: opts.dstVm, server: opts.server, sessionId: a.sessionId, id: a.id, bus: a.bus }));
  }
  for (const i of incs) i.attached.catch(() => {});
  for (const g of [opts.src, dst]) await g.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
  const uri = `unix:${path.join(dst.dir, 'migrate.sock')}`;
  await dst.qmp.execute('migrate-incoming', { uri });
  const handOffs = atts.map(
    (a) =>
      new Promise<HandOffEvent>((resolve) => {
        const on = (ev: HandOffEvent) => {
          if (ev.attachment !== a.id) return;
          opts.srcHost.bridge.off('handOff', on);
          resolve(ev);
        };
        opts.srcHost.bridge.on('handOff', on);
      }),
  );
  const srcDone = opts.src.events.waitForEvent<{ status: string }>('MIGRATION', (ev) => ['completed', 'failed', 'cancelled'].includes(ev.data.status), { timeoutMs: 300_000 });
  const t0 = Date.now();
  await opts.src.qmp.execute('migrate', { uri });
  if (opts.cancelAfterMs !== undefined) {
    await new Promise((r) => setTimeout(r, opts.cancelAfterMs));
    await opts.src.qmp.execute('migrate_cancel');
  }
  const done = await srcDone;
  const info = await opts.src.qmp.execute<{ status: string; 'total-time'?: number; downtime?: number }>('query-migrate');
  const res: MigrationResult & { attached?: AttachmentInfo; handOffs?: HandOffEvent[]; attachedAll?: AttachmentInfo[] } = { totalMs: info['total-time'] ?? Date.now() - t0, downtimeMs: info.downtime ?? -1, status: done.data.status, dst };
  if (done.data.status === 'completed') {
    res.handOffs = await Promise.all(handOffs);
    res.handOff = res.handOffs[0];
    res.attachedAll = await Promise.all(incs.map((i) => i.attached));
    res.attached = res.attachedAll[0];
    res.attachedMs = Date.now() - t0;
  }
  return res;
}
