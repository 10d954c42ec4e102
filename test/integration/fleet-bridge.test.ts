// Bridges in the fleet, without QEMU: two `usbroam serve --etcd` processes on a
// real etcd, bridges (in this process, and one `usbroam bridge --etcd` process)
// whose control API attaches by fleet selector to a fake QEMU on a cold-plug
// chardev socket. The claim is taken under the bridge's lease, the bridge
// connects to the server that holds the device with the claim token, racing
// bridges get ALREADY_EXISTS naming the holder, detach frees the claim, a claim
// that moves to someone else ends the session, a bridge killed -9 frees the
// device after the TTL and its session ends, and with etcd down open
// attachments keep running while new ones get UNAVAILABLE naming etcd.
import { expect } from 'chai';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { ClientError, Status } from 'nice-grpc';
import { Bridge } from '../../src/client/bridge/bridge.js';
import { BridgeControlClient } from '../../src/client/bridge-control/client.js';
import { BridgeControlServer } from '../../src/client/bridge-control/server.js';
import { createLogger, silentLogger } from '../../src/common/log.js';
import { clientTls } from '../../src/devkit/certs.js';
import { startEtcd, type EtcdCluster } from '../../src/devkit/etcd.js';
import { until } from '../../src/devkit/fleet-fakes.js';
import { untilLeaseGone } from '../helpers/wait.js';
import { startServerProcess, type ServerProcess } from '../../src/devkit/server-process.js';
import { BridgeFleet, certificateIdentity } from '../../src/fleet/bridge-fleet.js';
import { FleetDirectory } from '../../src/fleet/directory.js';
import { connectEtcd, type EtcdConnection } from '../../src/fleet/etcd.js';
import { encodeRecord, FleetKeys, type ClaimRecord } from '../../src/fleet/keys.js';
import { readClaim } from '../../src/fleet/claims.js';
import { parseFleetSelector as sel } from '../../src/fleet/selector.js';
import { AttachmentState } from '../../src/gen/usbroam/v1/bridge.js';
import { FakeQemu } from '../helpers/bridge-fake-qemu.js';
import { startColdPlugQmp, type FakeQmp } from '../helpers/fake-qmp.js';

const log = process.env.USBROAM_TEST_LOG ? createLogger({ level: process.env.USBROAM_TEST_LOG }) : silentLogger;
const TTL = 2;
const run = promisify(execFile);

async function status(p: Promise<unknown>): Promise<{ code: string; details: string }> {
  try {
    await p;
  } catch (err) {
    expect(err, String(err)).to.be.instanceOf(ClientError);
    return { code: Status[(err as ClientError).code], details: (err as ClientError).details };
  }
  throw new Error('expected a refusal, the call succeeded');
}

/** A fake QEMU listening on a cold-plug chardev socket: answers the bridge's hello. */
async function coldPlugQemu(dir: string, name: string): Promise<{ socketPath: string; qemu: Promise<FakeQemu>; close(): void }> {
  const socketPath = path.join(dir, `${name}.sock`);
  const listener = net.createServer();
  await new Promise<void>((r) => listener.listen(socketPath, r));
  const qemu = new Promise<FakeQemu>((r) =>
    listener.once('connection', (s) => {
      const q = new FakeQemu(s, { ackDisconnect: true });
      q.hello();
      r(q);
    }),
  );
  return { socketPath, qemu, close: () => listener.close() };
}

interface TestBridge {
  bridge: Bridge;
  control: BridgeControlServer;
  client: BridgeControlClient;
  fleet: BridgeFleet;
}

