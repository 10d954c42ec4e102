// A bridge in the fleet: one claimant (one etcd lease) per etcd cluster, with
// the bridge's identity (the CN of the client certificate it connects to
// servers with). attach resolves a selector and claims a device; the claim
// lives with the attachment, is given up when it ends, and moves to the
// destination's offer when its session is handed off in a live migration.
import { X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import type { HeldClaim, IncomingClaim, IncomingClaims } from '../client/bridge/held-claim.js';
import type { Logger } from '../common/log.js';
import { FleetClaimant, type FleetClaim } from './claims.js';
import { connectEtcd, parseEndpoints, type EtcdConnection } from './etcd.js';
import { abortable, FleetError, isEtcdUnreachable, Status } from './errors.js';
import { FleetKeys } from './keys.js';
import { parseFleetSelector } from './selector.js';

export interface BridgeFleetOptions {
  /** The bridge's own etcd endpoints (`usbroam bridge --etcd`); requests may name others. */
  etcd?: string | string[];
  /** The claimant identity: must be the CN of the certificate the bridge connects to servers with. */
  identity: string;
  leaseTtlS?: number;
  prefix?: string;
  log?: Logger;
}

/** The CN of a certificate file (else its first DNS/URI SAN): the identity a server sees. */
export function certificateIdentity(certFile: string): string {
  const cert = new X509Certificate(readFileSync(certFile));
  const cn = /(?:^|\n)CN=([^\n]+)/.exec(cert.subject)?.[1];
  const san = cert.subjectAltName?.split(',')[0]?.trim().replace(/^(DNS|URI):/, '');
  const id = cn ?? san;
  if (!id) throw new Error(`certificate ${certFile} has no CN or SAN to serve as the bridge's fleet identity`);
  return id;
}

const MOVE_RETRY_MS = [250, 500, 1000, 2000, 4000, 8000];
const FIND_RETRY_MS = 200;
const FIND_FOR_MS = 60_000;
const OFFER_WITHIN_MS = 3000;

interface Member {
  etcd: EtcdConnection;
  claimant: FleetClaimant;
}

export class BridgeFleet implements IncomingClaims {
  private readonly members = new Map<string, Promise<Member>>();
  private readonly defaultKey?: string;
  private closed = false;

  constructor(private readonly opts: BridgeFleetOptions) {
    if (opts.etcd) this.defaultKey = parseEndpoints(opts.etcd).join(',');
  }

  get identity(): string {
    return this.opts.identity;
  }

  /** The claimant for `etcd` (default: the bridge's own); UNAVAILABLE naming etcd when it cannot be reached. */
  claimant(etcd?: string): Promise<FleetClaimant> {
    if (this.closed) return Promise.reject(new FleetError(Status.UNAVAILABLE, 'the bridge is shutting down'));
    const key = etcd ? parseEndpoints(etcd).join(',') : this.defaultKey;
    if (!key) return Promise.reject(new FleetError(Status.FAILED_PRECONDITION, 'no etcd: start the bridge with --etcd URL[,URL...] or name it in the request (usbroam attach --etcd)'));
    let m = this.members.get(key);
    if (!m) {
      m = (async () => {
        const conn = await connectEtcd(key);
        try {
          const claimant = await FleetClaimant.create(conn, { claimant: this.opts.identity, leaseTtlS: this.opts.leaseTtlS, keys: new FleetKeys(this.opts.prefix), log: this.opts.log });
          claimant.on('claimsLost', (lost) => this.opts.log?.error({ devices: lost.map((c) => c.key) }, 'fleet claims lost while etcd was away: the servers end those sessions'));
          return { etcd: conn, claimant };
        } catch (err) {
          conn.close();
          throw err;
        }
      })();
      this.members.set(key, m);
      // Not kept on failure: the next request tries again (etcd may be back).
      m.catch(() => this.members.get(key) === m && this.members.delete(key));
    }
    return m.then((x) => x.claimant);
  }

  /** Resolve `selector` and claim one device under the bridge's lease. */
  async claim(selector: string, etcd?: string, signal?: AbortSignal): Promise<{ claim: FleetClaim; held: HeldClaim & { token: string } }> {
    let sel;
    try {
      sel = parseFleetSelector(selector);
    } catch (err) {
      throw new FleetError(Status.INVALID_ARGUMENT, `fleet selector "${selector}": ${(err as Error).message}`);
    }
    const claimant = await this.claimant(etcd);
    const claim = await claimant.claim(sel, { signal });
    return { claim, held: this.held(claimant, claim) };
  }

  private held(claimant: FleetClaimant, claim: FleetClaim): HeldClaim & { token: string } {
    const log = this.opts.log?.child({ host: claim.record.host, device: claim.record.deviceId });
    let done = false;
    return {
      label: `${claim.record.host}/${claim.record.deviceId}`,
      token: claim.record.token,
      release: async () => {
        if (done) return;
        done = true;
        await claimant.release(claim).catch((err) => log?.warn({ err: (err as Error).message }, 'fleet claim release failed; it goes with the lease'));
      },
      handedOff: async (sessionId) => {
        if (done) return;
        done = true;
        // The session is the destination's now; the claim follows. While etcd is away, keep trying (our lease
        // keeps the claim meanwhile, so nobody else can take it); a refusal (no offer, or the claim changed) is final.
        for (let i = 0; ; i++) {
          try {
            await claimant.handToOffer(claim, sessionId);
            return;
          } catch (err) {
            const final = !isEtcdUnreachable(err) || i >= MOVE_RETRY_MS.length * 4 || this.closed;
            log?.[final ? 'error' : 'warn']({ session: sessionId, err: (err as Error).message }, final ? 'fleet claim not moved with the session' : 'fleet claim move failed; retrying');
            if (final) {
              // No destination claim to move to: keep nothing that the destination cannot release.
              if (!isEtcdUnreachable(err)) await claimant.release(claim).catch(() => {});
              return;
            }
            await new Promise((r) => setTimeout(r, MOVE_RETRY_MS[Math.min(i, MOVE_RETRY_MS.length - 1)]).unref());
          }
        }
      },
    };
  }

  /** A migration destination: offer the bridge's default claimant to hold the session's claim. */
  async offer(sessionId: string): Promise<IncomingClaim | undefined> {
    if (!this.defaultKey) return undefined;
    // A migration waits for prepare-incoming: with etcd away, give up the offer soon rather than hold it up.
    const ac = new AbortController();
    const t = setTimeout(() => ac.abort(), OFFER_WITHIN_MS);
    const { claimant, offer, source } = await abortable(
      (async () => {
        const c = await this.claimant();
        const o = await c.offer(sessionId);
        // The claim to take over ourselves if the source does not move it (it may die after the hand-off).
        const source = await c.claimOfSession(sessionId).catch((err) => {
          this.opts.log?.warn({ session: sessionId, err: (err as Error).message }, 'cannot look up the claim of the incoming session; only the source can move it');
          return undefined;
        });
        if (ac.signal.aborted) await c.withdraw(o).catch(() => {}); // too late: nobody would take the claim here
        return { claimant: c, offer: o, source };
      })(),
      ac.signal,
    )
      .catch((err) => {
        throw ac.signal.aborted ? new FleetError(Status.UNAVAILABLE, `no claim offer for session ${sessionId} within ${OFFER_WITHIN_MS} ms: etcd unreachable?`) : err;
      })
      .finally(() => clearTimeout(t));
    const log = this.opts.log?.child({ session: sessionId });
    let withdrawn = false;
    return {
      withdraw: async () => {
        if (withdrawn) return;
        withdrawn = true;
        await claimant.withdraw(offer).catch((err) => log?.warn({ err: (err as Error).message }, 'claim offer not withdrawn; it goes with the lease'));
      },
      takenOver: () => {
        withdrawn = true;
        let found: FleetClaim | undefined;
        let released = false;
        const t0 = Date.now();
        // The source moves the claim right after the hand-off, and so do we, from the source's claim as it was at
        // prepare-incoming: the first guarded transaction wins, the other finds it done. Without that claim (it was
        // not known here) only the source can move it: look for it until it is here.
        const finding = (async () => {
          for (let i = 0; !released && !this.closed && Date.now() - t0 < FIND_FOR_MS; i++) {
            try {
              found = source ? await claimant.takeFromSource(source, offer) : await claimant.findOffered(offer.offer);
            } catch (err) {
              if (!isEtcdUnreachable(err)) {
                log?.error({ host: source?.record.host, device: source?.record.deviceId, err: (err as Error).message }, 'the fleet claim cannot follow the session');
                return;
              }
              log?.warn({ host: source?.record.host, device: source?.record.deviceId, err: (err as Error).message }, 'fleet claim take-over failed; retrying');
            }
            if (found) {
              log?.info({ host: found.record.host, device: found.record.deviceId, ms: Date.now() - t0 }, 'fleet claim arrived with the session');
              return;
            }
            const wait = source ? MOVE_RETRY_MS[Math.min(i, MOVE_RETRY_MS.length - 1)] : FIND_RETRY_MS;
            await new Promise((r) => setTimeout(r, wait).unref());
          }
          if (!found && !released) log?.warn(`the fleet claim did not follow the session within ${FIND_FOR_MS} ms (the source bridge did not move it, and it could not be taken here)`);
        })();
        return {
          get label() {
            return found ? `${found.record.host}/${found.record.deviceId}` : `(awaiting the claim of session ${sessionId})`;
          },
          release: async () => {
            released = true;
            await finding;
            if (found) await claimant.release(found).catch(() => {});
            await claimant.withdraw(offer).catch(() => {});
          },
          handedOff: async (next) => {
            released = true;
            await finding;
            if (found) await this.held(claimant, found).handedOff(next);
          },
        };
      },
    };
  }

  /** Revoke every lease (the claims go at once) and close the connections. */
  async close(): Promise<void> {
    this.closed = true;
    for (const m of this.members.values()) {
      const x = await m.catch(() => undefined);
      if (!x) continue;
      await x.claimant.close().catch(() => {});
      x.etcd.close();
    }
    this.members.clear();
  }
}
