// Scraping and checking Prometheus text exposition in tests: the scrape over HTTP, promtool's
// verdict on it, and the samples by name and labels.
import { execFileSync } from 'node:child_process';

export async function scrape(address: string): Promise<string> {
  const res = await fetch(`http://${address}/metrics`);
  if (res.status !== 200) throw new Error(`GET http://${address}/metrics answered ${res.status}`);
  return res.text();
}

/** promtool's complaints about an exposition ('' when it accepts it). Throws when promtool is missing. */
export function promtoolCheck(text: string): string {
  try {
    execFileSync('promtool', ['check', 'metrics'], { input: text, stdio: ['pipe', 'pipe', 'pipe'] });
    return '';
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stdout?: Buffer; stderr?: Buffer; status?: number };
    if (e.code === 'ENOENT') throw new Error("promtool is not installed (Debian's prometheus package: apt-get install prometheus)");
    return `${e.stdout?.toString() ?? ''}${e.stderr?.toString() ?? ''}`.trim() || `promtool exited with ${e.status}`;
  }
}

export interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

export function parseExposition(text: string): Sample[] {
  const out: Sample[] = [];
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!m) throw new Error(`not a sample line: ${line}`);
    const labels: Record<string, string> = {};
    for (const l of (m[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

/** The value of the sample `name` whose labels include `labels` (0 when there is none, as for a counter not yet moved). */
export function valueOf(samples: Sample[], name: string, labels: Record<string, string> = {}): number {
  const hits = samples.filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v));
  if (hits.length > 1) throw new Error(`${hits.length} samples of ${name} match ${JSON.stringify(labels)}`);
  return hits[0]?.value ?? 0;
}
