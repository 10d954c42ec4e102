// The etcd connection: the `etcd3` client (etcd's v3 gRPC API over grpc-js),
// loaded only when a fleet feature is used, with bounded call deadlines so an
// unreachable etcd is an error within seconds rather than a hang.
import dns from 'node:dns/promises';
import net from 'node:net';
import type { Etcd3, IOptions } from 'etcd3';

export interface EtcdConnection {
  client: Etcd3;
  endpoints: string[];
  close(): void;
}

export interface EtcdConnectOptions {
  /** Deadline of one unary call, ms (default 5000). Streams (watch, lease keep-alive) have none. */
  callTimeoutMs?: number;
  /** Connection attempt timeout, ms (default 3000). */
  dialTimeoutMs?: number;
}

/** Parse "URL[,URL...]" (or a list) into endpoint URLs; throws naming the bad one. */
export function parseEndpoints(urls: string | string[]): string[] {
  const list = (Array.isArray(urls) ? urls : [urls]).flatMap((u) => u.split(',')).map((u) => u.trim()).filter(Boolean);
  if (!list.length) throw new Error('--etcd needs at least one URL, e.g. http://127.0.0.1:2379');
  for (const u of list) {
    let url: URL;
    try {
      url = new URL(u);
    } catch {
      throw new Error(`etcd endpoint "${u}" is not a URL (e.g. http://127.0.0.1:2379)`);
    }
    if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new Error(`etcd endpoint "${u}" must be http:// or https://`);
    if (!url.port) throw new Error(`etcd endpoint "${u}" names no port`);
  }
  return list;
}

/**
 * One gRPC target for all members: `ipv4:a:p,b:p,...` (addresses resolved now). grpc-js then keeps one channel
 * that fails over to a live member by itself, streams included. etcd3's own per-member hosts do not: a lease
 * keep-alive stream that lands on a dead member waits out its timeout and, with a short TTL, the lease is lost.
 * Plain http only (an https target must keep its host name for the certificate): those keep etcd3's hosts.
 */
async function failoverTarget(endpoints: string[]): Promise<string[]> {
  if (endpoints.some((e) => !e.startsWith('http://'))) return endpoints;
  const addrs = await Promise.all(
    endpoints.map(async (e) => {
      const u = new URL(e);
      const host = u.hostname.replace(/^\[|\]$/g, '');
      const ip = net.isIP(host) ? host : (await dns.lookup(host)).address;
      return { family: net.isIP(ip), addr: net.isIP(ip) === 6 ? `[${ip}]:${u.port}` : `${ip}:${u.port}` };
    }),
  );
  const family = addrs[0].family;
  if (addrs.some((a) => a.family !== family)) return endpoints; // the ipv4:/ipv6: schemes take one family
  return [`${family === 6 ? 'ipv6' : 'ipv4'}:${addrs.map((a) => a.addr).join(',')}`];
}

export async function connectEtcd(urls: string | string[], opts: EtcdConnectOptions = {}): Promise<EtcdConnection> {
  const endpoints = parseEndpoints(urls);
  const [{ Etcd3, isRecoverableError }, { ExponentialBackoff, handleWhen, noop, retry }] = await Promise.all([import('etcd3'), import('cockatiel')]);
  const hosts = await failoverTarget(endpoints);
  const callTimeoutMs = opts.callTimeoutMs ?? 5000;
  const options: IOptions = {
    hosts,
    dialTimeout: opts.dialTimeoutMs ?? 3000,
    defaultCallOptions: (ctx) => (ctx.isStream ? {} : { deadline: Date.now() + callTimeoutMs }),
    faultHandling: {
      // With one failover target, etcd3's per-host circuit breaker would refuse every call for 5 s after three
      // dropped ones (a member killed, a leader election); grpc-js reconnects by itself, so no breaker.
      host: hosts.length === 1 ? () => noop : undefined,
      // Calls cut by a member going away are retried on the next connection, a few times, with backoff.
      global: retry(handleWhen(isRecoverableError), { maxAttempts: 5, backoff: new ExponentialBackoff({ initialDelay: 100, maxDelay: 1000 }) }),
    },
    grpcOptions: {
      // Reconnect quickly once etcd is back: recovery should not wait out a long backoff.
      'grpc.initial_reconnect_backoff_ms': 200,
      'grpc.max_reconnect_backoff_ms': 2000,
      'grpc.keepalive_time_ms': 10_000,
      'grpc.keepalive_timeout_ms': 5_000,
    },
  };
  const client = new Etcd3(options);
  return { client, endpoints, close: () => client.close() };
}
