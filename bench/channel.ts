// npm run bench:channel — the URB channel against the emulated loopback device: a USB host server
// in its own process, this process as the client, mutual TLS over loopback. In the same run, in
// the same rounds, the bare transports under it (raw TLS socket, raw grpc-js stream: the
// bench/ceilings server, its own process) do the same work.
//
//   npm run bench:channel [-- --rounds N] [--mib N] [--rtts N]
//   env: USBROAM_BENCH_ROUNDS, USBROAM_CERTS_DIR
//
// Every round measures, one right after the other (the order rotating from round to round):
//   - bulk OUT: N MiB of 64 KiB bulk OUT URBs, 16 in flight; raw TLS and grpc-js client->server
//     the same bytes in 64 KiB writes / messages;
//   - bulk IN: the same, device -> client / server -> client;
//   - round trips: 31 B bulk OUT URBs (a CBW's size) one at a time; grpc-js 31 B ping-pong;
//   - control round trips (GET_DESCRIPTOR), small URBs (64 B bulk OUT, 1024 in flight) and 100 B
//     grpc-js messages pipelined client->server.
// Each phase is a fixed amount of work; its CPU is user+sys of this process (process.cpuUsage)
// plus the server process doing it (/proc/PID/stat). A ratio (bulk_ratio, transport_ratio,
// rtt_ratio, cpu_*_ratio) is the median of the per-round ratios, with `_min` / `_max`; a rate or
// a cost is the median over the rounds (also with `_min` / `_max`).
// Progress goes to stderr; the last line on stdout is one JSON object.
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { UsbHostClient } from '../src/client/sdk/client.js';
import { tuneGcForBulkTransfers } from '../src/common/gc-tuning.js';
import { UrbStatus } from '../src/gen/usbroam/v1/usbhost.js';
import { ensureCerts, startCeilingsPeer } from './ceilings/client.js';
import { measureCpu } from './support/cpu.js';
import { ensureCommands } from './support/need.js';
import { median, positiveInt, putRatio, putSpread, rotated } from './support/rounds.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const log = (s: string) => process.stderr.write(`[bench:channel] ${s}\n`);

const { values: flags } = parseArgs({ options: { rounds: { type: 'string' }, mib: { type: 'string' }, rtts: { type: 'string' } } });
const rounds = positiveInt('rounds', flags.rounds ?? process.env.USBROAM_BENCH_ROUNDS, 5);
const mib = positiveInt('mib', flags.mib, 64);
const rttCount = positiveInt('rtts', flags.rtts, 3000);
const CHUNK = 64 * 1024;
const CHUNKS = (mib * 1024 * 1024) / CHUNK;
const MiB = 1024 * 1024;
const SMALL_URBS = 40_000;
const GRPC_SMALL_MSGS = 100_000;
const CONTROL_RTTS = 1000;

async function startServer(certs: string): Promise<{ address: string; child: ChildProcess; stop(): void }> {
  const child = spawn(
    process.execPath,
    [
      path.join(root, 'bin/usbroam.js'),
      'serve',
      '--listen',
      '127.0.0.1:0',
      '--ca',
      path.join(certs, 'ca.pem'),
      '--cert',
      path.join(certs, 'server.pem'),
      '--key',
      path.join(certs, 'server.key'),
      '--allow',
      'bridge=*',
      '--disk-size-mib',
      '8',
      '--log-level',
      'info',
    ],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  );
  const address = await new Promise<string>((resolve, reject) => {
    let buf = '';
    child.stdout!.on('data', (d: Buffer) => {
      buf += d.toString();
      const m = /"address":"([^"]+)"[^\n]*USB host server listening/.exec(buf);
      if (m) resolve(m[1]!);
    });
    child.on('exit', (code) => reject(new Error(`server exited with ${code}`)));
  });
  return { address, child, stop: () => child.kill('SIGTERM') };
}

function percentile(xs: number[], p: number): number {
  const sorted = [...xs].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

/** Runs `one` `count` times with at most `window` in flight. */
async function pipelined(window: number, count: number, one: () => Promise<unknown>): Promise<void> {
  let started = 0;
  await Promise.all(
    Array.from({ length: Math.min(window, count) }, async () => {
      while (started < count) {
        started++;
        await one();
      }
    }),
  );
}

/** Each call timed, one at a time: microseconds. */
async function timed(count: number, one: () => Promise<unknown>): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < count; i++) {
    const t = performance.now();
    await one();
    out.push((performance.now() - t) * 1000);
  }
  return out;
}

