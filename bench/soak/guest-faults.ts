// bench:soak part — the faults a guest sees through the bridge, with checksummed I/O in a real
// QEMU guest: a USB host server (`usbroam serve`, grace period GRACE_MS) behind a TCP proxy, the
// bridge daemon (`usbroam bridge --state-dir`), a guest writing 64 KiB blocks with O_DIRECT +
// fsync to 64 slots (a mark per completed write on /dev/ttyS1, timestamped on the host). Each
// fault runs with a fresh writer, and afterwards every slot whose last write succeeded is read
// back and compared with its checksum (data_lost counts the slots that do not match).
//   guest_cut_5s, guest_cut_20s   blackholes (no reset) shorter than the grace period
//   guest_cut_beyond_grace        connections reset and refused for GRACE_MS + 5 s
//   server_kill_restart           kill -9, restart on the same port 1.5 s later
//   bridge_kill_restart           kill -9, the bridge started again with the same flags
//   qemu_killed                   kill -9 of QEMU: the claim is released, another client claims
// Run alone: npx tsx bench/soak/guest-faults.ts (progress on stderr, the last stdout line is JSON).
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { BridgeControlClient } from '../../src/client/bridge-control/client.js';
import { UsbHostClient } from '../../src/client/sdk/client.js';
import { startBridgeGuest, waitForDisk } from '../../src/devkit/bridge-guest.js';
import { clientTls } from '../../src/devkit/certs.js';
import { ensureGuestImage, type Guest } from '../../src/devkit/guest/guest.js';
import {
  dmesgLineCount,
  faultServerArgs,
  guestView,
  markPortArgs,
  MarkListener,
  nextWriteMark,
  portOf,
  restartServerOnPort,
  startBridgeDaemon,
  type BridgeDaemon,
  type GuestView,
} from '../../src/devkit/guest-faults.js';
import { startSlotWriter, stopSlotWriter, verifySlots } from '../../src/devkit/migration-faults.js';
import { startServerProcess, type ServerProcess } from '../../src/devkit/server-process.js';
import { TcpProxy } from '../../test/helpers/tcp-proxy.js';
import type { FaultOutcome, SoakPart } from './types.js';

const GRACE_MS = Number(process.env.SOAK_GRACE_MS ?? 25_000);
const SERIAL = 'USBROAM-MSC-0001';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function until<T>(what: string, fn: () => Promise<T | undefined | false> | T | undefined | false, timeoutMs: number): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(100);
  }
}

interface Rig {
  dir: string;
  image: string;
  guest: Guest;
  bridgeQmp: string;
  bus: string;
  server: ServerProcess;
  proxy: TcpProxy;
  proxyAddress: string;
  daemon: BridgeDaemon;
  marks: MarkListener;
}

function daemonArgs(r: Pick<Rig, 'dir' | 'bridgeQmp'>): string[] {
  return ['--vm', `vm1=${r.bridgeQmp}`, '--run-dir', path.join(r.dir, 'run'), '--state-dir', path.join(r.dir, 'state'), '--log-level', 'info'];
}

async function attachments(r: Rig): Promise<{ sessionId: string; deviceId: string }[]> {
  const c = new BridgeControlClient({ address: r.daemon.control });
  try {
    return (await c.list('vm1')).map((a) => ({ sessionId: a.sessionId, deviceId: a.device?.id ?? '' }));
  } finally {
    c.close();
  }
}

const round = (v: number) => Math.round(v);

