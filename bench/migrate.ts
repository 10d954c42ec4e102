// bench:migrate — N live migrations (A -> B -> A ...) under guest I/O, with the bridge hand-off,
// and the same scenario with a usbredir peer that does no hand-off (baseline).
//
//   npm run bench:migrate [-- --migrations 20 --baseline 20 --settle-ms 2000]
//   env: USBROAM_BENCH_MIGRATIONS, USBROAM_BENCH_BASELINE (0 skips the baseline)
//
// Per migration: QEMU's downtime (query-migrate on the source after completion), the longest
// I/O stall the guest saw (a guest writer does 64 KiB O_DIRECT+fsync writes in a loop and prints
// a mark on a second serial port after each completed one; the host timestamps the marks, so
// the stall is in host time and includes the downtime: the guest's clock stops with the VM),
// and the difference. Guest dmesg is read (and cleared) after each migration: disconnects,
// resets, I/O errors. At the end every slot the writer saw written is verified (data errors).
//
// Baseline ("no hand-off"): the bridges get a QMP connection that never delivers MIGRATION
// events, so the source never hands off — what a plain usbredir peer gives. The destination
// QEMU has the same usb-redir (its chardev unconnected: the peer is not there yet), the source
// session is detached after the migration (the source peer loses its QEMU), and the destination
// bridge attaches afresh with a new session on the destination's chardev: what a reconnecting
// chardev gives. The guest sees the device go away and come back.
//
// Progress on stderr; the last stdout line is the JSON summary.
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Bridge, type AttachmentInfo, type HandOffEvent } from '../src/client/bridge/bridge.js';
import { connectChardev, hotplugRedir } from '../src/client/bridge/qemu-attach.js';
import { createLogger, silentLogger } from '../src/common/log.js';
import { clientTls } from '../src/devkit/certs.js';
import {
  MarkListener,
  capturingLogger,
  classifyDmesg,
  delay,
  qmpWithoutMigrationEvents,
  runMigration,
  startMarkedVm,
  startSlotWriter,
  stopSlotWriter,
  verifySlots,
  type MarkedVm,
} from '../src/devkit/migration-faults.js';
import { startServerProcess } from '../src/devkit/server-process.js';
import { ensureGuestImage, type Guest, type GuestImage } from '../src/devkit/guest/guest.js';


process.env.USBROAM_E2E_QUIET ??= '1';

function arg(name: string): string | undefined {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : undefined;
}
const N = Number(arg('migrations') ?? process.env.USBROAM_BENCH_MIGRATIONS ?? 20);
const NB = Number(arg('baseline') ?? process.env.USBROAM_BENCH_BASELINE ?? N);
const SETTLE = Number(arg('settle-ms') ?? 2000);
const CONTROL = process.env.USBROAM_BENCH_CONTROL === '1';
const SERIAL = 'USBROAM-MSC-0001';
// USBROAM_BENCH_TRAIL=1: the bridges log at debug level into memory, and the timeline adds when
// the destination QEMU sent its first usbredir request after the hand-off and when the first
// answer went back (from the attachment's packet trail; use --settle-ms 3500 or more).
const TRAIL = process.env.USBROAM_BENCH_TRAIL === '1';
const captured = TRAIL ? capturingLogger('debug') : undefined;
const log = captured ? captured.log : process.env.USBROAM_BENCH_LOG ? createLogger({ level: process.env.USBROAM_BENCH_LOG }) : silentLogger;
const say = (s: string) => process.stderr.write(`${s}\n`);

interface Run {
  i: number;
  status: string;
  downtime_ms: number;
  total_ms: number;
  stall_ms: number;
  excess_stall_ms: number;
  disconnects: number;
  resets: number;
  io_errors: number;
  failed_writes: number;
  hand_off_ms?: number;
  in_flight?: number;
  /** The guest's I/O never resumed (120 s). */
  unrecovered?: boolean;
  /**
   * Where the stall went (ms, relative to the source VM's STOP, from QEMU's own event
   * timestamps and host timestamps of the guest's marks): the last completed write before the
   * stop, pre-switchover, the source's 'completed', the destination's RESUME, the hand-off
   * confirmed at the source bridge, the destination attachment running, the first completed
   * write after.
   */
  timeline?: Record<string, number>;
  /**
   * USBROAM_BENCH_CONTROL=1: the longest gap of a second guest loop that never touches USB
   * (64 KiB dd + fsync to the guest's tmpfs, its own marks): the stall the VM itself shows
   * across the migration (TCG starts the destination with an empty translation cache).
   */
  control_stall_ms?: number;
}

