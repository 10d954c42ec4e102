// bench:migrate — N live migrations (A -> B -> A ...) under guest I/O, with the bridge hand-off;
// in the same run, taking turns with it, a no-USB control; then the same scenario with a usbredir
// peer that does no hand-off (baseline).
//
//   npm run bench:migrate [-- --migrations 20 (or --rounds 20) --baseline 20 --settle-ms 2000 --no-control]
//   env: USBROAM_BENCH_MIGRATIONS, USBROAM_BENCH_BASELINE (0 skips the baseline), USBROAM_BENCH_NO_CONTROL=1
//
// Per migration: QEMU's downtime (query-migrate on the source after completion), the longest
// I/O stall the guest saw (a guest writer does 64 KiB O_DIRECT+fsync writes in a loop and prints
// a mark on a second serial port after each completed one; the host timestamps the marks, so
// the stall is in host time and includes the downtime: the guest's clock stops with the VM),
// and the difference. Guest dmesg is read (and cleared) after each migration: disconnects,
// resets, I/O errors. At the end every slot the writer saw written is verified (data errors).
//
// Control ("no USB"): a second guest, the same kernel, memory and writer with the same marks,
// writing to a file on its tmpfs (a RAM disk; the guest has no brd or loop driver), migrated the
// same way. Migration i of usbroam and migration i of the control run one right after the other
// (which goes first alternates), each VM stopped while the other one migrates, so both see the
// same machine: max_excess_over_control_ms = max over i of (usbroam stall i - control stall i)
// is what usbroam adds to a migration; control_median_stall_ms / control_max_stall_ms what the
// migration costs this guest without USB.
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
import { QEMU_BENCH_NEEDS, ensureCommands } from './support/need.js';
import { positiveInt } from './support/rounds.js';


process.env.USBROAM_E2E_QUIET ??= '1';

function arg(name: string): string | undefined {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : undefined;
}
// --rounds is --migrations (each round: one usbroam migration and one control migration).
const N = positiveInt('migrations', arg('migrations') ?? arg('rounds') ?? process.env.USBROAM_BENCH_MIGRATIONS, 20);
const NB = Number(arg('baseline') ?? process.env.USBROAM_BENCH_BASELINE ?? N);
const SETTLE = Number(arg('settle-ms') ?? 2000);
const WITH_CONTROL = !process.argv.includes('--no-control') && process.env.USBROAM_BENCH_NO_CONTROL !== '1';
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
  /**
   * The source bridge's hand-off steps (ms): QEMU held at pre-switchover for the freeze
   * (switchover_pause; part of the downtime), freeze to measurement (freeze_before_save), the
   * socket-queue measurement (measure, ss), handOff() to the state sent (export) and to the
   * server's confirmation (total).
   */
  hand_off_steps?: { switchover_pause: number; freeze_before_save: number; measure: number; export: number; total: number };
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

type Mode = 'hand-off' | 'baseline' | 'control';

/**
 * One guest migrated again and again (A -> B -> A ...): set up, then migrate() once per
 * migration (so two scenarios can take turns), then finish() for the summary.
 *  - 'hand-off': the disk through usbroam, the bridges hand the session over;
 *  - 'baseline': the disk through usbroam, no hand-off (a plain usbredir peer);
 *  - 'control': no USB at all: the same guest and writer, the same marks, on a file in the
 *    guest's tmpfs (a RAM disk): the stall the migration itself costs this guest here.
 */
class Scenario {
  readonly tag: Mode;
  private readonly usb: boolean;
  private readonly handOff: boolean;
  private readonly sdir: string;
  private readonly bridges: Bridge[];
  private readonly marks = new MarkListener();
  private readonly guests: Guest[] = [];
  readonly runs: Run[] = [];
  private cur: MarkedVm | undefined;
  private curBridge = 0;
  private vmName: string;
  private att: AttachmentInfo | undefined;
  private eSeen = 0;
  /** Set when the guest's I/O never came back: no more migrations for this scenario. */
  stopped = false;
  private readonly id = 'usbroam-bench-disk';

