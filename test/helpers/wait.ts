// Waiting in tests, in one place. Prefer an awaited event (nextEvent, a promise the code under
// test hands back); poll with until() only for state that announces no change; sleep() only
// where a test must let time pass on purpose (I/O running across a migration, proving that
// nothing more arrives).
import { once, type EventEmitter } from 'node:events';

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
