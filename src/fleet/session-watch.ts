// The server's side of claims that change under an open session: it watches
// the claims of its own host and ends a session whose claim vanished (its
// claimant's lease expired: a bridge killed -9, say) or now names another
// identity. A claim moved to the identity that holds the session now (a
// migration's destination after the hand-over) leaves it running. Sessions keep
// running while etcd is unreachable; etcd3 resumes the watch from the last
// revision seen when etcd returns, so no change is missed.
import type { IKeyValue, Watcher } from 'etcd3';
import type { Logger } from '../common/log.js';
import type { EtcdConnection } from './etcd.js';
import { Status } from './errors.js';
import { decodeRecord, type ClaimRecord, type FleetKeys } from './keys.js';

/** What the watch needs of the server's sessions (SessionManager and Session have it). */
export interface WatchedSessions {
  list(): { id: string; identity: string; device: { id: string }; close(why: string, opts: { reset: boolean; code?: number; message?: string }): Promise<void> }[];
}

/** Why a session on a device whose claim went from `prev` to `now` must end, or undefined if it may go on. */
export function claimEndsSession(identity: string, prev: ClaimRecord | undefined, now: ClaimRecord | undefined): string | undefined {
  if (now) return now.claimant === identity ? undefined : `its fleet claim now names ${now.claimant} (since ${now.since}), not ${identity}`;
  if (prev && prev.claimant === identity) return `its fleet claim (of ${identity}, lease ${prev.lease}) vanished: the claimant's lease expired or the claim was released`;
  return undefined;
}

export class SessionClaimWatch {
  private watcher: Watcher | undefined;
  private stopped = false;

  constructor(
    private readonly etcd: EtcdConnection,
    private readonly keys: FleetKeys,
    private readonly host: string,
    private readonly sessions: WatchedSessions,
    private readonly log?: Logger,
  ) {}

  /** Start watching (retried in the background while etcd is unreachable). */
  start(): void {
    void this.open(250);
  }

  private async open(retryMs: number): Promise<void> {
    if (this.stopped) return;
    try {
      const w = await this.etcd.client.watch().prefix(this.keys.hostClaims(this.host)).withPreviousKV().create();
      if (this.stopped) return void w.cancel().catch(() => {});
      this.watcher = w;
      w.on('put', (kv: IKeyValue, prev?: IKeyValue) => this.changed(kv, prev, false));
      w.on('delete', (kv: IKeyValue, prev?: IKeyValue) => this.changed(kv, prev, true));
      this.log?.info({ host: this.host }, 'watching fleet claims of open sessions');
    } catch (err) {
      this.log?.warn({ host: this.host, err: (err as Error).message }, 'cannot watch fleet claims yet; retrying');
      setTimeout(() => void this.open(Math.min(retryMs * 2, 5000)), retryMs).unref();
    }
  }

  private changed(kv: IKeyValue, prevKv: IKeyValue | undefined, deleted: boolean): void {
    const key = kv.key.toString();
    const what = this.keys.parse(key);
    if (!what || what.kind !== 'claim' || what.host !== this.host) return;
    const now = deleted ? undefined : decodeRecord<ClaimRecord>(key, kv.value);
    const prev = prevKv ? decodeRecord<ClaimRecord>(key, prevKv.value) : undefined;
    for (const s of this.sessions.list()) {
      if (s.device.id !== what.id) continue;
      const why = claimEndsSession(s.identity, prev, now);
      if (!why) continue;
      this.log?.warn({ session: s.id, device: what.id, identity: s.identity, claimant: now?.claimant }, `ending session: ${why}`);
      void s.close(`fleet claim: ${why}`, { reset: true, code: Status.FAILED_PRECONDITION, message: `session ${s.id} on device ${what.id} ended: ${why}` });
    }
  }

  async stop(): Promise<void> {
    this.stopped = true;
    await this.watcher?.cancel().catch(() => {});
  }
}
