// A private libvirtd for tests and the devkit: its own config, state, runtime, cache and log
// directories and its own sockets, so nothing depends on (or disturbs) a system libvirtd.
//
// libvirtd running as root has its directories compiled in (/etc/libvirt, /run/libvirt,
// /var/lib/libvirt, ...) and its QEMU driver takes a lock in /run/libvirt/qemu, so two on one
// machine need two mount namespaces: each instance runs under `unshare -m` with its own
// directories bind-mounted over those paths. Its sockets (unix_sock_dir) and everything the
// domains use (chardev sockets, QMP sockets, kernel, initrd) live in paths both namespaces share
// (/tmp, the repository). The QEMU driver runs without cgroups, security driver, per-domain
// mount namespaces or virtlogd, which a container does not have.
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export interface LibvirtDaemonOptions {
  /** Directory of this instance (created): etc/, run/, lib/, log/, sock/, libvirtd.log. */
  dir: string;
  /** The qemu hook (/etc/libvirt/hooks/qemu of this instance), written before the daemon starts. */
  qemuHook?: string;
  /** QEMU capabilities cache shared between instances (probing QEMU takes seconds). */
  capsCacheDir?: string;
  /** libvirtd log level (1 debug .. 4 error). Default 3. */
  logLevel?: number;
  /** Longest wait for the daemon to answer. Default 60 s. */
  startTimeoutMs?: number;
}

const BIND = ['/etc/libvirt', '/run/libvirt', '/var/lib/libvirt', '/var/cache/libvirt', '/var/log/libvirt'] as const;

const QEMU_CONF = [
  'security_driver = "none"',
  'user = "root"',
  'group = "root"',
  'dynamic_ownership = 0',
  'remember_owner = 0',
  'cgroup_controllers = [ ]',
  'namespaces = [ ]',
  'stdio_handler = "file"',
].join('\n');

const live = new Set<LibvirtDaemon>();
let exitHook = false;

/** Where libvirtd is (Debian's libvirt-daemon-system), or undefined. */
export function libvirtdBinary(): string | undefined {
  for (const p of ['/usr/sbin/libvirtd', '/usr/bin/libvirtd']) if (fs.existsSync(p)) return p;
  return undefined;
}

export class LibvirtDaemon {
  /** For virsh -c / virConnectOpen. */
  readonly uri: string;
  readonly socketPath: string;
  readonly logFile: string;
  private exited = false;
  private readonly exitP: Promise<void>;

  private constructor(
    readonly dir: string,
    readonly child: ChildProcess,
  ) {
    this.socketPath = path.join(dir, 'sock', 'libvirt-sock');
    this.uri = `qemu+unix:///system?socket=${this.socketPath}`;
    this.logFile = path.join(dir, 'libvirtd.log');
    this.exitP = new Promise((r) => child.once('exit', () => ((this.exited = true), r())));
  }

