// npm run bench:soak: load, faults and hostile input, each a part under bench/soak/ that starts
// and cleans up its own servers, bridges and guests. Prints one JSON line (last on stdout) with
// every part's fields merged: `faults` and `hostile` merged by name, `data_lost` and `errors`
// summed. A part that throws counts as an error and is named in `failed_parts`.
//
//   npm run bench:soak -- [--duration-s 60] [--parts load,sdk-faults]
import { parseArgs } from 'node:util';
import type { SoakOptions, SoakPart, SoakRun } from './soak/types.js';
import { positiveInt } from './support/rounds.js';

/** The parts, in the order they run; adding one is one line. */
const PARTS: Record<string, () => Promise<{ run: SoakRun }>> = {
  load: () => import('./soak/load.js'),
  'sdk-faults': () => import('./soak/sdk-faults.js'),
  'guest-faults': () => import('./soak/guest-faults.js'),
  hostile: () => import('./soak/hostile.js'),
  'slow-consumer': () => import('./soak/slow-consumer.js'),
};

/** Merge `part` into `into`: fault tables by name, counts summed, other fields set (first part wins a name). */
export function mergePart(into: SoakPart, part: SoakPart, name: string): void {
  for (const [k, v] of Object.entries(part)) {
    if (k === 'faults' || k === 'hostile') {
      into[k] = { ...(into[k] ?? {}), ...(v as SoakPart['faults']) };
    } else if (k === 'data_lost' || k === 'errors') {
      into[k] = (into[k] ?? 0) + Number(v ?? 0);
    } else if (k in into) {
      into[`${name}.${k}`] = v;
    } else {
      into[k] = v;
    }
  }
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: { 'duration-s': { type: 'string' }, parts: { type: 'string' }, help: { type: 'boolean', short: 'h' } },
  });
  if (values.help) {
    process.stderr.write(`usage: npm run bench:soak -- [--duration-s N (default 60)] [--parts ${Object.keys(PARTS).join(',')}]\n`);
    return;
  }
  const durationS = positiveInt('duration-s', values['duration-s'], 60);
  const names = values.parts ? values.parts.split(',').map((s) => s.trim()).filter(Boolean) : Object.keys(PARTS);
  for (const n of names) if (!PARTS[n]) throw new Error(`--parts: no part "${n}" (known: ${Object.keys(PARTS).join(', ')})`);

  const out: SoakPart = { data_lost: 0, errors: 0, faults: {}, hostile: {} };
  const failed: Record<string, string> = {};
  const seconds: Record<string, number> = {};
  for (const name of names) {
    const opts: SoakOptions = { durationS, progress: (msg) => process.stderr.write(`[soak ${name}] ${msg}\n`) };
    const t0 = performance.now();
    opts.progress('starting');
    try {
      const { run } = await PARTS[name]!();
      mergePart(out, await run(opts), name);
    } catch (err) {
      failed[name] = (err as Error).stack ?? String(err);
      out.errors = (out.errors ?? 0) + 1;
      opts.progress(`FAILED: ${failed[name]}`);
    }
    seconds[name] = Math.round((performance.now() - t0) / 100) / 10;
    opts.progress(`done in ${seconds[name]} s`);
  }
  const faults = Object.values(out.faults ?? {});
  const hostile = Object.values(out.hostile ?? {});
  const result = {
    ok: out.errors === 0 && out.data_lost === 0 && !Object.keys(failed).length && [...faults, ...hostile].every((f) => f.ok),
    duration_s: durationS,
    parts: names,
    part_seconds: seconds,
    ...out,
    ...(Object.keys(failed).length ? { failed_parts: failed } : {}),
  };
  process.stdout.write(`${JSON.stringify(result)}\n`);
}

main().then(
  () => process.exit(0),
  (err) => {
    process.stderr.write(`${(err as Error).stack ?? err}\n`);
    process.exit(1);
  },
);
