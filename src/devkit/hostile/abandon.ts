// Streams opened and abandoned, at the HTTP/2 level (node:http2), as a crashing or malicious
// client leaves them: nothing sent, half a gRPC message, a whole one and no more; then a
// cancel (RST_STREAM) or the connection simply dropped.
import { readdirSync, readFileSync } from 'node:fs';
import http2 from 'node:http2';
import net from 'node:net';
import type { TlsPaths } from './raw-calls.js';

export type Target = { kind: 'tls'; host: string; port: number; tls: TlsPaths } | { kind: 'unix'; path: string };

export function targetOf(address: string, tls?: TlsPaths): Target {
  if (address.startsWith('unix:')) return { kind: 'unix', path: address.slice(5) };
  const i = address.lastIndexOf(':');
  if (!tls) throw new Error(`${address}: TCP targets need TLS files`);
  return { kind: 'tls', host: address.slice(0, i), port: Number(address.slice(i + 1)), tls };
}

function connect(t: Target): http2.ClientHttp2Session {
  if (t.kind === 'unix') return http2.connect('http://localhost', { createConnection: () => net.connect(t.path) });
  return http2.connect(`https://${t.host}:${t.port}`, {
    ca: readFileSync(t.tls.ca),
    cert: readFileSync(t.tls.cert),
    key: readFileSync(t.tls.key),
    servername: 'localhost',
  });
}

/** A gRPC length-prefixed message; `claim` can say more bytes than follow (half a message). */
export function grpcFrame(body: Uint8Array, claim = body.length): Buffer {
  const b = Buffer.alloc(5 + body.length);
  b.writeUInt32BE(claim, 1);
  b.set(body, 5);
  return b;
}

export interface AbandonTally {
  streams: number;
  connections: number;
  /** Streams the server answered (response headers) before they were abandoned. */
  answered: number;
  /** grpc-status values seen before abandoning (most streams see none). */
  statuses: Record<string, number>;
}

/**
 * `count` streams on `path`, `perConnection` at a time on one connection. Stream i sends
 * bodies[i % bodies.length] (undefined: nothing; a [bytes, claim] pair: a message whose
 * prefix claims `claim` bytes), waits `lingerMs`, and is cancelled (even i) or left for the
 * connection's drop (odd i).
 */
export async function abandonStreams(t: Target, path: string, count: number, bodies: (Buffer | undefined)[], opts: { perConnection?: number; lingerMs?: number } = {}): Promise<AbandonTally> {
  const per = opts.perConnection ?? 50;
  const linger = opts.lingerMs ?? 20;
  const tally: AbandonTally = { streams: 0, connections: 0, answered: 0, statuses: {} };
  for (let done = 0; done < count; ) {
    const session = connect(t);
    session.on('error', () => {});
    tally.connections++;
    await new Promise<void>((resolve, reject) => {
      session.once('connect', () => resolve());
      session.once('error', reject);
    });
    const n = Math.min(per, count - done);
    const streams: http2.ClientHttp2Stream[] = [];
    for (let j = 0; j < n; j++) {
      const i = done + j;
      const req = session.request({ ':method': 'POST', ':path': path, 'content-type': 'application/grpc', te: 'trailers' });
      req.on('error', () => {});
      req.on('response', (h) => {
        tally.answered++;
        const st = h['grpc-status'];
        if (st !== undefined) tally.statuses[String(st)] = (tally.statuses[String(st)] ?? 0) + 1;
      });
      req.on('trailers', (h) => {
        const st = h['grpc-status'];
        if (st !== undefined) tally.statuses[String(st)] = (tally.statuses[String(st)] ?? 0) + 1;
      });
      req.on('data', () => {});
      const body = bodies[i % bodies.length];
      if (body) req.write(body);
      streams.push(req);
      tally.streams++;
    }
    await new Promise((r) => setTimeout(r, linger));
    streams.forEach((s, j) => {
      if ((done + j) % 2 === 0 && !s.closed) s.close(http2.constants.NGHTTP2_CANCEL);
    });
    session.destroy(); // the rest: the connection just goes
    done += n;
  }
  return tally;
}

/** Resident memory (KiB) and open file descriptors of a process (Linux /proc). */
export function processUsage(pid: number | 'self' = 'self'): { rss_kib: number; fds: number } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const rss = Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? NaN);
  return { rss_kib: rss, fds: readdirSync(`/proc/${pid}/fd`).length };
}
