#!/usr/bin/env node
// `npm test`: the whole suite in lanes that run at the same time. The end-to-end tier (QEMU
// under TCG) is the long pole, and much of it, like the integration tier, waits (on guests,
// leases, grace periods, child processes) rather than computes, so on two cores it pays to
// overlap them:
//   build:   the CLI bundle (the integration and e2e tests run bin/usbroam.js), first
//   checks:  typecheck, then mocha over test/unit and test/integration
//   e2e:     guest image prepare, then the e2e files in USBROAM_E2E_SHARDS (default 2) mocha
//            processes (e2e-1, e2e-2, ...), the files dealt out by the wall time they took in a
//            measured run (E2E_SECONDS), longest first, each to the shard with the least so far
// Each lane's output streams live, every line prefixed with the lane's name; each mocha ends
// with a table of wall time per file; a summary at the end names each step with its result and
// time, and then each failed test (lane, file, title, the first lines of its error), last,
// because CI shows only the tail of a run. Exit status 1 if any step failed.
//   node scripts/run-tests.mjs [--lane checks|e2e]   (build, then that lane only)
//   node scripts/run-tests.mjs --list                 (how the e2e files are dealt out)
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const node = process.execPath;
const bin = (pkg, file) => path.join(root, 'node_modules', pkg, file);
const mocha = (...files) => [node, bin('mocha', 'bin/mocha.js'), '--reporter', './scripts/file-timing-reporter.cjs', ...(process.stdout.isTTY ? ['--color'] : []), ...files];

/**
 * Wall time per e2e file in seconds, hooks (guest boots) included, from the file-timing table of
 * a suite run; only the order matters. A file not listed (a new one) counts as DEFAULT_SECONDS.
 */
// Measured 2026-12-03 (npm test, the e2e tier in one process, on a busy machine).
const E2E_SECONDS = {
  'test/e2e/libusb-migrate.test.ts': 203,
  'test/e2e/libusb-usbhost.test.ts': 174,
  'test/e2e/migrate-faults.test.ts': 152,
  'test/e2e/libusb-iso.test.ts': 141,
  'test/e2e/fleet-migrate.test.ts': 86,
  'test/e2e/bridge-storage.test.ts': 61,
  'test/e2e/fault-network.test.ts': 55,
  'test/e2e/harness-boot.test.ts': 54,
  'test/e2e/migrate-basic.test.ts': 53,
  'test/e2e/libvirt-migrate.test.ts': 47,
  'test/e2e/migrate-serial.test.ts': 46,
  'test/e2e/bridge-superspeed.test.ts': 45,
  'test/e2e/fault-restart.test.ts': 41,
  'test/e2e/fault-bridge-restart.test.ts': 40,
  'test/e2e/migrate-multi.test.ts': 35,
  'test/e2e/bridge-claim.test.ts': 30,
  'test/e2e/bridge-coldplug.test.ts': 26,
  'test/e2e/migrate-control.test.ts': 25,
  'test/e2e/demo-capture.test.ts': 23,
  'test/e2e/bridge-control.test.ts': 20,
  'test/e2e/bridge-unplug.test.ts': 17,
  'test/e2e/bridge-serial.test.ts': 16,
  'test/e2e/uas-migrate.test.ts': 25,
  'test/e2e/harness-migrate.test.ts': 8,
};
const DEFAULT_SECONDS = 40;

/** The e2e files (test/e2e/**\/*.test.ts, as the glob finds new ones), dealt out to `n` shards. */
function e2eShards(n) {
  const dir = path.join(root, 'test', 'e2e');
  const files = fs.existsSync(dir)
    ? fs.readdirSync(dir, { recursive: true }).map((f) => path.join('test', 'e2e', String(f))).filter((f) => f.endsWith('.test.ts')).sort()
    : [];
  const weight = (f) => E2E_SECONDS[f.split(path.sep).join('/')] ?? DEFAULT_SECONDS;
  const shards = Array.from({ length: Math.max(1, Math.min(n, files.length)) }, () => ({ files: [], seconds: 0 }));
  for (const f of [...files].sort((a, b) => weight(b) - weight(a))) {
    const s = shards.reduce((a, b) => (b.seconds < a.seconds ? b : a));
    s.files.push(f);
    s.seconds += weight(f);
  }
  return shards.filter((s) => s.files.length > 0);
}

const shardCount = Number(process.env.USBROAM_E2E_SHARDS ?? 2);
if (!Number.isInteger(shardCount) || shardCount < 1) {
  console.error(`USBROAM_E2E_SHARDS must be a whole number >= 1, not ${process.env.USBROAM_E2E_SHARDS}`);
  process.exit(2);
}
const shards = e2eShards(shardCount).map((s, i, all) => ({
  name: all.length === 1 ? 'e2e' : `e2e-${i + 1}`,
  step: { name: `e2e (${s.files.length} files, ~${s.seconds} s measured)`, argv: mocha(...s.files) },
}));

if (process.argv.includes('--list')) {
  for (const s of shards) console.log(`${s.name}: ${s.step.name}: ${s.step.argv.filter((a) => a.startsWith('test/')).join(' ')}`);
  process.exit(0);
}