async function main() {
  tuneGcForBulkTransfers(); // as the usbroam CLI (server, bridge) does
  ensureCommands([{ command: 'openssl', apt: 'openssl' }]); // scripts/make-certs.mjs
  const certs = process.env.USBROAM_CERTS_DIR ?? path.join(root, 'certs/out');
  ensureCerts(certs);
  const srv = await startServer(certs);
  const srvPid = srv.child.pid!;
  log(`server on ${srv.address} (pid ${srvPid})`);
  const peer = await startCeilingsPeer({ certsDir: certs });
  log(`transport ceilings server (raw TLS, raw grpc-js) pid ${peer.pid}`);
  const client = new UsbHostClient({
    address: srv.address,
    ca: path.join(certs, 'ca.pem'),
    cert: path.join(certs, 'bridge.pem'),
    key: path.join(certs, 'bridge.key'),
  });
  const dev = await client.openDevice({ serial: 'USBROAM-LOOP-0001' }, { maxInFlight: 4096 });
  await dev.selectConfiguration(1);

  const big = new Uint8Array(CHUNK).fill(0x5a);
  const cbw = new Uint8Array(31);
  const small = new Uint8Array(64);
  const getDesc = async () => {
    const r = await dev.controlTransferIn({ requestType: 'standard', recipient: 'device', request: 6, value: 0x0100, index: 0 }, 18);
    if (r.status !== UrbStatus.URB_STATUS_SUCCESS) throw new Error('control transfer failed');
  };
  const bulkOut = () => pipelined(16, CHUNKS, () => dev.transferOut(1, big));
  const bulkIn = () =>
    pipelined(16, CHUNKS, async () => {
      const r = await dev.transferIn(1, CHUNK);
      if (r.data.length !== CHUNK) throw new Error(`short bulk IN: ${r.data.length} of ${CHUNK} bytes`);
    });

  // Warm-up: JIT, TLS sessions, flow-control windows.
  log('warm-up');
  await pipelined(16, 64, () => dev.transferOut(1, big));
  await pipelined(16, 64, () => dev.transferIn(1, CHUNK));
  await timed(300, () => dev.transferOut(1, cbw));
  await timed(300, getDesc);
  await pipelined(256, 5000, () => dev.transferOut(1, small));
  await peer.tlsUp(CHUNK, 64);
  await peer.tlsDown(CHUNK, 64);
  await peer.grpcUp(CHUNK, 64);
  await peer.grpcDown(CHUNK, 64);
  await peer.grpcPingPong(31, 300);
  await peer.grpcUp(100, 5000);

  const s: Record<string, number[]> = {};
  const push = (k: string, v: number) => (s[k] ??= []).push(v);
  const usbroamSide = <T>(work: () => Promise<T>) => measureCpu([srvPid], work);
  const peerSide = <T>(work: () => Promise<T>) => measureCpu([peer.pid], work);
  const bytes = CHUNKS * CHUNK;
  const MBps = (ms: number) => bytes / (ms / 1000) / 1e6;
  const perMiB = (cpuUs: number) => cpuUs / 1000 / (bytes / MiB);

  type Phase = [name: string, run: () => Promise<void>];
  const groups: Phase[][] = [
    [
      ['usbroam bulk OUT', async () => {
        const m = await usbroamSide(bulkOut);
        push('bulk_out', MBps(m.wallMs));
        push('cpu_out', perMiB(m.cpuUs));
      }],
      ['raw TLS up', async () => {
        const m = await peerSide(() => peer.tlsUp(CHUNK, CHUNKS));
        push('tls_up', MBps(m.wallMs));
        push('tls_cpu_up', perMiB(m.cpuUs));
      }],
      ['grpc-js up', async () => {
        const m = await peerSide(() => peer.grpcUp(CHUNK, CHUNKS));
        push('grpc_up', MBps(m.wallMs));
        push('grpc_cpu_up', perMiB(m.cpuUs));
      }],
    ],
    [
      ['usbroam bulk IN', async () => {
        const m = await usbroamSide(bulkIn);
        push('bulk_in', MBps(m.wallMs));
        push('cpu_in', perMiB(m.cpuUs));
      }],
      ['raw TLS down', async () => {
        const m = await peerSide(() => peer.tlsDown(CHUNK, CHUNKS));
        push('tls_down', MBps(m.wallMs));
        push('tls_cpu_down', perMiB(m.cpuUs));
      }],
      ['grpc-js down', async () => {
        const m = await peerSide(() => peer.grpcDown(CHUNK, CHUNKS));
        push('grpc_down', MBps(m.wallMs));
        push('grpc_cpu_down', perMiB(m.cpuUs));
      }],
    ],
    [
      ['usbroam 31 B bulk OUT round trips', async () => {
        const m = await usbroamSide(() => timed(rttCount, () => dev.transferOut(1, cbw)));
        push('urb_rtt_p50', percentile(m.value, 50));
        push('urb_rtt_p99', percentile(m.value, 99));
        push('cpu_rtt', m.cpuUs / rttCount);
      }],
      ['grpc-js 31 B ping-pong', async () => {
        const m = await peerSide(() => peer.grpcPingPong(31, rttCount));
        push('grpc_rtt_p50', percentile(m.value, 50));
        push('grpc_rtt_p99', percentile(m.value, 99));
        push('grpc_cpu_rtt', m.cpuUs / rttCount);
      }],
    ],
    [
      ['usbroam control round trips', async () => {
        const m = await usbroamSide(() => timed(CONTROL_RTTS, getDesc));
        push('ctrl_rtt_p50', percentile(m.value, 50));
        push('ctrl_rtt_p99', percentile(m.value, 99));
      }],
      ['usbroam small URBs', async () => {
        const m = await usbroamSide(() => pipelined(1024, SMALL_URBS, () => dev.transferOut(1, small)));
        push('small_urbs', SMALL_URBS / (m.wallMs / 1000));
        push('cpu_small_urb', m.cpuUs / SMALL_URBS);
      }],
      ['grpc-js 100 B messages', async () => {
        const m = await peerSide(() => peer.grpcUp(100, GRPC_SMALL_MSGS));
        push('grpc_msgs', GRPC_SMALL_MSGS / (m.wallMs / 1000));
      }],
    ],
  ];

  log(`${rounds} rounds; bulk ${mib} MiB per phase, ${rttCount} round trips, ${SMALL_URBS} small URBs`);
  for (let r = 0; r < rounds; r++) {
    const t0 = performance.now();
    for (const g of rotated(groups, r)) {
      for (const [, run] of r % 2 ? [...g].reverse() : g) await run();
    }
    const last = (k: string) => s[k]!.at(-1)!;
    log(
      `round ${r + 1}/${rounds} (${((performance.now() - t0) / 1000).toFixed(1)} s): ` +
        `OUT ${last('bulk_out').toFixed(0)} / TLS ${last('tls_up').toFixed(0)} / grpc ${last('grpc_up').toFixed(0)} MB/s; ` +
        `IN ${last('bulk_in').toFixed(0)} / TLS ${last('tls_down').toFixed(0)} / grpc ${last('grpc_down').toFixed(0)} MB/s; ` +
        `CPU/MiB OUT ${last('cpu_out').toFixed(2)} IN ${last('cpu_in').toFixed(2)} TLS ${last('tls_cpu_up').toFixed(2)}/${last('tls_cpu_down').toFixed(2)} ms; ` +
        `rtt ${last('urb_rtt_p50').toFixed(0)} / grpc ${last('grpc_rtt_p50').toFixed(0)} us, CPU ${last('cpu_rtt').toFixed(0)} / ${last('grpc_cpu_rtt').toFixed(0)} us; ` +
        `small URBs ${last('small_urbs').toFixed(0)}/s`,
    );
  }
  await dev.close();
  client.close();
  srv.stop();
  await peer.close();

  const perRound = (f: (i: number) => number) => s.bulk_out!.map((_, i) => f(i));
  const at = (k: string, i: number) => s[k]![i]!;
  const tlsMin = perRound((i) => Math.min(at('tls_up', i), at('tls_down', i)));
  const grpcMin = perRound((i) => Math.min(at('grpc_up', i), at('grpc_down', i)));
  const tlsCpu = perRound((i) => (at('tls_cpu_up', i) + at('tls_cpu_down', i)) / 2);
  const grpcCpu = perRound((i) => (at('grpc_cpu_up', i) + at('grpc_cpu_down', i)) / 2);
  const result: Record<string, unknown> = { rounds, mib_per_phase: mib, round_trips: rttCount };
  const whole = (k: string, xs: number[]) => putSpread(result, k, xs, 0);
  // The fields bench:channel always had (now medians over the rounds) ...
  whole('rtt_p50_us', s.ctrl_rtt_p50!);
  whole('rtt_p99_us', s.ctrl_rtt_p99!);
  whole('grpc_rtt_p50_us', s.grpc_rtt_p50!);
  whole('grpc_rtt_p99_us', s.grpc_rtt_p99!);
  whole('small_urbs_per_s', s.small_urbs!);
  whole('grpc_msgs_per_s', s.grpc_msgs!);
  whole('bulk_in_MBps', s.bulk_in!);
  whole('bulk_out_MBps', s.bulk_out!);
  whole('grpc_raw_MBps', grpcMin);
  whole('raw_tls_MBps', tlsMin);
  // ... and their ratios, from the rounds: both directions must reach the goal, so the headline
  // is the per-round minimum of the two directions' ratios.
  const bulkRatioIn = perRound((i) => at('bulk_in', i) / at('tls_down', i));
  const bulkRatioOut = perRound((i) => at('bulk_out', i) / at('tls_up', i));
  const trIn = perRound((i) => at('bulk_in', i) / at('grpc_down', i));
  const trOut = perRound((i) => at('bulk_out', i) / at('grpc_up', i));
  putSpread(result, 'transport_ratio', perRound((i) => Math.min(trIn[i]!, trOut[i]!)));
  putSpread(result, 'transport_ratio_in', trIn);
  putSpread(result, 'transport_ratio_out', trOut);
  putSpread(result, 'bulk_ratio', perRound((i) => Math.min(bulkRatioIn[i]!, bulkRatioOut[i]!)));
  putSpread(result, 'bulk_ratio_in', bulkRatioIn);
  putSpread(result, 'bulk_ratio_out', bulkRatioOut);
  putRatio(result, 'rtt_ratio', s.ctrl_rtt_p50!, s.grpc_rtt_p50!);
  // New: per-direction rates, the 31 B bulk OUT round trip, CPU per unit of work.
  whole('raw_tls_up_MBps', s.tls_up!);
  whole('raw_tls_down_MBps', s.tls_down!);
  whole('grpc_raw_up_MBps', s.grpc_up!);
  whole('grpc_raw_down_MBps', s.grpc_down!);
  whole('urb_rtt_p50_us', s.urb_rtt_p50!);
  whole('urb_rtt_p99_us', s.urb_rtt_p99!);
  putRatio(result, 'urb_rtt_ratio', s.urb_rtt_p50!, s.grpc_rtt_p50!);
  putSpread(result, 'cpu_us_per_urb_rtt', s.cpu_rtt!, 1);
  putSpread(result, 'grpc_cpu_us_per_rtt', s.grpc_cpu_rtt!, 1);
  putRatio(result, 'cpu_rtt_ratio', s.cpu_rtt!, s.grpc_cpu_rtt!);
  putSpread(result, 'cpu_us_per_small_urb', s.cpu_small_urb!, 2);
  putSpread(result, 'cpu_ms_per_mib_in', s.cpu_in!, 2);
  putSpread(result, 'cpu_ms_per_mib_out', s.cpu_out!, 2);
  putSpread(result, 'tls_cpu_ms_per_mib', tlsCpu, 2);
  putSpread(result, 'tls_cpu_ms_per_mib_up', s.tls_cpu_up!, 2);
  putSpread(result, 'tls_cpu_ms_per_mib_down', s.tls_cpu_down!, 2);
  putSpread(result, 'grpc_cpu_ms_per_mib', grpcCpu, 2);
  putRatio(result, 'cpu_per_mib_ratio_in', s.cpu_in!, s.tls_cpu_down!);
  putRatio(result, 'cpu_per_mib_ratio_out', s.cpu_out!, s.tls_cpu_up!);
  log(`median bulk OUT ${median(s.bulk_out!).toFixed(0)} MB/s, IN ${median(s.bulk_in!).toFixed(0)} MB/s`);
  console.log(JSON.stringify(result));
  process.exit(0);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
