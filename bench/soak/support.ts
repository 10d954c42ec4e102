// What the soak parts share: a server process to soak, its resident memory, a latency histogram.
import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { startServerProcess, type ServerProcess } from '../../src/devkit/server-process.js';
import { REPO_ROOT } from '../../src/common/repo-root.js';

/** VmRSS of process `pid`, KiB. */
export function rssKib(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'latin1'));
  if (!m) throw new Error(`no VmRSS for process ${pid}`);
  return Number(m[1]);
}

/** The median of `n` RSS samples `everyMs` apart (one sample catches a GC half done). */
export async function settledRssKib(pid: number, n = 5, everyMs = 200): Promise<number> {
  const xs: number[] = [];
  for (let i = 0; i < n; i++) {
    await new Promise((r) => setTimeout(r, everyMs));
    xs.push(rssKib(pid));
  }
  xs.sort((a, b) => a - b);
  return xs[n >> 1]!;
}

export interface SoakServer extends ServerProcess {
  port: number;
  dir: string;
  /** The server's inspector port (127.0.0.1), when started with `inspect`. */
  inspectPort?: number;
  /** Stop it and remove its directory. */
  dispose(): Promise<void>;
}

/** A TCP port free on 127.0.0.1 just now. */
async function freePort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise((r) => srv.close(r));
  return port;
}

/**
 * `usbroam serve` over mutual TLS (the devkit's certificates), `bridge` allowed everything, a small
 * disk in a temporary directory. With `inspect`, its inspector listens on 127.0.0.1 so that
 * liveMemoryKib can collect its garbage before a memory figure is taken.
 */
export async function startSoakServer(args: string[] = [], dir = mkdtempSync(path.join(os.tmpdir(), 'usbroam-soak-')), opts: { inspect?: boolean } = {}): Promise<SoakServer> {
  const inspectPort = opts.inspect ? await freePort() : undefined;
  const s = await startServerProcess(['--allow', 'bridge=*', '--disk-image', path.join(dir, 'disk.img'), '--disk-size-mib', '8', ...args], {
    nodeArgs: inspectPort ? [`--inspect=127.0.0.1:${inspectPort}`] : [],
  });
  return {
    ...s,
    port: Number(s.address.split(':').pop()),
    dir,
    inspectPort,
    dispose: async () => {
      await s.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/**
 * What the server holds live: two full garbage collections through its inspector
 * (inspector-gc.mjs), then its V8 heap in use, its Buffers' bytes and its settled RSS, KiB. Without the collection a
 * delta of a few MiB is lost in the noise of when the collector last ran (64 idle sessions once
 * measured -85 KiB each).
 */
export async function liveMemoryKib(server: SoakServer): Promise<{ heapUsedKib: number; arrayBuffersKib: number; rssKib: number }> {
  if (!server.inspectPort) throw new Error('liveMemoryKib: the server was started without inspect');
  const out = await new Promise<string>((resolve, reject) =>
    execFile(process.execPath, ['--experimental-websocket', path.join(REPO_ROOT, 'bench/soak/inspector-gc.mjs'), String(server.inspectPort)], { timeout: 40_000 }, (err, stdout, stderr) =>
      err ? reject(new Error(`inspector-gc on the server (pid ${server.child.pid}): ${stderr.trim() || err.message}`)) : resolve(stdout),
    ),
  );
  const usage = JSON.parse(out.trim().split('\n').pop()!) as { usedSize: number; arrayBuffers: number };
  return { heapUsedKib: Math.round(usage.usedSize / 1024), arrayBuffersKib: Math.round(usage.arrayBuffers / 1024), rssKib: await settledRssKib(server.child.pid!) };
}

/** Round-trip times in log buckets (about 1 % wide), so millions of samples cost a few KiB. */
export class LatencyHistogram {
  private static readonly STEP = Math.log(1.01);
  private readonly buckets = new Map<number, number>();
  count = 0;

  add(us: number): void {
    const b = Math.floor(Math.log(Math.max(us, 1)) / LatencyHistogram.STEP);
    this.buckets.set(b, (this.buckets.get(b) ?? 0) + 1);
    this.count++;
  }

  /** The value below which fraction `q` of the samples fall (bucket midpoint), or NaN without samples. */
  quantile(q: number): number {
    if (!this.count) return NaN;
    const keys = [...this.buckets.keys()].sort((a, b) => a - b);
    const rank = q * this.count;
    let seen = 0;
    for (const k of keys) {
      seen += this.buckets.get(k)!;
      if (seen >= rank) return Math.exp((k + 0.5) * LatencyHistogram.STEP);
    }
    return Math.exp((keys[keys.length - 1]! + 0.5) * LatencyHistogram.STEP);
  }
}
