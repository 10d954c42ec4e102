// npm run bench:channel — the URB channel against the emulated loopback
// device: a USB host server in its own process, this process as the client,
// mutual TLS over loopback. In the same run it measures the bare transports
// under it (raw TLS, raw grpc-js stream) so the figures are ratios.
// Progress goes to stderr; the last line on stdout is one JSON object.
import { spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { UsbHostClient } from '../src/client/sdk/client.js';
import { tuneGcForBulkTransfers } from '../src/common/gc-tuning.js';
import { UrbStatus } from '../src/gen/usbroam/v1/usbhost.js';
import { ensureCerts, measureCeilings } from './ceilings/client.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const log = (s: string) => process.stderr.write(`[bench:channel] ${s}\n`);
const durationMs = Number(process.env.BENCH_DURATION_MS ?? 2000);

async function startServer(certs: string): Promise<{ address: string; stop(): void }> {
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
      if (m) resolve(m[1]);
    });
    child.on('exit', (code) => reject(new Error(`server exited with ${code}`)));
  });
  return { address, stop: () => child.kill('SIGTERM') };
}

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

async function main() {
  tuneGcForBulkTransfers(); // as the usbroam CLI (server, bridge) does
  const certs = process.env.USBROAM_CERTS_DIR ?? path.join(root, 'certs/out');
  ensureCerts(certs);
  const srv = await startServer(certs);
  log(`server on ${srv.address}`);
  const client = new UsbHostClient({
    address: srv.address,
    ca: path.join(certs, 'ca.pem'),
    cert: path.join(certs, 'bridge.pem'),
    key: path.join(certs, 'bridge.key'),
  });
  const dev = await client.openDevice({ serial: 'USBROAM-LOOP-0001' }, { maxInFlight: 4096 });
  await dev.selectConfiguration(1);

  // Control round trip: GET_DESCRIPTOR(device), one at a time.
  const getDesc = () => dev.controlTransferIn({ requestType: 'standard', recipient: 'device', request: 6, value: 0x0100, index: 0 }, 18);
  for (let i = 0; i < 500; i++) await getDesc();
  const rtts: number[] = [];
  for (let i = 0; i < 5000; i++) {
    const t = process.hrtime.bigint();
    const r = await getDesc();
    rtts.push(Number(process.hrtime.bigint() - t) / 1000);
    if (r.status !== UrbStatus.URB_STATUS_SUCCESS) throw new Error('control transfer failed');
  }
  rtts.sort((a, b) => a - b);
  log(`control rtt p50 ${percentile(rtts, 50).toFixed(0)} us, p99 ${percentile(rtts, 99).toFixed(0)} us`);

  // Small URBs: 64 B bulk OUT, pipelined.
  const small = new Uint8Array(64);
  const pipelined = async (window: number, ms: number, one: () => Promise<unknown>) => {
    let n = 0;
    const end = Date.now() + ms;
    await Promise.all(
      Array.from({ length: window }, async () => {
        while (Date.now() < end) {
          await one();
          n++;
        }
      }),
    );
    return n;
  };
  await pipelined(256, 300, () => dev.transferOut(1, small));
  let t0 = performance.now();
  let n = await pipelined(1024, durationMs, () => dev.transferOut(1, small));
  const smallUrbsPerS = (n / (performance.now() - t0)) * 1000;
  log(`small URBs: ${smallUrbsPerS.toFixed(0)}/s`);

  // Bulk 64 KiB, 16 in flight.
  const big = new Uint8Array(64 * 1024).fill(0x5a);
  await pipelined(16, 300, () => dev.transferOut(1, big));
  t0 = performance.now();
  n = await pipelined(16, durationMs, () => dev.transferOut(1, big));
  const bulkOut = (n * big.length) / ((performance.now() - t0) / 1000) / 1e6;
  log(`bulk OUT ${bulkOut.toFixed(0)} MB/s`);
  await pipelined(16, 300, () => dev.transferIn(1, big.length));
  t0 = performance.now();
  n = await pipelined(16, durationMs, async () => {
    const r = await dev.transferIn(1, big.length);
    if (r.data.length !== big.length) throw new Error('short bulk IN');
  });
  const bulkIn = (n * big.length) / ((performance.now() - t0) / 1000) / 1e6;
  log(`bulk IN ${bulkIn.toFixed(0)} MB/s`);
  await dev.close();
  client.close();
  srv.stop();

  log('transport ceilings (raw TLS, raw grpc-js) ...');
  const c = await measureCeilings({ certsDir: certs, durationMs, log });
  const result = {
    rtt_p50_us: Math.round(percentile(rtts, 50)),
    rtt_p99_us: Math.round(percentile(rtts, 99)),
    grpc_rtt_p50_us: Math.round(c.grpc_rtt_p50_us),
    grpc_rtt_p99_us: Math.round(c.grpc_rtt_p99_us),
    small_urbs_per_s: Math.round(smallUrbsPerS),
    grpc_msgs_per_s: Math.round(c.grpc_msgs_per_s),
    bulk_in_MBps: Math.round(bulkIn),
    bulk_out_MBps: Math.round(bulkOut),
    grpc_raw_MBps: Math.round(c.grpc_raw_MBps),
    raw_tls_MBps: Math.round(c.raw_tls_MBps),
    transport_ratio: +(Math.min(bulkIn, bulkOut) / c.grpc_raw_MBps).toFixed(3),
    bulk_ratio: +(Math.min(bulkIn, bulkOut) / c.raw_tls_MBps).toFixed(3),
    rtt_ratio: +(percentile(rtts, 50) / c.grpc_rtt_p50_us).toFixed(3),
  };
  console.log(JSON.stringify(result));
  process.exit(0);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
