// Fault-injection and measurement helpers for migration e2e tests and bench:migrate, built on
// migration-rig.ts:
//  - startMarkedVm(): a guest with a second serial port (/dev/ttyS1) whose output the host
//    timestamps line by line (MarkListener): a guest-side writer prints a mark per completed
//    write, so I/O stalls are measured in host time (the guest's own clock does not advance
//    while the VM is stopped, so guest timestamps would hide the downtime).
//  - runMigration(): QEMU migration of a guest to a fresh destination with hooks (prepare the
//    destination, act while the migration runs), without assuming who hands off.
//  - BridgeChild: a Bridge in its own process (this file run with `--bridge-child`), driven by
//    JSON lines on stdin; events and answers as JSON lines on stdout; kill -9 it at will.
//  - guest workload scripts (slot writer with verification), dmesg classification.
import { createWriteStream, mkdirSync } from 'node:fs';
import { spawn, type ChildProcess } from 'node:child_process';
import { EventEmitter, once } from 'node:events';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import type { Logger } from '../common/log.js';
import { QmpClient } from '../qemu/qmp/client.js';
import type { AttachRequest, AttachmentInfo } from '../client/bridge/bridge.js';
import type { HostBridge } from './migration-rig.js';
import { startGuest, type Guest, type GuestImage } from './guest/guest.js';
import { XHCI } from './migration-rig.js';

/** Resolves after `ms` (bench:migrate paces its rounds with it). */
export const delay = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** dmesg lines a clean migration must never show. */
export const BAD_LINE = /USB disconnect|reset (low|full|high|super|SuperSpeed)[^\n]*USB device|error -110|I\/O error|DID_NO_CONNECT/;

export interface DmesgCounts {
  disconnects: number;
  resets: number;
  ioErrors: number;
  bad: string[];
}

export function classifyDmesg(text: string): DmesgCounts {
  const lines = text.split('\n');
  return {
    disconnects: lines.filter((l) => /USB disconnect/.test(l)).length,
    resets: lines.filter((l) => /reset (low|full|high|super|SuperSpeed)[^\n]*USB device/.test(l)).length,
    ioErrors: lines.filter((l) => /I\/O error|error -110|DID_NO_CONNECT/.test(l)).length,
    bad: lines.filter((l) => BAD_LINE.test(l)),
  };
}

/** A pino logger that keeps every record (parsed) in memory, for assertions on log lines. */
export function capturingLogger(level = 'info'): { log: Logger; records: Record<string, unknown>[] } {
  const records: Record<string, unknown>[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const l of chunk.toString().split('\n')) {
        if (!l) continue;
        try {
          records.push(JSON.parse(l));
        } catch {
          /* ignore */
        }
      }
      cb();
    },
  });
  return { log: pino({ level }, sink), records };
}

// ---------------------------------------------------------------------------------------------
// Guests with a mark port

let seq = 0;

export interface MarkedVm {
  guest: Guest;
  bridgeQmp: string;
  /** unix socket of the guest's /dev/ttyS1 (QEMU listens). */
  markSock: string;
}

/** A guest like migration-rig's startVmGuest, plus /dev/ttyS1 on a host socket (marks). */
export async function startMarkedVm(opts: { image: GuestImage; dir: string; name: string; incoming?: boolean; memoryMb?: number }): Promise<MarkedVm> {
  for (let attempt = 1; ; attempt++) {
    const n = ++seq;
    const bridgeQmp = path.join(opts.dir, `fq-${opts.name}-${n}.sock`);
    const markSock = path.join(opts.dir, `mk-${opts.name}-${n}.sock`);
    try {
      const guest = await startGuest({
        name: opts.name,
        image: opts.image,
        memoryMb: opts.memoryMb ?? 128,
        extraArgs: [
          ...XHCI,
          '-qmp', `unix:${bridgeQmp},server=on,wait=off`,
          '-chardev', `socket,id=mark0,path=${markSock},server=on,wait=off`,
          '-device', 'isa-serial,chardev=mark0',
          ...(opts.incoming ? ['-incoming', 'defer'] : []),
        ],
      });
      return { guest, bridgeQmp, markSock };
    } catch (err) {
      if (attempt >= 3 || opts.incoming) throw err;
    }
  }
}

