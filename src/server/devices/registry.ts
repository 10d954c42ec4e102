// The devices this server exports: the union of its backends' devices, with
// who holds a claim on each. It is the single place that decides exclusivity
// and the source of WatchDevices events.
import { EventEmitter } from 'node:events';
import type { DeviceInfo, UsbBackend } from '../backends/types.js';

export interface Claim {
  identity: string;
  sessionId: string;
}

export type RegistryEvent =
  | { kind: 'added'; device: DeviceInfo }
  | { kind: 'removed'; device: DeviceInfo }
  | { kind: 'claimed'; device: DeviceInfo; claim: Claim }
  | { kind: 'released'; device: DeviceInfo };

export class ClaimConflictError extends Error {
  constructor(
    readonly deviceId: string,
    readonly holder: Claim,
  ) {
    super(`device ${deviceId} is claimed by ${holder.identity} (session ${holder.sessionId})`);
    this.name = 'ClaimConflictError';
  }
}

export class DeviceRegistry extends EventEmitter {
  private readonly devices = new Map<string, { info: DeviceInfo; backend: UsbBackend }>();
  private readonly claims = new Map<string, Claim>();

  constructor(private readonly backends: UsbBackend[]) {
    super();
    this.setMaxListeners(0);
    for (const backend of backends) {
      for (const info of backend.list()) this.devices.set(info.id, { info, backend });
      backend.on('added', (info: DeviceInfo) => {
        this.devices.set(info.id, { info, backend });
        this.emitEvent({ kind: 'added', device: info });
      });
      backend.on('removed', (id: string) => {
        const entry = this.devices.get(id);
        if (!entry) return;
        this.devices.delete(id);
        this.emitEvent({ kind: 'removed', device: entry.info });
      });
    }
  }

  private emitEvent(ev: RegistryEvent): void {
    this.emit('event', ev);
  }

  list(): DeviceInfo[] {
    return [...this.devices.values()].map((d) => d.info);
  }

  get(id: string): DeviceInfo | undefined {
    return this.devices.get(id)?.info;
  }

  claimOf(id: string): Claim | undefined {
    return this.claims.get(id);
  }

  /** Take the exclusive claim and open the device; throws ClaimConflictError naming the holder. */
  async claim(id: string, claim: Claim) {
    const entry = this.devices.get(id);
    if (!entry) throw new Error(`no device ${id}`);
    const holder = this.claims.get(id);
    if (holder) throw new ClaimConflictError(id, holder);
    this.claims.set(id, claim);
    try {
      const handle = await entry.backend.open(id);
      this.emitEvent({ kind: 'claimed', device: entry.info, claim });
      return handle;
    } catch (err) {
      this.claims.delete(id);
      throw err;
    }
  }

  release(id: string, sessionId: string): void {
    const holder = this.claims.get(id);
    if (!holder || holder.sessionId !== sessionId) return;
    this.claims.delete(id);
    const info = this.devices.get(id)?.info;
    if (info) this.emitEvent({ kind: 'released', device: info });
  }

  /** The claim moves to another identity with its session (a hand-over). */
  transfer(id: string, sessionId: string, identity: string): void {
    const holder = this.claims.get(id);
    if (!holder || holder.sessionId !== sessionId) return;
    const claim = { identity, sessionId };
    this.claims.set(id, claim);
    const info = this.devices.get(id)?.info;
    if (info) this.emitEvent({ kind: 'claimed', device: info, claim });
  }

  async close(): Promise<void> {
    await Promise.all(this.backends.map((b) => b.close()));
  }
}