/** One fault: a fresh writer, `inject` (returns when the fault is over), recovery, checks. */
async function underWriter(
  r: Rig,
  inject: () => Promise<{ recovered: number; extra?: Record<string, unknown> }>,
): Promise<{ view: GuestView; t0: number; recoveredAtMs: number; firstWriteAtMs: number; unplugAtMs?: number; badSlots: number; verified: number; extra: Record<string, unknown> }> {
  const g = r.guest;
  await startSlotWriter(g, { marks: true });
  await nextWriteMark(r.marks, performance.now(), 120_000);
  await sleep(1000);
  const d0 = await dmesgLineCount(g);
  const t0 = performance.now();
  const { recovered, extra } = await inject();
  const next = await nextWriteMark(r.marks, recovered, 120_000);
  await nextWriteMark(r.marks, next + 300, 60_000);
  const view = await guestView(g, r.marks, t0, next, d0);
  const err = r.marks.marks.find((m) => m.t > t0 && /^E /.test(m.line));
  await stopSlotWriter(g);
  const v = await verifySlots(g);
  return { view, t0, recoveredAtMs: round(recovered - t0), firstWriteAtMs: round(next - t0), unplugAtMs: err ? round(err.t - t0) : undefined, badSlots: v.bad.length, verified: v.verified, extra: extra ?? {} };
}

function dmesgOf(v: GuestView) {
  return { disconnects: v.dmesg.disconnects, resets: v.dmesg.resets, io_errors: v.dmesg.ioErrors };
}

async function cut(r: Rig, ms: number): Promise<FaultOutcome & { lost: number }> {
  const before = (await attachments(r))[0]?.sessionId;
  const u = await underWriter(r, async () => {
    await r.proxy.blackhole(ms);
    return { recovered: performance.now() };
  });
  const after = (await attachments(r))[0]?.sessionId;
  const v = u.view;
  const ok = v.failedWrites === 0 && v.dmesg.bad.length === 0 && before === after && u.badSlots === 0;
  return {
    ok,
    detail: `${ms / 1000} s blackhole: the guest saw a stall of ${v.stallMs} ms, ${v.failedWrites} failed writes, ${v.dmesg.bad.length} bad kernel lines; ${before === after ? 'the same session resumed' : 'a NEW session'}; ${u.badSlots} corrupt slots of ${u.verified + u.badSlots}`,
    guest_saw: v.failedWrites === 0 && v.dmesg.disconnects === 0 ? 'stall' : 'errors',
    stall_ms: v.stallMs,
    failed_writes: v.failedWrites,
    dmesg: dmesgOf(v),
    same_session: before === after,
    slots_verified: u.verified,
    lost: u.badSlots,
  };
}

async function beyondGrace(r: Rig): Promise<FaultOutcome & { lost: number }> {
  const before = (await attachments(r))[0]!.sessionId;
  const ms = GRACE_MS + 5000;
  const u = await underWriter(r, async () => {
    await r.proxy.outage(ms);
    await until('the re-attached session', async () => (await attachments(r)).find((a) => a.sessionId !== before), 120_000);
    return { recovered: performance.now() };
  });
  const serverLine = r.server.logs.some((l) => l.includes('grace period expired') && l.includes(before));
  const bridgeLine = r.daemon.records.find((x) => x.session === before && /session lost/.test(String(x.msg)));
  const v = u.view;
  const clean = v.dmesg.disconnects > 0 && v.dmesg.resets === 0 && !v.dmesg.bad.some((l) => /error -110/.test(l));
  return {
    ok: clean && u.badSlots === 0 && serverLine && !!bridgeLine,
    detail: `${ms / 1000} s cut (grace ${GRACE_MS / 1000} s): ${clean ? 'a clean unplug' : 'NOT a clean unplug'} at ${u.unplugAtMs ?? '-'} ms, re-attached (replug) at ${u.recoveredAtMs} ms, first write at ${u.firstWriteAtMs} ms; server log ${serverLine ? 'names' : 'does NOT name'} the session and 'grace period expired'; bridge: ${bridgeLine ? `"${bridgeLine.msg}" (${String(bridgeLine.why)})` : 'no line'}; ${u.badSlots} corrupt slots`,
    guest_saw: clean ? 'unplug+replug' : 'errors',
    unplug_at_ms: u.unplugAtMs,
    replug_at_ms: u.recoveredAtMs,
    device_absent_ms: v.stallMs,
    dmesg: dmesgOf(v),
    lost: u.badSlots,
  };
}

