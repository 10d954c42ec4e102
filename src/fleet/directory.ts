// The fleet directory: every host's devices with their claims, read from etcd.
// list() is one consistent read (devices and claims at one revision); watch()
// is a snapshot and then live events, as an async iterable that an AbortSignal
// ends (the shape of UsbHostClient.watchDevices, across the whole fleet).
import type { IKeyValue } from 'etcd3';
import type { EtcdConnection } from './etcd.js';
import { abortable, etcdFailure, FleetError, Status } from './errors.js';
import { decodeRecord, FleetKeys, type ClaimRecord, type DeviceRecord, type HostRecord } from './keys.js';
import { describeFleetSelector, matchesFleetSelector, type FleetSelector } from './selector.js';

export interface FleetDevice extends DeviceRecord {
  /** The fleet claim (etcd), if a claimant holds one. */
  claim: ClaimRecord | null;
}

export type FleetEvent =
  | { kind: 'present'; device: FleetDevice }
  | { kind: 'snapshot-end'; revision: string }
  | { kind: 'host-up' | 'host-down'; host: HostRecord | { host: string }; revision: string }
  | { kind: 'added' | 'updated'; device: DeviceRecord; revision: string }
  | { kind: 'removed'; device: DeviceRecord | { host: string; id: string }; revision: string }
  | { kind: 'claimed'; claim: ClaimRecord; revision: string }
  | { kind: 'released'; claim: ClaimRecord | { host: string; deviceId: string }; revision: string };

/** Events a slow consumer may leave unread before its watch ends with RESOURCE_EXHAUSTED. */
export const WATCH_QUEUE_BOUND = 10_000;

export class FleetDirectory {
  readonly keys: FleetKeys;

  constructor(
    private readonly etcd: EtcdConnection,
    keys?: FleetKeys,
  ) {
    this.keys = keys ?? new FleetKeys();
  }

  /** Every device in the fleet matching `selector` (all without one), with its claim; sorted by host, then id. */
  async list(selector?: FleetSelector, opts: { signal?: AbortSignal } = {}): Promise<FleetDevice[]> {
    return (await this.snapshot(opts.signal, selector?.host)).devices.filter((d) => !selector || matchesFleetSelector(selector, d));
  }

  async hosts(opts: { signal?: AbortSignal } = {}): Promise<HostRecord[]> {
    const res = await this.range(this.keys.hosts, opts.signal);
    return res.kvs.map((kv) => decodeRecord<HostRecord>(kv.key.toString(), kv.value)).filter((h): h is HostRecord => !!h);
  }

  /** The devices matching `selector`; NOT_FOUND saying so when there are none. */
  async resolve(selector: FleetSelector, opts: { signal?: AbortSignal } = {}): Promise<FleetDevice[]> {
    const found = await this.list(selector, opts);
    if (!found.length) throw new FleetError(Status.NOT_FOUND, `no device in the fleet matches ${describeFleetSelector(selector)}`);
    return found;
  }

  private async range(prefix: string, signal?: AbortSignal, revision?: string) {
    let q = this.etcd.client.getAll().prefix(prefix);
    if (revision) q = q.revision(revision);
    try {
      return await abortable(q.exec(), signal);
    } catch (err) {
      throw etcdFailure('cannot read the fleet directory', this.etcd.endpoints, err);
    }
  }

  /** Devices and claims at one revision; of one host only when `host` is given (a narrower range read). */
  private async snapshot(signal?: AbortSignal, host?: string): Promise<{ devices: FleetDevice[]; revision: string }> {
    const devs = await this.range(host === undefined ? this.keys.devices : this.keys.hostDevices(host), signal);
    const revision = devs.header.revision;
    const claims = await this.range(host === undefined ? this.keys.claims : this.keys.hostClaims(host), signal, revision);
    const byDevice = new Map<string, ClaimRecord>();
    for (const kv of claims.kvs) {
      const c = decodeRecord<ClaimRecord>(kv.key.toString(), kv.value);
      if (c) byDevice.set(kv.key.toString(), c);
    }
    const devices: FleetDevice[] = [];
    for (const kv of devs.kvs) {
      const d = decodeRecord<DeviceRecord>(kv.key.toString(), kv.value);
      if (!d) continue;
      devices.push({ ...d, claim: byDevice.get(this.keys.claim(d.host, d.id)) ?? null });
    }
    devices.sort((a, b) => (a.host === b.host ? (a.id < b.id ? -1 : a.id > b.id ? 1 : 0) : a.host < b.host ? -1 : 1));
    return { devices, revision };
  }

