// Exclusive claims as etcd leases. A claimant (a bridge) holds one lease; each
// claim is a key under it, taken by one transaction that creates the key only
// if it is absent and the device is still registered, so of any number of
// racing claimants exactly one wins. The claim dies with the lease: a claimant
// that dies frees its devices after the TTL. A claim moves to another lease
// (live migration's destination) in one transaction guarded by the current
// record, so the key is never absent and no third party can take it between.
// A lease lost while etcd was away is replaced by a new one, and the claims are
// taken back under it (the old record swapped for the new in one transaction,
// or created again if it expired meanwhile and nobody else took it).
import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import type { IKeyValue } from 'etcd3';
import type { Logger } from '../common/log.js';
import { FleetDirectory, type FleetDevice } from './directory.js';
import type { EtcdConnection } from './etcd.js';
import { abortable, etcdFailure, FleetError, Status } from './errors.js';
import { decodeRecord, encodeRecord, FleetKeys, type ClaimOffer, type ClaimRecord } from './keys.js';
import { DEFAULT_LEASE_TTL_S, KeptLease } from './kept-lease.js';
import { describeFleetSelector, type FleetSelector } from './selector.js';

export interface FleetClaim {
  key: string;
  record: ClaimRecord;
  /** The device as the directory had it when the claim was taken. */
  device: FleetDevice;
}

export interface ClaimantOptions {
  /** The claimant's identity: the CN of the client certificate it will connect with. */
  claimant: string;
  leaseTtlS?: number;
  keys?: FleetKeys;
  log?: Logger;
}

export function newClaimToken(): string {
  return randomBytes(18).toString('base64url');
}

function firstKv(res: { responses: { response_range?: { kvs: IKeyValue[] } }[] }, i: number): IKeyValue | undefined {
  return res.responses[i]?.response_range?.kvs?.[0];
}

function describeHolder(c: ClaimRecord): string {
  return `${c.claimant} (since ${c.since}, lease ${c.lease})`;
}

export declare interface FleetClaimant {
  /** These claims are gone: the lease was lost and someone else holds the device now, or the device left. */
  on(event: 'claimsLost', fn: (claims: FleetClaim[], err: Error) => void): this;
  /** A claim held under a lost lease was taken back under the new one. */
  on(event: 'reclaimed', fn: (claim: FleetClaim) => void): this;
}

export class FleetClaimant extends EventEmitter {
  readonly keys: FleetKeys;
  readonly directory: FleetDirectory;
  readonly lease: KeptLease;
  private readonly held = new Map<string, FleetClaim>();
  /** Claims whose lease was lost, to be taken back under the next one. */
  private orphaned: FleetClaim[] = [];

  private constructor(
    private readonly etcd: EtcdConnection,
    private readonly opts: ClaimantOptions,
  ) {
    super();
    if (!opts.claimant) throw new Error('a fleet claimant needs an identity');
    this.keys = opts.keys ?? new FleetKeys();
    this.directory = new FleetDirectory(etcd, this.keys);
    this.lease = new KeptLease(etcd, opts.leaseTtlS ?? DEFAULT_LEASE_TTL_S, opts.log, `fleet lease of claimant ${opts.claimant}`);
    this.lease.on('lost', () => {
      this.orphaned.push(...this.held.values());
      this.held.clear();
      if (this.orphaned.length) {
        opts.log?.warn({ claimant: opts.claimant, devices: this.orphaned.map((c) => `${c.record.host}/${c.record.deviceId}`) }, 'fleet lease lost; its claims are taken back under the next lease');
      }
    });
    this.lease.on('granted', (lease) => {
      if (this.orphaned.length) void this.reclaim(lease);
    });
  }

