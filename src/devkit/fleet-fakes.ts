// Fleet test helpers: a device source that stands in for a server's device
// registry (hotplug and claims on demand), and a claimant in a child process
// (to be killed -9 while it holds its lease).
import type { ChildProcess } from 'node:child_process';
import { EventEmitter } from 'node:events';
import path from 'node:path';
import { REPO_ROOT } from '../common/repo-root.js';
import { spawnUntilReady } from './child-process-lines.js';
import type { DeviceInfo } from '../server/backends/types.js';
import { Speed } from '../server/backends/types.js';

export function fakeDevice(id: string, over: Partial<DeviceInfo> = {}): DeviceInfo {
  return {
    id,
    vendorId: 0x1209,
    productId: 0x0001,
    deviceClass: 0,
    deviceSubclass: 0,
    deviceProtocol: 0,
    bcdUsb: 0x0200,
    bcdDevice: 0x0100,
    speed: Speed.High,
    manufacturer: 'usbroam',
    product: `device ${id}`,
    serial: `SER-${id}`,
    bus: 1,
    portPath: [1],
    maxPacketSize0: 64,
    configurations: [{ value: 1, maxPowerMa: 100, selfPowered: false, remoteWakeup: false, interfaces: [], endpoints: [] }],
    activeConfiguration: 1,
    interfaces: [],
    endpoints: [],
    backend: 'fake',
    ...over,
  };
}

/** Emits the device registry's 'event's: added, removed, claimed, released. */
export class FakeDeviceSource extends EventEmitter {
  private readonly devices = new Map<string, DeviceInfo>();
  private readonly claims = new Map<string, { identity: string; sessionId: string }>();
  constructor(devices: DeviceInfo[] = []) {
    super();
    for (const d of devices) this.devices.set(d.id, d);
  }
  list(): DeviceInfo[] {
    return [...this.devices.values()];
  }
  claimOf(id: string) {
    return this.claims.get(id);
  }
  add(d: DeviceInfo): void {
    this.devices.set(d.id, d);
    this.emit('event', { kind: 'added', device: d });
  }
  remove(id: string): void {
    const d = this.devices.get(id);
    if (!d) return;
    this.devices.delete(id);
    this.emit('event', { kind: 'removed', device: d });
  }
  claim(id: string, identity: string): void {
    this.claims.set(id, { identity, sessionId: `s-${id}` });
    this.emit('event', { kind: 'claimed', device: this.devices.get(id)! });
  }
}

export async function until<T>(what: string, fn: () => Promise<T | undefined | false> | T | undefined | false, timeoutMs = 15_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  while (Date.now() < deadline) {
    try {
      const v = await fn();
      if (v) return v;
    } catch (err) {
      last = err;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`timed out waiting for ${what}${last ? `: ${(last as Error).message}` : ''}`);
}

/** A claimant in its own process: resolves once it holds a claim on `selector`; prints the claim as JSON. */
export async function startClaimantProcess(endpoints: string[], claimant: string, selector: string, ttlS: number, prefix: string): Promise<{ child: ChildProcess; claim: { key: string; lease: string } }> {
  const { child, ready: claim } = await spawnUntilReady(
    process.execPath,
    ['--import', 'tsx', path.join(REPO_ROOT, 'src/devkit/fleet-claimant-child.ts'), endpoints.join(','), claimant, selector, String(ttlS), prefix],
    { name: 'claimant process', ready: (j) => (typeof j.key === 'string' ? { key: j.key, lease: String(j.lease) } : undefined) },
  );
  return { child, claim };
}