  /**
   * The fleet as it is (one 'present' per device, then 'snapshot-end'), then every change from that revision on,
   * without a gap. etcd3 re-establishes the watch after etcd was away. Ends when `signal` aborts.
   */
  async *watch(opts: { signal?: AbortSignal; selector?: FleetSelector } = {}): AsyncIterable<FleetEvent> {
    const { signal, selector } = opts;
    const snap = await this.snapshot(signal);
    for (const device of snap.devices) if (!selector || matchesFleetSelector(selector, device)) yield { kind: 'present', device };
    yield { kind: 'snapshot-end', revision: snap.revision };

    const queue: FleetEvent[] = [];
    let wake: (() => void) | undefined;
    let failure: Error | undefined;
    const push = (ev: FleetEvent) => {
      if (queue.length >= WATCH_QUEUE_BOUND) failure ??= new FleetError(Status.RESOURCE_EXHAUSTED, `fleet watch consumer fell ${WATCH_QUEUE_BOUND} events behind`);
      else queue.push(ev);
      wake?.();
    };
    const watcher = await this.etcd.client
      .watch()
      .prefix(this.keys.prefix)
      .withPreviousKV()
      .startRevision(String(BigInt(snap.revision) + 1n))
      .create()
      .catch((err) => {
        throw etcdFailure('cannot watch the fleet directory', this.etcd.endpoints, err);
      });
    const onKv = (deleted: boolean) => (kv: IKeyValue, prev?: IKeyValue) => {
      const ev = this.toEvent(kv, prev, deleted);
      if (ev && (!selector || passes(selector, ev))) push(ev);
    };
    watcher.on('put', onKv(false));
    watcher.on('delete', onKv(true));
    const onAbort = () => wake?.();
    signal?.addEventListener('abort', onAbort);
    try {
      while (!signal?.aborted) {
        if (failure) throw failure;
        const ev = queue.shift();
        if (ev) {
          yield ev;
          continue;
        }
        await new Promise<void>((r) => (wake = r));
        wake = undefined;
      }
    } finally {
      signal?.removeEventListener('abort', onAbort);
      await watcher.cancel().catch(() => {});
    }
  }

  private toEvent(kv: IKeyValue, prev: IKeyValue | undefined, deleted: boolean): FleetEvent | undefined {
    const key = kv.key.toString();
    const what = this.keys.parse(key);
    if (!what) return undefined;
    const revision = kv.mod_revision;
    const value = deleted ? prev?.value : kv.value;
    if (what.kind === 'host') {
      const host = (value && decodeRecord<HostRecord>(key, value)) || { host: what.host };
      return { kind: deleted ? 'host-down' : 'host-up', host, revision };
    }
    if (what.kind === 'device') {
      const device = value ? decodeRecord<DeviceRecord>(key, value) : undefined;
      if (deleted) return { kind: 'removed', device: device ?? { host: what.host, id: what.id }, revision };
      if (!device) return undefined;
      return { kind: kv.version === '1' ? 'added' : 'updated', device, revision };
    }
    const claim = value ? decodeRecord<ClaimRecord>(key, value) : undefined;
    if (deleted) return { kind: 'released', claim: claim ?? { host: what.host, deviceId: what.id }, revision };
    if (!claim) return undefined;
    return { kind: 'claimed', claim, revision };
  }
}

/** A watch filtered by selector: device events must match it; claim and host events pass on host= alone. */
function passes(s: FleetSelector, ev: FleetEvent): boolean {
  switch (ev.kind) {
    case 'present':
    case 'added':
    case 'updated':
      return matchesFleetSelector(s, ev.device);
    case 'removed':
      return 'vidPid' in ev.device ? matchesFleetSelector(s, ev.device) : s.host === undefined || s.host === ev.device.host;
    case 'claimed':
    case 'released':
      return s.host === undefined || s.host === ev.claim.host;
    case 'host-up':
    case 'host-down':
      return s.host === undefined || s.host === ev.host.host;
    default:
      return true;
  }
}
