// Registration: a server publishes its address and each exported device under
// the fleet prefix, all under one lease. Hotplug and claim events from the
// device registry update the records; a lost lease (etcd away longer than the
// TTL) is granted anew and everything republished; stop() revokes the lease so
// the host leaves the directory at once. A server that dies leaves it when the
// lease runs out.
import type { Logger } from '../common/log.js';
import type { DeviceInfo } from '../server/backends/types.js';
import type { EtcdConnection } from './etcd.js';
import { deviceRecord, encodeRecord, FleetKeys, type DeviceRecord, type HostRecord } from './keys.js';
import { DEFAULT_LEASE_TTL_S, KeptLease } from './kept-lease.js';
import { matchesFleetSelector, type FleetSelector } from './selector.js';

/** What the publisher needs of the server's device registry (DeviceRegistry has it). */
export interface DeviceSource {
  list(): DeviceInfo[];
  claimOf(id: string): { identity: string; sessionId: string } | undefined;
  on(event: 'event', fn: (ev: { kind: string; device: DeviceInfo }) => void): unknown;
  off(event: 'event', fn: (ev: { kind: string; device: DeviceInfo }) => void): unknown;
}

export interface DeviceLabelRule {
  select: FleetSelector;
  labels: Record<string, string>;
}

export interface PublisherOptions {
  host: string;
  address: string;
  hostLabels?: Record<string, string>;
  /** Labels for the devices that match each rule (later rules win on the same key). */
  deviceLabels?: DeviceLabelRule[];
  leaseTtlS?: number;
  keys?: FleetKeys;
  log?: Logger;
}

const REPUBLISH_AFTER_FAILURE_MS = 1000;

export class FleetPublisher {
  readonly keys: FleetKeys;
  readonly lease: KeptLease;
  private chain: Promise<void> = Promise.resolve();
  private stopped = false;
  private republishTimer: NodeJS.Timeout | undefined;
  private readonly startedAt = new Date().toISOString();
  private readonly onEvent = (ev: { kind: string; device: DeviceInfo }) => this.deviceChanged(ev.kind, ev.device);
  /** Writes done, for tests and the benchmark. */
  writes = 0;

  constructor(
    private readonly etcd: EtcdConnection,
    private readonly source: DeviceSource,
    private readonly opts: PublisherOptions,
  ) {
    if (!opts.host || /[\s]/.test(opts.host)) throw new Error(`fleet host name "${opts.host}" must be non-empty without spaces`);
    this.keys = opts.keys ?? new FleetKeys();
    this.lease = new KeptLease(etcd, opts.leaseTtlS ?? DEFAULT_LEASE_TTL_S, opts.log, `fleet lease of host ${opts.host}`);
    this.lease.on('granted', () => this.enqueue(() => this.publishAll()));
  }

  /** Publish now if etcd answers; otherwise keep trying in the background (the server runs either way). */
  start(): void {
    this.source.on('event', this.onEvent);
    this.lease.startInBackground();
  }

  /** Resolves once every change so far has been written (or has failed). */
  flush(): Promise<void> {
    return this.chain;
  }

  /** The host's labels, then those of every rule the device matches (later rules win on the same key). */
  labelsOf(d: DeviceInfo): Record<string, string> {
    const labels: Record<string, string> = { ...(this.opts.hostLabels ?? {}) };
    const rec = this.record(d, {});
    for (const r of this.opts.deviceLabels ?? []) if (matchesFleetSelector(r.select, rec)) Object.assign(labels, r.labels);
    return labels;
  }

  private record(d: DeviceInfo, labels: Record<string, string>): DeviceRecord {
    return deviceRecord(this.opts.host, this.opts.address, d, labels, this.source.claimOf(d.id));
  }

  private deviceChanged(kind: string, d: DeviceInfo): void {
    if (kind === 'removed') this.enqueue(() => this.write((lease) => this.etcd.client.delete().key(this.keys.device(this.opts.host, d.id)).exec().then(() => lease)));
    else this.enqueue(() => this.putDevice(d));
  }

  private enqueue(step: () => Promise<void>): void {
    this.chain = this.chain.then(step).catch((err) => {
      this.opts.log?.warn({ host: this.opts.host, err: (err as Error).message }, 'fleet registration write failed; republishing shortly');
      this.scheduleRepublish();
    });
  }

  private scheduleRepublish(): void {
    if (this.stopped || this.republishTimer) return;
    this.republishTimer = setTimeout(() => {
      this.republishTimer = undefined;
      if (this.lease.leaseId) this.enqueue(() => this.publishAll());
    }, REPUBLISH_AFTER_FAILURE_MS);
    this.republishTimer.unref();
  }

  /** Run one write under the current lease; without one the next grant republishes everything. */
  private async write(fn: (lease: string) => Promise<unknown>): Promise<void> {
    const lease = this.lease.leaseId;
    if (!lease || this.stopped) return;
    await fn(lease);
    this.writes++;
  }

  private putDevice(d: DeviceInfo): Promise<void> {
    return this.write((lease) =>
      this.etcd.client.put(this.keys.device(this.opts.host, d.id)).value(encodeRecord(this.record(d, this.labelsOf(d)))).lease(lease).exec(),
    );
  }

  private async publishAll(): Promise<void> {
    const host: HostRecord = { host: this.opts.host, address: this.opts.address, labels: this.opts.hostLabels ?? {}, startedAt: this.startedAt };
    await this.write((lease) => this.etcd.client.put(this.keys.host(this.opts.host)).value(encodeRecord(host)).lease(lease).exec());
    const devices = this.source.list();
    for (const d of devices) await this.putDevice(d);
    // Records of devices that went while etcd was away.
    const present = new Set(devices.map((d) => this.keys.device(this.opts.host, d.id)));
    const keys = await this.etcd.client.getAll().prefix(this.keys.hostDevices(this.opts.host)).keys();
    for (const k of keys) if (!present.has(k)) await this.write((lease) => this.etcd.client.delete().key(k).exec().then(() => lease));
    this.opts.log?.info({ host: this.opts.host, devices: devices.length, lease: this.lease.leaseId }, 'fleet registration published');
  }

  /** Leave the fleet: revoke the lease, so the host and its devices vanish at once. */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    this.source.off('event', this.onEvent);
    if (this.republishTimer) clearTimeout(this.republishTimer);
    await this.chain;
    await this.lease.close();
  }
}
