// The setup the bridge end-to-end files share, as one mocha fixture: a temporary directory, a USB
// host server (its own process, or in this process), a QEMU guest with a USB host controller and a
// QMP socket for the bridge, a Bridge that knows the guest as vm1; and the teardown in reverse.
// useBridgeGuest() registers the before/after hooks of the enclosing describe and returns the rig
// they fill in. useMigrationSetup() does the same for the migration files (server, guests, bridge
// processes).
import { expect } from 'chai';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Bridge } from '../../src/client/bridge/bridge.js';
import { UsbHostClient } from '../../src/client/sdk/client.js';
import type { Device } from '../../src/gen/usbroam/v1/usbhost.js';
import { clientTls } from '../../src/devkit/certs.js';
import { e2eImageOrSkip, startBridgeGuest, testLog, type HcName } from '../../src/devkit/bridge-guest.js';
import type { Guest, GuestImage } from '../../src/devkit/guest/guest.js';
import { startServerProcess, type ServerProcess } from '../../src/devkit/server-process.js';
import { BridgeChild } from '../../src/devkit/migration-faults.js';
import type { MigrationHost } from '../../src/devkit/migration-rig.js';
import { startInProcessServer, type InProcessServer } from './in-process.js';
import { sleep } from './wait.js';

export type ServerOpts = { address: string; ca: string; cert: string; key: string };

export interface BridgeGuestOptions {
  /** The guest's name; also names the temporary directory. */
  name: string;
  hc?: HcName;
  /** `usbroam serve` in its own process with these arguments (`dir` is the rig's directory). */
  serverArgs?: (dir: string) => string[];
  /** A server in this process instead (an ACL, say). */
  inProcessServer?: Parameters<typeof startInProcessServer>[0];
  /** No Bridge object (a test that runs the bridge as a process). */
  noBridge?: boolean;
  /** Runs after the server and the Bridge exist, before the guest boots; returns extra QEMU arguments. */
  beforeGuest?: (rig: BridgeGuestRig) => Promise<string[] | void> | string[] | void;
  /** Runs first in the teardown, while the guest still runs (stop a guest-side process, say). */
  beforeTeardown?: (rig: BridgeGuestRig) => Promise<void>;
}

export interface BridgeGuestRig {
  dir: string;
  image: GuestImage;
  guest: Guest;
  /** The guest's QMP socket reserved for the bridge. */
  bridgeQmp: string;
  /** The guest's USB bus, e.g. xhci.0. */
  bus: string;
  bridge: Bridge;
  /** The server process (serverArgs), or undefined. */
  server: ServerProcess | undefined;
  /** The in-process server (inProcessServer), or undefined. */
  srv: InProcessServer | undefined;
  /** How the bridge reaches the server: by name (localhost) with the bridge's certificate. */
  serverOpts: ServerOpts;
}

export function useBridgeGuest(opts: BridgeGuestOptions): BridgeGuestRig {
  const rig = {} as BridgeGuestRig;
  before(async function () {
    this.timeout(900_000);
    rig.image = await e2eImageOrSkip(this);
    rig.dir = mkdtempSync(path.join(os.tmpdir(), `${opts.name}-`));
    if (opts.inProcessServer) {
      rig.srv = await startInProcessServer(opts.inProcessServer);
    } else {
      rig.server = await startServerProcess(opts.serverArgs?.(rig.dir) ?? ['--allow', 'bridge=*', '--disk-image', path.join(rig.dir, 'disk.img'), '--disk-size-mib', '64']);
    }
    const address = (rig.srv?.address ?? rig.server!.address).replace('127.0.0.1', 'localhost');
    rig.serverOpts = { address, ...clientTls('bridge') };
    if (!opts.noBridge) rig.bridge = new Bridge({ log: testLog, runDir: rig.dir });
    const extraArgs = (await opts.beforeGuest?.(rig)) ?? [];
    const bg = await startBridgeGuest({ name: opts.name, image: rig.image, dir: rig.dir, hc: opts.hc, extraArgs });
    rig.guest = bg.guest;
    rig.bridgeQmp = bg.bridgeQmp;
    rig.bus = bg.bus;
    rig.bridge?.addVm({ name: 'vm1', qmpSocket: bg.bridgeQmp });
  });
  after(async () => {
    if (opts.beforeTeardown && rig.guest) await opts.beforeTeardown(rig).catch(() => {});
    await rig.bridge?.close().catch(() => {});
    await rig.guest?.stop();
    await rig.server?.stop();
    await rig.srv?.stop();
    if (rig.dir && !process.env.USBROAM_E2E_KEEP) rmSync(rig.dir, { recursive: true, force: true });
  });
  return rig;
}