describe('fleet: bridges attach by fleet selector (real etcd, server processes, fake QEMU)', function () {
  this.timeout(120_000);
  let etcd: EtcdCluster;
  let conn: EtcdConnection;
  let dir: FleetDirectory;
  let tmp: string;
  const keys = new FleetKeys();
  const servers: ServerProcess[] = [];
  const bridges: TestBridge[] = [];
  const children: ChildProcess[] = [];
  const monitors: FakeQmp[] = [];

  before(async () => {
    etcd = await startEtcd(1);
    conn = await connectEtcd(etcd.endpoints);
    dir = new FleetDirectory(conn, keys);
    tmp = mkdtempSync(path.join(os.tmpdir(), 'usbroam-fleet-bridge-'));
    for (let i = 0; i < 2; i++) {
      servers.push(
        await startServerProcess([
          '--allow', 'bridge=*', '--allow', 'viewer=*', '--grace-ms', '60000',
          '--disk-image', path.join(tmp, `disk-${i}.img`), '--disk-size-mib', '4',
          '--etcd', etcd.endpoints.join(','), '--host-name', `host-${i}`, '--lease-ttl', String(TTL),
        ]),
      );
    }
    await until('both hosts registered', async () => (await dir.hosts()).length === 2, 20_000);
  });
  after(async () => {
    for (const c of children) c.kill('SIGKILL');
    await Promise.all(monitors.map((m) => m.stop()));
    for (const b of bridges) {
      b.client.close();
      await b.control.stop('test over').catch(() => {});
      await b.fleet.close();
    }
    await Promise.all(servers.map((s) => s.stop('SIGKILL')));
    conn?.close();
    await etcd?.stop();
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  });

  async function startBridge(identity: string): Promise<TestBridge> {
    const tls = clientTls(identity);
    const fleet = new BridgeFleet({ etcd: etcd.endpoints, identity: certificateIdentity(tls.cert), leaseTtlS: TTL, log });
    const bridge = new Bridge({ log, runDir: path.join(tmp, `run-${identity}-${bridges.length}`), incomingClaims: fleet });
    const sock = path.join(tmp, `control-${identity}-${bridges.length}.sock`);
    const control = new BridgeControlServer({ bridge, listen: sock, servers: tls, fleet, log });
    // The VM's QMP monitor: the bridge follows its migration events (there are none here).
    const qmp = await startColdPlugQmp(tmp, `qmp-${identity}-${bridges.length}.sock`);
    monitors.push(qmp);
    control.addVm('vm1', qmp.path);
    await control.start();
    const b = { bridge, control, client: new BridgeControlClient({ address: sock }), fleet };
    bridges.push(b);
    return b;
  }

  /** The fleet-selector attach of a cold-plugged device, the fake QEMU answering. */
  async function attach(b: TestBridge, select: string, name: string) {
    const q = await coldPlugQemu(tmp, name);
    try {
      const a = await b.client.attach({ vm: 'vm1', fleetSelect: select, coldPlugSocket: q.socketPath, attachmentId: name });
      const qemu = await q.qemu;
      await qemu.waitFor('device_connect');
      return { a, qemu };
    } finally {
      q.close();
    }
  }

  const loop1 = 'serial=USBROAM-LOOP-0001 host=host-1';

  it('attaches by fleet selector: the claim is under the bridge\'s lease, the session on the server that holds the device', async () => {
    const b = await startBridge('bridge');
    const { a } = await attach(b, loop1, 'loopA');
    const [d] = await dir.list(sel(loop1));
    expect(a.fleetClaim).to.equal(`host-1/${d!.id}`);
    expect(a.server).to.equal(d!.address);
    expect(a.device?.serial).to.equal('USBROAM-LOOP-0001');
    const claim = await readClaim(conn, keys, 'host-1', d!.id);
    expect(claim?.claimant).to.equal('bridge');
    expect(claim?.lease).to.equal((await b.fleet.claimant()).lease.leaseId);
    await until('the server publishes the session', async () => (await dir.list(sel(loop1)))[0]?.session?.identity === 'bridge');
  });

  it('another bridge asking for the same device: ALREADY_EXISTS naming the holder; nothing attached', async () => {
    const other = await startBridge('viewer');
    const q = await coldPlugQemu(tmp, 'loopB');
    try {
      const r = await status(other.client.attach({ vm: 'vm1', fleetSelect: loop1, coldPlugSocket: q.socketPath }));
      expect(r.code, r.details).to.equal('ALREADY_EXISTS');
      expect(r.details).to.match(/claimed by bridge/);
    } finally {
      q.close();
    }
    expect(await other.client.list()).to.deep.equal([]);
  });

  it('two bridges racing for one free device: exactly one attaches, the other is told who holds it', async () => {
    const [x, y] = bridges;
    const select = 'serial=USBROAM-LOOP-0001 host=host-0';
    const qs = await Promise.all([coldPlugQemu(tmp, 'raceX'), coldPlugQemu(tmp, 'raceY')]);
    for (const q of qs) q.qemu.then((f) => f.waitFor('device_connect')).catch(() => {});
    const rs = await Promise.allSettled([x!, y!].map((b, i) => b.client.attach({ vm: 'vm1', fleetSelect: select, coldPlugSocket: qs[i]!.socketPath, attachmentId: `race${i}` })));
    for (const q of qs) q.close();
    const won = rs.filter((r) => r.status === 'fulfilled');
    const lost = rs.filter((r): r is PromiseRejectedResult => r.status === 'rejected');
    expect(won, JSON.stringify(rs.map((r) => r.status))).to.have.length(1);
    const e = lost[0]!.reason as ClientError;
    expect(Status[e.code], e.details).to.equal('ALREADY_EXISTS');
    expect(e.details).to.match(/claimed by (bridge|viewer)/);
    const winner = rs[0]!.status === 'fulfilled' ? x! : y!;
    await winner.client.detach('vm1', rs[0]!.status === 'fulfilled' ? 'race0' : 'race1');
  });

  it('detach gives the claim up: the device is free in etcd at once', async () => {
    const b = bridges[0]!;
    const [d] = await dir.list(sel(loop1));
    await b.client.detach('vm1', 'loopA');
    expect(await readClaim(conn, keys, 'host-1', d!.id)).to.equal(undefined);
  });

  it('usbroam attach --select through the CLI: prints the attachment with its fleet claim', async () => {
    const b = bridges[1]!;
    const q = await coldPlugQemu(tmp, 'cli');
    q.qemu.then((f) => f.waitFor('device_connect')).catch(() => {});
    const sock = b.client.address.replace(/^unix:/, '');
    const r = await run(process.execPath, ['bin/usbroam.js', 'attach', '--control', sock, '--vm', 'vm1', '--etcd', etcd.endpoints.join(','), '--select', 'serial=USBROAM-LOOP-0001', 'host=host-1', '--cold-plug-socket', q.socketPath, '--id', 'cli0'], { timeout: 30_000 });
    q.close();
    expect(r.stdout).to.match(/^attached cli0 {2}vm vm1 .*fleet claim host-1\//);
    const bad = await run(process.execPath, ['bin/usbroam.js', 'attach', '--control', sock, '--vm', 'vm1', '--select', 'serial=X', '--device', 'serial=X']).catch((e: { stderr: string; code: number }) => e);
    expect((bad as { code: number }).code).to.not.equal(0);
    expect((bad as { stderr: string }).stderr).to.match(/either --device .* or --select/);
    await b.client.detach('vm1', 'cli0');
  });

  it('a claim moved to someone else ends the session: the attachment closes', async () => {
    const b = bridges[0]!;
    const { a } = await attach(b, loop1, 'moved');
    const [d] = await dir.list(sel(loop1));
    const key = keys.claim('host-1', d!.id);
    const now = await readClaim(conn, keys, 'host-1', d!.id);
    const usurper: ClaimRecord = { ...now!, claimant: 'usurper', token: 'x', since: new Date().toISOString() };
    await conn.client.put(key).value(encodeRecord(usurper)).lease(now!.lease).exec();
    await until('the attachment ended', async () => !(await b.client.list()).some((x) => x.id === a.id), 20_000);
    await until('the server released the device', async () => (await dir.list(sel(loop1)))[0]?.session === null, 20_000);
    await conn.client.delete().key(key).exec();
  });

  it('a bridge killed -9: its lease runs out, the device is free, and its server session has ended', async function () {
    this.timeout(90_000);
    const run = path.join(tmp, 'child');
    const control = path.join(run, 'bridge.sock');
    const tls = clientTls('bridge');
    const qmp = await startColdPlugQmp(tmp, 'qmp-child.sock');
    monitors.push(qmp);
    const child = spawn(process.execPath, ['bin/usbroam.js', 'bridge', '--control', control, '--run-dir', run, '--vm', `vm1=${qmp.path}`,
      '--server-ca', tls.ca, '--server-cert', tls.cert, '--server-key', tls.key, '--etcd', etcd.endpoints.join(','), '--lease-ttl', String(TTL)], { stdio: ['ignore', 'pipe', 'pipe'] });
    children.push(child);
    let out = '';
    child.stdout!.on('data', (b: Buffer) => (out += b.toString()));
    child.stderr!.on('data', (b: Buffer) => (out += b.toString()));
    await until('bridge process listening', () => /bridge control API listening/.test(out), 20_000);
    const c = new BridgeControlClient({ address: control });
    const q = await coldPlugQemu(tmp, 'doomed');
    const a = await c.attach({ vm: 'vm1', fleetSelect: loop1, coldPlugSocket: q.socketPath, attachmentId: 'doomed' });
    await (await q.qemu).waitFor('device_connect');
    q.close();
    c.close();
    const [d] = await dir.list(sel(loop1));
    expect(a.fleetClaim).to.equal(`host-1/${d!.id}`);
    expect((await readClaim(conn, keys, 'host-1', d!.id))?.claimant).to.equal('bridge');
    const killedAt = Date.now();
    child.kill('SIGKILL');
    await until('claim gone with the lease', async () => !(await readClaim(conn, keys, 'host-1', d!.id)), (TTL + 8) * 1000);
    expect(Date.now() - killedAt).to.be.greaterThan(TTL * 1000 - 1000);
    // The server's grace period is 60 s: the session ends because its claim vanished, not because the grace ran out.
    await until('server session ended', async () => (await dir.list(sel(loop1)))[0]?.session === null, 15_000);
    expect(Date.now() - killedAt).to.be.lessThan(40_000);
    // And another bridge takes it.
    const { a: again } = await attach(bridges[1]!, loop1, 'after-kill');
    expect(again.fleetClaim).to.equal(`host-1/${d!.id}`);
    await bridges[1]!.client.detach('vm1', 'after-kill');
  });

  it('etcd down: the open attachment keeps running, new ones get UNAVAILABLE naming etcd; back: attach works again', async function () {
    this.timeout(90_000);
    const b = bridges[0]!;
    const { a, qemu } = await attach(b, loop1, 'steady');
    const [d] = await dir.list(sel(loop1));
    const claimant = await b.fleet.claimant();
    const oldLease = claimant.lease.leaseId!;
    await etcd.members[0]!.kill();
    const q = await coldPlugQemu(tmp, 'refused');
    const r = await status(b.client.attach({ vm: 'vm1', fleetSelect: 'serial=USBROAM-ACM-0001 host=host-0', coldPlugSocket: q.socketPath }));
    q.close();
    expect(r.code, r.details).to.equal('UNAVAILABLE');
    expect(r.details).to.match(/etcd/);
    // Longer than the TTL: the leases are lost on the client side.
    await until('the bridge to lose its lease on its side', () => claimant.lease.leaseId === undefined, (TTL + 10) * 1000);
    const [still] = await b.client.list('vm1');
    expect(still?.id).to.equal(a.id);
    expect(still?.state).to.equal(AttachmentState.ATTACHMENT_STATE_CONNECTED);
    expect(qemu.ended).to.equal(false);
    await etcd.members[0]!.restart();
    // The claim is taken back under the bridge's new lease; the session stays.
    const newLease = await until('a new lease', async () => (await b.fleet.claimant()).lease.leaseId, 30_000);
    await until('claim under the new lease', async () => (await readClaim(conn, keys, 'host-1', d!.id))?.lease === newLease, 30_000);
    await untilLeaseGone(conn.client, oldLease, (TTL + 10) * 1000);
    expect((await readClaim(conn, keys, 'host-1', d!.id))?.claimant).to.equal('bridge');
    expect((await b.client.list('vm1')).map((x) => x.id)).to.include(a.id);
    const { a: fresh } = await until('attach works again', () => attach(b, 'serial=USBROAM-ACM-0001 host=host-0', `fresh${Date.now()}`).catch(() => undefined), 30_000);
    expect(fresh.fleetClaim).to.match(/^host-0\//);
  });
});
