// bench:soak part "hostile": hostile input against a USB host server (a child process, real
// certificates) and a bridge, each case summed up as a FaultOutcome with its counts (cases,
// statuses by code, internal_count which must be 0, RSS / descriptor deltas), and a bystander
// session's echo throughput with and without hostile traffic, in interleaved rounds.
// Alone: `npx tsx bench/soak/hostile.ts [durationS]` prints the JSON on its last stdout line.
import fc from 'fast-check';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { UsbHostClient } from '../../src/client/sdk/client.js';
import { createLogger } from '../../src/common/log.js';
import { UrbStatus } from '../../src/gen/usbroam/v1/usbhost.js';
import { clientTls, testCerts } from '../../src/devkit/certs.js';
import { spawnUntilReady } from '../../src/devkit/child-process-lines.js';
import { controlApiCase, usbredirCase } from '../../src/devkit/hostile/bridge-cases.js';
import { connectProperty, newTally } from '../../src/devkit/hostile/connect-model.js';
import { abandonedStreamsCase, oversizedServerCase, randomBytesCase, type ServerUnderTest } from '../../src/devkit/hostile/server-cases.js';
import { startServerProcess } from '../../src/devkit/server-process.js';
import { spread } from '../support/rounds.js';
import type { FaultOutcome, SoakPart, SoakOptions } from './types.js';

const GRACE_MS = 1000;
const FUZZ_SERIAL = 'USBROAM-LOOP-0001';
const ABANDON_SERIAL = 'USBROAM-MSC-0001';
const BYSTANDER_SERIAL = 'USBROAM-ACM-0001';
/** Hostile calls per second while the bystander runs: a client hammering the server, not a flood. */
const HOSTILE_RATE = 50;
const TRAFFIC_SCRIPT = fileURLToPath(new URL('./hostile-traffic.ts', import.meta.url));

/** The bystander: 4 KiB echoed through the serial device (OUT, then IN until all is back), checked. */
async function echoFor(dev: Awaited<ReturnType<UsbHostClient['openDevice']>>, ms: number): Promise<{ bytes: number; errors: number }> {
  const end = Date.now() + ms;
  let bytes = 0;
  let errors = 0;
  let n = 0;
  while (Date.now() < end) {
    const out = new Uint8Array(4096).fill(n++ & 0xff);
    const w = await dev.transferOut(0x01, out);
    if (w.status !== UrbStatus.URB_STATUS_SUCCESS) errors++;
    let got = 0;
    while (got < out.length) {
      const r = await dev.transferIn(0x81, out.length - got);
      if (r.status !== UrbStatus.URB_STATUS_SUCCESS || r.data.some((b) => b !== out[0])) {
        errors++;
        break;
      }
      got += r.data.length;
    }
    bytes += got;
  }
  return { bytes, errors };
}

