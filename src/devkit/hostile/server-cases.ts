// The hostile cases against one running USB host server (a child process, so that its memory
// and descriptors can be read from /proc), each summed up as an outcome: ok, a detail line,
// and its counts. Shared by test/integration/hostile-*.test.ts and bench/soak/hostile.ts.
import * as grpc from '@grpc/grpc-js';
import { ClientMessage, ListDevicesRequest, ListDevicesResponse, ListSessionsRequest, ListSessionsResponse } from '../../gen/usbroam/v1/usbhost.js';
import { abandonStreams, grpcFrame, processUsage, targetOf } from './abandon.js';
import { usbHostMethods } from './methods.js';
import { rawClient, rawUnary, type TlsPaths } from './raw-calls.js';
import { fuzzMethods, newWireTally, oversizedCase } from './wire-fuzz.js';

const S = grpc.status;

export interface Outcome {
  ok: boolean;
  detail: string;
  [k: string]: unknown;
}

export interface ServerUnderTest {
  address: string;
  pid: number;
  /** The server's log lines (JSON), as they come. */
  logs: string[];
  tls(identity: string): TlsPaths;
  /** An admin identity the ACL allows every device. */
  admin: string;
}

/** Sessions the server holds and devices it has claimed, as the admin sees them. */
export async function serverState(client: grpc.Client): Promise<{ sessions: number; claimed: number }> {
  const s = await rawUnary(client, '/usbroam.v1.UsbHost/ListSessions', ListSessionsRequest.encode({}).finish());
  const d = await rawUnary(client, '/usbroam.v1.UsbHost/ListDevices', ListDevicesRequest.encode({}).finish());
  if (s.status.code !== S.OK || d.status.code !== S.OK) throw new Error(`server state: ${s.status.details} ${d.status.details}`);
  return {
    sessions: ListSessionsResponse.decode(s.response!).sessions.length,
    claimed: ListDevicesResponse.decode(d.response!).devices.filter((x) => x.claim?.claimed).length,
  };
}