  constructor(private readonly opts: { image: GuestImage; dir: string; server: { address: string; ca: string; cert: string; key: string }; mode: Mode }) {
    this.tag = opts.mode;
    this.usb = opts.mode !== 'control';
    this.handOff = opts.mode === 'hand-off';
    this.sdir = mkdtempSync(path.join(opts.dir, `${opts.mode[0]}-`));
    this.vmName = `${opts.mode[0]}vm0`;
    // The baseline bridges never see MIGRATION events, so they must not pause QEMU at
    // pre-switchover either (nobody would continue the migration).
    this.bridges = this.usb ? [0, 1].map((k) => new Bridge({ log: log.child({ host: k ? 'B' : 'A', scenario: opts.mode }), runDir: path.join(this.sdir, k ? 'B' : 'A'), pauseBeforeSwitchover: this.handOff })) : [];
  }

  private get writerTarget(): string | undefined {
    return this.usb ? undefined : '/tmp/ramdisk';
  }

  private async attachQmp(b: Bridge, name: string, vm: MarkedVm): Promise<void> {
    if (this.handOff) b.addVm({ name, qmpSocket: vm.bridgeQmp });
    else b.addVm({ name, qmp: await qmpWithoutMigrationEvents(vm.bridgeQmp) });
  }

  async setup(): Promise<void> {
    const tag = this.tag;
    const cur = (this.cur = await startMarkedVm({ image: this.opts.image, dir: this.sdir, name: this.vmName }));
    this.guests.push(cur.guest);
    await this.marks.connect(cur.markSock);
    if (this.usb) {
      await this.attachQmp(this.bridges[0]!, this.vmName, cur);
      this.att = await this.bridges[0]!.attach({ vm: this.vmName, server: this.opts.server, selector: { serial: SERIAL }, bus: 'xhci.0', id: this.id });
      await cur.guest.waitForPath('/sys/block/sda', { timeoutMs: 120_000 });
      await cur.guest.waitForPath('/dev/sda');
    }
    await cur.guest.sh('dmesg -c > /dev/null');
    await startSlotWriter(cur.guest, { marks: true, target: this.writerTarget });
    if (CONTROL && this.usb) {
      await cur.guest.sh(
        `(exec 3>/dev/ttyS1; i=0; while [ ! -e /tmp/stop ]; do dd if=/tmp/pool.0 of=/tmp/ctl bs=65536 count=1 conv=fsync 2>/dev/null; echo "T $i" >&3; i=$((i + 1)); done) > /dev/null 2>&1 &`,
      );
    }
    await delay(3000);
    say(`[${tag}] guest writer running${this.usb ? '' : ' (no USB: a file on the guest tmpfs)'}`);
    if (CONTROL && this.handOff) {
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
        pauses.push(`paused ${r1(t1 - t0)} ms: write stall ${r1(this.marks.maxGap(t0 - 200, t1 + 1000).gapMs)} ms, control stall ${r1(this.marks.maxGap(t0 - 200, t1 + 1000, /^T /).gapMs)} ms`);
      }
      say(`[${tag}] stop/cont without migration: ${pauses.join('; ')}`);
    }
  }

  /** Stops the current VM (while the other scenario migrates: it must not compete for the CPU). */
  async pause(): Promise<void> {
    await this.cur?.guest.qmp.execute('stop');
  }

  /** Lets the current VM run again and its writer settle into its pace. */
  async resume(): Promise<void> {
    await this.cur?.guest.qmp.execute('cont');
    await delay(1500);
  }

  /** Migration `i` (0-based) of `n`; its Run, also in `runs`. */
  async migrate(i: number, n: number): Promise<Run> {
    const tag = this.tag;
    const { image, server } = this.opts;
    const marks = this.marks;
    const src = this.cur!;
    const srcBridge = this.bridges[this.curBridge];
    const dstBridge = this.bridges[1 - this.curBridge];
    const srcName = this.vmName;
    const dstName = `${tag[0]}vm${i + 1}`;
    const id = this.id;
    let attached: Promise<AttachmentInfo> | undefined;
    const socketPath = path.join(this.sdir, `${dstName}.sock`);
    let handOff: Promise<HandOffEvent> | undefined;
    let dummy: import('node:net').Socket | undefined;
    let unrecovered = false;
    if (this.handOff) {
      handOff = new Promise((resolve) => {
        const on = (ev: HandOffEvent) => {
          srcBridge!.off('handOff', on);
          resolve(ev);
        };
        srcBridge!.on('handOff', on);
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
      image,
      dir: this.sdir,
      src: src.guest,
      dstName,
      marks,
      prepareDst: async (dst) => {
        dst.guest.events.on('event', (ev: { event: string; data?: { status?: string }; timestamp?: { seconds: number; microseconds: number } }) =>
          qevents.push({ vm: 'dst', event: ev.event, status: ev.data?.status, t: evTime(ev) }),
        );
        if (this.handOff) {
          await this.attachQmp(dstBridge!, dstName, dst);
          const att = this.att!;
          const inc = await dstBridge!.prepareIncoming({ vm: dstName, server, sessionId: att.sessionId, id: att.id, bus: att.bus });
          attached = inc.attached;
          attached.then(() => (tAttachedWall = Date.now())).catch(() => {});
        } else if (this.usb) {
          // The same usb-redir on the destination, and a peer connected to its chardev (as
          // seamless migration needs) that knows nothing of the session: a reconnecting
          // chardev's peer.
          await hotplugRedir(dst.guest.qmp, { id, chardevId: `${id}-chr`, socketPath, bus: 'xhci.0' });
          dummy = await connectChardev(socketPath);
          dummy.pause();
        }
      },
    });
    this.guests.push(m.dst.guest);
    if (m.status !== 'completed') {
      say(`[${tag}] migration ${i + 1}: ${m.status}`);
      const run: Run = { i, status: m.status, downtime_ms: m.downtimeMs, total_ms: m.totalMs, stall_ms: 0, excess_stall_ms: 0, disconnects: 0, resets: 0, io_errors: 0, failed_writes: 0 };
      this.runs.push(run);
      void m.dst.guest.stop();
      return run;
    }
    let ho: HandOffEvent | undefined;
    let tRecovered: number;
    if (this.handOff) {
      handOff!.then(() => (tHandOffWall = Date.now())).catch(() => {});
      ho = await Promise.race([handOff!, delay(60_000).then(() => undefined)]);
      this.att = await Promise.race([attached!, delay(60_000).then(() => Promise.reject(new Error('destination not attached within 60 s')))]);
      tRecovered = m.tEnd;
      void src.guest.stop();
    } else if (this.usb) {
      // The source peer loses its QEMU: the session goes; the destination peer attaches anew.
      await Promise.race([srcBridge!.detach(srcName, id), delay(15_000)]).catch(() => {});
      await src.guest.stop();
      // The peer reconnects: QEMU sees its chardev close (device gone) and open again.
      dummy?.destroy();
      await delay(200);
      await this.attachQmp(dstBridge!, dstName, m.dst);
      this.att = await dstBridge!.attach({ vm: dstName, server, selector: { serial: SERIAL }, bus: 'xhci.0', id, coldPlugged: { socketPath } });
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
    } else {
      tRecovered = m.tEnd;
      void src.guest.stop();
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
        ...(this.usb ? { pre_switchover: rel(qevents.find((e) => e.vm === 'src' && e.status === 'pre-switchover')?.t) } : {}),
        completed: rel(qevents.find((e) => e.vm === 'src' && e.status === 'completed')?.t),
        dst_resume: rel(qevents.find((e) => e.vm === 'dst' && e.event === 'RESUME')?.t),
        ...(this.handOff ? { hand_off_confirmed: rel(tHandOffWall), dst_attached: rel(tAttachedWall) } : {}),
        first_write_after: rel(ws.find((t) => t > stop.t)),
        second_write_after: rel(ws.filter((t) => t > stop.t)[1]),
      };
      if (captured && this.usb) {
        // Trail entries: "<perf.now % 1e6><dir><type>:<id>..." ('<' from QEMU, '>' to QEMU).
        const rec = captured.records.filter((r) => r.msg === 'the first usbredir packets after the hand-off' && r.vm === dstName).at(-1);
        const stopPerf = (stop.t - performance.timeOrigin) % 1e6;
        const first = (dir: '<' | '>') => {
          const mm = String(rec?.trail ?? '').split(' ').map((x) => /^([0-9.]+)([<>])/.exec(x)).find((x) => x && x[2] === dir);
          return mm ? r1(Number(mm[1]) - stopPerf) : NaN;
        };
        timeline.dst_first_request = first('<');
        timeline.dst_first_answer = first('>');
      }
      if (CONTROL && this.usb) {
        const cs = marks.marks.filter((x) => /^T /.test(x.line)).map((x) => wall(x.t));
        timeline.last_control_before_stop = rel(cs.filter((t) => t <= stop.t).at(-1));
        timeline.first_control_after = rel(cs.find((t) => t > stop.t));
      }
    }
    const dm = classifyDmesg(await m.dst.guest.sh('dmesg -c', { timeoutMs: 60_000 }));
    const eTotal = marks.count(/^E /);
    const failedW = eTotal - this.eSeen;
    this.eSeen = eTotal;
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
      ...(ho?.info
        ? { hand_off_steps: { switchover_pause: r1(ho.switchoverPauseMs ?? 0), freeze_before_save: r1(ho.info.freezeBeforeSaveMs), measure: r1(ho.info.measureMs), export: r1(ho.info.freezeMs), total: r1(ho.info.totalMs) } }
        : {}),
      ...(timeline ? { timeline } : {}),
      ...(CONTROL && this.usb ? { control_stall_ms: r1(marks.maxGap(m.tStart, tRecovered + SETTLE / 2, /^T /).gapMs) } : {}),
    };
    if (unrecovered) run.unrecovered = true;
    this.runs.push(run);
    this.cur = m.dst;
    if (unrecovered) {
      say(`[${tag}] ${i + 1}/${n}: the guest did not write again within 120 s of the re-attach (dmesg: ${dm.disconnects} disc, ${dm.resets} resets, ${dm.ioErrors} I/O err); stopping this scenario`);
      this.stopped = true;
      return run;
    }
    if (timeline) say(`[${tag}] ${i + 1}/${n} timeline (ms from the source's STOP): ${Object.entries(timeline).map(([k, v]) => `${k} ${v}`).join(', ')}`);
    if (run.hand_off_steps) say(`[${tag}] ${i + 1}/${n} hand-off steps (ms): ${Object.entries(run.hand_off_steps).map(([k, v]) => `${k} ${v}`).join(', ')}`);
    say(`[${tag}] ${i + 1}/${n}: downtime ${run.downtime_ms} ms, stall ${run.stall_ms} ms (excess ${run.excess_stall_ms} ms)${run.control_stall_ms !== undefined ? `, control loop (no USB) stall ${run.control_stall_ms} ms` : ''}, total ${run.total_ms} ms` +
      `${ho ? `, hand-off ${ho.ok ? `+${run.hand_off_ms} ms, in flight ${run.in_flight}` : `FAILED ${ho.error}`}` : ''}; dmesg: ${dm.disconnects} disc, ${dm.resets} resets, ${dm.ioErrors} I/O err; failed writes ${run.failed_writes}`);
    this.curBridge = 1 - this.curBridge;
    this.vmName = dstName;
    return run;
  }

  summary(extra: Partial<Summary>): Summary {
    const runs = this.runs;
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
      typical_write_gap_ms: r1(this.marks.medianGap()),
      ...(CONTROL && this.usb ? { max_control_stall_ms: r1(Math.max(0, ...ok.map((r) => r.control_stall_ms ?? 0))), median_control_stall_ms: r1(median(ok.map((r) => r.control_stall_ms ?? 0))), typical_control_gap_ms: r1(this.marks.medianGap(/^T /)) } : {}),
      runs,
      ...extra,
    };
  }

  /** Stops the writer and verifies every slot it saw written; the summary. */
  async finish(): Promise<Summary> {
    if (this.runs.some((r) => r.unrecovered)) return this.summary({ data_errors: -1, error: 'the guest lost the disk (not verified)' });
    await stopSlotWriter(this.cur!.guest);
    const v = await verifySlots(this.cur!.guest, { target: this.writerTarget });
    say(`[${this.tag}] ${v.writes} writes, ${v.verified} slots verified, ${v.bad.length} bad, ${v.skipped} skipped (last write failed)`);
    return this.summary({ data_errors: v.bad.length, writes: v.writes });
  }

  async close(): Promise<void> {
    this.marks.close();
    for (const b of this.bridges) await Promise.race([b.close().catch(() => {}), delay(20_000)]);
    await Promise.allSettled(this.guests.map((g) => g.stop()));
  }
}

