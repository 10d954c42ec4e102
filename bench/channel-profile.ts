// CPU profiles of one URB-channel workload (a bench:channel phase), client and server:
//
//   npx tsx bench/channel-profile.ts --phase out|in|rtt|small [--count N] [--dir DIR] [--no-profile]
//
// --no-profile: no profiler on either side, only the CPU figure (to compare settings quickly).
//
// The server runs with --cpu-prof (its whole life: startup shows up as tsx/esbuild frames; tsx's
// loader thread writes a second, small profile: the server's is the largest CPU.*.cpuprofile); this
// process profiles only the phase, with the inspector. Summarise with
// `node bench/cpuprofile-top.mjs DIR/FILE.cpuprofile`. Prints the phase's CPU per unit (this
// process + the server) on its last stdout line, as JSON.
import { spawn } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { Session } from 'node:inspector/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { UsbHostClient } from '../src/client/sdk/client.js';
import { tuneGcForBulkTransfers } from '../src/common/gc-tuning.js';
import { ensureCerts } from './ceilings/client.js';
import { measureCpu } from './support/cpu.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const log = (s: string) => process.stderr.write(`[bench:channel-profile] ${s}\n`);
const { values: flags } = parseArgs({ options: { phase: { type: 'string' }, count: { type: 'string' }, dir: { type: 'string' }, 'no-profile': { type: 'boolean' } } });
const profiling = !flags['no-profile'];
const phase = flags.phase ?? 'out';
const CHUNK = 64 * 1024;
const defaults: Record<string, number> = { out: 4096, in: 4096, rtt: 10_000, small: 200_000 };
if (!(phase in defaults)) throw new Error(`--phase must be one of ${Object.keys(defaults).join(', ')}`);
const count = Number(flags.count ?? defaults[phase]);
const dir = path.resolve(flags.dir ?? `/tmp/usbroam-profile-${phase}`);

async function pipelined(window: number, n: number, one: () => Promise<unknown>): Promise<void> {
  let started = 0;
  await Promise.all(
    Array.from({ length: Math.min(window, n) }, async () => {
      while (started < n) {
        started++;
        await one();
      }
    }),
  );
}

async function main() {
  tuneGcForBulkTransfers();
  mkdirSync(dir, { recursive: true });
  const certs = process.env.USBROAM_CERTS_DIR ?? path.join(root, 'certs/out');
  ensureCerts(certs);
  const child = spawn(
    process.execPath,
    [
      ...(profiling ? ['--cpu-prof', '--cpu-prof-dir', dir] : []),
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
      const m = /"address":"([^"]+)"/.exec(buf);
      if (m) resolve(m[1]!);
    });
    child.on('exit', (code) => reject(new Error(`server exited with ${code}`)));
  });
  const client = new UsbHostClient({ address, ca: path.join(certs, 'ca.pem'), cert: path.join(certs, 'bridge.pem'), key: path.join(certs, 'bridge.key') });
  const dev = await client.openDevice({ serial: 'USBROAM-LOOP-0001' }, { maxInFlight: 4096 });
  await dev.selectConfiguration(1);
  const big = new Uint8Array(CHUNK).fill(0x5a);
  const cbw = new Uint8Array(31);
  const small = new Uint8Array(64);
  const work: Record<string, (n: number) => Promise<void>> = {
    out: (n) => pipelined(16, n, () => dev.transferOut(1, big)),
    in: (n) => pipelined(16, n, () => dev.transferIn(1, CHUNK)),
    rtt: async (n) => {
      for (let i = 0; i < n; i++) await dev.transferOut(1, cbw);
    },
    small: (n) => pipelined(1024, n, () => dev.transferOut(1, small)),
  };
  log(`warm-up, then ${count} units of "${phase}"`);
  await work[phase]!(Math.ceil(count / 10));
  const session = new Session();
  if (profiling) {
    session.connect();
    await session.post('Profiler.enable');
    await session.post('Profiler.start');
  }
  const m = await measureCpu([child.pid!], () => work[phase]!(count));
  const clientFile = path.join(dir, `client-${phase}.cpuprofile`);
  if (profiling) writeFileSync(clientFile, JSON.stringify((await session.post('Profiler.stop')).profile));
  await dev.close();
  client.close();
  child.kill('SIGTERM');
  await new Promise((r) => child.once('exit', r));
  const unit = phase === 'out' || phase === 'in' ? 'mib' : 'urb';
  const units = unit === 'mib' ? (count * CHUNK) / (1024 * 1024) : count;
  if (profiling) log(`profiles: ${clientFile}, the server's CPU.*.cpuprofile in ${dir}`);
  console.log(JSON.stringify({ phase, count, wall_ms: Math.round(m.wallMs), [`cpu_us_per_${unit}`]: +(m.cpuUs / units).toFixed(1) }));
  process.exit(0);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
