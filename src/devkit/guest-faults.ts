// What the fault e2e tests (test/e2e/fault-*) and bench/soak/guest-faults.ts share: a guest whose
// slot writer prints a mark per completed write on /dev/ttyS1 (timestamped on the host, so a
// stall is measured in host time), the verdict of a fault as the guest saw it (longest gap
// between completed writes, failed writes, kernel lines), a USB host server restarted on the
// same port with the same disk image, and the bridge daemon (`usbroam bridge`) as a process
// that can be killed with SIGKILL.
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { REPO_ROOT } from '../common/repo-root.js';
import type { Guest } from './guest/guest.js';
import { classifyDmesg, MarkListener, type DmesgCounts } from './migration-faults.js';
import { startServerProcess, type ServerProcess } from './server-process.js';
import { testCerts } from './certs.js';

export { MarkListener };

/** QEMU arguments of a second serial port (/dev/ttyS1) on a host socket, for the writer's marks. */
export function markPortArgs(dir: string, name: string): { args: string[]; sock: string } {
  const sock = path.join(dir, `${name}-marks.sock`);
  return { sock, args: ['-chardev', `socket,id=mark0,path=${sock},server=on,wait=off`, '-device', 'isa-serial,chardev=mark0'] };
}

/** What the guest saw of one fault. */
export interface GuestView {
  /** Longest time without a completed write, from the fault on (ms, host clock). */
  stallMs: number;
  /** Writes that completed / failed in the window. */
  writes: number;
  failedWrites: number;
  /** Kernel lines of the window, classified. */
  dmesg: DmesgCounts;
}

/** Guest kernel log lines after `fromLine` (dmesg), and their count for the next window. */
export async function dmesgSince(g: Guest, fromLine: number): Promise<{ text: string; lines: number }> {
  const all = (await g.dmesg()).split('\n').filter((l) => l.trim() !== '');
  return { text: all.slice(fromLine).join('\n'), lines: all.length };
}

export async function dmesgLineCount(g: Guest): Promise<number> {
  return (await g.dmesg()).split('\n').filter((l) => l.trim() !== '').length;
}

/** The guest's view of [from, to] (performance.now()): write marks and the kernel lines since `dmesgFrom`. */
export async function guestView(g: Guest, marks: MarkListener, from: number, to: number, dmesgFrom: number): Promise<GuestView> {
  const w = marks.marks.filter((m) => m.t >= from && m.t <= to);
  const okTimes = w.filter((m) => /^W /.test(m.line)).map((m) => m.t);
  let stall = 0;
  let prev = from;
  for (const t of okTimes) {
    stall = Math.max(stall, t - prev);
    prev = t;
  }
  stall = Math.max(stall, to - prev);
  const d = await dmesgSince(g, dmesgFrom);
  return { stallMs: Math.round(stall), writes: okTimes.length, failedWrites: w.filter((m) => /^E /.test(m.line)).length, dmesg: classifyDmesg(d.text) };
}

/** Resolves at the first completed write mark after `after` (performance.now()). */
export async function nextWriteMark(marks: MarkListener, after: number, timeoutMs: number): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const m = marks.marks.find((x) => x.t > after && /^W /.test(x.line));
    if (m) return m.t;
    if (Date.now() > deadline) throw new Error(`no completed write in the guest within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** `usbroam serve` args of the fault rigs: the emulated disk on `image`, `graceMs`. */
export function faultServerArgs(image: string, graceMs: number, port?: number): string[] {
  return ['--allow', 'bridge=*', '--disk-image', image, '--disk-size-mib', '64', '--grace-ms', String(graceMs), ...(port ? ['--listen', `127.0.0.1:${port}`] : [])];
}

/** Start a server again on the port a killed one had (the bridge keeps its address). */
export async function restartServerOnPort(port: number, image: string, graceMs: number): Promise<ServerProcess> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await startServerProcess(faultServerArgs(image, graceMs, port));
    } catch (err) {
      if (attempt >= 20) throw err; // the port may linger a moment after the kill
      await new Promise((r) => setTimeout(r, 250));
    }
  }
}

export function portOf(address: string): number {
  return Number(address.slice(address.lastIndexOf(':') + 1));
}

/** The bridge daemon in its own process, with the development certificates for the server. */
export interface BridgeDaemon {
  child: ChildProcess;
  control: string;
  /** Parsed pino records (and raw lines that were not JSON, as { raw }). */
  records: Record<string, unknown>[];
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** Resolves with the first record matching `pred` (already seen or to come). */
  waitFor(pred: (r: Record<string, unknown>) => boolean, timeoutMs: number, what: string): Promise<Record<string, unknown>>;
  kill(signal?: NodeJS.Signals): Promise<void>;
}

export async function startBridgeDaemon(opts: { control: string; server: string; args: string[] }): Promise<BridgeDaemon> {
  const c = testCerts();
  const child = spawn(
    process.execPath,
    [path.join(REPO_ROOT, 'bin/usbroam.js'), 'bridge', '--control', opts.control, '--server', opts.server, '--server-ca', c.file('ca.pem'), '--server-cert', c.file('bridge.pem'), '--server-key', c.file('bridge.key'), ...opts.args],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  const records: Record<string, unknown>[] = [];
  const waiters = new Set<() => void>();
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) => child.once('exit', (code, signal) => r({ code, signal })));
  let buf = '';
  const onLine = (line: string) => {
    if (!line.trim()) return;
    try {
      records.push(JSON.parse(line));
    } catch {
      records.push({ raw: line });
    }
    if (process.env.USBROAM_TEST_LOG) process.stderr.write(`      bridge: ${line}\n`);
    for (const w of [...waiters]) w();
  };
  child.stdout!.on('data', (d: Buffer) => {
    buf += d.toString();
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      onLine(buf.slice(0, i));
      buf = buf.slice(i + 1);
    }
  });
  child.stderr!.on('data', (d: Buffer) => onLine(d.toString()));
  const waitFor = (pred: (r: Record<string, unknown>) => boolean, timeoutMs: number, what: string) =>
    new Promise<Record<string, unknown>>((resolve, reject) => {
      const check = () => {
        const r = records.find(pred);
        if (!r) return;
        cleanup();
        resolve(r);
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new Error(`bridge daemon: no ${what} within ${timeoutMs} ms; last lines:\n${records.slice(-15).map((r) => JSON.stringify(r)).join('\n')}`));
      }, timeoutMs);
      const cleanup = () => {
        clearTimeout(timer);
        waiters.delete(check);
      };
      waiters.add(check);
      check();
    });
  const d: BridgeDaemon = {
    child,
    control: opts.control,
    records,
    exited,
    waitFor,
    kill: async (signal = 'SIGKILL') => {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill(signal);
      await exited;
    },
  };
  await Promise.race([
    waitFor((r) => r.msg === 'bridge control API listening', 20_000, 'control API'),
    exited.then(({ code }) => {
      throw new Error(`bridge daemon exited with ${code}: ${records.map((r) => JSON.stringify(r)).join('\n')}`);
    }),
  ]);
  return d;
}