  static async start(opts: LibvirtDaemonOptions): Promise<LibvirtDaemon> {
    const bin = libvirtdBinary();
    if (!bin) throw new Error('libvirtd not installed (apt-get install --no-install-recommends libvirt-daemon-system libvirt-clients)');
    const dir = path.resolve(opts.dir);
    const sub = (s: string) => path.join(dir, s);
    for (const d of ['etc/hooks', 'run', 'lib', 'log', 'cache', 'sock']) fs.mkdirSync(sub(d), { recursive: true });
    const sock = sub('sock');
    if (path.join(sock, 'libvirt-sock-ro').length > 100) throw new Error(`libvirt socket path too long for AF_UNIX: ${sock}`);
    fs.writeFileSync(
      sub('etc/libvirtd.conf'),
      [`unix_sock_dir = "${sock}"`, 'auth_unix_rw = "none"', 'auth_unix_ro = "none"', `log_outputs = "${opts.logLevel ?? 3}:file:${sub('libvirtd.log')}"`].join('\n') + '\n',
    );
    fs.writeFileSync(sub('etc/qemu.conf'), QEMU_CONF + '\n');
    if (opts.qemuHook !== undefined) fs.writeFileSync(sub('etc/hooks/qemu'), opts.qemuHook, { mode: 0o755 });
    const cache = opts.capsCacheDir ? path.resolve(opts.capsCacheDir) : sub('cache');
    fs.mkdirSync(cache, { recursive: true });
    const sources: Record<(typeof BIND)[number], string> = {
      '/etc/libvirt': sub('etc'),
      '/run/libvirt': sub('run'),
      '/var/lib/libvirt': sub('lib'),
      '/var/cache/libvirt': cache,
      '/var/log/libvirt': sub('log'),
    };
    // The mount points must exist (outside the namespace too: /run/libvirt may not).
    for (const m of BIND) fs.mkdirSync(m, { recursive: true });
    const script = [...BIND.map((m) => `mount --bind '${sources[m]}' '${m}'`), `exec '${bin}' -f /etc/libvirt/libvirtd.conf -p '${sub('libvirtd.pid')}'`].join(' && ');
    const child = spawn('unshare', ['--mount', '--propagation', 'private', 'sh', '-c', script], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout!.on('data', (d: Buffer) => (out = (out + d.toString()).slice(-8192)));
    child.stderr!.on('data', (d: Buffer) => (out = (out + d.toString()).slice(-8192)));
    const daemon = new LibvirtDaemon(dir, child);
    live.add(daemon);
    installExitHook();
    const deadline = Date.now() + (opts.startTimeoutMs ?? 60_000);
    for (;;) {
      if (daemon.exited) {
        live.delete(daemon);
        throw new Error(`libvirtd exited during start-up: ${out.trim()}\n${tail(daemon.logFile)}`);
      }
      if (fs.existsSync(daemon.socketPath)) {
        try {
          await daemon.virsh(['version'], { timeoutMs: 30_000 });
          return daemon;
        } catch (err) {
          if (Date.now() > deadline) {
            await daemon.stop();
            throw new Error(`libvirtd does not answer: ${(err as Error).message}\n${tail(daemon.logFile)}`);
          }
        }
      } else if (Date.now() > deadline) {
        await daemon.stop();
        throw new Error(`libvirtd did not create ${daemon.socketPath}: ${out.trim()}\n${tail(daemon.logFile)}`);
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  /** Run virsh against this daemon; resolves with stdout, rejects with stderr. */
  virsh(args: string[], opts: { timeoutMs?: number; input?: string } = {}): Promise<string> {
    return new Promise((resolve, reject) => {
      const c = execFile('virsh', ['-q', '-c', this.uri, ...args], { timeout: opts.timeoutMs ?? 120_000, maxBuffer: 16 << 20 }, (err, stdout, stderr) => {
        if (err) reject(new Error(`virsh ${args.join(' ')}: ${(stderr || err.message).trim()}`));
        else resolve(stdout);
      });
      if (opts.input !== undefined) c.stdin!.end(opts.input);
    });
  }

  /** Names of the running domains. */
  async runningDomains(): Promise<string[]> {
    return (await this.virsh(['list', '--name'])).split('\n').map((s) => s.trim()).filter(Boolean);
  }

  /** QEMU's log of a domain (this instance's /var/log/libvirt/qemu/NAME.log). */
  qemuLog(domain: string): string {
    return tail(path.join(this.dir, 'log', 'qemu', `${domain}.log`), 4000);
  }

  /** PIDs of the QEMU processes this instance started (its pid files). */
  qemuPids(): number[] {
    const d = path.join(this.dir, 'run', 'qemu');
    let names: string[] = [];
    try {
      names = fs.readdirSync(d).filter((n) => n.endsWith('.pid'));
    } catch {
      return [];
    }
    return names.map((n) => Number(fs.readFileSync(path.join(d, n), 'utf8').trim())).filter((p) => Number.isInteger(p) && p > 0);
  }

  /**
   * Destroy every domain, stop the daemon (SIGTERM, then SIGKILL), and kill any QEMU it left
   * (libvirtd does not take its domains down with it). Idempotent; never throws.
   */
  async stop(): Promise<void> {
    if (!this.exited) {
      const doms = await this.runningDomains().catch(() => []);
      await Promise.allSettled(doms.map((d) => this.virsh(['destroy', d], { timeoutMs: 20_000 })));
    }
    killAll(this.qemuPids());
    if (!this.exited) {
      this.child.kill('SIGTERM');
      const t = setTimeout(() => this.child.kill('SIGKILL'), 5000);
      await this.exitP;
      clearTimeout(t);
    }
    live.delete(this);
  }

  /** Synchronous last resort (process exit). */
  killNow(): void {
    killAll(this.qemuPids());
    if (!this.exited) this.child.kill('SIGKILL');
  }
}

function killAll(pids: number[]): void {
  for (const p of pids) {
    try {
      process.kill(p, 'SIGKILL');
    } catch {
      /* gone */
    }
  }
}

function installExitHook(): void {
  if (exitHook) return;
  exitHook = true;
  process.on('exit', () => {
    for (const d of live) d.killNow();
  });
}

function tail(file: string, n = 2000): string {
  try {
    return fs.readFileSync(file, 'utf8').slice(-n);
  } catch {
    return '';
  }
}

/** A QEMU capabilities cache shared by the instances on this machine. */
export function sharedCapsCacheDir(): string {
  return path.join(os.tmpdir(), 'usbroam-libvirt-cache');
}