/**
 * Host-side timestamps of the lines a guest prints on /dev/ttyS1, across migrations: connect
 * it to each QEMU's mark socket (source, then each destination) and lines are merged.
 */
export class MarkListener {
  readonly marks: { t: number; line: string }[] = [];
  private readonly socks: net.Socket[] = [];
  private readonly waiters = new Set<() => void>();

  async connect(sockPath: string, timeoutMs = 20_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        const s = net.connect(sockPath);
        await once(s, 'connect');
        let buf = '';
        s.on('data', (d: Buffer) => {
          const t = performance.now();
          buf += d.toString('latin1');
          let i;
          while ((i = buf.indexOf('\n')) >= 0) {
            const line = buf.slice(0, i).replace(/\r/g, '').trim();
            buf = buf.slice(i + 1);
            if (line) this.marks.push({ t, line });
          }
          for (const w of [...this.waiters]) w();
        });
        s.on('error', () => {});
        this.socks.push(s);
        return;
      } catch (err) {
        if (Date.now() > deadline) throw err;
        await delay(100);
      }
    }
  }

  /** Longest gap between consecutive marks matching `re` (ms) inside [from, to] (performance.now()). */
  maxGap(from: number, to: number, re = /^W /): { gapMs: number; count: number; at?: number } {
    const ts = this.marks.filter((m) => re.test(m.line)).map((m) => m.t);
    let gap = 0;
    let at: number | undefined;
    let count = 0;
    for (let i = 1; i < ts.length; i++) {
      const a = ts[i - 1]!;
      const b = ts[i]!;
      if (b < from || a > to) continue;
      count++;
      if (b - a > gap) {
        gap = b - a;
        at = a;
      }
    }
    return { gapMs: gap, count, at };
  }

  /** Median gap between consecutive marks matching `re` (ms), whole run. */
  medianGap(re = /^W /): number {
    const ts = this.marks.filter((m) => re.test(m.line)).map((m) => m.t);
    const g: number[] = [];
    for (let i = 1; i < ts.length; i++) g.push(ts[i]! - ts[i - 1]!);
    g.sort((x, y) => x - y);
    return g.length ? g[Math.floor(g.length / 2)]! : 0;
  }

  /** Marks matching `re`, those after `since` (performance.now()) only if given. */
  count(re: RegExp, since = -Infinity): number {
    return this.marks.filter((m) => m.t > since && re.test(m.line)).length;
  }

  /**
   * Resolves once `n` marks matching `re` arrived after `since` (performance.now(); default: all
   * marks so far count); rejects naming `what` after `timeoutMs`. Woken by each arriving line.
   */
  waitForCount(re: RegExp, n: number, opts: { since?: number; timeoutMs?: number; what?: string } = {}): Promise<void> {
    const since = opts.since ?? -Infinity;
    const timeoutMs = opts.timeoutMs ?? 120_000;
    return new Promise<void>((resolve, reject) => {
      const check = () => {
        if (this.count(re, since) < n) return;
        this.waiters.delete(check);
        clearTimeout(timer);
        resolve();
      };
      const timer = setTimeout(() => {
        this.waiters.delete(check);
        reject(new Error(`timed out after ${timeoutMs} ms waiting for ${opts.what ?? `${n} marks ${re}`} (${this.count(re, since)} arrived)`));
      }, timeoutMs);
      this.waiters.add(check);
      check();
    });
  }

  close(): void {
    for (const s of this.socks) s.destroy();
  }
}

// ---------------------------------------------------------------------------------------------
// Migration with hooks

export interface RunMigrationResult {
  status: string;
  downtimeMs: number;
  totalMs: number;
  dst: MarkedVm;
  /** performance.now() at `migrate` and at the source's terminal MIGRATION event. */
  tStart: number;
  tEnd: number;
}

/**
 * Migrate `src` to a fresh destination QEMU (-incoming defer). `prepareDst` runs before
 * migrate-incoming (e.g. prepareIncoming on the destination bridge, or a bare usb-redir);
 * `whileMigrating` runs right after `migrate` was issued (e.g. kill the source bridge).
 */
