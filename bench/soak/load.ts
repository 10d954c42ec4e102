// bench:soak part "load": 64 SDK clients, each with its own mTLS connection and session on its
// own emulated loopback device of one `usbroam serve --emulated-count 64`, pipelining verified
// URBs (src/devkit/loop-io.ts) for the duration. Also the server's resident memory per idle
// session and with 64 in-flight 64 KiB URBs on one session.
import { UsbHostClient } from '../../src/client/sdk/client.js';
import { TransferType, type RemoteDevice } from '../../src/client/sdk/remote-device.js';
import { clientTls } from '../../src/devkit/certs.js';
import { LoopIo, prepareLoop } from '../../src/devkit/loop-io.js';
import { LOOP_BULK_IN, LOOP_BULK_OUT } from '../../src/server/backends/emulated/loopback.js';
import { procCpuMicros, selfCpuMicros } from '../support/cpu.js';
import { LatencyHistogram, settledRssKib, startSoakServer } from './support.js';
import type { SoakOptions, SoakPart } from './types.js';

const SESSIONS = 64;
const URB_BYTES = 16 * 1024;
/** OUT and IN URBs in flight per session, each. */
const WINDOW = 4;
const INFLIGHT_URBS = 64;
const INFLIGHT_URB_BYTES = 64 * 1024;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export async function run({ durationS, progress }: SoakOptions): Promise<SoakPart> {
  const server = await startSoakServer(['--emulated-count', String(SESSIONS)]);
  const pid = server.child.pid!;
  const tls = clientTls('bridge');
  const clients: UsbHostClient[] = [];
  const newClient = () => {
    const c = new UsbHostClient({ address: server.address, ...tls });
    clients.push(c);
    return c;
  };
  try {
    progress(`server pid ${pid} at ${server.address}; warming up one session`);
    {
      const dev = await newClient().openDevice({ id: 'emu-2-1' });
      await prepareLoop(dev);
      const io = new LoopIo(dev, { urbBytes: URB_BYTES, window: WINDOW }).start();
      await sleep(1000);
      await io.stop();
      await dev.close();
    }

    // Idle sessions: each its own client connection (as 64 bridges would be), opened and configured.
    const rssBeforeIdle = await settledRssKib(pid);
    const devs: RemoteDevice[] = [];
    for (let i = 1; i <= SESSIONS; i++) {
      const dev = await newClient().openDevice({ id: `emu-2-${i}` });
      await prepareLoop(dev);
      devs.push(dev);
    }
    const rssIdle = await settledRssKib(pid);
    const rssPerIdle = (rssIdle - rssBeforeIdle) / SESSIONS;
    progress(`${SESSIONS} idle sessions: server RSS ${rssBeforeIdle} -> ${rssIdle} KiB (${rssPerIdle.toFixed(1)} KiB per session)`);

    // Before the load has grown the heap: a session on the default set's loopback.
    const rssInflight = await inflightRss(newClient(), pid, progress);

    // Load.
    const hist = new LatencyHistogram();
    const ios = devs.map((d) => new LoopIo(d, { urbBytes: URB_BYTES, window: WINDOW, onRtt: (us) => hist.add(us) }));
    const cpu0 = procCpuMicros(pid);
    const self0 = selfCpuMicros();
    const t0 = performance.now();
    for (const io of ios) io.start();
    const end = t0 + durationS * 1000;
    let peakRss = rssIdle;
    while (performance.now() < end) {
      await sleep(Math.min(5000, end - performance.now()));
      const mib = ios.reduce((a, io) => a + io.progress.bytesVerified, 0) / 2 ** 20;
      const rss = await settledRssKib(pid, 1, 0);
      peakRss = Math.max(peakRss, rss);
      progress(`${((performance.now() - t0) / 1000).toFixed(0)} s: ${mib.toFixed(0)} MiB verified, ${hist.count} URBs, server RSS ${rss} KiB`);
    }
    const atEnd = ios.map((io) => io.progress);
    const seconds = (performance.now() - t0) / 1000;
    const serverCpu = procCpuMicros(pid) - cpu0;
    const clientCpu = selfCpuMicros() - self0;
    const results = await Promise.all(ios.map((io) => io.stop()));
    const perSession = atEnd.map((p) => (p.bytesOut + p.bytesVerified) / seconds);
    const urbs = atEnd.reduce((a, p) => a + p.urbs, 0);
    const mib = atEnd.reduce((a, p) => a + p.bytesOut + p.bytesVerified, 0) / 2 ** 20;
    const errors = results.reduce((a, r) => a + r.errors.length, 0);
    const dataLost = results.reduce((a, r) => a + r.bytesLost, 0);
    for (const [i, r] of results.entries()) if (r.errors.length) progress(`session on emu-2-${i + 1}: ${r.errors.slice(0, 3).join('; ')}`);
    await Promise.all(devs.map((d) => d.close()));

    return {
      sessions: SESSIONS,
      load_seconds: round(seconds, 1),
      urbs: urbs,
      mib_per_s: round(mib / seconds, 1),
      p50_rtt_us: Math.round(hist.quantile(0.5)),
      p99_rtt_us: Math.round(hist.quantile(0.99)),
      fairness: round(Math.min(...perSession) / Math.max(...perSession), 3),
      errors,
      data_lost: dataLost,
      server_cpu_us_per_urb: round(serverCpu / urbs, 1),
      server_cpu_ms_per_mib: round(serverCpu / 1000 / mib, 2),
      client_cpu_us_per_urb: round(clientCpu / urbs, 1),
      server_rss_peak_kib: peakRss,
      rss_per_idle_session_kib: round(rssPerIdle, 1),
      rss_64_inflight_kib: rssInflight,
    };
  } finally {
    for (const c of clients) c.close();
    await server.dispose();
  }
}

