// npm run bench:e2e — the disk through usbroam vs the same image as a QEMU-local usb-storage.
//
// One QEMU guest (TCG) per USB host controller; a USB host server in its own process with the
// emulated 64 MiB disk; a Bridge in this process. In the guest: dd 32 MiB (bs=1M) from a tmpfs file
// of random data to the disk with O_DIRECT and fsync, drop caches, dd it back with O_DIRECT;
// timed inside the guest (/proc/uptime). The same dd against the same image file attached to the
// same guest as QEMU's own usb-storage on the same bus (blockdev-add + device_add), with
// cache=writeback (QEMU's default; the headline "local") and cache=none. Every round runs each
// target once, the order rotating; a ratio is the median of the per-round ratios (target and
// baseline measured in the same round, minutes never apart), with `_min` / `_max`; a rate is the
// median over the rounds.
//
// The emulated disk's bus speed (--disk-speed): on xHCI the default is SuperSpeed (Linux
// usb-storage sends 1 MiB SCSI commands instead of 120 KiB at high speed: ~8x fewer URB round
// trips per MiB), and "both" (the default) also measures the high-speed disk in the same rounds
// (usbroam_high_*), one USB host server process per speed, the same image file. EHCI is USB 2
// only (a SuperSpeed usb-redir device does not enumerate there): always high speed.
//
//   npm run bench:e2e [-- --bus xhci|ehci] [--rounds N] [--size-mib N] [--no-ehci] [--disk-speed super|high|both] [--no-floor]
//   env: USBROAM_BENCH_BUS, USBROAM_BENCH_ROUNDS, USBROAM_BENCH_SIZE_MIB, USBROAM_BENCH_EHCI=0,
//        USBROAM_BENCH_DISK_SPEED, USBROAM_BENCH_FLOOR=0
//
// Progress goes to stderr; the last stdout line is JSON: usbroam_write_MBps, usbroam_read_MBps
// (the disk at disk_speed), local_write_MBps, local_read_MBps, write_ratio, read_ratio
// (usbroam / local), the cache=none figures (local_direct_*), with "both" the other speed's
// usbroam_<speed>_* figures and ratios, and with the default xHCI bus the same over EHCI (ehci_*).
// On xHCI also the UAS disk (serve --emulated-uas: bulk streams, SuperSpeed) on the same image:
// uas_write_MBps, uas_read_MBps, uas_vs_bot_write / uas_vs_bot_read (vs the headline BOT disk),
// uas_bridge_cpu_ms_per_mib, uas_server_cpu_ms_per_mib and their per-URB figures; with the floor
// also the UAS disk's own floor (floor_uas_*_MBps, uas_write_vs_floor / uas_read_vs_floor).
// Also (unless --no-floor) the "usb-redir floor": the same image behind the bridge's usbredir
// device side in this process with no URB channel (floor_*_MBps, floor_*_ratio vs local, and
// write_vs_floor / read_vs_floor = what the channel costs), at the headline speed and, with
// "both", at high speed too (floor_high_*_MBps, high_vs_floor_write / high_vs_floor_read: the
// 120 KiB-command disk every USB 2 stick is). EHCI: ehci_write_vs_floor / ehci_read_vs_floor.
// The floor's transport bounds (with the floor): the grpc floor is the floor with, per URB, one
// round trip on a raw grpc-js bidi stream to another process (bench/ceilings Ask) carrying the
// URB's bytes (OUT data up, IN data down, 32 B of header each way; no protobuf, no session, no
// device logic), the tls floor the same over raw mutual TLS: what any URB channel on grpc-js (on
// TLS) reaches at most, its own cost zero. grpc_floor_*_MBps, grpc_floor_vs_floor_write / _read
// (the bound of write_vs_floor), vs_grpc_floor_write / _read (usbroam against that bound), the same
// with tls_, and h2_ for one raw node:http2 stream (mutual TLS, no grpc-js), prefixed high_ /
// ehci_ like the rest.
// Where a command's time goes: urb_us_p50_write / _read (a URB's submit-to-completion at the
// device the bridge talks to: the channel and the server, or the in-process device) and
// urb_time_share_write / _read (their sum over the dd's wall time), per target like the CPU figures.
// CPU cost (what survives a busy machine): bridge_cpu_ms_per_mib (this process: the bridge; for
// the floor, the whole in-process device side) and server_cpu_ms_per_mib (the server process,
// /proc/<pid>/stat), each also _write / _read, and bridge_cpu_us_per_urb / server_cpu_us_per_urb
// (per URB completed at the attachment), and *_cpu_sys_share (the kernel's part of it); prefixed
// high_, floor_, floor_high_, ehci_ like the rates. And QEMU's own CPU (all its threads) per MiB,
// qemu_cpu_ms_per_mib_write / _read, and cores_busy_write / _read: the CPU time of QEMU, this
// process and the server over the dd divided by its wall time, for every target (local_ too): on
// 2 cores, a target near 2.0 is CPU-bound, and its rate is what its CPU per MiB allows.
import { closeSync, fsyncSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { tuneGcForBulkTransfers } from '../src/common/gc-tuning.js';
import { Attachment } from '../src/client/bridge/attachment.js';
import { Bridge } from '../src/client/bridge/bridge.js';
import { chainUrbObservers } from '../src/client/bridge/bridge-metrics.js';
import { connectChardev, hotplugRedir, unplugRedir } from '../src/client/bridge/qemu-attach.js';
import { silentLogger } from '../src/common/log.js';
import { EmulatedBackend, parseEmulatedSpeed } from '../src/server/backends/emulated/emulated-backend.js';
import { MassStorageDevice } from '../src/server/backends/emulated/mass-storage.js';
import { UasDevice } from '../src/server/backends/emulated/uas.js';
import { InProcessDevice } from './support/in-process-device.js';
import { startCeilingsPeer, type Asker, type CeilingsPeer } from './ceilings/client.js';
import { UsbHostClient } from '../src/client/sdk/client.js';
import { clientTls } from '../src/devkit/certs.js';
import { startServerProcess, type ServerProcess } from '../src/devkit/server-process.js';
import { HOST_CONTROLLERS, MiB, guestSha256, startBridgeGuest, timedDd, waitForDisk, waitGoneInGuest, type HcName } from '../src/devkit/bridge-guest.js';
import { ensureGuestImage, type Guest, type GuestImage } from '../src/devkit/guest/guest.js';
import { QEMU_BENCH_NEEDS, ensureCommands } from './support/need.js';
import { positiveInt, putRatio, median, rotated } from './support/rounds.js';

// The bridge runs in this process: tune the GC as `usbroam bridge` does.
tuneGcForBulkTransfers();

const { values: flags } = parseArgs({
  options: {
    bus: { type: 'string' },
    rounds: { type: 'string' },
    'size-mib': { type: 'string' },
    'no-ehci': { type: 'boolean' },
    'disk-speed': { type: 'string' },
    'no-floor': { type: 'boolean' },
    help: { type: 'boolean', short: 'h' },
  },
});
if (flags.help) {
  process.stderr.write('usage: npm run bench:e2e [-- --bus xhci|ehci] [--rounds N] [--size-mib N] [--no-ehci] [--disk-speed super|high|both] [--no-floor]\n');
  process.exit(0);
}
const bus = (flags.bus ?? process.env.USBROAM_BENCH_BUS ?? 'xhci').toLowerCase() as HcName;
if (!(bus in HOST_CONTROLLERS)) throw new Error(`--bus must be xhci or ehci, not ${bus}`);
const rounds = positiveInt('rounds', flags.rounds ?? process.env.USBROAM_BENCH_ROUNDS, 5);
const sizeMiB = positiveInt('size-mib', flags['size-mib'] ?? process.env.USBROAM_BENCH_SIZE_MIB, 32);
const withFloor = !flags['no-floor'] && process.env.USBROAM_BENCH_FLOOR !== '0';
const withEhci = bus === 'xhci' && !flags['no-ehci'] && process.env.USBROAM_BENCH_EHCI !== '0';
const DISK_MIB = Math.max(64, sizeMiB * 2);
type DiskSpeed = 'super' | 'high';
const diskSpeedFlag = (flags['disk-speed'] ?? process.env.USBROAM_BENCH_DISK_SPEED ?? 'both').toLowerCase();
if (!['super', 'high', 'both'].includes(diskSpeedFlag)) throw new Error(`--disk-speed must be super, high or both, not ${diskSpeedFlag}`);
/** The disk speeds measured on a bus, the headline one first (USB 2 controllers: high speed only). */
function diskSpeedsFor(hc: HcName): DiskSpeed[] {
  if (hc !== 'xhci') return ['high'];
  if (diskSpeedFlag === 'both') return ['super', 'high'];
  return [diskSpeedFlag as DiskSpeed];
}

const t0 = Date.now();
function progress(line: string): void {
  process.stderr.write(`[${((Date.now() - t0) / 1000).toFixed(1).padStart(6)} s] ${line}\n`);
}
const r2 = (x: number) => Math.round(x * 100) / 100;

/** 'usbroam' is the disk at the bus's headline speed, 'usbroam_<speed>' the others. */
type Target = string;
interface Figures {
  write: number[];
  read: number[];
  /** CPU ms per MiB moved, per round: this process (the bridge) and the server process. */
  bridgeCpuWrite: number[];
  bridgeCpuRead: number[];
  serverCpuWrite: number[];
  serverCpuRead: number[];
  /** CPU µs per URB completed at the attachment, per round (bridge, server), write and read together. */
  bridgeUsPerUrb: number[];
  serverUsPerUrb: number[];
  /** The kernel's (system) share of that CPU, per round, write and read together. */
  bridgeSysShare: number[];
  serverSysShare: number[];
  /** QEMU's CPU ms per MiB (all its threads: TCG vCPU, main loop, I/O), per round. */
  qemuCpuWrite: number[];
  qemuCpuRead: number[];
  /** Cores kept busy over the dd by QEMU + this process + the server (CPU time / wall time), per round. */
  coresWrite: number[];
  coresRead: number[];
  /** Per round: the median time of a URB from submit to completion at the device the Attachment talks to (µs). */
  urbUsWrite: number[];
  urbUsRead: number[];
  /** Per round: the sum of those URB times over the dd's wall time (BOT has one URB in flight: the share of the dd spent waiting on the device side). */
  urbShareWrite: number[];
  urbShareRead: number[];
}
const emptyFigures = (): Figures => ({
  write: [],
  read: [],
  bridgeCpuWrite: [],
  bridgeCpuRead: [],
  serverCpuWrite: [],
  serverCpuRead: [],
  bridgeUsPerUrb: [],
  serverUsPerUrb: [],
  bridgeSysShare: [],
  serverSysShare: [],
  qemuCpuWrite: [],
  qemuCpuRead: [],
  coresWrite: [],
  coresRead: [],
  urbUsWrite: [],
  urbUsRead: [],
  urbShareWrite: [],
  urbShareRead: [],
});

/**
 * URB submit-to-completion times at the RemoteDevice an Attachment talks to (the URB channel and
 * the server for usbroam, the in-process device for the floor): where a command's time goes.
 */
class UrbTimes {
  private times: number[] = [];
  /** µs of one URB. */
  add(us: number): void {
    if (this.times.length < 1_000_000) this.times.push(us);
  }
  /** The times since the last take. */
  take(): number[] {
    const t = this.times;
    this.times = [];
    return t;
  }
}
const urbTimes = new UrbTimes();

/** User+system CPU of this process, in ms. */
function selfCpuMs(): number {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1000;
}
/** System CPU of this process, in ms. */
function selfSysMs(): number {
  return process.cpuUsage().system / 1000;
}
const CLK_TCK = 100; // Linux's USER_HZ for /proc/<pid>/stat on every architecture Node runs on
/** User+system CPU of another process, in ms (from /proc/<pid>/stat; 10 ms resolution). */
function pidCpuMs(pid: number | undefined, sysOnly = false): number {
  if (pid === undefined) return 0;
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (((sysOnly ? 0 : Number(f[11])) + Number(f[12])) * 1000) / CLK_TCK; // fields 14 utime, 15 stime
}

/** A plugged target: how to unplug it, and (for the CPU figures) its URB count and server process. */
interface Plugged {
  unplug: () => Promise<void>;
  urbs: () => number;
  serverPid?: number;
}

/**
 * The usb-redir floor: the same disk image behind the bridge's Attachment in this process, with
 * no URB channel (bench/support/in-process-device.ts): what usb-redir costs by itself. `uas`:
 * the UAS disk (bulk streams, SuperSpeed) instead of the BOT one.
 */
async function plugFloor(g: Guest, bus: string, speed: DiskSpeed, diskPath: string, dir: string, n: number, uas = false, hop?: Asker): Promise<Plugged> {
  const backend = new EmulatedBackend();
  const Disk = uas ? UasDevice : MassStorageDevice;
  const disk = await Disk.create({ bus: 9, portPath: [n], speed: parseEmulatedSpeed(uas ? 'super' : speed), imagePath: diskPath, serial: 'USBROAM-FLOOR-0001' });
  backend.add(disk);
  const handle = await backend.open(disk.info.id);
  const ids = { id: `bench-floor${n}`, chardevId: `bench-floor${n}-chr` };
  const socketPath = path.join(dir, `floor${n}.sock`);
  await hotplugRedir(g.qmp, { ...ids, socketPath, bus });
  const dev = new InProcessDevice(handle);
  const submit = dev.submit.bind(dev);
  dev.submit = async (req) => {
    const t = performance.now();
    const c = await submit(req);
    // The grpc / h2 / tls floors: one raw round trip per URB carrying its bytes, the OUT data up and
    // the IN data down (with a URB header's worth each way): what any channel on that transport pays.
    if (hop) await hop.ask(URB_HEADER_BYTES + (req.endpoint & 0x80 ? 0 : (req.data?.length ?? 0)), URB_HEADER_BYTES + (req.endpoint & 0x80 ? c.data.length : 0));
    urbTimes.add((performance.now() - t) * 1000);
    return c;
  };
  const att = new Attachment({ device: dev.asRemoteDevice(), socket: await connectChardev(socketPath), log: silentLogger, id: ids.id }).start();
  await waitForDisk(g);
  const unplug = async () => {
    await unplugRedir(g.qmp, ids);
    await att.close('bench target done');
    await backend.close();
    await waitGoneInGuest(g, '/sys/block/sda');
  };
  return { unplug, urbs: () => att.stats.urbsCompleted, serverPid: hop ? ceilingsPeer?.pid : undefined };
}

/** The transport floors' URB header each way (about what a URB frame adds to its data). */
const URB_HEADER_BYTES = 32;
/** The raw grpc-js, node:http2 and TLS peer (bench/ceilings) the transport floors carry every URB to and back. */
let ceilingsPeer: CeilingsPeer | undefined;

async function benchBus(hc: HcName, image: GuestImage, servers: Record<DiskSpeed, ServerProcess>, diskPath: string, dir: string, uasServer?: ServerProcess): Promise<Record<Target, Figures>> {
  const H = HOST_CONTROLLERS[hc];
  const speeds = diskSpeedsFor(hc);
  const usbroamTargets = new Map<Target, DiskSpeed>(speeds.map((sp, i) => [i === 0 ? 'usbroam' : `usbroam_${sp}`, sp]));
  const serverOpts = (sp: DiskSpeed) => ({ address: servers[sp].address.replace('127.0.0.1', 'localhost'), ...clientTls('bridge') });
  progress(`${H.name}: booting the guest`);
  const { guest, bridgeQmp } = await startBridgeGuest({ name: `bench-${hc}`, image, dir, hc, memoryMb: 256, log: (l) => progress(l.trim()) });
  const bridge = new Bridge({ runDir: path.join(dir, `bridge-${hc}`) });
  bridge.addVm({ name: 'vm', qmpSocket: bridgeQmp });
  bridge.observer = {
    attachmentStarted: (_att, device) => {
      device.urbObserver = chainUrbObservers(device.urbObserver, { submitted: () => {}, completed: (_s, _c, seconds) => urbTimes.add(seconds * 1e6) });
    },
  };
  const g: Guest = guest;
  // The floor at each measured speed: 'usbredir_floor' at the headline speed, 'usbredir_floor_<speed>' the others.
  const floorTargets = new Map<Target, DiskSpeed>(withFloor ? speeds.map((sp, i) => [i === 0 ? 'usbredir_floor' : `usbredir_floor_${sp}`, sp]) : []);
  // The transport floors at each speed ('grpc_floor', 'grpc_floor_<speed>', 'h2_floor', ...,
  // 'tls_floor', ...): the floor with one raw grpc-js, node:http2 or mutual-TLS round trip per URB.
  const hopFloorTargets = new Map<Target, { speed: DiskSpeed; hop: 'grpc' | 'h2' | 'tls' }>(
    withFloor ? (['grpc', 'h2', 'tls'] as const).flatMap((hop) => speeds.map((sp, i) => [i === 0 ? `${hop}_floor` : `${hop}_floor_${sp}`, { speed: sp, hop }] as const)) : [],
  );
  // 'uas': the UAS disk (bulk streams, SuperSpeed; xHCI only) on the same image, beside the BOT disk.
  const withUas = hc === 'xhci' && uasServer !== undefined;
  // 'usbredir_floor_uas': the UAS disk behind the in-process device side (the floor of 'uas').
  const targets: Target[] = [...usbroamTargets.keys(), ...(withUas ? ['uas'] : []), 'local', 'local_direct', ...floorTargets.keys(), ...hopFloorTargets.keys(), ...(withUas && withFloor ? ['usbredir_floor_uas'] : [])];
  const out: Record<Target, Figures> = Object.fromEntries(targets.map((t) => [t, emptyFigures()]));
  let localSeq = 0;
  try {
    await g.sh(`dd if=/dev/urandom of=/tmp/x bs=1M count=${sizeMiB} 2>/dev/null`, { timeoutMs: 120_000 });
    const want = await guestSha256(g, 'cat /tmp/x');

    const plug = async (t: Target, round: number): Promise<Plugged> => {
      const sp = usbroamTargets.get(t);
      if (sp || t === 'uas') {
        const server = sp ? servers[sp] : uasServer!;
        const opts = { address: server.address.replace('127.0.0.1', 'localhost'), ...clientTls('bridge') };
        const info = await bridge.attach({ vm: 'vm', server: opts, selector: { serial: sp ? 'USBROAM-MSC-0001' : 'USBROAM-UAS-0001' }, bus: H.bus });
        await waitForDisk(g);
        const kb = (await g.sh('cat /sys/block/sda/queue/max_sectors_kb')).trim();
        if (round === 0) progress(`${H.name} ${t}: disk at ${sp ?? 'super (UAS)'} speed, guest max_sectors_kb ${kb}`);
        const unplug = async () => {
          await bridge.detach('vm', info.id);
          await waitGoneInGuest(g, '/sys/block/sda');
        };
        return { unplug, urbs: () => bridge.list('vm').find((a) => a.id === info.id)?.stats.urbsCompleted ?? 0, serverPid: server.child.pid };
      }
      if (t === 'usbredir_floor_uas') return plugFloor(g, H.bus, 'super', diskPath, dir, ++localSeq, true);
      const hopFloor = hopFloorTargets.get(t);
      if (hopFloor) {
        const asker = hopFloor.hop === 'grpc' ? ceilingsPeer!.asker() : hopFloor.hop === 'h2' ? await ceilingsPeer!.h2Asker() : await ceilingsPeer!.tlsAsker();
        const p = await plugFloor(g, H.bus, hopFloor.speed, diskPath, dir, ++localSeq, false, asker);
        return { ...p, unplug: () => p.unplug().finally(() => asker.close()) };
      }
      const floorSpeed = floorTargets.get(t);
      if (floorSpeed) return plugFloor(g, H.bus, floorSpeed, diskPath, dir, ++localSeq);
      const n = ++localSeq;
      const node = `bench-local${n}`;
      const id = `bench-usb${n}`;
      const direct = t === 'local_direct';
      await g.qmp.execute('blockdev-add', {
        driver: 'raw',
        'node-name': node,
        cache: { direct, 'no-flush': false },
        file: { driver: 'file', filename: diskPath, aio: 'threads', cache: { direct, 'no-flush': false } },
      });
      await g.qmp.execute('device_add', { driver: 'usb-storage', id, drive: node, bus: H.bus, serial: `LOCAL${n}` });
      await waitForDisk(g);
      const unplug = async () => {
        const gone = g.qmp.waitForEvent<{ device?: string }>('DEVICE_DELETED', (ev) => ev.data?.device === id, { timeoutMs: 60_000 });
        await g.qmp.execute('device_del', { id });
        await gone;
        await g.qmp.execute('blockdev-del', { 'node-name': node });
        await waitGoneInGuest(g, '/sys/block/sda');
      };
      return { unplug, urbs: () => 0 };
    };

    for (let r = 0; r < rounds; r++) {
      const order = rotated(targets, r);
      for (const t of order) {
        const plugged = await plug(t, r);
        try {
          // CPU of this process (the bridge, or the floor's device side), of the server and of QEMU over each dd.
          const sample = () => [selfCpuMs(), pidCpuMs(plugged.serverPid), plugged.urbs(), selfSysMs(), pidCpuMs(plugged.serverPid, true), pidCpuMs(g.pid), performance.now()] as const;
          urbTimes.take();
          const cpu0 = sample();
          const w = await timedDd(g, `dd if=/tmp/x of=/dev/sda bs=1M oflag=direct conv=fsync`, sizeMiB * MiB);
          const cpu1 = sample();
          const wUrbs = urbTimes.take();
          await g.sh('sync; echo 3 > /proc/sys/vm/drop_caches');
          urbTimes.take();
          const cpu2 = sample();
          const rd = await timedDd(g, `dd if=/dev/sda of=/tmp/y bs=1M count=${sizeMiB} iflag=direct`, sizeMiB * MiB);
          const cpu3 = sample();
          const rUrbs = urbTimes.take();
          const f = out[t]!;
          const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0);
          if (wUrbs.length) {
            f.urbUsWrite.push(median(wUrbs));
            f.urbShareWrite.push(sum(wUrbs) / 1000 / (cpu1[6] - cpu0[6]));
          }
          if (rUrbs.length) {
            f.urbUsRead.push(median(rUrbs));
            f.urbShareRead.push(sum(rUrbs) / 1000 / (cpu3[6] - cpu2[6]));
          }
          f.qemuCpuWrite.push((cpu1[5] - cpu0[5]) / sizeMiB);
          f.qemuCpuRead.push((cpu3[5] - cpu2[5]) / sizeMiB);
          const cores = (a: typeof cpu0, b: typeof cpu0) => (b[0] - a[0] + b[1] - a[1] + b[5] - a[5]) / (b[6] - a[6]);
          f.coresWrite.push(cores(cpu0, cpu1));
          f.coresRead.push(cores(cpu2, cpu3));
          f.bridgeCpuWrite.push((cpu1[0] - cpu0[0]) / sizeMiB);
          f.bridgeCpuRead.push((cpu3[0] - cpu2[0]) / sizeMiB);
          if (plugged.serverPid !== undefined) {
            f.serverCpuWrite.push((cpu1[1] - cpu0[1]) / sizeMiB);
            f.serverCpuRead.push((cpu3[1] - cpu2[1]) / sizeMiB);
          }
          const span = (k: 0 | 1 | 3 | 4) => cpu1[k] - cpu0[k] + cpu3[k] - cpu2[k];
          if (span(0) > 0) f.bridgeSysShare.push(span(3) / span(0));
          if (plugged.serverPid !== undefined && span(1) > 0) f.serverSysShare.push(span(4) / span(1));
          const urbs = cpu1[2] - cpu0[2] + cpu3[2] - cpu2[2];
          if (urbs > 0) {
            f.bridgeUsPerUrb.push((1000 * (cpu1[0] - cpu0[0] + cpu3[0] - cpu2[0])) / urbs);
            if (plugged.serverPid !== undefined) f.serverUsPerUrb.push((1000 * (cpu1[1] - cpu0[1] + cpu3[1] - cpu2[1])) / urbs);
          }
          const got = await guestSha256(g, 'cat /tmp/y');
          await g.sh('rm -f /tmp/y');
          if (got !== want) throw new Error(`${H.name} ${t}: read back ${got}, wrote ${want}`);
          f.write.push(w);
          f.read.push(rd);
          const cpuNote = `cpu ms/MiB bridge ${f.bridgeCpuWrite.at(-1)!.toFixed(1)}/${f.bridgeCpuRead.at(-1)!.toFixed(1)}` + (plugged.serverPid !== undefined ? ` server ${f.serverCpuWrite.at(-1)!.toFixed(1)}/${f.serverCpuRead.at(-1)!.toFixed(1)}` : '');
          progress(`${H.name} round ${r + 1}/${rounds} ${t.padEnd(20)} write ${w.toFixed(1).padStart(5)} MB/s  read ${rd.toFixed(1).padStart(5)} MB/s  ${cpuNote}`);
        } finally {
          await plugged.unplug();
          // Leave no dirty host page cache of the image for the next target's fsyncs to pay for.
          const fd = openSync(diskPath, 'r+');
          fsyncSync(fd);
          closeSync(fd);
        }
      }
    }
  } finally {
    await bridge.close().catch(() => {});
    await g.stop();
  }
  return out;
}