  /** Take the orphaned claims back under `lease`: swap the old record if it is still there, else create it if absent. */
  private async reclaim(lease: string): Promise<void> {
    const orphans = this.orphaned;
    this.orphaned = [];
    const lost: FleetClaim[] = [];
    for (const c of orphans) {
      const record: ClaimRecord = { ...c.record, lease };
      const put = () => this.etcd.client.put(c.key).value(encodeRecord(record)).lease(lease);
      try {
        let ok = (await this.etcd.client.if(c.key, 'Value', '==', encodeRecord(c.record)).then(put()).commit()).succeeded;
        if (!ok) {
          const deviceKey = this.keys.device(c.record.host, c.record.deviceId);
          ok = (await this.etcd.client.if(c.key, 'Create', '==', 0).and(deviceKey, 'Create', '>', 0).then(put()).commit()).succeeded;
        }
        if (!ok) {
          lost.push(c);
          continue;
        }
        const claim = { ...c, record, device: { ...c.device, claim: record } };
        this.held.set(c.key, claim);
        this.opts.log?.info({ claimant: this.identity, host: record.host, device: record.deviceId, lease }, 'fleet claim taken back under the new lease');
        this.emit('reclaimed', claim);
      } catch {
        this.orphaned.push(c); // etcd went away again: the next grant retries
      }
    }
    if (lost.length) {
      this.opts.log?.warn({ claimant: this.identity, devices: lost.map((c) => `${c.record.host}/${c.record.deviceId}`) }, 'fleet claims lost: taken by someone else, or the device left, while our lease was gone');
      this.emit('claimsLost', lost, new FleetError(Status.ABORTED, 'the claim was taken by someone else while our etcd lease was lost'));
    }
  }

  /** The claim on `key` as held now (its record changes when it is taken back under a new lease). */
  current(key: string): FleetClaim | undefined {
    return this.held.get(key) ?? this.orphaned.find((c) => c.key === key);
  }

  /** A claimant with a granted lease (kept, and granted anew after a loss); UNAVAILABLE at once when etcd cannot be reached. */
  static async create(etcd: EtcdConnection, opts: ClaimantOptions): Promise<FleetClaimant> {
    const c = new FleetClaimant(etcd, opts);
    try {
      await c.lease.start();
    } catch (err) {
      await c.lease.close();
      throw err;
    }
    return c;
  }

  get identity(): string {
    return this.opts.claimant;
  }

  /** Claims held now (under the live lease). */
  claims(): FleetClaim[] {
    return [...this.held.values()];
  }

  private leaseOrFail(what: string): string {
    const id = this.lease.leaseId;
    if (!id) throw new FleetError(Status.UNAVAILABLE, `${what}: no etcd lease (etcd at ${this.etcd.endpoints.join(',')} unreachable); no new claims until it returns`);
    return id;
  }

  /**
   * Resolve `selector` and claim one matching device. Free devices are tried first. One device that is taken gives
   * ALREADY_EXISTS naming the holder; several, all taken, RESOURCE_EXHAUSTED naming each.
   */
  async claim(selector: FleetSelector, opts: { signal?: AbortSignal } = {}): Promise<FleetClaim> {
    const what = `cannot claim ${describeFleetSelector(selector)}`;
    this.leaseOrFail(what);
    const found = await this.directory.resolve(selector, opts);
    // Free first; a device the server has open for another identity (outside fleet claims) last.
    const rank = (d: FleetDevice) => (d.claim ? 2 : d.session && d.session.identity !== this.identity ? 1 : 0);
    const candidates = [...found].sort((a, b) => rank(a) - rank(b));
    const holders: ClaimRecord[] = [];
    for (const device of candidates) {
      if (device.claim && device.claim.claimant !== this.identity) {
        holders.push(device.claim);
        continue;
      }
      const r = await this.tryClaim(device, opts.signal);
      if ('claim' in r) return r.claim;
      holders.push(r.holder);
    }
    if (candidates.length === 1) {
      const d = candidates[0];
      throw new FleetError(Status.ALREADY_EXISTS, `${what}: device ${d.id} on host ${d.host} is claimed by ${describeHolder(holders[0])}`, holders);
    }
    throw new FleetError(
      Status.RESOURCE_EXHAUSTED,
      `${what}: all ${candidates.length} matching devices are claimed: ${candidates.map((d, i) => `${d.host}/${d.id} by ${holders[i].claimant}`).join(', ')}`,
      holders,
    );
  }