/**
 * Server RSS growth while one session holds 64 OUT URBs of 64 KiB in flight: the loopback's FIFO
 * is filled first (1 MiB, so it is not counted), then the OUTs wait at the device until read back.
 */
async function inflightRss(client: UsbHostClient, pid: number, progress: (m: string) => void): Promise<number> {
  const dev = await client.openDevice({ id: 'emu-1-2' });
  await prepareLoop(dev);
  const payload = Buffer.alloc(INFLIGHT_URB_BYTES, 0x5a);
  const out = (n: number) => Array.from({ length: n }, () => dev.submit({ endpoint: LOOP_BULK_OUT, type: TransferType.TRANSFER_BULK, data: payload }));
  const fifoUrbs = (1024 * 1024) / INFLIGHT_URB_BYTES;
  await Promise.all(out(fifoUrbs));
  const before = await settledRssKib(pid);
  const pending = out(INFLIGHT_URBS);
  for (let i = 0; ; i++) {
    const s = (await client.listSessions()).find((x) => x.id === dev.sessionId);
    if (s && s.urbsInFlight >= INFLIGHT_URBS) break;
    if (i > 100) throw new Error(`the server has ${s?.urbsInFlight} URBs in flight, not ${INFLIGHT_URBS}`);
    await sleep(100);
  }
  const during = await settledRssKib(pid);
  progress(`${INFLIGHT_URBS} x ${INFLIGHT_URB_BYTES / 1024} KiB URBs in flight: server RSS ${before} -> ${during} KiB`);
  const reads = Array.from({ length: fifoUrbs + INFLIGHT_URBS }, () => dev.submit({ endpoint: LOOP_BULK_IN, type: TransferType.TRANSFER_BULK, length: INFLIGHT_URB_BYTES }));
  await Promise.all([...pending, ...reads]);
  await dev.close();
  return during - before;
}

const round = (x: number, digits: number) => (Number.isFinite(x) ? Math.round(x * 10 ** digits) / 10 ** digits : null);
