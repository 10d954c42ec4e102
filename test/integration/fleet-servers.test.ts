// Three `usbroam serve --etcd` processes with emulated devices on a real
// three-member etcd cluster: registration with host and device labels, a claim
// taken through etcd and honoured by the server at session open (token and
// identity checked), an etcd member killed (the leader), a server killed -9.
import { expect } from 'chai';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ChannelClosedError } from '../../src/client/sdk/remote-device.js';
import { UsbHostClient } from '../../src/client/sdk/client.js';
import { FleetClaimant, type FleetClaim } from '../../src/fleet/claims.js';
import { FleetDirectory } from '../../src/fleet/directory.js';
import { connectEtcd, type EtcdConnection } from '../../src/fleet/etcd.js';
import { Status } from '../../src/fleet/errors.js';
import { parseFleetSelector as sel } from '../../src/fleet/selector.js';
import { clientTls } from '../../src/devkit/certs.js';
import { startEtcd, type EtcdCluster } from '../../src/devkit/etcd.js';
import { until } from '../../src/devkit/fleet-fakes.js';
import { startServerProcess, type ServerProcess } from '../../src/devkit/server-process.js';

const TTL = 2;

async function refusal(p: Promise<unknown>): Promise<{ code: number; message: string }> {
  try {
    await p;
  } catch (err) {
    const e = err as ChannelClosedError & { code: number; details?: string };
    return { code: e.code, message: e.details ?? e.message };
  }
  throw new Error('expected a refusal');
}

/** The member that leads the cluster now (etcd's gRPC gateway: Maintenance.Status). */
async function leaderIndex(cluster: EtcdCluster): Promise<number> {
  const status = await Promise.all(
    cluster.members.map(async (m) => (await (await fetch(`${m.clientUrl}/v3/maintenance/status`, { method: 'POST', body: '{}' })).json()) as { header: { member_id: string }; leader: string }),
  );
  const i = status.findIndex((s) => s.header.member_id === s.leader);
  if (i < 0) throw new Error(`no leader in ${JSON.stringify(status)}`);
  return i;
}

