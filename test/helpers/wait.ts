// Waiting in tests, in one place. Prefer an awaited event (nextEvent, a promise the code under
// test hands back); poll with until() only for state that announces no change; sleep() only
// where a test must let time pass on purpose (I/O running across a migration, proving that
// nothing more arrives).
import { once, type EventEmitter } from 'node:events';
import type { Etcd3 } from 'etcd3';

/** Resolves after `ms` milliseconds. */
export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/**
 * Calls `fn` every `everyMs` until it returns something truthy, and returns that; throws, naming
 * `what`, once `timeoutMs` has passed.
 */
export async function until<T>(what: string, fn: () => T | Promise<T>, timeoutMs = 30_000, everyMs = 100): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(everyMs);
  }
}

/** `p`, or an error naming `what` if it has not settled within `timeoutMs`. */
export async function withTimeout<T>(p: Promise<T>, timeoutMs: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)), timeoutMs);
  });
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** The arguments of the next `event` that `emitter` emits, within `timeoutMs`. */
export async function nextEvent(emitter: EventEmitter, event: string, timeoutMs = 30_000): Promise<unknown[]> {
  const ac = new AbortController();
  const timer = setTimeout(() => ac.abort(), timeoutMs);
  try {
    return await once(emitter, event, { signal: ac.signal });
  } catch (err) {
    if (ac.signal.aborted) throw new Error(`timed out after ${timeoutMs} ms waiting for the '${event}' event`);
    throw err;
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Resolves once etcd no longer knows lease `leaseId` (it ran out or was revoked: LeaseTimeToLive
 * answers TTL -1), polling every `everyMs`; throws after `timeoutMs`. For tests that must see a
 * lease's TTL run out: waits exactly that long, however slow etcd is.
 */
export async function untilLeaseGone(client: Pick<Etcd3, 'leaseClient'>, leaseId: string, timeoutMs = 30_000, everyMs = 100): Promise<void> {
  await until(`etcd lease ${leaseId} to run out`, async () => Number((await client.leaseClient.leaseTimeToLive({ ID: leaseId })).TTL) < 0, timeoutMs, everyMs);
}

/**
 * Polls `read` (a counter: lines in a log, URBs completed) until it is at least `target`, and
 * returns what it read; throws, naming `what` and the last value, once `timeoutMs` has passed.
 */
export async function untilAtLeast(what: string, read: () => number | Promise<number>, target: number, timeoutMs = 60_000, everyMs = 200): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await read();
    if (v >= target) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}: ${v} of ${target}`);
    await sleep(everyMs);
  }
}

/** Reads the counter `read` now, then waits until it has grown by `by` (progress made from now on). */
export async function untilGrows(what: string, read: () => number | Promise<number>, by: number, timeoutMs = 60_000, everyMs = 200): Promise<number> {
  return untilAtLeast(what, read, (await read()) + by, timeoutMs, everyMs);
}

/** What the waits below need of a guest (src/devkit/guest/guest.ts Guest). */
interface GuestShell {
  run(command: string): Promise<{ exitCode: number }>;
  sh(command: string): Promise<string>;
}

/** Lines in `file` in the guest (0 while it does not exist): a counter for untilAtLeast/untilGrows. */
export async function guestLines(g: Pick<GuestShell, 'sh'>, file: string): Promise<number> {
  return Number((await g.sh(`cat ${file} 2>/dev/null | wc -l`)).trim());
}

/** Waits until the guest process whose pid is in `pidFile` has `path` open (a background reader got going). */
export async function untilGuestHasOpen(g: GuestShell, pidFile: string, path: string, timeoutMs = 30_000): Promise<void> {
  await until(`pid in ${pidFile} to open ${path}`, async () => (await g.run(`ls -l /proc/$(cat ${pidFile})/fd 2>/dev/null | grep -q ' ${path}$'`)).exitCode === 0, timeoutMs, 100);
}