/**
 * Runs scenarios taking turns, migration by migration (the first's migration i, the second's
 * migration i, then the second's i + 1 first, ...); a scenario's VM is stopped while another
 * migrates. Returns each scenario's summary.
 */
async function interleaved(scenarios: Scenario[], n: number): Promise<Summary[]> {
  const errors = new Map<Scenario, string>();
  try {
    for (const sc of scenarios) await sc.setup();
    if (scenarios.length > 1) for (const sc of scenarios) await sc.pause();
    for (let i = 0; i < n; i++) {
      const order = i % 2 ? [...scenarios].reverse() : scenarios;
      for (const sc of order) {
        if (sc.stopped || errors.has(sc)) continue;
        if (scenarios.length > 1) await sc.resume();
        try {
          await sc.migrate(i, n);
        } catch (err) {
          say(`[${sc.tag}] aborted: ${(err as Error).stack ?? err}`);
          errors.set(sc, (err as Error).message);
        }
        if (scenarios.length > 1 && !errors.has(sc)) await sc.pause().catch(() => {});
      }
    }
    const out: Summary[] = [];
    for (const sc of scenarios) {
      if (errors.has(sc)) {
        out.push(sc.summary({ error: errors.get(sc), data_errors: -1 }));
        continue;
      }
      if (scenarios.length > 1) await sc.resume();
      out.push(await sc.finish().catch((err: Error) => sc.summary({ error: err.message, data_errors: -1 })));
    }
    return out;
  } catch (err) {
    say(`aborted: ${(err as Error).stack ?? err}`);
    return scenarios.map((sc) => sc.summary({ error: (err as Error).message, data_errors: -1 }));
  } finally {
    for (const sc of scenarios) await sc.close();
  }
}

