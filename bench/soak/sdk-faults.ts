// bench:soak part "sdk-faults": the faults an SDK client meets without QEMU, each with verified
// I/O (src/devkit/loop-io.ts) running through it. The scenarios take their figures as arguments
// so the tests (test/integration/fault-*.test.ts) run them short; run() uses the real ones.
import { UsbHostClient } from '../../src/client/sdk/client.js';
import { openDeviceWithRetry } from '../../src/client/sdk/reopen.js';
import type { RemoteDevice } from '../../src/client/sdk/remote-device.js';
import { clientTls } from '../../src/devkit/certs.js';
import { LoopIo, prepareLoop, type LoopIoResult } from '../../src/devkit/loop-io.js';
import { TcpProxy } from '../../test/helpers/tcp-proxy.js';
import { startSoakServer, type SoakServer } from './support.js';
import type { FaultOutcome, SoakOptions, SoakPart } from './types.js';

/** The emulated loopback of the default set. */
const LOOPBACK = { id: 'emu-1-2' };
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export interface FaultResult extends FaultOutcome {
  data_lost: number;
}

interface Rig {
  server: SoakServer;
  proxy: TcpProxy;
  client: UsbHostClient;
  dispose(): Promise<void>;
}

/** A server with grace `graceMs`, reached through a TCP proxy, and an SDK client of it. */
async function rig(graceMs: number): Promise<Rig> {
  const server = await startSoakServer(['--grace-ms', String(graceMs)]);
  const proxy = new TcpProxy('127.0.0.1', server.port);
  const address = await proxy.start();
  const client = new UsbHostClient({ address, ...clientTls('bridge') });
  return {
    server,
    proxy,
    client,
    dispose: async () => {
      client.close();
      await proxy.stop();
      await server.dispose();
    },
  };
}

async function startIo(dev: RemoteDevice): Promise<LoopIo> {
  await prepareLoop(dev);
  return new LoopIo(dev, { window: 4 }).start();
}

/** Wait until `io` verified more bytes than `than` (it carries on), or `ms` passed. */
async function progressed(io: LoopIo, than: number, ms: number): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (io.progress.bytesVerified > than) return true;
    await sleep(50);
  }
  return false;
}

const summary = (r: LoopIoResult) => `${(r.bytesVerified / 2 ** 20).toFixed(1)} MiB verified, ${r.urbs} URBs, ${r.errors.length} errors${r.errors.length ? ` (${r.errors[0]})` : ''}`;

/**
 * A network cut shorter than the grace period (nothing passes, nobody is told): the SDK user sees
 * no error, the session resumes by sequence number (or its connection survives the cut), no byte is lost.
 */
export async function networkCut(opts: { cutMs: number; graceMs: number }): Promise<FaultResult> {
  const r = await rig(opts.graceMs);
  try {
    const dev = await r.client.openDevice(LOOPBACK, { reconnectWindowMs: opts.graceMs });
    const session = dev.sessionId;
    const io = await startIo(dev);
    await progressed(io, 0, 5000);
    await r.proxy.blackhole(opts.cutMs);
    const before = io.progress.bytesVerified;
    const resumed = await progressed(io, before, 30_000);
    const res = await io.stop();
    await dev.close();
    const ok = resumed && res.errors.length === 0 && res.bytesLost === 0 && dev.sessionId === session;
    return { ok, detail: `cut ${opts.cutMs} ms, grace ${opts.graceMs} ms: session ${session} ${resumed ? 'carried on' : 'did not carry on'} (${dev.reconnects} resumes); ${summary(res)}`, data_lost: res.bytesLost, resumes: dev.reconnects };
  } finally {
    await r.dispose();
  }
}

/**
 * A cut longer than the grace period: the session ends; the SDK user gets an error naming the session
 * (the server no longer knows it), and the server logs a line naming the session and the reason.
 * `mode`: 'blackhole' (nobody is told; the server finds out by its keepalive) or 'reset' (connections reset, new ones refused).
 */
