// The etcd connection: the `etcd3` client (etcd's v3 gRPC API over grpc-js),
// loaded only when a fleet feature is used, with bounded call deadlines so an
// unreachable etcd is an error within seconds rather than a hang.
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

export async function connectEtcd(urls: string | string[], opts: EtcdConnectOptions = {}): Promise<EtcdConnection> {
  const endpoints = parseEndpoints(urls);
  const { Etcd3 } = await import('etcd3');
  const callTimeoutMs = opts.callTimeoutMs ?? 5000;
  const options: IOptions = {
    hosts: endpoints,
    dialTimeout: opts.dialTimeoutMs ?? 3000,
    defaultCallOptions: (ctx) => (ctx.isStream ? {} : { deadline: Date.now() + callTimeoutMs }),
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
