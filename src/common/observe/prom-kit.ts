// What the server's and the bridge's Prometheus metrics share. prom-client's own inc() and
// observe() hash a label object on every call (a string and an object per URB), so the hot
// path counts into plain numbers and typed arrays instead (no allocation), and prom-client
// reads them at scrape time: counters through collect(), histograms through PrecountedHistogram.
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { collectDefaultMetrics, Counter, Gauge, Registry } from 'prom-client';
import type { Logger } from '../log.js';

/** Seconds: 50 µs to 10 s, for URB service times and round trips. */
export const LATENCY_BUCKETS = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10];

/** One histogram's counts: observe() is a loop over the bounds and three number writes. */
export class HistogramCells {
  /** counts[i]: observations in (bounds[i-1], bounds[i]]; the last one: above every bound. */
  readonly counts: Float64Array;
  sum = 0;
  count = 0;

  constructor(readonly bounds: readonly number[]) {
    this.counts = new Float64Array(bounds.length + 1);
  }

  observe(v: number): void {
    const b = this.bounds;
    let i = 0;
    while (i < b.length && v > b[i]) i++;
    this.counts[i]++;
    this.sum += v;
    this.count++;
  }
}

type Labels = Record<string, string | number>;

/**
 * A histogram whose counts live in HistogramCells, shown by prom-client's registry in the
 * standard exposition (cumulative _bucket series with le, _sum, _count).
 */
export class PrecountedHistogram {
  readonly type = 'histogram';
  readonly aggregator = 'sum';

  constructor(
    registry: Registry,
    readonly name: string,
    readonly help: string,
    private readonly cells: () => Iterable<[Labels, HistogramCells]>,
  ) {
    registry.registerMetric(this as unknown as Parameters<Registry['registerMetric']>[0]);
  }

  async get() {
    const values: { labels: Labels; value: number; metricName: string }[] = [];
    for (const [labels, c] of this.cells()) {
      let cum = 0;
      for (let i = 0; i < c.bounds.length; i++) {
        cum += c.counts[i];
        values.push({ labels: { ...labels, le: c.bounds[i] }, value: cum, metricName: `${this.name}_bucket` });
      }
      values.push({ labels: { ...labels, le: '+Inf' }, value: c.count, metricName: `${this.name}_bucket` });
      values.push({ labels, value: c.sum, metricName: `${this.name}_sum` });
      values.push({ labels, value: c.count, metricName: `${this.name}_count` });
    }
    return { name: this.name, help: this.help, type: this.type, values, aggregator: this.aggregator };
  }

  reset(): void {}
}

/** A counter whose values `fill` sets at each scrape (from totals kept elsewhere). */
export function collectedCounter(registry: Registry, name: string, help: string, labelNames: string[], fill: (c: Counter) => void): Counter {
  return new Counter({
    name,
    help,
    labelNames,
    registers: [registry],
    collect() {
      this.reset();
      fill(this);
    },
  });
}

/** A gauge whose values `fill` sets at each scrape. */
export function collectedGauge(registry: Registry, name: string, help: string, labelNames: string[], fill: (g: Gauge) => void): Gauge {
  return new Gauge({
    name,
    help,
    labelNames,
    registers: [registry],
    collect() {
      this.reset();
      fill(this);
    },
  });
}

/** A registry with prom-client's process and Node.js metrics, named usbroam_... like ours. */
export function newRegistry(): Registry {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: 'usbroam_' });
  // prom-client adds three gauges named ..._total beside the same figures by type
  // (nodejs_active_handles{type}...); promtool's lint rejects a gauge named _total.
  for (const what of ['handles', 'requests', 'resources']) registry.removeSingleMetric(`usbroam_nodejs_active_${what}_total`);
  return registry;
}

export interface MetricsEndpoint {
  /** host:port actually bound. */
  address: string;
  close(): Promise<void>;
}

/** Parse HOST:PORT (IPv6 in brackets); port 0 picks a free one. */
export function parseHostPort(listen: string, what = '--metrics-listen'): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]|([^:[\]]+)):(\d+)$/.exec(listen);
  if (!m) throw new Error(`${what} "${listen}" must be HOST:PORT (e.g. 127.0.0.1:9470)`);
  const port = Number(m[3]);
  if (port > 65535) throw new Error(`${what} "${listen}": port ${port} is out of range`);
  return { host: m[1] ?? m[2], port };
}

/** Serve GET /metrics from `registry` over plain HTTP on `listen` (HOST:PORT). */
export async function serveMetrics(registry: Registry, listen: string, log: Logger): Promise<MetricsEndpoint> {
  const { host, port } = parseHostPort(listen);
  const server: Server = createServer((req, res) => {
    const url = (req.url ?? '/').split('?')[0];
    if (url !== '/metrics') {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('only /metrics is served here\n');
      return;
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD', 'content-type': 'text/plain' }).end('GET /metrics\n');
      return;
    }
    registry.metrics().then(
      (text) => res.writeHead(200, { 'content-type': registry.contentType }).end(req.method === 'HEAD' ? undefined : text),
      (err: Error) => {
        log.error({ err: err.message }, 'collecting metrics failed');
        res.writeHead(500, { 'content-type': 'text/plain' }).end(`collecting metrics failed: ${err.message}\n`);
      },
    );
  });
  // A scrape is small; a client that sends more than headers gets cut off.
  server.headersTimeout = 10_000;
  server.requestTimeout = 10_000;
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const a = server.address() as AddressInfo;
  const address = a.family === 'IPv6' ? `[${a.address}]:${a.port}` : `${a.address}:${a.port}`;
  log.info({ metrics: `http://${address}/metrics` }, 'serving Prometheus metrics');
  return {
    address,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections?.();
        server.close(() => resolve());
      }),
  };
}