  /** One create-if-absent transaction on the device's claim key, under our lease. */
  private async tryClaim(device: FleetDevice, signal?: AbortSignal): Promise<{ claim: FleetClaim } | { holder: ClaimRecord }> {
    const lease = this.leaseOrFail(`cannot claim device ${device.id} on host ${device.host}`);
    const key = this.keys.claim(device.host, device.id);
    const deviceKey = this.keys.device(device.host, device.id);
    const record: ClaimRecord = {
      host: device.host,
      deviceId: device.id,
      claimant: this.identity,
      token: newClaimToken(),
      lease,
      since: new Date().toISOString(),
    };
    let res;
    try {
      res = await abortable(
        this.etcd.client
          .if(key, 'Create', '==', 0)
          .and(deviceKey, 'Create', '>', 0)
          .then(this.etcd.client.put(key).value(encodeRecord(record)).lease(lease))
          .else(this.etcd.client.get(key), this.etcd.client.get(deviceKey))
          .commit(),
        signal,
      );
    } catch (err) {
      throw etcdFailure(`cannot claim device ${device.id} on host ${device.host}`, this.etcd.endpoints, err);
    }
    if (res.succeeded) {
      const claim = { key, record, device: { ...device, claim: record } };
      this.held.set(key, claim);
      this.opts.log?.info({ claimant: this.identity, host: device.host, device: device.id, lease }, 'fleet claim taken');
      return { claim };
    }
    const holderKv = firstKv(res, 0);
    if (!firstKv(res, 1)) throw new FleetError(Status.NOT_FOUND, `device ${device.id} left host ${device.host} before it could be claimed`);
    const holder = holderKv && decodeRecord<ClaimRecord>(key, holderKv.value);
    if (holder && holder.token === record.token) {
      // Our own earlier attempt: the transaction committed but its answer was lost, and the retry found the key.
      const claim = { key, record, device: { ...device, claim: record } };
      this.held.set(key, claim);
      return { claim };
    }
    return { holder: holder ?? { host: device.host, deviceId: device.id, claimant: '(unreadable claim record)', token: '', lease: '?', since: '?' } };
  }

  /** Give a claim up: delete its key if it is still ours (same token). */
  async release(c: FleetClaim): Promise<boolean> {
    const claim = this.current(c.key) ?? c;
    this.held.delete(claim.key);
    this.orphaned = this.orphaned.filter((o) => o.key !== claim.key);
    try {
      const res = await this.etcd.client.if(claim.key, 'Value', '==', encodeRecord(claim.record)).then(this.etcd.client.delete().key(claim.key)).commit();
      if (res.succeeded) this.opts.log?.info({ claimant: this.identity, host: claim.record.host, device: claim.record.deviceId }, 'fleet claim released');
      return res.succeeded;
    } catch (err) {
      throw etcdFailure(`cannot release the claim on device ${claim.record.deviceId} on host ${claim.record.host}`, this.etcd.endpoints, err);
    }
  }

  /** Hand a claim to another claimant (live migration's destination): see moveClaim. */
  async handTo(claim: FleetClaim, to: { claimant: string; leaseId: string }): Promise<ClaimRecord> {
    const moved = await moveClaim(this.etcd, claim.key, claim.record, to);
    this.held.delete(claim.key);
    return moved;
  }

  /** Take a claim handed over by moveClaim as our own (the destination side, after the move). */
  adopt(key: string, record: ClaimRecord, device: FleetDevice): FleetClaim {
    if (record.claimant !== this.identity) {
      throw new FleetError(Status.FAILED_PRECONDITION, `claim on device ${record.deviceId} is under lease ${record.lease} of ${record.claimant}, not ours`);
    }
    const claim = { key, record, device: { ...device, claim: record } };
    if (record.lease === this.lease.leaseId) {
      this.held.set(key, claim);
    } else {
      // Moved to us under a lease we have lost since: take it back under the current one like our own claims.
      this.orphaned.push(claim);
      const lease = this.lease.leaseId;
      if (lease) void this.reclaim(lease);
    }
    return claim;
  }

