// An etcd lease that is kept: granted, kept alive by etcd3, and granted anew
// after it is lost (etcd unreachable longer than the TTL, or revoked). Whoever
// keeps records under it republishes them on 'granted'.
import { EventEmitter } from 'node:events';
import type { Lease } from 'etcd3';
import type { Logger } from '../common/log.js';
import type { EtcdConnection } from './etcd.js';
import { etcdFailure } from './errors.js';

export const DEFAULT_LEASE_TTL_S = 10;
const RETRY_MIN_MS = 250;
const RETRY_MAX_MS = 5000;

export declare interface KeptLease {
  on(event: 'granted', fn: (leaseId: string) => void): this;
  on(event: 'lost', fn: (err: Error) => void): this;
}

export class KeptLease extends EventEmitter {
  private lease: Lease | undefined;
  private id: string | undefined;
  private closed = false;
  private retryTimer: NodeJS.Timeout | undefined;
  private retryMs = RETRY_MIN_MS;

  constructor(
    private readonly etcd: EtcdConnection,
    readonly ttlS: number,
    private readonly log?: Logger,
    private readonly what = 'fleet lease',
  ) {
    super();
    if (!Number.isInteger(ttlS) || ttlS < 2) throw new Error(`lease TTL ${ttlS} s must be a whole number of seconds, at least 2`);
  }

  /** The lease id while granted and not known lost. */
  get leaseId(): string | undefined {
    return this.id;
  }

  /** Grant the first lease; throws (UNAVAILABLE when etcd cannot be reached). */
  async start(): Promise<string> {
    return this.grant();
  }

  /** Grant now if possible, else keep trying in the background; never throws. */
  startInBackground(): void {
    this.grant().catch(() => this.scheduleRetry());
  }

  private async grant(): Promise<string> {
    const lease = this.etcd.client.lease(this.ttlS);
    this.lease = lease;
    let id: string;
    try {
      id = await lease.grant();
    } catch (err) {
      lease.release();
      if (this.lease === lease) this.lease = undefined;
      throw etcdFailure(`cannot grant the ${this.what}`, this.etcd.endpoints, err);
    }
    if (this.closed || this.lease !== lease) {
      lease.revoke().catch(() => {});
      throw new Error(`${this.what} closed`);
    }
    lease.on('lost', (err) => {
      if (this.lease !== lease || this.closed) return;
      this.id = undefined;
      this.lease = undefined;
      this.log?.warn({ lease: id, err: err.message }, `${this.what} lost; granting a new one`);
      this.emit('lost', err);
      this.scheduleRetry();
    });
    this.id = id;
    this.retryMs = RETRY_MIN_MS;
    this.log?.info({ lease: id, ttlS: this.ttlS }, `${this.what} granted`);
    this.emit('granted', id);
    return id;
  }

  private scheduleRetry(): void {
    if (this.closed || this.retryTimer) return;
    const ms = this.retryMs;
    this.retryMs = Math.min(RETRY_MAX_MS, this.retryMs * 2);
    this.retryTimer = setTimeout(() => {
      this.retryTimer = undefined;
      this.grant().catch((err) => {
        this.log?.debug({ err: (err as Error).message }, `${this.what}: etcd still unreachable`);
        this.scheduleRetry();
      });
    }, ms);
    this.retryTimer.unref();
  }

  /** Revoke the lease (its keys vanish at once) and stop renewing. */
  async close(): Promise<void> {
    this.closed = true;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    const lease = this.lease;
    this.lease = undefined;
    this.id = undefined;
    if (!lease) return;
    try {
      await lease.revoke();
    } catch (err) {
      lease.release();
      this.log?.warn({ err: (err as Error).message }, `${this.what}: revoke failed; its keys go when the TTL runs out`);
    }
  }
}