export async function runMigration(opts: {
  image: GuestImage;
  dir: string;
  src: Guest;
  dstName: string;
  marks?: MarkListener;
  prepareDst?: (dst: MarkedVm) => Promise<void>;
  whileMigrating?: () => Promise<void>;
  memoryMb?: number;
}): Promise<RunMigrationResult> {
  const dst = await startMarkedVm({ image: opts.image, dir: opts.dir, name: opts.dstName, incoming: true, memoryMb: opts.memoryMb });
  try {
    if (opts.marks) await opts.marks.connect(dst.markSock);
    await opts.prepareDst?.(dst);
    for (const g of [opts.src, dst.guest]) await g.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
    const uri = `unix:${path.join(dst.guest.dir, 'migrate.sock')}`;
    await dst.guest.qmp.execute('migrate-incoming', { uri });
    const srcDone = opts.src.events.waitForEvent<{ status: string }>('MIGRATION', (ev) => ['completed', 'failed', 'cancelled'].includes(ev.data.status), { timeoutMs: 300_000 });
    const tStart = performance.now();
    await opts.src.qmp.execute('migrate', { uri });
    await opts.whileMigrating?.();
    const done = await srcDone;
    const tEnd = performance.now();
    const info = await opts.src.qmp.execute<{ 'total-time'?: number; downtime?: number }>('query-migrate');
    return { status: done.data.status, downtimeMs: info.downtime ?? -1, totalMs: info['total-time'] ?? tEnd - tStart, dst, tStart, tEnd };
  } catch (err) {
    await dst.guest.stop().catch(() => {});
    throw err;
  }
}

/**
 * A QMP client that never delivers MIGRATION events: a Bridge given this for a VM does not
 * notice the migration and so never hands off (the "no hand-off" baseline).
 */
export async function qmpWithoutMigrationEvents(socketPath: string): Promise<QmpClient> {
  const q = new QmpClient({ path: socketPath, reconnect: true });
  const orig = q.emit.bind(q) as (ev: string | symbol, ...a: unknown[]) => boolean;
  (q as unknown as { emit: typeof orig }).emit = (ev, ...a) => (ev === 'event:MIGRATION' || (ev === 'event' && (a[0] as { event?: string })?.event === 'MIGRATION') ? false : orig(ev, ...a));
  await q.connect();
  return q;
}

// ---------------------------------------------------------------------------------------------
// Guest workloads

/** Shell snippet: DEV = the current USB disk (it may come back under another name after a replug). */
const PICK_DEV = `set -- /sys/block/sd*; DEV=/dev/\${1##*/}`;

/**
 * Slot writer: 64 KiB blocks written with O_DIRECT + fsync to SLOTS slots at offset BASE
 * (in 64 KiB units), contents from a pool of POOL pre-generated random blocks: write i goes to
 * slot i % SLOTS with block (i / SLOTS) % POOL, so consecutive writes to one slot differ and a
 * lost write shows. Each completed write: "i ok" in /tmp/wlog and "W i" on /dev/ttyS1 (if
 * marks); a failed one: "i ERR" and "E i". Stops at /tmp/stop, then "DONE" in /tmp/wlog.
 * `target`: a file (e.g. on the guest's tmpfs, a RAM disk) instead of the USB disk: buffered
 * writes with fsync (tmpfs has no O_DIRECT), the file never truncated.
 */
export interface SlotWriterOptions {
  slots?: number;
  pool?: number;
  base?: number;
  marks?: boolean;
  target?: string;
}

/** How the slot writer and its verification reach their device: `DEV=...`, the dd flags. */
function slotTarget(target: string | undefined): { pick: string; oflags: string; iflags: string; test: string } {
  if (target) return { pick: `DEV=${target}`, oflags: 'conv=notrunc,fsync', iflags: '', test: '-f' };
  return { pick: PICK_DEV, oflags: 'oflag=direct conv=fsync', iflags: 'iflag=direct', test: '-b' };
}