const build = { name: 'build', argv: [node, 'scripts/build.mjs'] };
const checks = [
  { name: 'typecheck', argv: [node, bin('typescript', 'bin/tsc'), '--noEmit', '-p', '.'] },
  { name: 'unit+integration', argv: mocha('test/unit/**/*.test.ts', 'test/integration/**/*.test.ts') },
];
const prepare = { name: 'guest prepare', argv: [node, '--import', 'tsx', 'src/devkit/guest/prepare.ts'] };
const lanes = ['checks', 'e2e'];

const only = process.argv.includes('--lane') ? process.argv[process.argv.indexOf('--lane') + 1] : undefined;
if (only && !lanes.includes(only)) {
  console.error(`no lane named ${only}; lanes: ${lanes.join(', ')}`);
  process.exit(2);
}
const width = Math.max(...['build', 'checks', 'e2e', ...shards.map((s) => s.name)].map((n) => n.length));
const children = new Set();

/** Run one step, its stdout and stderr line by line behind `prefix`; resolves to its exit code. */
function runStep(step, prefix, failuresFile) {
  return new Promise((resolve) => {
    const env = { ...process.env, USBROAM_TEST_FAILURES: failuresFile };
    const child = spawn(step.argv[0], step.argv.slice(1), { cwd: root, stdio: ['ignore', 'pipe', 'pipe'], env });
    children.add(child);
    const pipe = (from, to) => {
      let rest = '';
      from.setEncoding('utf8');
      from.on('data', (chunk) => {
        const lines = (rest + chunk).split('\n');
        rest = lines.pop();
        if (lines.length) to.write(lines.map((l) => `${prefix}${l}\n`).join(''));
      });
      from.on('end', () => {
        if (rest) to.write(`${prefix}${rest}\n`);
      });
    };
    pipe(child.stdout, process.stdout);
    pipe(child.stderr, process.stderr);
    child.once('error', (err) => {
      process.stderr.write(`${prefix}cannot start ${step.name}: ${err.message}\n`);
      resolve(127);
    });
    child.once('close', (code, signal) => {
      children.delete(child);
      resolve(code ?? (signal ? 128 : 1));
    });
  });
}

for (const sig of ['SIGINT', 'SIGTERM']) {
  process.once(sig, () => {
    for (const c of children) c.kill(sig);
    process.exitCode = 130;
  });
}

const seconds = (ms) => `${(ms / 1000).toFixed(1)} s`;
const results = [];
const t0 = Date.now();
const failuresDir = fs.mkdtempSync(path.join(os.tmpdir(), 'usbroam-test-failures-'));
/** Failed tests as the reporter wrote them: { lane, file, title, error }. */
const failedTests = [];

async function runLane(lane, steps) {
  const prefix = `[${lane.padEnd(width)}] `;
  for (const step of steps) {
    const t = Date.now();
    process.stdout.write(`${prefix}== ${step.name}\n`);
    const failuresFile = path.join(failuresDir, `${lane}-${results.length}.json`);
    const code = await runStep(step, prefix, failuresFile);
    try {
      for (const f of JSON.parse(fs.readFileSync(failuresFile, 'utf8'))) failedTests.push({ lane, ...f });
    } catch {
      // not a mocha step, or it ended before its reporter wrote the file
    }
    results.push({ lane, step: step.name, code, ms: Date.now() - t });
    process.stdout.write(`${prefix}== ${step.name}: ${code === 0 ? 'ok' : `FAILED (exit ${code})`} in ${seconds(Date.now() - t)}\n`);
    if (code !== 0) return false; // a failed typecheck or guest prepare: the lane's tests would not mean much
  }
  return true;
}

if (await runLane('build', [build])) {
  await Promise.all([
    (!only || only === 'checks') && runLane('checks', checks),
    (!only || only === 'e2e') &&
      (async () => {
        if (await runLane('e2e', [prepare])) await Promise.all(shards.map((s) => runLane(s.name, [s.step])));
      })(),
  ]);
}
const failed = results.filter((r) => r.code !== 0);
const lines = ['', `== npm test: ${failed.length ? 'FAILED' : 'passed'} in ${seconds(Date.now() - t0)}`];
for (const r of results) lines.push(`   ${r.code === 0 ? 'ok    ' : 'FAILED'} ${seconds(r.ms).padStart(8)}  ${r.lane.padEnd(width)}  ${r.step}`);
if (failed.length) lines.push(`   failed: ${failed.map((r) => `${r.lane}/${r.step}`).join(', ')} (search the output for "[lane]" lines above)`);
for (const f of failedTests) {
  lines.push(`   FAILED test [${f.lane}] ${f.file ?? ''}: ${f.title}`);
  for (const l of f.error.split('\n')) lines.push(`      ${l}`);
}
fs.rmSync(failuresDir, { recursive: true, force: true });
process.stdout.write(lines.join('\n') + '\n');
process.exitCode = failed.length || process.exitCode ? 1 : 0;
