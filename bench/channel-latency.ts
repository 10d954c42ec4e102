// Per-URB latency of the URB channel against its transport, interleaved so a
// noisy machine hurts both alike:
//   npx tsx bench/channel-latency.ts [rounds=5] [samples=2000]
// Each round measures, one after another: the raw grpc-js 64 B ping-pong
// (bench/ceilings server), a control IN round trip (GET_DESCRIPTOR), a 31 B
// bulk OUT round trip (a CBW's size) and a 13 B bulk IN round trip (a CSW's).
// Prints per-round figures on stderr and one JSON line of medians on stdout.
import { spawn } from 'node:child_process';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import { UsbHostClient } from '../src/client/sdk/client.js';
import { ensureCerts } from './ceilings/client.js';
import { CEILINGS_GRPC_CHANNEL_OPTIONS, CeilingsService, loadCerts } from './ceilings/common.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const log = (s: string) => process.stderr.write(`[latency] ${s}\n`);
const rounds = Number(process.argv[2] ?? 5);
const samples = Number(process.argv[3] ?? 2000);

function spawnLine(args: string[], match: (line: string) => string | undefined): Promise<{ value: string; kill(): void }> {
  const child = spawn(process.execPath, args, { cwd: root, stdio: ['pipe', 'pipe', 'inherit'] });
  return new Promise((resolve, reject) => {
    const rl = createInterface({ input: child.stdout! });
    rl.on('line', (line) => {
      const v = match(line);
      if (v !== undefined) resolve({ value: v, kill: () => child.kill('SIGTERM') });
    });
    child.once('exit', (code) => reject(new Error(`child exited with ${code}`)));
  });
}

const pct = (xs: number[], p: number) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
};
const median = (xs: number[]) => pct(xs, 50);

async function timeIt(n: number, one: () => Promise<unknown>): Promise<number[]> {
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const t = performance.now();
    await one();
    out.push((performance.now() - t) * 1000);
  }
  return out;
}

async function main() {
  const certs = process.env.USBROAM_CERTS_DIR ?? path.join(root, 'certs/out');
  ensureCerts(certs);
  const server = await spawnLine(
    [path.join(root, 'bin/usbroam.js'), 'serve', '--listen', '127.0.0.1:0', '--ca', path.join(certs, 'ca.pem'), '--cert', path.join(certs, 'server.pem'), '--key', path.join(certs, 'server.key'), '--allow', 'bridge=*', '--disk-size-mib', '8', '--log-level', 'info'],
    (line) => /"address":"([^"]+)"[^\n]*USB host server listening/.exec(line)?.[1],
  );
  const ceil = await spawnLine(['--import', import.meta.resolve('tsx'), path.join(root, 'bench/ceilings/server.ts'), certs], (line) => (line.startsWith('{') ? line : undefined));
  const grpcPort = (JSON.parse(ceil.value) as { grpcPort: number }).grpcPort;
  try {
    const c = loadCerts(certs, 'bridge');
    const Ctor = grpc.makeGenericClientConstructor(CeilingsService, 'Ceilings');
    const raw = new Ctor(`127.0.0.1:${grpcPort}`, grpc.credentials.createSsl(c.ca, c.key, c.cert), CEILINGS_GRPC_CHANNEL_OPTIONS) as unknown as grpc.Client & { Echo(): grpc.ClientDuplexStream<Buffer, Buffer> };
    const echo = raw.Echo();
    let waiter: (() => void) | undefined;
    echo.on('data', () => waiter?.());
    const ping = Buffer.alloc(64, 0x22);
    const pingPong = () =>
      new Promise<void>((resolve) => {
        waiter = resolve;
        echo.write(ping);
      });

    const client = new UsbHostClient({ address: server.value, ca: path.join(certs, 'ca.pem'), cert: path.join(certs, 'bridge.pem'), key: path.join(certs, 'bridge.key') });
    const dev = await client.openDevice({ serial: 'USBROAM-LOOP-0001' });
    await dev.selectConfiguration(1);
    const ctrl = () => dev.controlTransferIn({ requestType: 'standard', recipient: 'device', request: 6, value: 0x0100, index: 0 }, 18);
    const cbw = new Uint8Array(31);
    const out = () => dev.transferOut(1, cbw);
    const inp = () => dev.transferIn(1, 13);
    for (const f of [pingPong, ctrl, out, inp]) await timeIt(500, f);

    const res: Record<string, number[]> = { grpc_p50: [], grpc_p99: [], ctrl_p50: [], ctrl_p99: [], out_p50: [], out_p99: [], in_p50: [], in_p99: [] };
    for (let r = 0; r < rounds; r++) {
      const g = await timeIt(samples, pingPong);
      const a = await timeIt(samples, ctrl);
      const o = await timeIt(samples, out);
      const i = await timeIt(samples, inp);
      const line: Record<string, number> = {};
      for (const [k, xs] of [['grpc', g], ['ctrl', a], ['out', o], ['in', i]] as const) {
        res[`${k}_p50`].push(pct(xs, 50));
        res[`${k}_p99`].push(pct(xs, 99));
        line[k] = Math.round(pct(xs, 50));
        line[`${k}99`] = Math.round(pct(xs, 99));
      }
      log(`round ${r + 1}: ${JSON.stringify(line)}`);
    }
    const result: Record<string, number> = {};
    for (const [k, xs] of Object.entries(res)) result[`${k}_us`] = Math.round(median(xs));
    result.ctrl_ratio = +(median(res.ctrl_p50) / median(res.grpc_p50)).toFixed(2);
    result.out_ratio = +(median(res.out_p50) / median(res.grpc_p50)).toFixed(2);
    console.log(JSON.stringify(result));
    echo.end();
    raw.close();
    await dev.close();
    client.close();
  } finally {
    server.kill();
    ceil.kill();
  }
  process.exit(0);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