export function slotWriterScript(opts: SlotWriterOptions = {}): string {
  const slots = opts.slots ?? 64;
  const pool = opts.pool ?? 8;
  const base = opts.base ?? 64;
  const t = slotTarget(opts.target);
  return `
${opts.marks ? 'stty -F /dev/ttyS1 115200 raw -echo 2>/dev/null; exec 3>/dev/ttyS1' : 'exec 3>/dev/null'}
rm -f /tmp/wlog
i=0
while [ ! -e /tmp/stop ]; do
  ${t.pick}
  s=$((i % ${slots})); p=$(( (i / ${slots}) % ${pool} ))
  if [ ${t.test} "$DEV" ] && dd if=/tmp/pool.$p of=$DEV bs=65536 seek=$((s + ${base})) ${t.oflags} 2>/dev/null; then
    echo "$i ok" >> /tmp/wlog; echo "W $i" >&3
  else
    echo "$i ERR" >> /tmp/wlog; echo "E $i" >&3; sleep 0.1
  fi
  i=$((i + 1))
done
echo DONE >> /tmp/wlog
`;
}

/** Create the pool blocks (/tmp/pool.N, 64 KiB each) and their checksums (/tmp/pool.sums). */
export async function makePool(g: Guest, pool = 8): Promise<void> {
  await g.sh(`rm -f /tmp/pool.sums; for p in $(seq 0 ${pool - 1}); do head -c 65536 /dev/urandom > /tmp/pool.$p; echo "$p $(sha256sum /tmp/pool.$p | cut -d' ' -f1)" >> /tmp/pool.sums; done`, { timeoutMs: 60_000 });
}

export async function startSlotWriter(g: Guest, opts: SlotWriterOptions = {}): Promise<void> {
  await makePool(g, opts.pool ?? 8);
  if (opts.target) await g.sh(`dd if=/dev/zero of=${opts.target} bs=65536 count=${(opts.base ?? 64) + (opts.slots ?? 64)} 2>/dev/null`);
  await g.sh(`cat > /tmp/w.sh <<'EOS'\n${slotWriterScript(opts)}\nEOS\nrm -f /tmp/stop /tmp/wlog; (sh /tmp/w.sh > /dev/null 2>&1 &)`);
}

/** Stop the slot writer and wait (in the guest) for its DONE line. */
export async function stopSlotWriter(g: Guest, timeoutMs = 120_000): Promise<void> {
  const tries = Math.ceil(timeoutMs / 100);
  const r = await g.run(`touch /tmp/stop; i=0; until tail -n1 /tmp/wlog 2>/dev/null | grep -q DONE || [ $i -ge ${tries} ]; do usleep 100000; i=$((i + 1)); done; tail -n1 /tmp/wlog | grep -q DONE`, { timeoutMs: timeoutMs + 30_000 });
  if (r.exitCode !== 0) throw new Error(`the guest writer did not stop within ${timeoutMs} ms`);
}

/**
 * Wait in the guest for a USB disk (sd*) with its /dev node; returns its name. After a replug it
 * may come back under another name.
 */
export async function waitUsbDisk(g: Guest, timeoutMs = 120_000): Promise<string> {
  const tries = Math.ceil(timeoutMs / 100);
  const r = await g.run(
    `i=0; while :; do for d in /sys/block/sd*; do [ -e "$d" ] && [ -e /dev/\${d##*/} ] && { echo "DISK \${d##*/}"; break 2; }; done; [ $i -ge ${tries} ] && break; usleep 100000; i=$((i + 1)); done`,
    { timeoutMs: timeoutMs + 30_000 },
  );
  const m = /DISK (sd[a-z]+)/.exec(r.output);
  if (m) return m[1]!;
  const dm = (await g.dmesg()).split('\n').filter((l) => /usb|sd[a-z]|scsi/i.test(l)).slice(-25).join('\n');
  throw new Error(`no USB disk in the guest within ${timeoutMs} ms; dmesg:\n${dm}\nQEMU:\n${g.qemuLog().slice(-1500)}`);
}

export interface SlotVerification {
  writes: number;
  failedWrites: number;
  verified: number;
  /** Slots whose last write succeeded but whose content is not that block. */
  bad: number[];
  /** Slots skipped because their last write failed (content undefined by design). */
  skipped: number;
}

