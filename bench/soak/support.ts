// What the soak parts share: a server process to soak, its resident memory, a latency histogram.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { startServerProcess, type ServerProcess } from '../../src/devkit/server-process.js';

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
  /** Stop it and remove its directory. */
  dispose(): Promise<void>;
}

/** `usbroam serve` over mutual TLS (the devkit's certificates), `bridge` allowed everything, a small disk in a temporary directory. */
export async function startSoakServer(args: string[] = [], dir = mkdtempSync(path.join(os.tmpdir(), 'usbroam-soak-'))): Promise<SoakServer> {
  const s = await startServerProcess(['--allow', 'bridge=*', '--disk-image', path.join(dir, 'disk.img'), '--disk-size-mib', '8', ...args]);
  return {
    ...s,
    port: Number(s.address.split(':').pop()),
    dir,
    dispose: async () => {
      await s.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
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
