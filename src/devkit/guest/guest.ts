// startGuest(): a Linux guest under QEMU TCG for the end-to-end tests, the benches and the demo.
//
//   const guest = await startGuest({ name: 'vm1', extraArgs: ['-device', 'qemu-xhci,id=xhci'] });
//   try {
//     const { output, exitCode } = await guest.console.run('uname -r');
//     await guest.qmp.execute('device_add', { driver: 'usb-kbd', bus: 'xhci.0' });
//   } finally {
//     await guest.stop();
//   }
//
// Each guest gets a temp dir holding: qmp.sock (commands: guest.qmp),
// qmp-events.sock (a second QMP monitor for a long-lived event listener:
// guest.events; a QMP socket serves one client at a time), console.sock (the
// serial port; the harness listens, QEMU connects, so no boot output is
// lost), console.log and qemu.log.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { QmpClient } from '../../qemu/qmp/client.js';
import { GuestCommandTimeoutError, GuestConsole, type RunOptions, type RunResult } from './console.js';
import { kernelLinesInMemoryDump } from './memory-dump-log.js';
import { QBOOT_ROM, QEMU_BINARY, ensureGuestImage, findGuestImage, type GuestImage } from './image.js';

export * from './image.js';
export * from './console.js';

export interface StartGuestOptions {
  /** Label for logs and the temp dir. Default "guest". */
  name?: string;
  /** Image to boot. Default: the cached one, built if missing (ensureGuestImage). */
  image?: GuestImage;
  /** Guest RAM. Default 128 MiB. */
  memoryMb?: number;
  /** Extra QEMU arguments, e.g. ['-device', 'qemu-xhci,id=xhci'] or ['-incoming', 'defer']. */
  extraArgs?: string[];
  /** Appended to the kernel command line ("console=ttyS0 quiet ..."). */
  append?: string;
  /**
   * Wait until the guest's shell answers. Default true, except when
   * extraArgs contain -incoming (the VM does not run until migration) or -S.
   */
  waitForBoot?: boolean;
  /** Default 180 s. */
  bootTimeoutMs?: number;
  /** Parent of the per-guest temp dir. Default os.tmpdir(). */
  tmpRoot?: string;
  /** Keep the temp dir after stop() (also: env USBROAM_E2E_KEEP=1). */
  keepTmp?: boolean;
  /** Progress log. Default: lines to stderr (silence with env USBROAM_E2E_QUIET=1). */
  log?: (line: string) => void;
}

export interface Guest {
  readonly name: string;
  /** Per-guest temp dir (sockets, logs; put test files here too). */
  readonly dir: string;
  readonly pid: number;
  readonly image: GuestImage;
  /** Paths of the sockets. */
  readonly qmpPath: string;
  readonly qmpEventsPath: string;
  readonly consolePath: string;
  /** QMP client for commands. */
  readonly qmp: QmpClient;
  /** QMP client on the second monitor, for events (or commands that must not queue behind qmp). */
  readonly events: QmpClient;
  readonly console: GuestConsole;
  /** Launch to shell-ready, in ms (undefined when not waited for). */
  readonly bootMs: number | undefined;
  /** Shortcut for console.run. */
  run(command: string, options?: RunOptions): Promise<RunResult>;
  /** Like run, but throws unless the exit code is 0; returns the output. */
  sh(command: string, options?: RunOptions): Promise<string>;
  /** Wait until the guest shell is up (what startGuest does unless waitForBoot is false). */
  waitForBoot(timeoutMs?: number): Promise<number>;
  /** Poll inside the guest until `path` exists. */
  waitForPath(guestPath: string, options?: { timeoutMs?: number }): Promise<void>;
  /** The guest kernel log. */
  dmesg(): Promise<string>;
  /** QEMU's stderr so far. */
  qemuLog(): string;
  /** Resolves when QEMU exits. */
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  readonly hasExited: boolean;
  /** Kill QEMU (SIGTERM, then SIGKILL), close clients, remove the temp dir. Idempotent. */
  stop(): Promise<void>;
}

const live = new Set<ChildProcess>();
let exitHookInstalled = false;
function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  // Never leave QEMU running when the test process goes away.
  process.on('exit', () => {
    for (const c of live) {
      try {
        c.kill('SIGKILL');
      } catch {
        /* ignore */
      }
    }
  });
}

function defaultLog(line: string): void {
  if (process.env.USBROAM_E2E_QUIET === '1') return;
  process.stderr.write(`      ${line}\n`);
}