/** Check every slot whose last write succeeded holds exactly that write's block. */
export async function verifySlots(g: Guest, opts: Omit<SlotWriterOptions, 'marks'> = {}): Promise<SlotVerification> {
  const slots = opts.slots ?? 64;
  const pool = opts.pool ?? 8;
  const base = opts.base ?? 64;
  const wlog = (await g.sh('grep -v DONE /tmp/wlog || true', { timeoutMs: 60_000 })).trim().split('\n').filter((l) => /^\d+ (ok|ERR)$/.test(l));
  const sums = new Map<number, string>();
  for (const l of (await g.sh('cat /tmp/pool.sums')).trim().split('\n')) {
    const [p, s] = l.trim().split(' ');
    sums.set(Number(p), s!);
  }
  const last = new Map<number, { i: number; ok: boolean }>();
  let failed = 0;
  for (const l of wlog) {
    const [is, st] = l.split(' ');
    const i = Number(is);
    if (st === 'ERR') failed++;
    last.set(i % slots, { i, ok: st === 'ok' });
  }
  const check = [...last].filter(([, v]) => v.ok).map(([s]) => s);
  const out = check.length
    ? await g.sh(`${slotTarget(opts.target).pick}; for s in ${check.join(' ')}; do echo "$s $(dd if=$DEV bs=65536 skip=$((s + ${base})) count=1 ${slotTarget(opts.target).iflags} 2>/dev/null | sha256sum | cut -d' ' -f1)"; done`, { timeoutMs: 300_000 })
    : '';
  const bad: number[] = [];
  let verified = 0;
  for (const l of out.trim().split('\n').filter((x) => /^\d+ [0-9a-f]{64}$/.test(x.trim()))) {
    const [ss, h] = l.trim().split(' ');
    const s = Number(ss);
    const want = sums.get(Math.floor(last.get(s)!.i / slots) % pool);
    if (h === want) verified++;
    else bad.push(s);
  }
  if (verified + bad.length !== check.length) bad.push(-1); // a read failed
  return { writes: wlog.length, failedWrites: failed, verified, bad, skipped: last.size - check.length };
}

// ---------------------------------------------------------------------------------------------
// A Bridge in its own process

export interface ChildMessage {
  id?: number;
  result?: unknown;
  error?: string;
  event?: string;
  data?: unknown;
  ready?: boolean;
}

/** Drives `tsx src/devkit/migration-faults.ts --bridge-child RUNDIR` over JSON lines. */
export class BridgeChild {
  readonly child: ChildProcess;
  readonly events: ChildMessage[] = [];
  /** Each event also as an EventEmitter event (name, data). */
  readonly emitter = new EventEmitter();
  readonly stderr: string[] = [];
  private nextId = 0;
  private readonly pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private readyP: Promise<void>;