async function main(): Promise<void> {
  ensureCommands(QEMU_BENCH_NEEDS, progress);
  progress(`guest image (built and cached on first use)`);
  const image = await ensureGuestImage({ log: (l) => progress(l) });
  const dir = mkdtempSync(path.join(os.tmpdir(), 'ube-'));
  const diskPath = path.join(dir, 'disk.img');
  // One USB host server process per disk speed, started one after the other (the first creates
  // the image), all on the same image file; only one of them has the disk attached at a time.
  const speeds = [...new Set([...diskSpeedsFor(bus), ...(withEhci ? diskSpeedsFor('ehci') : [])])];
  const servers: Partial<Record<DiskSpeed | 'uas', ServerProcess>> = {};
  try {
    if (withFloor) {
      ceilingsPeer = await startCeilingsPeer();
      progress(`raw grpc-js / node:http2 / TLS peer for the transport floors (bench/ceilings, own process ${ceilingsPeer.pid})`);
    }
    for (const sp of speeds) {
      const server = await startServerProcess(['--allow', 'bridge=*', '--disk-image', diskPath, '--disk-size-mib', String(DISK_MIB), '--disk-speed', sp]);
      servers[sp] = server;
      progress(`USB host server (own process) on ${server.address}, disk at ${sp} speed, image ${diskPath} (${DISK_MIB} MiB)`);
      const c = new UsbHostClient({ address: server.address.replace('127.0.0.1', 'localhost'), ...clientTls('bridge') });
      const msc = (await c.listDevices()).find((d) => d.serial === 'USBROAM-MSC-0001');
      c.close();
      if (!msc) throw new Error('the server does not serve the emulated disk');
    }

    const result: Record<string, unknown> = { bus, rounds, size_mib: sizeMiB, bs: '1M', disk_speed: diskSpeedsFor(bus)[0] };
    if (withEhci) result.ehci_disk_speed = diskSpeedsFor('ehci')[0];
    const add = (prefix: string, f: Record<Target, Figures>, hc: HcName) => {
      const m = (t: Target, k: keyof Figures) => median(f[t]![k]);
      // Every target ran once per round: a ratio pairs the two targets' figures of the same round.
      const ratio = (name: string, t: Target, base: Target, k: keyof Figures) => putRatio(result, `${prefix}${name}`, f[t]![k], f[base]![k]);
      result[`${prefix}usbroam_write_MBps`] = r2(m('usbroam', 'write'));
      result[`${prefix}usbroam_read_MBps`] = r2(m('usbroam', 'read'));
      result[`${prefix}local_write_MBps`] = r2(m('local', 'write'));
      result[`${prefix}local_read_MBps`] = r2(m('local', 'read'));
      ratio('write_ratio', 'usbroam', 'local', 'write');
      ratio('read_ratio', 'usbroam', 'local', 'read');
      result[`${prefix}local_direct_write_MBps`] = r2(m('local_direct', 'write'));
      result[`${prefix}local_direct_read_MBps`] = r2(m('local_direct', 'read'));
      ratio('write_ratio_vs_direct', 'usbroam', 'local_direct', 'write');
      ratio('read_ratio_vs_direct', 'usbroam', 'local_direct', 'read');
      if (f['uas']) {
        // The UAS disk next to the BOT disk at SuperSpeed (the headline 'usbroam' target on xHCI).
        result[`${prefix}uas_write_MBps`] = r2(m('uas', 'write'));
        result[`${prefix}uas_read_MBps`] = r2(m('uas', 'read'));
        ratio('uas_vs_bot_write', 'uas', 'usbroam', 'write');
        ratio('uas_vs_bot_read', 'uas', 'usbroam', 'read');
      }
      if (f['uas'] && f['usbredir_floor_uas']) {
        // UAS against its own floor: with several commands in flight the channel's latency overlaps.
        result[`${prefix}floor_uas_write_MBps`] = r2(m('usbredir_floor_uas', 'write'));
        result[`${prefix}floor_uas_read_MBps`] = r2(m('usbredir_floor_uas', 'read'));
        ratio('uas_write_vs_floor', 'uas', 'usbredir_floor_uas', 'write');
        ratio('uas_read_vs_floor', 'uas', 'usbredir_floor_uas', 'read');
      }
      for (const t of Object.keys(f).filter((x) => x.startsWith('usbroam_'))) {
        result[`${prefix}${t}_write_MBps`] = r2(m(t, 'write'));
        result[`${prefix}${t}_read_MBps`] = r2(m(t, 'read'));
        ratio(`${t}_write_ratio`, t, 'local', 'write');
        ratio(`${t}_read_ratio`, t, 'local', 'read');
      }
      if (f['usbredir_floor']) {
        // QEMU's usb-redir with a zero-cost peer: the most any usb-redir based path can reach here.
        result[`${prefix}floor_write_MBps`] = r2(m('usbredir_floor', 'write'));
        result[`${prefix}floor_read_MBps`] = r2(m('usbredir_floor', 'read'));
        ratio('floor_write_ratio', 'usbredir_floor', 'local', 'write');
        ratio('floor_read_ratio', 'usbredir_floor', 'local', 'read');
        ratio('write_vs_floor', 'usbroam', 'usbredir_floor', 'write');
        ratio('read_vs_floor', 'usbroam', 'usbredir_floor', 'read');
        // The high-speed disk against the high-speed floor (on xHCI with "both"; else the headline disk is that one).
        // (On EHCI the headline disk is the high-speed one: ehci_write_vs_floor says it.)
        const [usbroamHigh, floorHigh] = hc !== 'xhci' ? [] : f['usbredir_floor_high'] ? ['usbroam_high', 'usbredir_floor_high'] : diskSpeedsFor(hc)[0] === 'high' ? ['usbroam', 'usbredir_floor'] : [];
        if (usbroamHigh && floorHigh) {
          if (floorHigh !== 'usbredir_floor') {
            result[`${prefix}floor_high_write_MBps`] = r2(m(floorHigh, 'write'));
            result[`${prefix}floor_high_read_MBps`] = r2(m(floorHigh, 'read'));
          }
          ratio('high_vs_floor_write', usbroamHigh, floorHigh, 'write');
          ratio('high_vs_floor_read', usbroamHigh, floorHigh, 'read');
        }
      }
      // The grpc floor: the most a channel on grpc-js could reach against the floor (its own cost
      // zero), and how near usbroam comes to it; at each speed.
      // The tls floor the same with raw mutual TLS: the most any channel over TLS could reach here;
      // the h2 floor on raw node:http2 (what a gRPC channel without grpc-js would still pay).
      for (const hop of ['grpc', 'h2', 'tls']) {
        const pairs: [Target, Target, Target, string][] = [[`${hop}_floor`, 'usbredir_floor', 'usbroam', '']];
        if (f[`${hop}_floor_high`]) pairs.push([`${hop}_floor_high`, 'usbredir_floor_high', 'usbroam_high', 'high_']);
        else if (hc === 'xhci' && diskSpeedsFor(hc)[0] === 'high') pairs.push([`${hop}_floor`, 'usbredir_floor', 'usbroam', 'high_']);
        for (const [hf, fl, us, name] of pairs) {
          if (!f[hf] || !f[fl] || !f[us]) continue;
          result[`${prefix}${name}${hop}_floor_write_MBps`] = r2(m(hf, 'write'));
          result[`${prefix}${name}${hop}_floor_read_MBps`] = r2(m(hf, 'read'));
          ratio(`${name}${hop}_floor_vs_floor_write`, hf, fl, 'write');
          ratio(`${name}${hop}_floor_vs_floor_read`, hf, fl, 'read');
          ratio(`${name}vs_${hop}_floor_write`, us, hf, 'write');
          ratio(`${name}vs_${hop}_floor_read`, us, hf, 'read');
        }
      }
      // CPU per MiB and per URB: the bridge (this process) and the server, usbroam targets and the floor.
      const r1 = (x: number) => (Number.isFinite(x) ? Math.round(x * 10) / 10 : null);
      for (const [t, name] of Object.entries({ usbroam: '', usbroam_high: 'high_', uas: 'uas_', usbredir_floor: 'floor_', usbredir_floor_high: 'floor_high_', usbredir_floor_uas: 'floor_uas_', grpc_floor: 'grpc_floor_', grpc_floor_high: 'grpc_floor_high_', h2_floor: 'h2_floor_', h2_floor_high: 'h2_floor_high_', tls_floor: 'tls_floor_', tls_floor_high: 'tls_floor_high_' })) {
        const fig = f[t];
        if (!fig) continue;
        const both = (a: number[], b: number[]) => median(a.map((x, i) => (x + b[i]!) / 2));
        result[`${prefix}${name}bridge_cpu_ms_per_mib`] = r1(both(fig.bridgeCpuWrite, fig.bridgeCpuRead));
        result[`${prefix}${name}bridge_cpu_ms_per_mib_write`] = r1(median(fig.bridgeCpuWrite));
        result[`${prefix}${name}bridge_cpu_ms_per_mib_read`] = r1(median(fig.bridgeCpuRead));
        result[`${prefix}${name}bridge_cpu_us_per_urb`] = r1(median(fig.bridgeUsPerUrb));
        result[`${prefix}${name}bridge_cpu_sys_share`] = r2(median(fig.bridgeSysShare));
        if (fig.urbUsWrite.length) {
          result[`${prefix}${name}urb_us_p50_write`] = r1(median(fig.urbUsWrite));
          result[`${prefix}${name}urb_us_p50_read`] = r1(median(fig.urbUsRead));
          result[`${prefix}${name}urb_time_share_write`] = r2(median(fig.urbShareWrite));
          result[`${prefix}${name}urb_time_share_read`] = r2(median(fig.urbShareRead));
        }
        if (!fig.serverCpuWrite.length) continue;
        result[`${prefix}${name}server_cpu_ms_per_mib`] = r1(both(fig.serverCpuWrite, fig.serverCpuRead));
        result[`${prefix}${name}server_cpu_ms_per_mib_write`] = r1(median(fig.serverCpuWrite));
        result[`${prefix}${name}server_cpu_ms_per_mib_read`] = r1(median(fig.serverCpuRead));
        result[`${prefix}${name}server_cpu_us_per_urb`] = r1(median(fig.serverUsPerUrb));
        result[`${prefix}${name}server_cpu_sys_share`] = r2(median(fig.serverSysShare));
      }
      // QEMU's CPU and the cores all three kept busy: where 2 cores are the limit, a path that costs
      // more CPU per MiB than the floor cannot reach the floor's rate (README, Performance).
      for (const [t, name] of Object.entries({ usbroam: '', usbroam_high: 'high_', uas: 'uas_', local: 'local_', usbredir_floor: 'floor_', usbredir_floor_high: 'floor_high_', usbredir_floor_uas: 'floor_uas_', grpc_floor: 'grpc_floor_', grpc_floor_high: 'grpc_floor_high_', h2_floor: 'h2_floor_', h2_floor_high: 'h2_floor_high_', tls_floor: 'tls_floor_', tls_floor_high: 'tls_floor_high_' })) {
        const fig = f[t];
        if (!fig?.qemuCpuWrite.length) continue;
        result[`${prefix}${name}qemu_cpu_ms_per_mib_write`] = r1(median(fig.qemuCpuWrite));
        result[`${prefix}${name}qemu_cpu_ms_per_mib_read`] = r1(median(fig.qemuCpuRead));
        result[`${prefix}${name}cores_busy_write`] = r2(median(fig.coresWrite));
        result[`${prefix}${name}cores_busy_read`] = r2(median(fig.coresRead));
      }
      result[`${prefix}samples`] = Object.fromEntries(Object.entries(f).map(([t, v]) => [t, { write: v.write.map(r2), read: v.read.map(r2) }]));
    };
    let uasServer: ServerProcess | undefined;
    if (bus === 'xhci') {
      // Its own process: the UAS disk on the same image (its BOT disk on a scratch image, unused).
      uasServer = await startServerProcess(['--allow', 'bridge=*', '--disk-image', path.join(dir, 'unused-msc.img'), '--disk-size-mib', '1', '--emulated-uas', diskPath]);
      servers.uas = uasServer;
      progress(`USB host server (own process) on ${uasServer.address}, UAS disk at super speed, image ${diskPath}`);
    }
    const all = servers as Record<DiskSpeed, ServerProcess>;
    add('', await benchBus(bus, image, all, diskPath, dir, uasServer), bus);
    if (withEhci) add('ehci_', await benchBus('ehci', image, all, diskPath, dir), 'ehci');
    result.elapsed_s = Math.round((Date.now() - t0) / 1000);
    console.log(JSON.stringify(result));
  } finally {
    for (const s of Object.values(servers)) await s.stop();
    await ceilingsPeer?.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

main().then(
  () => process.exit(0),
  (err) => {
    process.stderr.write(`bench:e2e failed: ${(err as Error).stack ?? err}\n`);
    process.exit(1);
  },
);
