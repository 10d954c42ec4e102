// bench:soak part "slow-consumer": a client that stops reading its completions (the SDK's
// pauseReading test hook) while it keeps submitting 64 KiB bulk INs, against a server with the
// default session byte bound and a short grace period. Another client runs verified loop I/O on
// another device and connection the whole time. In interleaved rounds (the order alternating) that
// other session's throughput is measured with a slow consumer held at the bound and without one;
// each slow session must end with RESOURCE_EXHAUSTED naming itself after the grace period, and
// the server's RSS must stay bounded.
import { Status } from 'nice-grpc';
import { UsbHostClient } from '../../src/client/sdk/client.js';
import { ChannelClosedError, TransferType, type RemoteDevice } from '../../src/client/sdk/remote-device.js';
import { clientTls } from '../../src/devkit/certs.js';
import { LoopIo, prepareLoop } from '../../src/devkit/loop-io.js';
import { LOOP_BULK_IN } from '../../src/server/backends/emulated/loopback.js';
import { procCpuMicros } from '../support/cpu.js';
import { putRatio, putSpread, rotated } from '../support/rounds.js';
import { rssKib, settledRssKib, startSoakServer, type SoakServer } from './support.js';
import type { FaultOutcome, SoakOptions, SoakPart } from './types.js';

const GRACE_MS = 5000;
/** The slow client's URBs: 6000 x 64 KiB = 375 MiB of completions it never reads. */
const SLOW_URBS = 6000;
const URB_BYTES = 64 * 1024;
/** How long the other session's throughput is measured in each phase. */
const MEASURE_MS = 2000;
/** Server RSS growth over a round's start allowed while a slow client is held. */
const RSS_BOUND_KIB = 128 * 1024;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface Phase {
  mibPerS: number;
  /** Server CPU per MiB the other session moved (OUT + verified IN). */
  cpuMsPerMib: number;
}

/** The other session's throughput and the server's CPU per MiB over MEASURE_MS. */
async function measure(io: LoopIo, pid: number): Promise<Phase> {
  const p0 = io.progress;
  const c0 = procCpuMicros(pid);
  const t0 = performance.now();
  await sleep(MEASURE_MS);
  const p1 = io.progress;
  const mib = (p1.bytesOut - p0.bytesOut + p1.bytesVerified - p0.bytesVerified) / 2 ** 20;
  return { mibPerS: mib / ((performance.now() - t0) / 1000), cpuMsPerMib: (procCpuMicros(pid) - c0) / 1000 / mib };
}

interface SlowOutcome {
  phase: Phase;
  /** The server's journal of the held session, at its largest. */
  heldJournalBytes: number;
  rssGrowthKib: number;
  /** From pausing to the server's log of the session's end. */
  endedAfterMs: number;
  clear: boolean;
  released: boolean;
  message: string;
}

/** One slow consumer: paused, submitting, held; the other session measured meanwhile; then its end. */
/** `client` holds the slow stream; `admin`, on its own connection (the paused stream holds the shared HTTP/2 window), looks on. */
async function slowConsumer(server: SoakServer, client: UsbHostClient, admin: UsbHostClient, io: LoopIo): Promise<SlowOutcome> {
  const pid = server.child.pid!;
  const before = await settledRssKib(pid, 3);
  const slow: RemoteDevice = await client.openDevice({ id: 'emu-1-2' }, { maxInFlight: SLOW_URBS });
  await slow.selectConfiguration(1);
  const closed = new Promise<Error>((resolve) => slow.once('closed', (err: Error) => resolve(err)));
  let peak = before;
  const sampler = setInterval(() => (peak = Math.max(peak, rssKib(pid))), 50);
  const t0 = Date.now();
  try {
    slow.pauseReading();
    for (let i = 0; i < SLOW_URBS; i++) slow.submit({ endpoint: LOOP_BULK_IN, type: TransferType.TRANSFER_BULK, length: URB_BYTES }).catch(() => {});
    // Held: the server's journal of the session stops growing.
    let held = 0;
    for (let last = -1; ; ) {
      const s = (await admin.listSessions()).find((x) => x.id === slow.sessionId);
      const j = Number(s?.journalBytes ?? 0);
      if (j > 0 && j === last) break;
      if (Date.now() - t0 > GRACE_MS / 2) break;
      last = j;
      held = Math.max(held, j);
      await sleep(100);
    }
    const phase = await measure(io, pid);
    const logged = () => server.logs.some((l) => l.includes('did not read completions') && l.includes(slow.sessionId));
    while (!logged() && Date.now() - t0 < GRACE_MS + 30_000) await sleep(50);
    const endedAfterMs = Date.now() - t0;
    let released = false;
    for (let i = 0; i < 100 && !released; i++) {
      try {
        await (await admin.openDevice({ id: 'emu-1-2' })).close();
        released = true;
      } catch {
        await sleep(100);
      }
    }
    slow.resumeReading();
    const err = await Promise.race([closed, sleep(10_000).then(() => new Error('the SDK did not report the session closed'))]);
    const clear = err instanceof ChannelClosedError && err.code === Status.RESOURCE_EXHAUSTED && err.message.includes(slow.sessionId) && /did not read completions for/.test(err.message);
    return { phase, heldJournalBytes: held, rssGrowthKib: peak - before, endedAfterMs, clear, released, message: err.message };
  } finally {
    clearInterval(sampler);
  }
}

