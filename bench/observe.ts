// npm run bench:observe — what metrics cost the server per URB: two USB host servers in their
// own processes, one with --metrics-listen (scraped each round), one without, driven in
// interleaved rounds with the same small bulk IN URBs against the emulated loopback device.
// Server CPU per URB comes from /proc/PID/stat. Progress on stderr; the last stdout line is JSON.
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { UsbHostClient } from '../src/client/sdk/client.js';
import { ensureCerts } from './ceilings/client.js';
import path from 'node:path';

const log = (s: string) => process.stderr.write(`[bench:observe] ${s}\n`);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 7);
const URBS = Number(process.env.BENCH_URBS ?? 20000);
const WINDOW = 64;

interface Srv {
  child: ChildProcess;
  address: string;
  metrics?: string;
}

async function start(certs: string, metrics: boolean): Promise<Srv> {
  const c = (n: string) => path.join(certs, n);
  const args = ['bin/usbroam.js', 'serve', '--listen', '127.0.0.1:0', '--ca', c('ca.pem'), '--cert', c('server.pem'), '--key', c('server.key'), '--allow', 'bridge=*', '--disk-size-mib', '8', '--disk-image', `/tmp/usbroam-bench-observe-${process.pid}-${metrics}.img`];
  if (metrics) args.push('--metrics-listen', '127.0.0.1:0');
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'inherit'] });
  return new Promise((resolve, reject) => {
    let buf = '';
    let metricsAt: string | undefined;
    child.stdout!.on('data', (d: Buffer) => {
      buf += d.toString();
      for (let i; (i = buf.indexOf('\n')) >= 0; buf = buf.slice(i + 1)) {
        const j = JSON.parse(buf.slice(0, i)) as { msg: string; address?: string; metrics?: string };
        if (j.msg === 'serving Prometheus metrics') metricsAt = new URL(j.metrics!).host;
        if (j.msg === 'USB host server listening') resolve({ child, address: j.address!, metrics: metricsAt });
      }
    });
    child.on('exit', (code) => reject(new Error(`server exited with ${code}`)));
  });
}

function cpuSeconds(pid: number): number {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(f[11]) + Number(f[12])) / 100; // utime, stime in clock ticks (USER_HZ 100)
}

async function round(s: Srv, client: UsbHostClient): Promise<{ cpuUsPerUrb: number; urbsPerSec: number }> {
  const dev = await client.openDevice({ serial: 'USBROAM-LOOP-0001' });
  await dev.selectConfiguration(1);
  const cpu0 = cpuSeconds(s.child.pid!);
  const t0 = performance.now();
  let next = 0;
  const worker = async () => {
    while (next++ < URBS) await dev.transferIn(0x81, 512);
  };
  await Promise.all(Array.from({ length: WINDOW }, worker));
  const ms = performance.now() - t0;
  if (s.metrics) await (await fetch(`http://${s.metrics}/metrics`)).text();
  const cpu = cpuSeconds(s.child.pid!) - cpu0;
  await dev.close();
  return { cpuUsPerUrb: (cpu * 1e6) / URBS, urbsPerSec: URBS / (ms / 1000) };
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

async function main(): Promise<void> {
  const certs = process.env.USBROAM_CERTS_DIR ?? path.resolve('certs/out');
  ensureCerts(certs);
  const base = await start(certs, false);
  const withMetrics = await start(certs, true);
  const tls = { ca: path.join(certs, 'ca.pem'), cert: path.join(certs, 'bridge.pem'), key: path.join(certs, 'bridge.key') };
  const cb = new UsbHostClient({ address: base.address, ...tls });
  const cm = new UsbHostClient({ address: withMetrics.address, ...tls });
  await round(base, cb);
  await round(withMetrics, cm); // warm-up
  const cpuRatios: number[] = [];
  const rateRatios: number[] = [];
  const rows: { base: number; metrics: number }[] = [];
  for (let r = 0; r < ROUNDS; r++) {
    // a: with metrics, b: without; which goes first alternates.
    let a, b;
    if (r % 2) {
      a = await round(withMetrics, cm);
      b = await round(base, cb);
    } else {
      b = await round(base, cb);
      a = await round(withMetrics, cm);
    }
    cpuRatios.push(a.cpuUsPerUrb / b.cpuUsPerUrb);
    rateRatios.push(a.urbsPerSec / b.urbsPerSec);
    rows.push({ base: b.cpuUsPerUrb, metrics: a.cpuUsPerUrb });
    log(`round ${r + 1}/${ROUNDS}: server CPU per URB ${b.cpuUsPerUrb.toFixed(1)} µs without metrics, ${a.cpuUsPerUrb.toFixed(1)} µs with; URB/s ratio ${(a.urbsPerSec / b.urbsPerSec).toFixed(3)}`);
  }
  cb.close();
  cm.close();
  base.child.kill();
  withMetrics.child.kill();
  console.log(
    JSON.stringify({
      urbsPerRound: URBS,
      rounds: ROUNDS,
      serverCpuUsPerUrb: { withoutMetrics: median(rows.map((x) => x.base)), withMetrics: median(rows.map((x) => x.metrics)) },
      cpuPerUrbRatio: { median: median(cpuRatios), min: Math.min(...cpuRatios), max: Math.max(...cpuRatios) },
      urbsPerSecRatio: { median: median(rateRatios), min: Math.min(...rateRatios), max: Math.max(...rateRatios) },
    }),
  );
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