/**
 * The no-USB control against usbroam: migration i of each ran one right after the other, so
 * the excess of migration i is usbroam's stall minus the control's stall of migration i.
 */
function overControl(main: Summary, control: Summary): Record<string, unknown> {
  const ok = (s: Summary) => new Map(s.runs.filter((r) => r.status === 'completed').map((r) => [r.i, r]));
  const c = ok(control);
  const excess = [...ok(main).values()].filter((r) => c.has(r.i)).map((r) => r1(r.stall_ms - c.get(r.i)!.stall_ms));
  const cs = [...c.values()].map((r) => r.stall_ms);
  const out: Record<string, unknown> = {
    control_median_stall_ms: r1(median(cs)),
    control_max_stall_ms: r1(Math.max(0, ...cs)),
    max_excess_over_control_ms: excess.length ? r1(Math.max(...excess)) : null,
    median_excess_over_control_ms: excess.length ? r1(median(excess)) : null,
    excess_over_control_ms: excess,
  };
  return out;
}

async function main(): Promise<void> {
  ensureCommands(QEMU_BENCH_NEEDS, say);
  const image = await ensureGuestImage();
  const dir = mkdtempSync(path.join(os.tmpdir(), 'ubm-'));
  const server = await startServerProcess(['--allow', 'bridge=*', '--disk-image', path.join(dir, 'disk.img'), '--disk-size-mib', '64']);
  const serverOpts = { address: server.address.replace('127.0.0.1', 'localhost'), ...clientTls('bridge') };
  const t0 = Date.now();
  try {
    const mk = (mode: Mode) => new Scenario({ image, dir, server: serverOpts, mode });
    const [main, control] = await interleaved(WITH_CONTROL ? [mk('hand-off'), mk('control')] : [mk('hand-off')], N);
    const baseline = NB > 0 ? (await interleaved([mk('baseline')], NB))[0] : undefined;
    const strip = (s: Summary) => {
      const { runs, ...rest } = s;
      return { ...rest, downtimes_ms: runs.map((r) => r.downtime_ms), stalls_ms: runs.map((r) => r.stall_ms) };
    };
    const out = {
      bench: 'migrate',
      guest_memory_mb: 128,
      write_block_bytes: 65536,
      elapsed_s: Math.round((Date.now() - t0) / 1000),
      ...strip(main!),
      ...(control ? overControl(main!, control) : {}),
      ...(control ? { control: strip(control) } : {}),
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
