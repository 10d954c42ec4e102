// Interleaved rounds for benchmarks on a noisy machine: a target and its baseline are measured
// in the same round, one right after the other, and a ratio is the median of the per-round
// ratios (with min and max), never a ratio of two medians taken minutes apart.

/** A positive integer option: `raw` (a flag or env value) if given, else `def`; a clear error otherwise. */
export function positiveInt(name: string, raw: string | undefined, def: number): number {
  if (raw === undefined || raw === '') return def;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 1) throw new Error(`--${name} must be a positive integer, not ${raw}`);
  return n;
}

export function median(xs: readonly number[]): number {
  const s = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (!s.length) return NaN;
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

export interface Spread {
  median: number;
  min: number;
  max: number;
}

export function spread(xs: readonly number[]): Spread {
  const f = xs.filter((x) => Number.isFinite(x));
  return { median: median(f), min: f.length ? Math.min(...f) : NaN, max: f.length ? Math.max(...f) : NaN };
}

/** Per-round ratios num[i] / den[i] (the two arrays hold one value per round, same order). */
export function perRoundRatios(num: readonly number[], den: readonly number[]): number[] {
  if (num.length !== den.length) throw new Error(`per-round ratio of ${num.length} and ${den.length} values`);
  return num.map((x, i) => x / den[i]!);
}

const roundTo = (x: number, digits: number) => (Number.isFinite(x) ? Math.round(x * 10 ** digits) / 10 ** digits : null);

/**
 * Sets `out[name]` to the median of the values and `out[name_min]` / `out[name_max]` to their
 * extremes (rounded to `digits`; a value that is not a number becomes null).
 */
export function putSpread(out: Record<string, unknown>, name: string, xs: readonly number[], digits = 3): void {
  const s = spread(xs);
  out[name] = roundTo(s.median, digits);
  out[`${name}_min`] = roundTo(s.min, digits);
  out[`${name}_max`] = roundTo(s.max, digits);
}

/** putSpread of the per-round ratios num[i] / den[i]. */
export function putRatio(out: Record<string, unknown>, name: string, num: readonly number[], den: readonly number[], digits = 3): void {
  putSpread(out, name, perRoundRatios(num, den), digits);
}

/** The order of `targets` in round `r`: rotated by one each round, so no target always runs first. */
export function rotated<T>(targets: readonly T[], r: number): T[] {
  return targets.map((_, i) => targets[(i + r) % targets.length]!);
}