async function serverKill(r: Rig): Promise<FaultOutcome & { lost: number }> {
  const before = (await attachments(r))[0]!.sessionId;
  const port = portOf(r.server.address);
  let backAt = 0;
  const u = await underWriter(r, async () => {
    const t = performance.now();
    r.server.child.kill('SIGKILL');
    await r.server.stop();
    await sleep(1500);
    r.server = await restartServerOnPort(port, r.image, GRACE_MS);
    backAt = performance.now() - t;
    await until('the re-attached session', async () => (await attachments(r)).find((a) => a.sessionId !== before), 120_000);
    return { recovered: performance.now() };
  });
  const v = u.view;
  const clean = v.dmesg.resets === 0 && !v.dmesg.bad.some((l) => /error -110/.test(l));
  return {
    ok: clean && u.badSlots === 0,
    detail: `server killed, back after ${round(backAt)} ms: the guest saw a stall then ${v.dmesg.disconnects ? 'a clean unplug' : 'no unplug'} at ${u.unplugAtMs ?? '-'} ms, re-attached (replug) at ${u.recoveredAtMs} ms, first write at ${u.firstWriteAtMs} ms; ${u.badSlots} corrupt slots of ${u.verified + u.badSlots}`,
    guest_saw: v.dmesg.disconnects ? 'stall, unplug+replug' : 'stall',
    server_back_ms: round(backAt),
    unplug_at_ms: u.unplugAtMs,
    replug_at_ms: u.recoveredAtMs,
    no_write_ms: v.stallMs,
    dmesg: dmesgOf(v),
    lost: u.badSlots,
  };
}

async function bridgeKill(r: Rig): Promise<FaultOutcome & { lost: number }> {
  const before = (await attachments(r))[0]!.sessionId;
  let restartedAt = 0;
  const u = await underWriter(r, async () => {
    const t = performance.now();
    await r.daemon.kill('SIGKILL');
    r.daemon = await startBridgeDaemon({ control: r.daemon.control, server: r.proxyAddress, args: daemonArgs(r) });
    restartedAt = performance.now() - t;
    await r.daemon.waitFor((x) => x.msg === 'device re-attached: the guest sees a replug', 60_000, 're-attach');
    return { recovered: performance.now() };
  });
  const v = u.view;
  const oldClosed = r.server.logs.some((l) => l.includes('session closed by admin request') && l.includes(before));
  const clean = v.dmesg.resets === 0 && !v.dmesg.bad.some((l) => /error -110/.test(l));
  return {
    ok: clean && u.badSlots === 0 && oldClosed && u.recoveredAtMs < GRACE_MS,
    detail: `bridge killed, restarted after ${round(restartedAt)} ms: the guest saw a clean unplug at ${u.unplugAtMs ?? '-'} ms, re-attached from the state file (replug) at ${u.recoveredAtMs} ms (grace ${GRACE_MS} ms), first write at ${u.firstWriteAtMs} ms; the dead bridge's session ${oldClosed ? 'was closed' : 'was NOT closed'} by the new one; ${u.badSlots} corrupt slots`,
    guest_saw: 'unplug+replug',
    bridge_restart_ms: round(restartedAt),
    unplug_at_ms: u.unplugAtMs,
    replug_at_ms: u.recoveredAtMs,
    device_absent_ms: v.stallMs,
    dmesg: dmesgOf(v),
    lost: u.badSlots,
  };
}

async function qemuKilled(r: Rig): Promise<FaultOutcome> {
  const [a] = await attachments(r);
  const other = new UsbHostClient({ address: r.server.address.replace('127.0.0.1', 'localhost'), ...clientTls('bridge') });
  try {
    const t0 = performance.now();
    process.kill(r.guest.pid, 'SIGKILL');
    await r.guest.exited;
    await until('the session to end', async () => !(await other.listSessions()).some((s) => s.id === a!.sessionId), GRACE_MS);
    const released = performance.now() - t0;
    const dev = await other.openDevice({ id: a!.deviceId });
    const claimed = performance.now() - t0;
    await dev.close();
    return {
      ok: released < GRACE_MS,
      detail: `QEMU killed: the bridge closed the session, the server released the claim after ${round(released)} ms (grace ${GRACE_MS} ms); another client claimed the device after ${round(claimed)} ms`,
      released_ms: round(released),
      claimed_by_other_ms: round(claimed),
    };
  } finally {
    other.close();
  }
}