export async function cutBeyondGrace(opts: { cutMs: number; graceMs: number; mode: 'blackhole' | 'reset' }): Promise<FaultResult> {
  const r = await rig(opts.graceMs);
  try {
    const dev = await r.client.openDevice(LOOPBACK, { reconnectWindowMs: opts.cutMs + 30_000 });
    const session = dev.sessionId;
    const closed = new Promise<Error | undefined>((res) => dev.once('closed', (e?: Error) => res(e)));
    const io = await startIo(dev);
    await progressed(io, 0, 5000);
    await (opts.mode === 'blackhole' ? r.proxy.blackhole(opts.cutMs) : r.proxy.outage(opts.cutMs));
    const err = await Promise.race([closed, sleep(30_000).then(() => new Error('the SDK did not end the session within 30 s after the cut'))]);
    const res = await io.stop();
    const logLine = r.server.logs.find((l) => l.includes(session) && l.includes('grace period expired'));
    const clear = !!err && err.message.includes(session) && /unknown or has expired/.test(err.message);
    // Bytes accepted but never read back went with the session: not lost by the channel.
    const ok = clear && !!logLine && res.bytesLost === 0;
    return {
      ok,
      detail: `cut ${opts.cutMs} ms (${opts.mode}), grace ${opts.graceMs} ms: SDK error "${err?.message}"; server log: ${logLine ?? 'none naming the session'}; ${summary(res)}`,
      data_lost: res.bytesLost,
    };
  } finally {
    await r.dispose();
  }
}

/**
 * The server is killed (SIGKILL) and started again: the SDK user sees the device go with an error
 * naming the session, opens it again (with backoff while the server is down) and carries on.
 */
export async function serverRestart(opts: { graceMs: number; downMs: number }): Promise<FaultResult> {
  const r = await rig(opts.graceMs);
  let second: SoakServer | undefined;
  try {
    const dev = await r.client.openDevice(LOOPBACK, { reconnectWindowMs: opts.graceMs });
    const session = dev.sessionId;
    const closed = new Promise<Error | undefined>((res) => dev.once('closed', (e?: Error) => res(e)));
    const io = await startIo(dev);
    await progressed(io, 0, 5000);
    const t0 = Date.now();
    r.server.child.kill('SIGKILL');
    await sleep(opts.downMs);
    second = await startSoakServer(['--grace-ms', String(opts.graceMs)], r.server.dir);
    r.proxy.retarget(second.port);
    const err = await Promise.race([closed, sleep(opts.graceMs + 30_000).then(() => new Error('the SDK did not report the session gone'))]);
    const first = await io.stop();
    let retries = 0;
    const again = await openDeviceWithRetry(r.client, LOOPBACK, { reconnectWindowMs: opts.graceMs, onRetry: () => retries++ });
    const backMs = Date.now() - t0;
    const io2 = await startIo(again);
    const carried = await progressed(io2, 0, 10_000);
    const res2 = await io2.stop();
    await again.close();
    const clear = !!err && err.message.includes(session);
    const lost = first.bytesLost + res2.bytesLost;
    const ok = clear && carried && res2.errors.length === 0 && lost === 0 && again.sessionId !== session;
    return {
      ok,
      detail: `SDK error "${err?.message}"; reopened as session ${again.sessionId} ${backMs} ms after the kill (${retries} retries); before: ${summary(first)}; after: ${summary(res2)}`,
      data_lost: lost,
      back_ms: backMs,
    };
  } finally {
    await second?.stop();
    await r.dispose();
  }
}

export async function run({ progress }: SoakOptions): Promise<SoakPart> {
  const grace = 30_000;
  const faults: Record<string, FaultOutcome> = {};
  let dataLost = 0;
  const cases: [string, () => Promise<FaultResult>][] = [
    ['cut_5s', () => networkCut({ cutMs: 5000, graceMs: grace })],
    ['cut_20s', () => networkCut({ cutMs: 20_000, graceMs: grace })],
    // The server notices a blackholed connection by its keepalive (10 s + 5 s): the cut outlasts that and the grace period.
    ['cut_beyond_grace', () => cutBeyondGrace({ cutMs: grace + 20_000, graceMs: grace, mode: 'blackhole' })],
    ['server_restart', () => serverRestart({ graceMs: grace, downMs: 2000 })],
  ];
  for (const [name, f] of cases) {
    progress(`${name}...`);
    try {
      const o = await f();
      dataLost += o.data_lost;
      faults[name] = o;
    } catch (err) {
      faults[name] = { ok: false, detail: `threw: ${(err as Error).message}` };
    }
    progress(`${name}: ${faults[name]!.ok ? 'ok' : 'FAILED'}: ${faults[name]!.detail}`);
  }
  return { faults, data_lost: dataLost, errors: 0 };
}