  /**
   * Migration destination, at prepare-incoming: the claim on the device that session `sessionId` has open, as its
   * server publishes it, if that claim belongs to the identity holding the session (the source bridge).
   */
  async claimOfSession(sessionId: string): Promise<{ key: string; record: ClaimRecord } | undefined> {
    let devices: FleetDevice[];
    try {
      devices = await this.directory.list({ labels: {} });
    } catch (err) {
      throw etcdFailure(`cannot look up the device of session ${sessionId}`, this.etcd.endpoints, err);
    }
    const d = devices.find((x) => x.session?.sessionId === sessionId);
    if (!d?.claim || d.claim.claimant !== d.session?.identity) return undefined;
    return { key: this.keys.claim(d.host, d.id), record: d.claim };
  }

  /**
   * Migration destination, after the take-over: move the source's claim to our offer ourselves (the source may have
   * died before doing it). One transaction guarded by the claim's revision while it is still the source's claim
   * (same claimant and token; its lease may have been renewed), putting the offered record under our lease and
   * deleting the offer. If the source moved it first, that is the result; if the source's lease ran out first, the
   * claim is created again if still absent. Never deletes the claim key.
   */
  async takeFromSource(source: { key: string; record: ClaimRecord }, offer: { key: string; offer: ClaimOffer }, device?: FleetDevice): Promise<FleetClaim> {
    const src = source.record;
    const what = `cannot take over the claim on device ${src.deviceId} on host ${src.host} with session ${offer.offer.sessionId}`;
    for (let attempt = 0; attempt < 8; attempt++) {
      const lease = this.leaseOrFail(what);
      const next: ClaimRecord = { ...src, claimant: this.identity, token: offer.offer.token, lease, since: new Date().toISOString() };
      const put = this.etcd.client.put(source.key).value(encodeRecord(next)).lease(lease);
      let kv: IKeyValue | undefined;
      let res;
      try {
        kv = (await this.etcd.client.get(source.key).exec()).kvs[0];
        const now = kv && decodeRecord<ClaimRecord>(source.key, kv.value);
        if (now && now.claimant === this.identity && now.token === offer.offer.token) return this.adopt(source.key, now, device ?? deviceOf(now));
        if (now && (now.claimant !== src.claimant || now.token !== src.token)) {
          throw new FleetError(Status.ABORTED, `${what}: it is held by ${describeHolder(now)}`, [now]);
        }
        const guard = now ? this.etcd.client.if(source.key, 'Mod', '==', kv!.mod_revision) : this.etcd.client.if(source.key, 'Create', '==', 0).and(this.keys.device(src.host, src.deviceId), 'Create', '>', 0);
        res = await guard.then(put, this.etcd.client.delete().key(offer.key)).commit();
        if (!now && res.succeeded) this.opts.log?.warn({ claimant: this.identity, host: src.host, device: src.deviceId }, 'fleet claim of the source had expired before the move; claimed again with the session');
      } catch (err) {
        if (err instanceof FleetError) throw err;
        throw etcdFailure(what, this.etcd.endpoints, err);
      }
      if (res.succeeded) {
        this.opts.log?.info({ claimant: this.identity, from: src.claimant, host: src.host, device: src.deviceId, lease }, 'fleet claim moved from the migration source by the destination');
        return this.adopt(source.key, next, device ?? deviceOf(next));
      }
      // The claim changed between the read and the transaction (the source moved it, or renewed its lease): look again.
    }
    throw new FleetError(Status.ABORTED, `${what}: the claim kept changing`);
  }