interface Summary {
  migrations: number;
  completed: number;
  disconnects: number;
  resets: number;
  io_errors: number;
  failed_writes: number;
  data_errors: number;
  writes: number;
  unrecovered: number;
  max_downtime_ms: number;
  median_downtime_ms: number;
  max_stall_ms: number;
  median_stall_ms: number;
  max_excess_stall_ms: number;
  median_excess_stall_ms: number;
  /** Median gap between two completed writes outside migrations (the loop's own pace). */
  typical_write_gap_ms: number;
  max_control_stall_ms?: number;
  median_control_stall_ms?: number;
  typical_control_gap_ms?: number;
  runs: Run[];
  error?: string;
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.floor(s.length / 2)]! : 0;
};
const r1 = (x: number) => Math.round(x * 10) / 10;

async function scenario(opts: { image: GuestImage; dir: string; server: { address: string; ca: string; cert: string; key: string }; n: number; handOff: boolean }): Promise<Summary> {
  const tag = opts.handOff ? 'hand-off' : 'baseline';
  const sdir = mkdtempSync(path.join(opts.dir, opts.handOff ? 'h-' : 'b-'));
  // The baseline bridges never see MIGRATION events, so they must not pause QEMU at
  // pre-switchover either (nobody would continue the migration).
  const bridges = [0, 1].map((k) => new Bridge({ log: log.child({ host: k ? 'B' : 'A' }), runDir: path.join(sdir, k ? 'B' : 'A'), pauseBeforeSwitchover: opts.handOff }));
  const marks = new MarkListener();
  const guests: Guest[] = [];
  const runs: Run[] = [];
  let cur: MarkedVm | undefined;
  let curBridge = 0;
  let vmName = `${tag[0]}vm0`;
  const id = 'usbroam-bench-disk';
  let eSeen = 0;
  const summary = (extra: Partial<Summary>): Summary => {
    const ok = runs.filter((r) => r.status === 'completed');
    return {
      migrations: runs.length,
      completed: ok.length,
      disconnects: runs.reduce((a, r) => a + r.disconnects, 0),
      resets: runs.reduce((a, r) => a + r.resets, 0),
      io_errors: runs.reduce((a, r) => a + r.io_errors, 0),
      failed_writes: runs.reduce((a, r) => a + r.failed_writes, 0),
      data_errors: 0,
      writes: 0,
      unrecovered: runs.filter((r) => r.unrecovered).length,
      max_downtime_ms: Math.max(0, ...ok.map((r) => r.downtime_ms)),
      median_downtime_ms: median(ok.map((r) => r.downtime_ms)),
      max_stall_ms: r1(Math.max(0, ...ok.map((r) => r.stall_ms))),
      median_stall_ms: r1(median(ok.map((r) => r.stall_ms))),
      max_excess_stall_ms: r1(Math.max(0, ...ok.map((r) => r.excess_stall_ms))),
      median_excess_stall_ms: r1(median(ok.map((r) => r.excess_stall_ms))),
      typical_write_gap_ms: r1(marks.medianGap()),
      ...(CONTROL ? { max_control_stall_ms: r1(Math.max(0, ...ok.map((r) => r.control_stall_ms ?? 0))), median_control_stall_ms: r1(median(ok.map((r) => r.control_stall_ms ?? 0))), typical_control_gap_ms: r1(marks.medianGap(/^T /)) } : {}),
      runs,
      ...extra,
    };
  };
  try {
    const attachQmp = async (b: Bridge, name: string, vm: MarkedVm) => {
      if (opts.handOff) b.addVm({ name, qmpSocket: vm.bridgeQmp });
      else b.addVm({ name, qmp: await qmpWithoutMigrationEvents(vm.bridgeQmp) });
    };
    cur = await startMarkedVm({ image: opts.image, dir: sdir, name: vmName });
    guests.push(cur.guest);
    await marks.connect(cur.markSock);
    await attachQmp(bridges[0]!, vmName, cur);
    let att: AttachmentInfo = await bridges[0]!.attach({ vm: vmName, server: opts.server, selector: { serial: SERIAL }, bus: 'xhci.0', id });
    await cur.guest.waitForPath('/sys/block/sda', { timeoutMs: 120_000 });
    await cur.guest.waitForPath('/dev/sda');
    await cur.guest.sh('dmesg -c > /dev/null');
    await startSlotWriter(cur.guest, { marks: true });
    if (CONTROL) {
      await cur.guest.sh(
        `(exec 3>/dev/ttyS1; i=0; while [ ! -e /tmp/stop ]; do dd if=/tmp/pool.0 of=/tmp/ctl bs=65536 count=1 conv=fsync 2>/dev/null; echo "T $i" >&3; i=$((i + 1)); done) > /dev/null 2>&1 &`,
      );
    }
    await delay(3000);
    say(`[${tag}] guest writer running; ${opts.n} migrations`);
    if (CONTROL && opts.handOff) {
      // The same pause without a migration (stop, 25 ms, cont on the same QEMU): what the
      // guest's loops show when only the downtime happens.
      const pauses: string[] = [];
      for (let k = 0; k < 3; k++) {
        const t0 = performance.now();
        await cur.guest.qmp.execute('stop');
        await delay(25);
        await cur.guest.qmp.execute('cont');
        const t1 = performance.now();
        await delay(1500);
        pauses.push(`paused ${r1(t1 - t0)} ms: write stall ${r1(marks.maxGap(t0 - 200, t1 + 1000).gapMs)} ms, control stall ${r1(marks.maxGap(t0 - 200, t1 + 1000, /^T /).gapMs)} ms`);
      }
      say(`[${tag}] stop/cont without migration: ${pauses.join('; ')}`);
    }
    for (let i = 0; i < opts.n; i++) {
      const src = cur;
      const srcBridge = bridges[curBridge]!;
      const dstBridge = bridges[1 - curBridge]!;
      const srcName = vmName;
      const dstName = `${tag[0]}vm${i + 1}`;
      let attached: Promise<AttachmentInfo> | undefined;
      const socketPath = path.join(sdir, `${dstName}.sock`);
      let handOff: Promise<HandOffEvent> | undefined;
      let dummy: import('node:net').Socket | undefined;
      let unrecovered = false;
      if (opts.handOff) {
        handOff = new Promise((resolve) => {
          const on = (ev: HandOffEvent) => {
            srcBridge.off('handOff', on);
            resolve(ev);
          };
          srcBridge.on('handOff', on);
        });
      }
      // QMP events of both QEMUs with QEMU's own timestamps (wall clock, ms).
      const qevents: { vm: 'src' | 'dst'; event: string; status?: string; t: number }[] = [];
      const evTime = (ev: { timestamp?: { seconds: number; microseconds: number } }) => (ev.timestamp ? ev.timestamp.seconds * 1000 + ev.timestamp.microseconds / 1000 : Date.now());
      const srcEv = (ev: { event: string; data?: { status?: string }; timestamp?: { seconds: number; microseconds: number } }) =>
        qevents.push({ vm: 'src', event: ev.event, status: ev.data?.status, t: evTime(ev) });
      src.guest.events.on('event', srcEv);
      let tHandOffWall: number | undefined;
      let tAttachedWall: number | undefined;
      const m = await runMigration({
        image: opts.image,
        dir: sdir,
        src: src.guest,
        dstName,
        marks,
        prepareDst: async (dst) => {
          if (opts.handOff) {
            await attachQmp(dstBridge, dstName, dst);
            const inc = await dstBridge.prepareIncoming({ vm: dstName, server: opts.server, sessionId: att.sessionId, id: att.id, bus: att.bus });
            attached = inc.attached;
            attached.then(() => (tAttachedWall = Date.now())).catch(() => {});
            dst.guest.events.on('event', (ev: { event: string; data?: { status?: string }; timestamp?: { seconds: number; microseconds: number } }) =>
              qevents.push({ vm: 'dst', event: ev.event, status: ev.data?.status, t: evTime(ev) }),
            );
          } else {
            // The same usb-redir on the destination, and a peer connected to its chardev (as
            // seamless migration needs) that knows nothing of the session: a reconnecting
            // chardev's peer.
            await hotplugRedir(dst.guest.qmp, { id, chardevId: `${id}-chr`, socketPath, bus: 'xhci.0' });
            dummy = await connectChardev(socketPath);
            dummy.pause();
          }
        },
      });
      guests.push(m.dst.guest);
      if (m.status !== 'completed') {
        say(`[${tag}] migration ${i + 1}: ${m.status}`);
        runs.push({ i, status: m.status, downtime_ms: m.downtimeMs, total_ms: m.totalMs, stall_ms: 0, excess_stall_ms: 0, disconnects: 0, resets: 0, io_errors: 0, failed_writes: 0 });
        void m.dst.guest.stop();
        continue;
      }
      let ho: HandOffEvent | undefined;
      let tRecovered: number;
      if (opts.handOff) {
        handOff!.then(() => (tHandOffWall = Date.now())).catch(() => {});
        ho = await Promise.race([handOff!, delay(60_000).then(() => undefined)]);
        att = await Promise.race([attached!, delay(60_000).then(() => Promise.reject(new Error('destination not attached within 60 s')))]);
        tRecovered = m.tEnd;
        void src.guest.stop();
      } else {
        // The source peer loses its QEMU: the session goes; the destination peer attaches anew.
        await Promise.race([srcBridge.detach(srcName, id), delay(15_000)]).catch(() => {});
        await src.guest.stop();
        // The peer reconnects: QEMU sees its chardev close (device gone) and open again.
        dummy?.destroy();
        await delay(200);
        await attachQmp(dstBridge, dstName, m.dst);
        att = await dstBridge.attach({ vm: dstName, server: opts.server, selector: { serial: SERIAL }, bus: 'xhci.0', id, coldPlugged: { socketPath } });
        // Until the guest's writer completes writes again.
        const tAtt = performance.now();
        const deadline = Date.now() + 120_000;
        while (!marks.marks.some((x) => x.t > tAtt && x.line.startsWith('W '))) {
          if (Date.now() > deadline) {
            unrecovered = true;
            break;
          }
          await delay(200);
        }
        tRecovered = performance.now();
      }
      await delay(SETTLE);
      src.guest.events.off('event', srcEv);
      const stall = marks.maxGap(m.tStart, tRecovered + SETTLE / 2);
      let timeline: Record<string, number> | undefined;
      const stop = qevents.find((e) => e.vm === 'src' && e.event === 'STOP');
      if (stop) {
        const rel = (t: number | undefined) => (t === undefined ? NaN : r1(t - stop.t));
        const wall = (t: number) => performance.timeOrigin + t;
        const ws = marks.marks.filter((x) => /^W /.test(x.line)).map((x) => wall(x.t));
        timeline = {
          last_write_before_stop: rel(ws.filter((t) => t <= stop.t).at(-1)),
          pre_switchover: rel(qevents.find((e) => e.vm === 'src' && e.status === 'pre-switchover')?.t),
          completed: rel(qevents.find((e) => e.vm === 'src' && e.status === 'completed')?.t),
          dst_resume: rel(qevents.find((e) => e.vm === 'dst' && e.event === 'RESUME')?.t),
          hand_off_confirmed: rel(tHandOffWall),
          dst_attached: rel(tAttachedWall),
          first_write_after: rel(ws.find((t) => t > stop.t)),
          second_write_after: rel(ws.filter((t) => t > stop.t)[1]),
        };
        if (captured) {
          // Trail entries: "<perf.now % 1e6><dir><type>:<id>..." ('<' from QEMU, '>' to QEMU).
          const rec = captured.records.filter((r) => r.msg === 'the first usbredir packets after the hand-off' && r.vm === dstName).at(-1);
          const stopPerf = (stop.t - performance.timeOrigin) % 1e6;
          const first = (dir: '<' | '>') => {
            const m = String(rec?.trail ?? '').split(' ').map((x) => /^([0-9.]+)([<>])/.exec(x)).find((x) => x && x[2] === dir);
            return m ? r1(Number(m[1]) - stopPerf) : NaN;
          };
          timeline.dst_first_request = first('<');
          timeline.dst_first_answer = first('>');
        }
        if (CONTROL) {
          const cs = marks.marks.filter((x) => /^T /.test(x.line)).map((x) => wall(x.t));
          timeline.last_control_before_stop = rel(cs.filter((t) => t <= stop.t).at(-1));
          timeline.first_control_after = rel(cs.find((t) => t > stop.t));
        }
      }
      const dm = classifyDmesg(await m.dst.guest.sh('dmesg -c', { timeoutMs: 60_000 }));
      const eTotal = marks.count(/^E /);
      const failedW = eTotal - eSeen;
      eSeen = eTotal;
      const run: Run = {
        i,
        status: m.status,
        downtime_ms: m.downtimeMs,
        total_ms: m.totalMs,
        stall_ms: r1(stall.gapMs),
        excess_stall_ms: r1(stall.gapMs - m.downtimeMs),
        disconnects: dm.disconnects,
        resets: dm.resets,
        io_errors: dm.ioErrors,
        failed_writes: failedW,
        ...(ho ? { hand_off_ms: r1(ho.sinceCompletedMs ?? -1), in_flight: ho.info?.inFlight } : {}),
        ...(timeline ? { timeline } : {}),
        ...(CONTROL ? { control_stall_ms: r1(marks.maxGap(m.tStart, tRecovered + SETTLE / 2, /^T /).gapMs) } : {}),
      };
      if (unrecovered) run.unrecovered = true;
      runs.push(run);
      if (unrecovered) {
        say(`[${tag}] ${i + 1}/${opts.n}: the guest did not write again within 120 s of the re-attach (dmesg: ${dm.disconnects} disc, ${dm.resets} resets, ${dm.ioErrors} I/O err); stopping this scenario`);
        cur = m.dst;
        break;
      }
      if (timeline) say(`[${tag}] ${i + 1}/${opts.n} timeline (ms from the source's STOP): ${Object.entries(timeline).map(([k, v]) => `${k} ${v}`).join(', ')}`);
      say(`[${tag}] ${i + 1}/${opts.n}: downtime ${run.downtime_ms} ms, stall ${run.stall_ms} ms (excess ${run.excess_stall_ms} ms)${CONTROL ? `, control loop (no USB) stall ${run.control_stall_ms} ms` : ''}, total ${run.total_ms} ms` +
        `${ho ? `, hand-off ${ho.ok ? `+${run.hand_off_ms} ms, in flight ${run.in_flight}` : `FAILED ${ho.error}`}` : ''}; dmesg: ${dm.disconnects} disc, ${dm.resets} resets, ${dm.ioErrors} I/O err; failed writes ${run.failed_writes}`);
      cur = m.dst;
      curBridge = 1 - curBridge;
      vmName = dstName;
    }
    if (runs.some((r) => r.unrecovered)) return summary({ data_errors: -1, error: 'the guest lost the disk (not verified)' });
    await stopSlotWriter(cur.guest);
    const v = await verifySlots(cur.guest);
    say(`[${tag}] ${v.writes} writes, ${v.verified} slots verified, ${v.bad.length} bad, ${v.skipped} skipped (last write failed)`);
    return summary({ data_errors: v.bad.length, writes: v.writes });
  } catch (err) {
    say(`[${tag}] aborted: ${(err as Error).stack ?? err}`);
    return summary({ error: (err as Error).message, data_errors: -1 });
  } finally {
    marks.close();
    for (const b of bridges) await Promise.race([b.close().catch(() => {}), delay(20_000)]);
    await Promise.allSettled(guests.map((g) => g.stop()));
  }
}