/** The device with this serial number as the rig's server lists it to the bridge. */
export async function servedDevice(rig: BridgeGuestRig, serial: string): Promise<Device> {
  const c = new UsbHostClient(rig.serverOpts);
  try {
    const d = (await c.listDevices()).find((x) => x.serial === serial);
    expect(d, `the server serves ${serial}`).to.not.equal(undefined);
    return d!;
  } finally {
    c.close();
  }
}

export interface MigrationSetup {
  dir: string;
  image: GuestImage;
  server: ServerProcess;
  serverOpts: ServerOpts;
  /** Every guest a test starts (sources and destinations): stopped in the teardown. */
  guests: Guest[];
  /** Bridges in their own processes: closed, then sent SIGTERM, in the teardown. */
  children: BridgeChild[];
}

/**
 * The setup the migration end-to-end files share: a temporary directory, a server process with a
 * `diskMiB` disk, and the teardown of what the tests add to `guests` and `children`
 * (`beforeTeardown` first, for bridges in this process).
 */
export function useMigrationSetup(opts: { name: string; diskMiB: number; beforeTeardown?: () => Promise<void>; /** More `usbroam serve` flags (a function: evaluated in the before hook). */ extraServerArgs?: () => string[]; /** More `usbroam serve` flags. */ serverArgs?: string[] }): MigrationSetup {
  const m = { guests: [], children: [] } as unknown as MigrationSetup;
  before(async function () {
    this.timeout(900_000);
    m.image = await e2eImageOrSkip(this);
    m.dir = mkdtempSync(path.join(os.tmpdir(), `${opts.name}-`));
    m.server = await startServerProcess(['--allow', 'bridge=*', '--disk-image', path.join(m.dir, 'disk.img'), '--disk-size-mib', String(opts.diskMiB), ...(opts.serverArgs ?? []), ...(opts.extraServerArgs?.() ?? [])]);
    m.serverOpts = { address: m.server.address.replace('127.0.0.1', 'localhost'), ...clientTls('bridge') };
  });
  after(async () => {
    await opts.beforeTeardown?.().catch(() => {});
    for (const c of m.children) {
      await Promise.race([c.call('close').catch(() => {}), sleep(10_000)]);
      await c.kill('SIGTERM');
    }
    await Promise.allSettled(m.guests.map((g) => g.stop()));
    await m.server?.stop();
    if (m.dir && !process.env.USBROAM_E2E_KEEP) rmSync(m.dir, { recursive: true, force: true });
  });
  return m;
}

/**
 * Two migration hosts A and B, each a bridge in its own process under `m.dir`/A and /B (closed
 * with the setup). Filled in by a before hook: read `hosts.A` / `hosts.B` in the tests.
 */
export function useBridgeHosts(m: MigrationSetup): { A: MigrationHost; B: MigrationHost; childA: BridgeChild; childB: BridgeChild } {
  const hosts = {} as { A: MigrationHost; B: MigrationHost; childA: BridgeChild; childB: BridgeChild };
  before(async function () {
    this.timeout(120_000);
    // Each bridge in its own process (USBROAM_CHILD_LOG=info for its log on stderr).
    hosts.childA = new BridgeChild(path.join(m.dir, 'A'));
    hosts.childB = new BridgeChild(path.join(m.dir, 'B'));
    m.children.push(hosts.childA, hosts.childB);
    await Promise.all([hosts.childA.ready(), hosts.childB.ready()]);
    hosts.A = { name: 'A', bridge: hosts.childA.host() };
    hosts.B = { name: 'B', bridge: hosts.childB.host() };
  });
  return hosts;
}