  constructor(runDir: string) {
    const self = fileURLToPath(import.meta.url);
    this.child = spawn(process.execPath, ['--import', 'tsx', self, '--bridge-child', runDir], { stdio: ['pipe', 'pipe', 'pipe'], cwd: path.resolve(path.dirname(self), '../..') });
    let buf = '';
    let ready!: () => void;
    this.readyP = new Promise((r) => (ready = r));
    this.child.stdout!.on('data', (d: Buffer) => {
      buf += d.toString();
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        let m: ChildMessage;
        try {
          m = JSON.parse(line);
        } catch {
          this.stderr.push(line);
          continue;
        }
        if (m.ready) ready();
        else if (m.id !== undefined) {
          const p = this.pending.get(m.id);
          this.pending.delete(m.id);
          if (m.error !== undefined) p?.reject(new Error(m.error));
          else p?.resolve(m.result);
        } else {
          this.events.push(m);
          if (m.event) this.emitter.emit(m.event, m.data);
        }
      }
    });
    this.child.stderr!.on('data', (d: Buffer) => this.stderr.push(d.toString()));
    // USBROAM_E2E_KEEP: also in RUNDIR/bridge.log, kept with the test's directory.
    if (process.env.USBROAM_E2E_KEEP) {
      mkdirSync(runDir, { recursive: true });
      const out = createWriteStream(path.join(runDir, 'bridge.log'));
      this.child.stdout!.pipe(out);
      this.child.stderr!.pipe(out);
    }
    this.child.on('exit', () => {
      for (const p of this.pending.values()) p.reject(new Error('bridge child exited'));
      this.pending.clear();
    });
  }

  ready(): Promise<void> {
    return this.readyP;
  }

  call<T>(method: string, ...args: unknown[]): Promise<T> {
    const id = ++this.nextId;
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.child.stdin!.write(JSON.stringify({ id, method, args }) + '\n');
    });
  }

  /**
   * This child as a migration rig host bridge (migrateWithHandOff): addVm, prepareIncoming (its
   * `attached` resolves on the child's 'attached' event), and its 'handOff' events.
   */
  host(): HostBridge & { attach(req: AttachRequest): Promise<AttachmentInfo> } {
    return {
      addVm: (spec) => this.call('addVm', spec),
      attach: (req) => this.call<AttachmentInfo>('attach', req),
      prepareIncoming: async (req) => {
        let resolve!: (a: AttachmentInfo) => void;
        let reject!: (e: Error) => void;
        const attached = new Promise<AttachmentInfo>((res, rej) => ((resolve = res), (reject = rej)));
        const on = (d: { id: string; vm: string; info?: AttachmentInfo; error?: string }) => {
          if (d.id !== req.id || d.vm !== req.vm) return;
          this.emitter.off('attached', on);
          if (d.info) resolve(d.info);
          else reject(new Error(d.error ?? 'no take-over'));
        };
        this.emitter.on('attached', on);
        try {
          await this.call('prepareIncoming', req);
        } catch (err) {
          this.emitter.off('attached', on);
          throw err;
        }
        return { attached };
      },
      on: (event, fn) => this.emitter.on(event, fn),
      off: (event, fn) => this.emitter.off(event, fn),
    };
  }

  kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return Promise.resolve();
    const p = once(this.child, 'exit').then(() => {});
    this.child.kill(signal);
    return p;
  }
}

async function bridgeChildMain(runDir: string): Promise<void> {
  const { Bridge } = await import('../client/bridge/bridge.js');
  const { createLogger } = await import('../common/log.js');
  const log = createLogger({ level: process.env.USBROAM_CHILD_LOG ?? 'warn' });
  const bridge = new Bridge({ log, runDir });
  const out = (m: ChildMessage) => process.stdout.write(JSON.stringify(m) + '\n');
  bridge.on('handOff', (ev) => out({ event: 'handOff', data: ev }));
  const methods: Record<string, (...a: never[]) => unknown> = {
    addVm: (spec: { name: string; qmpSocket: string }) => bridge.addVm(spec),
    attach: (req: Parameters<typeof bridge.attach>[0]) => bridge.attach(req),
    prepareIncoming: async (req: Parameters<typeof bridge.prepareIncoming>[0]) => {
      const inc = await bridge.prepareIncoming(req);
      inc.attached.then(
        (info) => out({ event: 'attached', data: { id: inc.id, vm: inc.vm, info } }),
        (err: Error) => out({ event: 'attached', data: { id: inc.id, vm: inc.vm, error: err.message } }),
      );
      return { id: inc.id, vm: inc.vm, sessionId: inc.sessionId, socketPath: inc.socketPath };
    },
    list: () => bridge.list(),
    close: () => bridge.close(),
  };
  let buf = '';
  process.stdin.on('data', (d: Buffer) => {
    buf += d.toString();
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      const req = JSON.parse(line) as { id: number; method: string; args: never[] };
      const fn = methods[req.method];
      if (!fn) {
        out({ id: req.id, error: `unknown method ${req.method}` });
        continue;
      }
      Promise.resolve()
        .then(() => fn(...req.args))
        .then((result) => out({ id: req.id, result: result ?? null }))
        .catch((err: Error) => out({ id: req.id, error: err.message }));
    }
  });
  process.stdin.on('end', () => void bridge.close().finally(() => process.exit(0)));
  out({ ready: true });
}

if (process.argv[2] === '--bridge-child' && import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  void bridgeChildMain(process.argv[3] ?? path.join('/tmp', `usbroam-child-${process.pid}`));
}