export async function run({ durationS, progress }: SoakOptions): Promise<SoakPart> {
  const rounds = Math.min(8, Math.max(3, Math.round(durationS / 12)));
  const server = await startSoakServer(['--emulated-count', '1', '--grace-ms', String(GRACE_MS)]);
  const pid = server.child.pid!;
  const tls = clientTls('bridge');
  const otherClient = new UsbHostClient({ address: server.address, ...tls });
  const slowClient = new UsbHostClient({ address: server.address, ...tls });
  try {
    const other = await otherClient.openDevice({ id: 'emu-2-1' });
    await prepareLoop(other);
    const io = new LoopIo(other, { urbBytes: 16 * 1024, window: 4 }).start();
    await sleep(1000);
    const withSlow: Phase[] = [];
    const without: Phase[] = [];
    const outcomes: SlowOutcome[] = [];
    for (let r = 0; r < rounds; r++) {
      for (const target of rotated(['with', 'without'] as const, r)) {
        if (target === 'without') {
          without.push(await measure(io, pid));
          continue;
        }
        const o = await slowConsumer(server, slowClient, otherClient, io);
        outcomes.push(o);
        withSlow.push(o.phase);
      }
      const o = outcomes[outcomes.length - 1]!;
      progress(
        `round ${r + 1}/${rounds}: other session ${withSlow[r]!.mibPerS.toFixed(1)} MiB/s with a slow consumer, ${without[r]!.mibPerS.toFixed(1)} without; ` +
          `held journal ${(o.heldJournalBytes / 2 ** 20).toFixed(1)} MiB, RSS +${(o.rssGrowthKib / 1024).toFixed(1)} MiB, ended after ${o.endedAfterMs} ms: ${o.message}`,
      );
    }
    const res = await io.stop();
    await other.close();
    const rssGrowth = Math.max(...outcomes.map((o) => o.rssGrowthKib));
    const allClear = outcomes.every((o) => o.clear && o.released && o.endedAfterMs >= GRACE_MS);
    const ok = allClear && rssGrowth < RSS_BOUND_KIB && res.errors.length === 0 && res.bytesLost === 0;
    const fault: FaultOutcome = {
      ok,
      detail:
        `${rounds} rounds, grace ${GRACE_MS} ms, default session bound: ${outcomes.filter((o) => o.clear).length} slow sessions ended with RESOURCE_EXHAUSTED naming them ` +
        `(${outcomes.filter((o) => o.released).length} devices released), e.g. "${outcomes[0]?.message}"; other session ${(res.bytesVerified / 2 ** 20).toFixed(0)} MiB verified, ${res.errors.length} errors${res.errors.length ? ` (${res.errors[0]})` : ''}`,
      rounds,
      grace_ms: GRACE_MS,
      rss_growth_kib_max: rssGrowth,
      rss_bound_kib: RSS_BOUND_KIB,
      held_journal_bytes_max: Math.max(...outcomes.map((o) => o.heldJournalBytes)),
      ended_after_ms_max: Math.max(...outcomes.map((o) => o.endedAfterMs)),
      other_errors: res.errors.length,
    };
    putSpread(fault, 'other_mib_per_s_with_slow', withSlow.map((p) => p.mibPerS), 1);
    putSpread(fault, 'other_mib_per_s_without', without.map((p) => p.mibPerS), 1);
    putRatio(fault, 'other_throughput_ratio', withSlow.map((p) => p.mibPerS), without.map((p) => p.mibPerS));
    putSpread(fault, 'server_cpu_ms_per_mib_with_slow', withSlow.map((p) => p.cpuMsPerMib), 2);
    putSpread(fault, 'server_cpu_ms_per_mib_without', without.map((p) => p.cpuMsPerMib), 2);
    return { faults: { slow_consumer: fault }, data_lost: res.bytesLost, errors: res.errors.length };
  } finally {
    otherClient.close();
    slowClient.close();
    await server.dispose();
  }
}