export async function run(opts: SoakOptions): Promise<SoakPart> {
  const { progress } = opts;
  const scale = Math.max(1, Math.round(opts.durationS / 60));
  const dir = mkdtempSync(path.join(os.tmpdir(), 'usbroam-soak-hostile-'));
  const log = createLogger({ level: 'silent' });
  const seed = Number(process.env.USBROAM_FUZZ_SEED ?? Date.now() % 1e9);
  progress(`hostile: seed ${seed}; starting the server`);
  const proc = await startServerProcess(['--grace-ms', String(GRACE_MS), '--allow', 'bridge=*', '--admin', 'bridge', '--disk-image', path.join(dir, 'disk.img'), '--disk-size-mib', '8']);
  const srv: ServerUnderTest = { address: proc.address, pid: proc.child.pid!, logs: proc.logs, tls: (id) => clientTls(id), admin: 'bridge' };
  const hostile: Record<string, FaultOutcome> = {};
  const fuzzTarget = { address: srv.address, tls: srv.tls, owner: 'bridge', other: 'viewer', serial: FUZZ_SERIAL, maxUrbBytes: 8 * 1024 * 1024 };
  const guard = async (name: string, f: () => Promise<FaultOutcome>) => {
    progress(`hostile: ${name}`);
    const t0 = Date.now();
    try {
      hostile[name] = { ...(await f()), seconds: Math.round((Date.now() - t0) / 100) / 10 };
    } catch (err) {
      hostile[name] = { ok: false, detail: `failed: ${(err as Error).message}`, seed };
    }
    progress(`hostile: ${name}: ${hostile[name]!.ok ? 'ok' : 'FAILED'}: ${hostile[name]!.detail}`);
  };
  let errors = 0;
  try {
    await guard('connect_fuzz', async () => {
      const tally = newTally();
      const numRuns = 40 * scale;
      const r = await fc.check(connectProperty(fuzzTarget, tally, 30), { numRuns, seed });
      const ok = !r.failed && tally.internal_count === 0;
      return {
        ok,
        detail: ok ? `${tally.runs} runs, ${tally.commands} commands, ${tally.streams} streams, ended by ${JSON.stringify(tally.statuses)}` : `seed ${seed} path ${r.counterexamplePath}: ${String(r.errorInstance)}`.slice(0, 600),
        cases: tally.commands,
        runs: tally.runs,
        streams: tally.streams,
        statuses: tally.statuses,
        internal_count: tally.internal_count,
        seed,
      };
    });
    await guard('random_bytes', () => randomBytesCase(srv, 40 * scale, ABANDON_SERIAL, seed));
    await guard('oversized', () => oversizedServerCase(srv));
    await guard('abandoned_streams', () => abandonedStreamsCase(srv, 1000, ABANDON_SERIAL, GRACE_MS));
    const bridgeOpts = { server: { address: srv.address, tls: clientTls('bridge') }, log };
    await guard('control_api', () => controlApiCase(bridgeOpts, 30 * scale, 1000, seed));
    await guard('usbredir_stream', () => usbredirCase(bridgeOpts, 30 * scale, FUZZ_SERIAL, ABANDON_SERIAL, seed));
    await guard('bystander', async () => {
      const client = new UsbHostClient({ address: srv.address.replace('127.0.0.1', 'localhost'), ...clientTls('bridge') });
      const dev = await client.openDevice({ serial: BYSTANDER_SERIAL });
      await dev.selectConfiguration(1);
      const roundMs = 3000;
      const rounds = Math.max(4, Math.min(10, Math.floor(opts.durationS / 15)));
      const quiet: number[] = [];
      const loud: number[] = [];
      let bystanderErrors = 0;
      let hostileCalls = 0;
      let hostileInternal = 0;
      const hostileViolations: string[] = [];
      try {
        for (let i = 0; i < rounds; i++) {
          const q = await echoFor(dev, roundMs);
          const traffic = await spawnUntilReady(process.execPath, ['--import', 'tsx', TRAFFIC_SCRIPT, srv.address, testCerts().dir, ABANDON_SERIAL, FUZZ_SERIAL, String(seed + i), String(HOSTILE_RATE)], {
            name: 'hostile traffic',
            ready: (line) => (line.ready ? true : undefined),
            timeoutMs: 60_000,
          });
          const l = await echoFor(dev, roundMs);
          traffic.child.kill('SIGTERM');
          if ((await traffic.exited) !== 0) throw new Error(`hostile traffic exited badly: ${traffic.logs.slice(-5).join('\n')}`);
          const counts = JSON.parse([...traffic.logs].reverse().find((x) => x.includes('"calls"')) ?? '{}') as { calls?: number; internal_count?: number; violations?: string[] };
          hostileCalls += counts.calls ?? 0;
          hostileInternal += counts.internal_count ?? 0;
          hostileViolations.push(...(counts.violations ?? []));
          quiet.push(q.bytes / roundMs);
          loud.push(l.bytes / roundMs);
          bystanderErrors += q.errors + l.errors;
          progress(`hostile: bystander round ${i + 1}/${rounds}: ${Math.round(q.bytes / roundMs)} vs ${Math.round(l.bytes / roundMs)} KB/s`);
        }
      } finally {
        await dev.close();
        client.close();
      }
      const ratio = spread(loud.map((x, i) => x / quiet[i]!));
      errors += bystanderErrors;
      // The hostile client runs in its own process at HOSTILE_RATE calls/s, and all three share this
      // machine's two cores; "unaffected" means no errors and no collapse: the median round keeps
      // at least half its quiet throughput.
      const ok = bystanderErrors === 0 && hostileInternal === 0 && ratio.median >= 0.5;
      const r2 = (x: number) => Math.round(x * 100) / 100;
      return {
        ok,
        detail: `echo throughput with/without hostile traffic: median ${r2(ratio.median)} (min ${r2(ratio.min)}, max ${r2(ratio.max)}) over ${rounds} interleaved rounds; ${bystanderErrors} bystander errors; ${hostileCalls} hostile calls meanwhile from another process (${HOSTILE_RATE}/s), ${hostileInternal} INTERNAL${hostileViolations.length ? `; violations: ${hostileViolations.join(' | ')}` : ''}`,
        cases: rounds,
        bystander_ratio: r2(ratio.median),
        bystander_ratio_min: r2(ratio.min),
        bystander_ratio_max: r2(ratio.max),
        bystander_errors: bystanderErrors,
        hostile_calls: hostileCalls,
        hostile_rate_per_s: HOSTILE_RATE,
        internal_count: hostileInternal,
      };
    });
  } finally {
    const code = await proc.stop();
    if (code !== 0) {
      errors++;
      hostile.server_exit = { ok: false, detail: `the server exited with ${code}` };
    }
    rmSync(dir, { recursive: true, force: true });
  }
  for (const o of Object.values(hostile)) if (!o.ok) errors++;
  return { hostile, errors };
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const durationS = Number(process.argv[2] ?? 60);
  const out = await run({ durationS, progress: (m) => process.stderr.write(`${m}\n`) });
  process.stdout.write(`${JSON.stringify(out)}\n`);
  process.exit(0);
}
