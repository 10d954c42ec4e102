// Fleet failures carry a gRPC status code, so the CLI, the control API and the
// server's session check report them the way every other usbroam error is.
import { status as Status } from '@grpc/grpc-js';
import type { ClaimRecord } from './keys.js';

export { Status };

export class FleetError extends Error {
  constructor(
    readonly code: Status,
    message: string,
    /** The claims that stood in the way (ALREADY_EXISTS, RESOURCE_EXHAUSTED). */
    readonly holders: ClaimRecord[] = [],
  ) {
    super(message);
    this.name = 'FleetError';
  }
  get details(): string {
    return this.message;
  }
}

/** True for failures that mean "etcd did not answer" rather than "etcd said no". */
export function isEtcdUnreachable(err: unknown): boolean {
  const e = err as Error & { code?: number };
  if (e instanceof FleetError) return e.code === Status.UNAVAILABLE;
  const name = e?.constructor?.name ?? '';
  return (
    /Unavailable|ConnectFailed|DeadlineExceeded|Cancelled|ClientClosed|BrokenCircuit|TaskCancelled/i.test(name) ||
    /unavailable|deadline|ECONNREFUSED|No connection established|circuit/i.test(e?.message ?? '')
  );
}

/** Turn an etcd client failure into a FleetError that says what could not be done and why. */
export function etcdFailure(what: string, endpoints: readonly string[], err: unknown): FleetError {
  if (err instanceof FleetError) return err;
  const msg = (err as Error)?.message ?? String(err);
  if (isEtcdUnreachable(err)) return new FleetError(Status.UNAVAILABLE, `${what}: etcd is unreachable at ${endpoints.join(',')} (${msg})`);
  return new FleetError(Status.INTERNAL, `${what}: etcd failed: ${msg}`);
}

/** Reject with `signal`'s reason as soon as it aborts; etcd3's calls take no AbortSignal. */
export function abortable<T>(p: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
  if (!signal) return p;
  if (signal.aborted) return Promise.reject(new FleetError(Status.CANCELLED, 'fleet operation aborted'));
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(new FleetError(Status.CANCELLED, 'fleet operation aborted'));
    signal.addEventListener('abort', onAbort, { once: true });
    p.then(
      (v) => {
        signal.removeEventListener('abort', onAbort);
        resolve(v);
      },
      (e) => {
        signal.removeEventListener('abort', onAbort);
        reject(e);
      },
    );
  });
}
