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
import { LatencyHistogram, liveMemoryKib, rssKib, startSoakServer, type SoakServer } from './support.js';
import type { SoakOptions, SoakPart } from './types.js';

const SESSIONS = 64;
const URB_BYTES = 16 * 1024;
/** OUT and IN URBs in flight per session, each. */
const WINDOW = 4;
const INFLIGHT_URBS = 64;
const INFLIGHT_URB_BYTES = 64 * 1024;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export async function run({ durationS, progress }: SoakOptions): Promise<SoakPart> {
  const server = await startSoakServer(['--emulated-count', String(SESSIONS)], undefined, { inspect: true });
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
    // Memory figures are taken after full collections in the server (its inspector), so they are what is held live.
    const beforeIdle = await liveMemoryKib(server);
    const devs: RemoteDevice[] = [];
    for (let i = 1; i <= SESSIONS; i++) {
      const dev = await newClient().openDevice({ id: `emu-2-${i}` });
      await prepareLoop(dev);
      devs.push(dev);
    }
    const idle = await liveMemoryKib(server);
    const rssPerIdle = (idle.rssKib - beforeIdle.rssKib) / SESSIONS;
    const heapPerIdle = (idle.heapUsedKib - beforeIdle.heapUsedKib) / SESSIONS;
    progress(
      `${SESSIONS} idle sessions: server RSS ${beforeIdle.rssKib} -> ${idle.rssKib} KiB (${rssPerIdle.toFixed(1)} KiB per session), ` +
        `live heap ${beforeIdle.heapUsedKib} -> ${idle.heapUsedKib} KiB (${heapPerIdle.toFixed(1)} KiB per session)`,
    );

    // Before the load has grown the heap: a session on the default set's loopback.
    const inflight = await inflightMemory(newClient(), server, progress);

    // Load.
    const hist = new LatencyHistogram();
    const ios = devs.map((d) => new LoopIo(d, { urbBytes: URB_BYTES, window: WINDOW, onRtt: (us) => hist.add(us) }));
    const cpu0 = procCpuMicros(pid);
    const self0 = selfCpuMicros();
    const t0 = performance.now();
    for (const io of ios) io.start();
    const end = t0 + durationS * 1000;
    let peakRss = idle.rssKib;
    while (performance.now() < end) {
      await sleep(Math.min(5000, end - performance.now()));
      const mib = ios.reduce((a, io) => a + io.progress.bytesVerified, 0) / 2 ** 20;
      const rss = rssKib(pid);
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
      heap_per_idle_session_kib: round(heapPerIdle, 1),
      rss_64_inflight_kib: inflight.rssKib,
      heap_64_inflight_kib: inflight.heapUsedKib,
      buffers_64_inflight_kib: inflight.arrayBuffersKib,
    };
  } finally {
    for (const c of clients) c.close();
    await server.dispose();
  }
}

/**
 * Server RSS and live heap growth while one session holds 64 OUT URBs of 64 KiB in flight: the
 * loopback's FIFO is filled first (1 MiB, so it is not counted), then the OUTs wait at the device
 * until read back. Their payloads are Buffers outside the V8 heap (buffers_64_inflight_kib: what is
 * held; the RSS grows less where the allocator reuses pages freed before).
 */
async function inflightMemory(client: UsbHostClient, server: SoakServer, progress: (m: string) => void): Promise<{ rssKib: number; heapUsedKib: number; arrayBuffersKib: number }> {
  const dev = await client.openDevice({ id: 'emu-1-2' });
  await prepareLoop(dev);
  const payload = Buffer.alloc(INFLIGHT_URB_BYTES, 0x5a);
  const out = (n: number) => Array.from({ length: n }, () => dev.submit({ endpoint: LOOP_BULK_OUT, type: TransferType.TRANSFER_BULK, data: payload }));
  const fifoUrbs = (1024 * 1024) / INFLIGHT_URB_BYTES;
  await Promise.all(out(fifoUrbs));
  const before = await liveMemoryKib(server);
  const pending = out(INFLIGHT_URBS);
  for (let i = 0; ; i++) {
    const s = (await client.listSessions()).find((x) => x.id === dev.sessionId);
    if (s && s.urbsInFlight >= INFLIGHT_URBS) break;
    if (i > 100) throw new Error(`the server has ${s?.urbsInFlight} URBs in flight, not ${INFLIGHT_URBS}`);
    await sleep(100);
  }
  const during = await liveMemoryKib(server);
  progress(
    `${INFLIGHT_URBS} x ${INFLIGHT_URB_BYTES / 1024} KiB URBs in flight: server RSS ${before.rssKib} -> ${during.rssKib} KiB, live heap ${before.heapUsedKib} -> ${during.heapUsedKib} KiB, Buffers ${before.arrayBuffersKib} -> ${during.arrayBuffersKib} KiB`,
  );
  const reads = Array.from({ length: fifoUrbs + INFLIGHT_URBS }, () => dev.submit({ endpoint: LOOP_BULK_IN, type: TransferType.TRANSFER_BULK, length: INFLIGHT_URB_BYTES }));
  await Promise.all([...pending, ...reads]);
  await dev.close();
  return { rssKib: during.rssKib - before.rssKib, heapUsedKib: during.heapUsedKib - before.heapUsedKib, arrayBuffersKib: during.arrayBuffersKib - before.arrayBuffersKib };
}

const round = (x: number, digits: number) => (Number.isFinite(x) ? Math.round(x * 10 ** digits) / 10 ** digits : null);