  /**
   * Migration destination: offer to hold the claim of the session `sessionId` stands by on. The offer (the record the
   * claim will have here: our identity, lease and a fresh token) lives under our lease until the source moves the
   * claim (handToOffer) or we withdraw it.
   */
  async offer(sessionId: string): Promise<{ key: string; offer: ClaimOffer }> {
    const lease = this.leaseOrFail(`cannot offer to take over the claim of session ${sessionId}`);
    const key = this.keys.offer(sessionId);
    const offer: ClaimOffer = { sessionId, claimant: this.identity, token: newClaimToken(), lease, since: new Date().toISOString() };
    try {
      await this.etcd.client.put(key).value(encodeRecord(offer)).lease(lease).exec();
    } catch (err) {
      throw etcdFailure(`cannot offer to take over the claim of session ${sessionId}`, this.etcd.endpoints, err);
    }
    return { key, offer };
  }

  /** Withdraw an offer that was not taken (the migration was cancelled). */
  async withdraw(offer: { key: string; offer: ClaimOffer }): Promise<void> {
    try {
      await this.etcd.client.if(offer.key, 'Value', '==', encodeRecord(offer.offer)).then(this.etcd.client.delete().key(offer.key)).commit();
    } catch (err) {
      throw etcdFailure(`cannot withdraw the claim offer for session ${offer.offer.sessionId}`, this.etcd.endpoints, err);
    }
  }

  /**
   * Source of a migration, after the hand-off of `sessionId`: move the claim to the destination's offer in one
   * transaction guarded by our exact record and the offer (so no third party can take the device between, and a
   * withdrawn offer moves nothing). The offer is deleted in the same transaction.
   */
  async handToOffer(c: FleetClaim, sessionId: string): Promise<ClaimRecord> {
    const claim = this.current(c.key) ?? c;
    const offerKey = this.keys.offer(sessionId);
    const what = `cannot move the claim on device ${claim.record.deviceId} on host ${claim.record.host} with session ${sessionId}`;
    let raw: Buffer | null;
    try {
      raw = await this.etcd.client.get(offerKey).buffer();
    } catch (err) {
      throw etcdFailure(what, this.etcd.endpoints, err);
    }
    const offer = raw ? decodeRecord<ClaimOffer>(offerKey, raw) : undefined;
    if (!offer) {
      const now = await this.etcd.client.get(claim.key).buffer().then((b) => (b ? decodeRecord<ClaimRecord>(claim.key, b) : undefined)).catch(() => undefined);
      if (now && now.token !== claim.record.token && now.claimant !== this.identity) {
        // The destination took the claim itself (it does after the take-over), deleting the offer with it.
        this.held.delete(claim.key);
        this.opts.log?.info({ claimant: this.identity, to: now.claimant, host: now.host, device: now.deviceId }, 'fleet claim already moved by the migration destination');
        return now;
      }
    }
    if (!offer) throw new FleetError(Status.FAILED_PRECONDITION, `${what}: the destination offered to hold no claim (is its bridge in the fleet?)`);
    const next: ClaimRecord = { ...claim.record, claimant: offer.claimant, token: offer.token, lease: offer.lease, since: new Date().toISOString() };
    let res;
    try {
      res = await this.etcd.client
        .if(claim.key, 'Value', '==', encodeRecord(claim.record))
        .and(offerKey, 'Value', '==', raw!)
        .then(this.etcd.client.put(claim.key).value(encodeRecord(next)).lease(offer.lease), this.etcd.client.delete().key(offerKey))
        .else(this.etcd.client.get(claim.key))
        .commit();
    } catch (err) {
      if (/lease not found/i.test((err as Error).message)) throw new FleetError(Status.FAILED_PRECONDITION, `${what}: the destination's lease ${offer.lease} is gone`);
      throw etcdFailure(what, this.etcd.endpoints, err);
    }
    if (!res.succeeded) {
      const kv = firstKv(res, 0);
      const now = kv && decodeRecord<ClaimRecord>(claim.key, kv.value);
      if (now && now.token === next.token && now.lease === next.lease) {
        // Our own earlier attempt committed and its answer was lost.
        this.held.delete(claim.key);
        return now;
      }
      throw new FleetError(Status.FAILED_PRECONDITION, `${what}: ${now ? `it is held by ${describeHolder(now)}` : 'it is no longer claimed'}, or the offer changed`, now ? [now] : []);
    }
    this.held.delete(claim.key);
    this.opts.log?.info({ claimant: this.identity, to: offer.claimant, host: next.host, device: next.deviceId, lease: offer.lease }, 'fleet claim moved to the migration destination');
    return next;
  }