describe('fleet: three servers on a three-member etcd cluster', function () {
  this.timeout(120_000);
  let etcd: EtcdCluster;
  let conn: EtcdConnection;
  let dir: FleetDirectory;
  const servers: ServerProcess[] = [];
  const clients: UsbHostClient[] = [];
  let tmp: string;

  before(async () => {
    etcd = await startEtcd(3);
    conn = await connectEtcd(etcd.endpoints);
    dir = new FleetDirectory(conn);
    tmp = mkdtempSync(path.join(os.tmpdir(), 'usbroam-fleet-'));
    for (let i = 0; i < 3; i++) {
      servers.push(
        await startServerProcess([
          '--allow', 'bridge=*', '--allow', 'viewer=*',
          '--disk-image', path.join(tmp, `disk-${i}.img`), '--disk-size-mib', '4',
          '--etcd', etcd.endpoints.join(','), '--host-name', `host-${i}`, '--lease-ttl', String(TTL),
          '--label', `rack=r${i}`, '--device-label', 'serial=USBROAM-ACM-0001 kind=serial',
        ]),
      );
    }
    await until('all three hosts registered', async () => (await dir.hosts()).length === 3 && (await dir.list()).length >= 9);
  });
  after(async () => {
    for (const c of clients) c.close();
    await Promise.all(servers.map((s) => s.stop('SIGKILL')));
    conn?.close();
    await etcd?.stop();
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  });

  function client(identity: string, address: string, claimToken?: string): UsbHostClient {
    const c = new UsbHostClient({ address, ...clientTls(identity), claimToken });
    clients.push(c);
    return c;
  }

  it('lists every host\'s devices with their labels and addresses, filterable by selector', async () => {
    const hosts = await dir.hosts();
    expect(hosts.map((h) => h.host).sort()).to.deep.equal(['host-0', 'host-1', 'host-2']);
    expect(hosts.map((h) => h.address).sort()).to.deep.equal(servers.map((s) => s.address).sort());
    const serials = await dir.list(sel('label kind=serial'));
    expect(serials.map((d) => d.host)).to.deep.equal(['host-0', 'host-1', 'host-2']);
    expect(serials.every((d) => d.serial === 'USBROAM-ACM-0001' && d.portPath === '1-3')).to.equal(true);
    expect((await dir.list(sel('rack=r1'))).every((d) => d.host === 'host-1')).to.equal(true);
  });

  it('usbroam devices --etcd --select lists the matching devices of every host', () => {
    const out = execFileSync(process.execPath, ['bin/usbroam.js', 'devices', '--etcd', etcd.endpoints.join(','), '--select', 'label kind=serial', '--json']);
    const list = JSON.parse(out.toString()) as { host: string; serial: string; address: string }[];
    expect(list.map((d) => `${d.host} ${d.serial}`)).to.deep.equal(['host-0 USBROAM-ACM-0001', 'host-1 USBROAM-ACM-0001', 'host-2 USBROAM-ACM-0001']);
    const bad = spawnSync(process.execPath, ['bin/usbroam.js', 'devices', '--etcd', etcd.endpoints[0], '--select', 'vid:pid'], { encoding: 'utf8' });
    expect(bad.status).to.equal(1);
    expect(bad.stderr).to.match(/vid:pid "vid:pid" is not of the form vvvv:pppp/);
  });

  it('the server opens a device for the fleet claim\'s holder with its token, and refuses everyone else', async () => {
    const bridge = await FleetClaimant.create(conn, { claimant: 'bridge', leaseTtlS: TTL });
    const claim: FleetClaim = await bridge.claim(sel('host=host-1 serial=USBROAM-ACM-0001'));
    const address = claim.device.address;
    const other = await refusal(client('viewer', address).openDevice({ id: claim.device.id }));
    expect(other.code, other.message).to.equal(Status.FAILED_PRECONDITION);
    expect(other.message).to.include('claimed in the fleet by bridge');
    const noToken = await refusal(client('bridge', address).openDevice({ id: claim.device.id }));
    expect(noToken.code, noToken.message).to.equal(Status.PERMISSION_DENIED);
    const wrongToken = await refusal(client('bridge', address, 'not-the-token').openDevice({ id: claim.device.id }));
    expect(wrongToken.code, wrongToken.message).to.equal(Status.PERMISSION_DENIED);
    const dev = await client('bridge', address, claim.record.token).openDevice({ id: claim.device.id });
    await until('server publishes its session', async () => (await dir.list(sel('host=host-1 serial=USBROAM-ACM-0001')))[0]?.session?.identity === 'bridge');
    await dev.close();
    // An unclaimed device opens as before.
    const free = await client('viewer', address).openDevice({ serial: 'USBROAM-LOOP-0001' });
    await free.close();
    await bridge.close();
  });

  it('moves the claim with a session hand-off (migration): the destination holds both, no third party got in', async () => {
    const [srcC, dstC, thirdC] = await Promise.all(
      ['bridge', 'viewer', 'third'].map((claimant) => FleetClaimant.create(conn, { claimant, leaseTtlS: TTL })),
    );
    const claim = await srcC.claim(sel('host=host-2 serial=USBROAM-LOOP-0001'));
    const src = await client('bridge', claim.device.address, claim.record.token).openDevice({ id: claim.device.id });
    await src.selectConfiguration(1);
    expect((await src.transferOut(1, Buffer.from('before'))).status).to.equal(0);
    const dst = await client('viewer', claim.device.address).standbySession(src.sessionId);
    // A third claimant keeps trying throughout: the claim key is never absent, so it never wins.
    let thirdWon = false;
    let racing = true;
    const third = (async () => {
      while (racing) await thirdC.claim(sel('host=host-2 serial=USBROAM-LOOP-0001')).then(() => (thirdWon = true), () => {});
    })();
    await src.handOff(Buffer.from('{}'));
    await dst.takeOver!;
    const moved = await srcC.handTo(claim, { claimant: dstC.identity, leaseId: dstC.lease.leaseId! });
    expect((await dst.transferOut(1, Buffer.from('after'))).status).to.equal(0);
    await srcC.close(); // the source bridge goes away; its lease with it
    const [d] = await until('directory shows the destination', async () => {
      const l = await dir.list(sel('host=host-2 serial=USBROAM-LOOP-0001'));
      return l[0]?.session?.identity === 'viewer' && l;
    });
    expect(d.claim).to.include({ claimant: 'viewer', lease: moved.lease });
    racing = false;
    await third;
    expect(thirdWon).to.equal(false);
    await dst.close();
    await Promise.all([dstC.close(), thirdC.close()]);
  });

  it('with the leader member killed, claims, races and the directory still work', async () => {
    const hostLeases = async () => (await conn.client.getAll().prefix(dir.keys.hosts).exec()).kvs.map((kv) => kv.lease).sort();
    const before = await hostLeases();
    const leader = await leaderIndex(etcd);
    await etcd.members[leader].kill();
    const cs = await Promise.all(Array.from({ length: 8 }, (_, i) => FleetClaimant.create(conn, { claimant: `racer-${i}`, leaseTtlS: TTL })));
    const results = await Promise.allSettled(cs.map((c) => c.claim(sel('host=host-2 serial=USBROAM-LOOP-0001'))));
    expect(results.filter((r) => r.status === 'fulfilled').length).to.equal(1);
    for (const r of results) if (r.status === 'rejected') expect(r.reason.code, r.reason.message).to.equal(Status.ALREADY_EXISTS);
    expect((await dir.list()).length).to.be.at.least(9, 'no registration was lost');
    expect(await hostLeases()).to.deep.equal(before, 'every server kept its lease: none had to register anew');
    for (const c of cs) await c.close();
    await etcd.members[leader].restart();
  });

  it('a server killed -9 leaves the directory when its lease runs out', async () => {
    await servers[0].stop('SIGKILL');
    await until('host-0 gone', async () => (await dir.list(sel('host=host-0'))).length === 0 && (await dir.hosts()).every((h) => h.host !== 'host-0'), (TTL + 8) * 1000);
    expect((await dir.hosts()).map((h) => h.host).sort()).to.deep.equal(['host-1', 'host-2']);
  });

  it('etcd entirely down: an open session keeps working, new claims and sessions are refused clearly, then all recovers', async () => {
    const c = await FleetClaimant.create(conn, { claimant: 'bridge', leaseTtlS: TTL });
    const claim = await c.claim(sel('host=host-1 serial=USBROAM-LOOP-0001'));
    const dev = await client('bridge', claim.device.address, claim.record.token).openDevice({ id: claim.device.id });
    await dev.selectConfiguration(1);
    await Promise.all(etcd.members.map((m) => m.kill()));
    expect((await dev.transferOut(1, Buffer.from('during the outage'))).status).to.equal(0);
    const noClaim = await refusal(c.claim(sel('host=host-1 serial=USBROAM-ACM-0001')));
    expect(noClaim.code, noClaim.message).to.equal(Status.UNAVAILABLE);
    const noSession = await refusal(client('viewer', claim.device.address).openDevice({ serial: 'USBROAM-ACM-0001' }));
    expect(noSession.code, noSession.message).to.equal(Status.UNAVAILABLE);
    expect(noSession.message).to.match(/cannot check its fleet claim/);
    // Every lease runs out meanwhile: the claimant's and host-1's (the server with the session) are lost on their side.
    await until('the claimant to lose its lease', () => c.lease.leaseId === undefined, (TTL + 10) * 1000);
    await until('host-1 to lose its lease', () => servers[1]!.logs.some((l) => l.includes('fleet lease of host host-1 lost')), (TTL + 10) * 1000);
    expect((await dev.transferOut(1, Buffer.from('still'))).status).to.equal(0);
    await Promise.all(etcd.members.map((m) => m.restart()));
    await until('servers registered again', async () => (await dir.hosts()).length === 2, 30_000);
    const again = await until('claims work again', () => c.claim(sel('host=host-1 serial=USBROAM-ACM-0001')).catch(() => undefined), 30_000);
    const dev2 = await client('bridge', again.device.address, again.record.token).openDevice({ id: again.device.id });
    await dev2.close();
    await dev.close();
    await c.close();
  });
});