export async function startGuest(options: StartGuestOptions = {}): Promise<Guest> {
  const name = options.name ?? 'guest';
  const log = options.log ?? defaultLog;
  const extra = options.extraArgs ?? [];
  const waitBoot = options.waitForBoot ?? !(extra.includes('-incoming') || extra.includes('-S'));
  const bootTimeoutMs = options.bootTimeoutMs ?? 180_000;
  const image = options.image ?? findGuestImage() ?? (await ensureGuestImage({ log }));
  const keep = options.keepTmp ?? process.env.USBROAM_E2E_KEEP === '1';

  const dir = fs.mkdtempSync(path.join(options.tmpRoot ?? os.tmpdir(), `usbroam-${name.replace(/[^\w-]/g, '_')}-`));
  const qmpPath = path.join(dir, 'qmp.sock');
  const qmpEventsPath = path.join(dir, 'qmp-events.sock');
  const consolePath = path.join(dir, 'console.sock');
  if (consolePath.length > 100) throw new Error(`socket path too long for AF_UNIX: ${consolePath}`);

  const cons = new GuestConsole(path.join(dir, 'console.log'), (line) => log(`[${name}] ${line}`));
  const consoleServer = net.createServer();
  const consoleConnected = new Promise<void>((resolve) => {
    consoleServer.once('connection', (sock) => {
      cons.attach(sock);
      consoleServer.close(); // one connection is all QEMU makes
      resolve();
    });
  });
  await new Promise<void>((resolve, reject) => {
    consoleServer.once('error', reject);
    consoleServer.listen(consolePath, () => resolve());
  });

  const args = [
    '-name', name,
    '-accel', 'tcg',
    '-cpu', 'max',
    '-m', String(options.memoryMb ?? 128),
    '-smp', '1',
    '-nodefaults', '-no-user-config',
    '-vga', 'none', '-display', 'none',
    '-no-reboot',
    ...(fs.existsSync(QBOOT_ROM) ? ['-bios', QBOOT_ROM] : []),
    '-kernel', image.kernel,
    '-initrd', image.initrd,
    '-append', `console=ttyS0 quiet${options.append ? ` ${options.append}` : ''}`,
    '-chardev', `socket,id=con0,path=${consolePath}`,
    '-serial', 'chardev:con0',
    '-qmp', `unix:${qmpPath},server=on,wait=off`,
    '-qmp', `unix:${qmpEventsPath},server=on,wait=off`,
    ...extra,
  ];
  fs.writeFileSync(path.join(dir, 'qemu.cmdline'), [QEMU_BINARY, ...args].map((a) => (/[\s"']/.test(a) ? JSON.stringify(a) : a)).join(' ') + '\n');

  installExitHook();
  const t0 = Date.now();
  const child = spawn(QEMU_BINARY, args, { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
  live.add(child);
  let qemuStderr = '';
  const qemuLogStream = fs.createWriteStream(path.join(dir, 'qemu.log'));
  const onOut = (d: Buffer) => {
    qemuLogStream.write(d);
    qemuStderr = (qemuStderr + d.toString('utf8')).slice(-64 * 1024);
  };
  child.stdout!.on('data', onOut);
  child.stderr!.on('data', onOut);
  let hasExited = false;
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.once('exit', (code, signal) => {
      hasExited = true;
      live.delete(child);
      resolve({ code, signal });
    });
    child.once('error', (err) => {
      hasExited = true;
      live.delete(child);
      qemuStderr += `\nspawn error: ${err.message}`;
      resolve({ code: null, signal: null });
    });
  });
  log(`[${name}] QEMU started (pid ${child.pid}) in ${dir}`);

  const qmp = new QmpClient({ path: qmpPath, connectTimeoutMs: 30_000 });
  const events = new QmpClient({ path: qmpEventsPath, connectTimeoutMs: 30_000 });
  let stopped = false;
  let stopping: Promise<void> | null = null;

  const stop = (): Promise<void> => {
    if (stopping) return stopping;
    stopping = (async () => {
      stopped = true;
      await Promise.allSettled([qmp.close(), events.close()]);
      if (!hasExited) {
        child.kill('SIGTERM');
        const t = setTimeout(() => {
          if (!hasExited) child.kill('SIGKILL');
        }, 3000);
        await exited;
        clearTimeout(t);
      }
      cons.close();
      consoleServer.close();
      await new Promise<void>((r) => qemuLogStream.end(() => r()));
      if (!keep) fs.rmSync(dir, { recursive: true, force: true });
      else log(`[${name}] kept ${dir}`);
    })();
    return stopping;
  };

  /** Reject as soon as QEMU exits (used while starting up). */
  const failOnExit = exited.then(({ code, signal }) => {
    if (!stopped) throw new Error(`[${name}] QEMU exited (code ${code}, signal ${signal}) during startup:\n${qemuStderr.slice(-3000)}`);
    return new Promise<never>(() => {});
  });
  failOnExit.catch(() => {}); // only meaningful while raced; never unhandled

  /**
   * What QEMU says of a guest whose console stopped answering: run state and where the vCPU is;
   * for a console silent from the start, also kernel messages found in a dump of guest memory.
   */
  const consoleDiagnostics = async (silent: boolean): Promise<string> => {
    const part = async (what: string, f: () => Promise<string>) => {
      try {
        return `${what}: ${await f()}`;
      } catch (err) {
        return `${what}: (${(err as Error).message})`;
      }
    };
    const status = await part('QEMU status', async () => JSON.stringify(await events.execute('query-status', undefined, { timeoutMs: 5000 })));
    const regs = await part('vCPU', async () => {
      const r = await events.execute<string>('human-monitor-command', { 'command-line': 'info registers' }, { timeoutMs: 5000 });
      return (r.match(/RIP=\S+|HLT=\d|EFL=\S+/g) ?? [r.slice(0, 200)]).join(' ');
    });
    if (!silent) return `${status}; ${regs}`;
    const dumped = await part('kernel messages in guest memory', async () => {
      const file = path.join(dir, 'memory.dump');
      try {
        await events.execute('dump-guest-memory', { paging: false, protocol: `file:${file}` }, { timeoutMs: 120_000 });
        const lines = kernelLinesInMemoryDump(fs.readFileSync(file));
        return lines.length ? `\n  ${lines.join('\n  ')}` : 'none found';
      } finally {
        fs.rmSync(file, { force: true });
      }
    });
    return `${status}; ${regs}\n--- ${dumped}`;
  };
  const run = async (command: string, o?: RunOptions): Promise<RunResult> => {
    try {
      return await cons.run(command, o);
    } catch (err) {
      if (err instanceof GuestCommandTimeoutError && !hasExited) err.message = `[${name}] ${err.message}\n--- ${await consoleDiagnostics(err.silent)}`;
      throw err;
    }
  };
  let bootMs: number | undefined;
  const waitForBoot = async (timeoutMs = bootTimeoutMs): Promise<number> => {
    const tb = Date.now();
    await Promise.race([consoleConnected, failOnExit]);
    const m = await Promise.race([cons.waitFor(/USBROAM-GUEST-READY ([\d.]+)/, { timeoutMs, fromStart: true }), failOnExit]);
    const r = await Promise.race([run('echo ok', { timeoutMs: 30_000 }), failOnExit]);
    if (r.output.trim() !== 'ok') throw new Error(`[${name}] guest shell not answering as expected: ${JSON.stringify(r.output)}`);
    const since = Date.now() - t0;
    log(`[${name}] guest ready ${(since / 1000).toFixed(1)} s after launch (guest uptime at /init end ${m[1]} s, waited ${((Date.now() - tb) / 1000).toFixed(1)} s)`);
    return since;
  };

  try {
    await Promise.race([Promise.all([qmp.connect(), events.connect()]), failOnExit]);
    if (waitBoot) bootMs = await waitForBoot();
    else await Promise.race([consoleConnected, failOnExit]);
  } catch (err) {
    const keepOnFail = keep;
    await stop();
    if (!keepOnFail && !(err instanceof Error && err.message.includes('QEMU exited'))) {
      (err as Error).message += `\nQEMU log tail:\n${qemuStderr.slice(-2000)}\nconsole tail:\n${cons.transcript().slice(-2000)}`;
    }
    throw err;
  }

  const guest: Guest = {
    name,
    dir,
    pid: child.pid!,
    image,
    qmpPath,
    qmpEventsPath,
    consolePath,
    qmp,
    events,
    console: cons,
    get bootMs() {
      return bootMs;
    },
    run,
    async sh(command, o) {
      const r = await run(command, o);
      if (r.exitCode !== 0) throw new Error(`[${name}] guest command failed (exit ${r.exitCode}): ${command}\n${r.output}`);
      return r.output;
    },
    async waitForBoot(timeoutMs) {
      bootMs = await waitForBoot(timeoutMs);
      return bootMs;
    },
    async waitForPath(guestPath, o = {}) {
      const timeoutMs = o.timeoutMs ?? 30_000;
      const tries = Math.max(1, Math.ceil(timeoutMs / 100));
      const q = `'${guestPath.replace(/'/g, `'\\''`)}'`;
      const r = await run(`i=0; while [ ! -e ${q} ] && [ $i -lt ${tries} ]; do usleep 100000; i=$((i+1)); done; [ -e ${q} ]`, {
        timeoutMs: timeoutMs + 30_000,
      });
      if (r.exitCode !== 0) throw new Error(`[${name}] ${guestPath} did not appear in the guest within ${timeoutMs} ms`);
    },
    async dmesg() {
      const r = await run('dmesg');
      return r.output;
    },
    qemuLog: () => qemuStderr,
    exited,
    get hasExited() {
      return hasExited;
    },
    stop,
  };
  return guest;
}