  /** Migration destination, after the take-over: the claim as moved to our offer, once it is there (undefined before). */
  async findOffered(offer: ClaimOffer): Promise<FleetClaim | undefined> {
    let res;
    try {
      res = await this.etcd.client.getAll().prefix(this.keys.claims).exec();
    } catch (err) {
      throw etcdFailure(`cannot look for the claim moved with session ${offer.sessionId}`, this.etcd.endpoints, err);
    }
    for (const kv of res.kvs) {
      const key = kv.key.toString();
      const r = decodeRecord<ClaimRecord>(key, kv.value);
      if (!r || r.token !== offer.token || r.claimant !== this.identity) continue;
      const dev = await this.directory.list({ host: r.host, id: r.deviceId, labels: {} }).catch(() => []);
      const device = dev[0] ?? ({ host: r.host, id: r.deviceId, claim: r } as FleetDevice);
      return this.adopt(key, r, device);
    }
    return undefined;
  }

  /** Revoke the lease: every claim goes at once. */
  async close(): Promise<void> {
    this.held.clear();
    this.orphaned = [];
    await this.lease.close();
  }
}

/**
 * Move a claim from its current holder to `to` in one transaction: it succeeds only if the key still holds exactly
 * `current` (same claimant, token and lease), and writes the new record under the destination's lease with a fresh
 * token. FAILED_PRECONDITION, naming who holds it now, when the holder changed.
 */
export async function moveClaim(etcd: EtcdConnection, key: string, current: ClaimRecord, to: { claimant: string; leaseId: string }): Promise<ClaimRecord> {
  const next: ClaimRecord = { ...current, claimant: to.claimant, token: newClaimToken(), lease: to.leaseId, since: new Date().toISOString() };
  const what = `cannot move the claim on device ${current.deviceId} on host ${current.host} from ${current.claimant} to ${to.claimant}`;
  let res;
  try {
    res = await etcd.client
      .if(key, 'Value', '==', encodeRecord(current))
      .then(etcd.client.put(key).value(encodeRecord(next)).lease(to.leaseId))
      .else(etcd.client.get(key))
      .commit();
  } catch (err) {
    // A lease that does not exist fails the whole transaction (etcd: "requested lease not found").
    if (/lease not found/i.test((err as Error).message)) throw new FleetError(Status.FAILED_PRECONDITION, `${what}: lease ${to.leaseId} does not exist`);
    throw etcdFailure(what, etcd.endpoints, err);
  }
  if (!res.succeeded) {
    const kv = firstKv(res, 0);
    const now = kv && decodeRecord<ClaimRecord>(key, kv.value);
    throw new FleetError(Status.FAILED_PRECONDITION, `${what}: ${now ? `it is held by ${describeHolder(now)}` : 'it is no longer claimed'}`, now ? [now] : []);
  }
  return next;
}

/** The claim record on a device, if any. */
export async function readClaim(etcd: EtcdConnection, keys: FleetKeys, host: string, deviceId: string): Promise<ClaimRecord | undefined> {
  const key = keys.claim(host, deviceId);
  let v: Buffer | null;
  try {
    v = await etcd.client.get(key).buffer();
  } catch (err) {
    throw etcdFailure(`cannot read the fleet claim on device ${deviceId}`, etcd.endpoints, err);
  }
  return v ? decodeRecord<ClaimRecord>(key, v) : undefined;
}

/** A device record for a claim whose device the directory did not list (only host and id are known). */
function deviceOf(r: ClaimRecord): FleetDevice {
  return { host: r.host, id: r.deviceId, claim: r } as FleetDevice;
}