/** Wait (bounded) until the server holds no session and no claim. */
export async function untilIdle(client: grpc.Client, timeoutMs: number): Promise<{ sessions: number; claimed: number }> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const st = await serverState(client);
    if ((st.sessions === 0 && st.claimed === 0) || Date.now() > end) return st;
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Random and mutated bytes to every method; undecodable ones INVALID_ARGUMENT, logged with identity and peer. */
export async function randomBytesCase(srv: ServerUnderTest, runsPerMethod: number, serial: string, seed?: number): Promise<Outcome> {
  const client = rawClient(srv.address, srv.tls(srv.admin));
  const tally = newWireTally();
  const logsBefore = srv.logs.length;
  try {
    await fuzzMethods(client, usbHostMethods(serial), runsPerMethod, tally, { seed });
  } finally {
    client.close();
  }
  const refusalsLogged = () =>
    srv.logs
      .slice(logsBefore)
      .map((l) => {
        try {
          return JSON.parse(l) as { msg?: string; identity?: string; peer?: string; method?: string };
        } catch {
          return {};
        }
      })
      .filter((l) => l.msg === 'request refused: its bytes do not parse');
  // The server's log lines come through its stdout pipe, the statuses through the TLS socket: the
  // last lines may still be on their way when the last call has ended.
  const deadline = Date.now() + 5000;
  while (refusalsLogged().length < tally.undecodable && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  const refusals = refusalsLogged();
  const logged = refusals.filter((l) => l.identity === srv.admin && /^127\.0\.0\.1:\d+$/.test(l.peer ?? '')).length;
  const ok = tally.internal_count === 0 && tally.violations.length === 0 && tally.undecodable > 0 && logged === tally.undecodable;
  return {
    ok,
    detail: `${tally.cases} calls (${tally.undecodable} undecodable, ${tally.served} served), ${logged} refusals logged with identity and peer${tally.violations.length ? `; violations: ${tally.violations.join(' | ')}` : ''}`,
    cases: tally.cases,
    undecodable: tally.undecodable,
    served: tally.served,
    skipped: tally.skipped,
    statuses: tally.statuses,
    internal_count: tally.internal_count,
    logged_refusals: logged,
    violations: tally.violations,
  };
}

/** Past the 64 MiB receive limit: RESOURCE_EXHAUSTED, and the server still serves. */
export async function oversizedServerCase(srv: ServerUnderTest, bytes = 64 * 1024 * 1024 + 1024): Promise<Outcome> {
  const client = rawClient(srv.address, srv.tls(srv.admin));
  const tally = newWireTally();
  try {
    for (const path of ['/usbroam.v1.UsbHost/Connect', '/usbroam.v1.UsbHost/ListDevices']) await oversizedCase(client, path, bytes, tally);
    const after = await serverState(client);
    const ok = tally.violations.length === 0 && tally.internal_count === 0;
    return { ok, detail: `${tally.cases} messages of ${bytes} bytes: ${JSON.stringify(tally.statuses)}; serving after: ${after.sessions} sessions${tally.violations.length ? `; ${tally.violations.join(' | ')}` : ''}`, cases: tally.cases, bytes, statuses: tally.statuses, internal_count: tally.internal_count };
  } finally {
    client.close();
  }
}

/**
 * `count` Connect streams opened and abandoned (after a warm-up of a tenth of it), then the
 * server's memory and descriptors against before, once its sessions' grace periods are over.
 */
export async function abandonedStreamsCase(srv: ServerUnderTest, count: number, serial: string, graceMs: number, limits = { rssKiB: 32 * 1024, fds: 4 }): Promise<Outcome> {
  const target = targetOf(srv.address, srv.tls(srv.admin));
  const open = ClientMessage.encode({ frames: [{ seq: 0, kind: { $case: 'open', value: { target: { $case: 'device', value: { id: '', vidPid: '', serial, portPath: '' } } } } }] }).finish();
  const bodies = [undefined, grpcFrame(open), grpcFrame(open, open.length + 100), grpcFrame(Uint8Array.of(0xff, 0xff, 0xff)), grpcFrame(new Uint8Array(0), 8 * 1024 * 1024)];
  const path = '/usbroam.v1.UsbHost/Connect';
  const admin = rawClient(srv.address, srv.tls(srv.admin));
  try {
    await abandonStreams(target, path, Math.max(50, Math.floor(count / 10)), bodies);
    await untilIdle(admin, graceMs + 10_000);
    const before = await settledUsage(srv.pid);
    const t = await abandonStreams(target, path, count, bodies);
    const idle = await untilIdle(admin, graceMs + 10_000);
    const after = await settledUsage(srv.pid, before.fds);
    const rssDelta = after.rss_kib - before.rss_kib;
    const fdDelta = after.fds - before.fds;
    const ok = idle.sessions === 0 && idle.claimed === 0 && fdDelta <= limits.fds && rssDelta <= limits.rssKiB;
    return {
      ok,
      detail: `${t.streams} streams on ${t.connections} connections abandoned (${t.answered} answered first); after: ${idle.sessions} sessions, ${idle.claimed} claims, fd ${before.fds} -> ${after.fds}, RSS ${before.rss_kib} -> ${after.rss_kib} KiB`,
      cases: t.streams,
      connections: t.connections,
      answered: t.answered,
      statuses_before_abandon: t.statuses,
      sessions_after: idle.sessions,
      claims_after: idle.claimed,
      rss_delta_kib: rssDelta,
      fd_delta: fdDelta,
      internal_count: (t.statuses[String(S.INTERNAL)] ?? 0) + (t.statuses[String(S.UNKNOWN)] ?? 0),
    };
  } finally {
    admin.close();
  }
}

/** Usage once the descriptor count has come down to `fdsAtMost` (closing sockets take a moment), at most 5 s. */
async function settledUsage(pid: number, fdsAtMost = Infinity): Promise<{ rss_kib: number; fds: number }> {
  const end = Date.now() + 5000;
  let u = processUsage(pid);
  while (u.fds > fdsAtMost && Date.now() < end) {
    await new Promise((r) => setTimeout(r, 100));
    u = processUsage(pid);
  }
  return u;
}