async function main(): Promise<void> {
  const image = await ensureGuestImage();
  const dir = mkdtempSync(path.join(os.tmpdir(), 'ubm-'));
  const server = await startServerProcess(['--allow', 'bridge=*', '--disk-image', path.join(dir, 'disk.img'), '--disk-size-mib', '64']);
  const serverOpts = { address: server.address.replace('127.0.0.1', 'localhost'), ...clientTls('bridge') };
  const t0 = Date.now();
  try {
    const main = await scenario({ image, dir, server: serverOpts, n: N, handOff: true });
    const baseline = NB > 0 ? await scenario({ image, dir, server: serverOpts, n: NB, handOff: false }) : undefined;
    const strip = (s: Summary) => {
      const { runs, ...rest } = s;
      return { ...rest, downtimes_ms: runs.map((r) => r.downtime_ms), stalls_ms: runs.map((r) => r.stall_ms) };
    };
    const out = {
      bench: 'migrate',
      guest_memory_mb: 128,
      write_block_bytes: 65536,
      elapsed_s: Math.round((Date.now() - t0) / 1000),
      ...strip(main),
      ...(baseline ? { baseline: strip(baseline) } : {}),
    };
    console.log(JSON.stringify(out));
  } finally {
    await server.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

main().then(
  () => process.exit(0),
  (err) => {
    say(`bench:migrate failed: ${(err as Error).stack ?? err}`);
    process.exit(1);
  },
);
