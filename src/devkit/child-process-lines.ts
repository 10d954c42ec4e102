// A child process that logs JSON lines (pino, or our own little protocols), started and awaited until a line says it is ready.
import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { createInterface } from 'node:readline';
import type { Readable } from 'node:stream';

/** Calls `onJson` for each line of `stream` that parses as JSON, `onOther` for the rest. */
export function onJsonLines(stream: Readable, onJson: (value: unknown, line: string) => void, onOther?: (line: string) => void): void {
  createInterface({ input: stream, crlfDelay: Infinity }).on('line', (line) => {
    let value: unknown;
    try {
      value = JSON.parse(line);
    } catch {
      onOther?.(line);
      return;
    }
    onJson(value, line);
  });
}

export interface ReadyChild<T> {
  child: ChildProcess;
  /** Every stdout line, and stderr chunks, for error messages. */
  logs: string[];
  exited: Promise<number | null>;
  /** What `ready` returned for the line that made the child ready. */
  ready: T;
}

export interface SpawnUntilReadyOptions<T> {
  /** Names the child in errors ("server did not start: ..."). */
  name: string;
  /** Looks at each JSON line on stdout; the first non-undefined result makes the child ready. */
  ready: (line: Record<string, unknown>) => T | undefined;
  timeoutMs?: number;
  spawn?: SpawnOptions;
  /** Also echo each stdout line to our stderr, prefixed (for debugging a test with USBROAM_TEST_LOG set). */
  echoPrefix?: string;
}

/** Spawns `command` and resolves once a JSON line on its stdout satisfies `ready`; rejects with its logs on exit or timeout. */
export async function spawnUntilReady<T>(command: string, args: string[], o: SpawnUntilReadyOptions<T>): Promise<ReadyChild<T>> {
  const child = spawn(command, args, { ...o.spawn, stdio: ['ignore', 'pipe', 'pipe'] });
  const logs: string[] = [];
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const ready = await new Promise<T>((resolve, reject) => {
    let done = false;
    const timer = setTimeout(() => fail(new Error(`${o.name} did not start within ${o.timeoutMs ?? 20_000} ms: ${logs.join('\n')}`)), o.timeoutMs ?? 20_000);
    const fail = (err: Error) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      child.kill('SIGKILL');
      reject(err);
    };
    const log = (line: string) => {
      logs.push(line);
      if (o.echoPrefix) process.stderr.write(`${o.echoPrefix}${line}\n`);
    };
    onJsonLines(
      child.stdout!,
      (value, line) => {
        log(line);
        if (done || typeof value !== 'object' || value === null) return;
        const r = o.ready(value as Record<string, unknown>);
        if (r === undefined) return;
        done = true;
        clearTimeout(timer);
        resolve(r);
      },
      log,
    );
    child.stderr!.on('data', (d: Buffer) => logs.push(d.toString()));
    void exited.then((code) => fail(new Error(`${o.name} exited with ${code}: ${logs.join('\n')}`)));
  });
  return { child, logs, exited, ready };
}