export async function run(opts: { durationS: number; progress: (msg: string) => void }): Promise<SoakPart> {
  const p = opts.progress;
  const dir = mkdtempSync(path.join(os.tmpdir(), 'soak-guest-faults-'));
  const faults: Record<string, FaultOutcome> = {};
  let dataLost = 0;
  let errors = 0;
  const rig = { dir, image: path.join(dir, 'disk.img'), marks: new MarkListener() } as Rig;
  try {
    const img = await ensureGuestImage();
    rig.server = await startServerProcess(faultServerArgs(rig.image, GRACE_MS));
    rig.proxy = new TcpProxy('127.0.0.1', portOf(rig.server.address));
    rig.proxyAddress = (await rig.proxy.start()).replace('127.0.0.1', 'localhost');
    const m = markPortArgs(dir, 'soak');
    const bg = await startBridgeGuest({ name: 'soak-faults', image: img, dir, extraArgs: m.args });
    Object.assign(rig, { guest: bg.guest, bridgeQmp: bg.bridgeQmp, bus: bg.bus });
    await rig.marks.connect(m.sock);
    rig.daemon = await startBridgeDaemon({ control: path.join(dir, 'control.sock'), server: rig.proxyAddress, args: daemonArgs(rig) });
    const c = new BridgeControlClient({ address: rig.daemon.control });
    await c.attach({ vm: 'vm1', device: { serial: SERIAL, id: '', vidPid: '', portPath: '' }, bus: rig.bus }).finally(() => c.close());
    await waitForDisk(rig.guest);
    const steps: [string, () => Promise<FaultOutcome & { lost?: number }>][] = [
      ['guest_cut_5s', () => cut(rig, 5000)],
      ['guest_cut_20s', () => cut(rig, 20_000)],
      ['guest_cut_beyond_grace', () => beyondGrace(rig)],
      ['server_kill_restart', () => serverKill(rig)],
      ['bridge_kill_restart', () => bridgeKill(rig)],
      ['qemu_killed', () => qemuKilled(rig)],
    ];
    for (const [name, fn] of steps) {
      p(`${name}...`);
      try {
        const { lost, ...o } = await fn();
        dataLost += lost ?? 0;
        faults[name] = o;
      } catch (err) {
        errors++;
        faults[name] = { ok: false, detail: `failed: ${(err as Error).message}` };
      }
      p(`${name}: ${faults[name]!.ok ? 'ok' : 'FAILED'}: ${faults[name]!.detail}`);
      if (name !== 'qemu_killed' && !faults[name]!.ok && rig.guest.hasExited) break;
    }
  } finally {
    rig.marks.close();
    await rig.daemon?.kill('SIGTERM').catch(() => {});
    await rig.guest?.stop().catch(() => {});
    await rig.proxy?.stop().catch(() => {});
    await rig.server?.stop().catch(() => {});
    rmSync(dir, { recursive: true, force: true });
  }
  return { faults, data_lost: dataLost, errors, guest_faults_grace_ms: GRACE_MS };
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const t0 = Date.now();
  run({ durationS: Number(process.env.SOAK_DURATION_S ?? 60), progress: (m) => process.stderr.write(`[soak:guest-faults] ${m}\n`) })
    .then((r) => {
      process.stderr.write(`[soak:guest-faults] done in ${Math.round((Date.now() - t0) / 1000)} s\n`);
      process.stdout.write(JSON.stringify(r) + '\n');
      process.exit(0);
    })
    .catch((err: Error) => {
      process.stderr.write(`[soak:guest-faults] ${err.stack}\n`);
      process.stdout.write(JSON.stringify({ faults: {}, data_lost: 0, errors: 1, error: err.message }) + '\n');
      process.exit(1);
    });
}
