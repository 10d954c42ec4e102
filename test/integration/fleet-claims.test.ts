// The fleet on a real one-member etcd: registration, the directory and its
// watch, exclusive claims under racing claimants, claim moves, a claimant
// killed -9, and etcd going away and coming back.
import { expect } from 'chai';
import { FleetClaimant, moveClaim, type FleetClaim } from '../../src/fleet/claims.js';
import { FleetDirectory, type FleetEvent } from '../../src/fleet/directory.js';
import { connectEtcd, type EtcdConnection } from '../../src/fleet/etcd.js';
import { FleetError, Status } from '../../src/fleet/errors.js';
import { FleetKeys } from '../../src/fleet/keys.js';
import { FleetPublisher } from '../../src/fleet/publisher.js';
import { parseFleetSelector as sel } from '../../src/fleet/selector.js';
import { startEtcd, type EtcdCluster } from '../../src/devkit/etcd.js';
import { FakeDeviceSource, fakeDevice, startClaimantProcess, until } from '../../src/devkit/fleet-fakes.js';

const TTL = 2;

async function rejection(p: Promise<unknown>): Promise<FleetError> {
  try {
    await p;
  } catch (err) {
    return err as FleetError;
  }
  throw new Error('expected a rejection');
}

describe('fleet on etcd (one member)', function () {
  this.timeout(60_000);
  let etcd: EtcdCluster;
  let conn: EtcdConnection;
  const keys = new FleetKeys('/usbroam-test/');
  const opened: { close(): unknown }[] = [];
  const publishers: FleetPublisher[] = [];
  const claimants: FleetClaimant[] = [];

  before(async () => {
    etcd = await startEtcd(1);
    conn = await connectEtcd(etcd.endpoints);
  });
  after(async () => {
    for (const c of claimants) await c.close().catch(() => {});
    for (const p of publishers) await p.stop().catch(() => {});
    for (const c of opened) c.close();
    conn?.close();
    await etcd?.stop();
  });
  afterEach(async () => {
    for (const c of claimants.splice(0)) await c.close().catch(() => {});
    for (const p of publishers.splice(0)) await p.stop().catch(() => {});
  });

  async function publish(host: string, source: FakeDeviceSource, opts: Partial<ConstructorParameters<typeof FleetPublisher>[2]> = {}) {
    const p = new FleetPublisher(conn, source, { host, address: `127.0.0.1:${7000 + publishers.length}`, leaseTtlS: TTL, keys, ...opts });
    publishers.push(p);
    p.start();
    await until(`host ${host} registered`, async () => (await new FleetDirectory(conn, keys).list(sel(`host=${host}`))).length === source.list().length);
    return p;
  }

  async function claimant(name: string, ttl = TTL): Promise<FleetClaimant> {
    const c = await FleetClaimant.create(await connectEtcd(etcd.endpoints).then((e) => (opened.push(e), e)), { claimant: name, leaseTtlS: ttl, keys });
    claimants.push(c);
    return c;
  }

  it('publishes hosts and devices with labels, follows hotplug, and leaves at once on stop', async () => {
    const src = new FakeDeviceSource([fakeDevice('d1'), fakeDevice('d2', { vendorId: 0x1050, productId: 0x0407, serial: 'YK-1' })]);
    const p = await publish('alpha', src, { hostLabels: { rack: 'r1' }, deviceLabels: [{ select: sel('serial=YK-1'), labels: { role: 'hsm' } }] });
    const dir = new FleetDirectory(conn, keys);
    const hosts = await dir.hosts();
    expect(hosts.map((h) => [h.host, h.labels.rack])).to.deep.equal([['alpha', 'r1']]);
    expect((await dir.list(sel('1050:0407'))).map((d) => d.id)).to.deep.equal(['d2']);
    expect((await dir.list(sel('label role=hsm'))).map((d) => d.serial)).to.deep.equal(['YK-1']);
    expect((await dir.list(sel('rack=r1'))).length).to.equal(2, 'host labels reach its devices');
    expect(await dir.list(sel('host=beta'))).to.deep.equal([]);
    src.add(fakeDevice('d3', { serial: 'NEW' }));
    await until('hotplugged device listed', async () => (await dir.list(sel('serial=NEW'))).length === 1);
    src.remove('d1');
    await until('unplugged device gone', async () => (await dir.list(sel('host=alpha'))).every((d) => d.id !== 'd1'));
    src.claim('d2', 'someone');
    await until('server-side claim published', async () => (await dir.list(sel('serial=YK-1')))[0]?.session?.identity === 'someone');
    await p.stop();
    expect(await dir.list(sel('host=alpha'))).to.deep.equal([]);
    expect(await dir.hosts()).to.deep.equal([]);
  });

  it('watch gives a snapshot, then device and claim events, and ends on abort', async () => {
    const src = new FakeDeviceSource([fakeDevice('w1')]);
    await publish('watched', src);
    const dir = new FleetDirectory(conn, keys);
    const abort = new AbortController();
    const seen: FleetEvent[] = [];
    const done = (async () => {
      for await (const ev of dir.watch({ signal: abort.signal, selector: sel('host=watched') })) seen.push(ev);
    })();
    await until('snapshot', () => seen.some((e) => e.kind === 'snapshot-end'));
    expect(seen[0]).to.include({ kind: 'present' });
    src.add(fakeDevice('w2'));
    const c = await claimant('watcher-test');
    const claim = await c.claim(sel('host=watched id=w2'));
    await c.release(claim);
    src.remove('w2');
    await until('events', () => seen.some((e) => e.kind === 'removed'));
    expect(seen.map((e) => e.kind)).to.deep.equal(['present', 'snapshot-end', 'added', 'claimed', 'released', 'removed']);
    abort.abort();
    await done;
  });

  for (const n of [2, 8]) {
    it(`of ${n} racing claimants exactly one wins; the others get ALREADY_EXISTS naming it`, async () => {
      await publish(`race${n}`, new FakeDeviceSource([fakeDevice('only', { serial: `RACE-${n}` })]));
      const cs = await Promise.all(Array.from({ length: n }, (_, i) => claimant(`bridge-${i}`)));
      for (let round = 0; round < 5; round++) {
        const results = await Promise.allSettled(cs.map((c) => c.claim(sel(`serial=RACE-${n}`))));
        const won = results.filter((r): r is PromiseFulfilledResult<FleetClaim> => r.status === 'fulfilled');
        expect(won.length, `round ${round}`).to.equal(1);
        const winner = won[0].value.record.claimant;
        for (const r of results) {
          if (r.status === 'fulfilled') continue;
          const e = r.reason as FleetError;
          expect(e.code, e.message).to.equal(Status.ALREADY_EXISTS);
          expect(e.message).to.include(`claimed by ${winner}`);
        }
        const c = cs.find((x) => x.identity === winner)!;
        expect(await c.release(won[0].value)).to.equal(true);
      }
    });
  }

  it('a label selector spreads claimants over the matching devices; when all are taken, RESOURCE_EXHAUSTED', async () => {
    await publish('pool', new FakeDeviceSource([fakeDevice('p1'), fakeDevice('p2'), fakeDevice('p3')]), {
      deviceLabels: [{ select: sel('id=p1'), labels: { license: 'cad' } }, { select: sel('id=p2'), labels: { license: 'cad' } }],
    });
    const cs = await Promise.all([claimant('a'), claimant('b'), claimant('c')]);
    const results = await Promise.allSettled(cs.map((c) => c.claim(sel('label license=cad'))));
    const won = results.filter((r): r is PromiseFulfilledResult<FleetClaim> => r.status === 'fulfilled').map((r) => r.value.record.deviceId);
    expect(won.sort()).to.deep.equal(['p1', 'p2']);
    const lost = results.find((r) => r.status === 'rejected') as PromiseRejectedResult;
    expect((lost.reason as FleetError).code).to.equal(Status.RESOURCE_EXHAUSTED);
    expect((lost.reason as FleetError).message).to.match(/all 2 matching devices are claimed/);
    expect((await rejection(cs[0].claim(sel('label license=none')))).code).to.equal(Status.NOT_FOUND);
  });

  it('moves a claim to another lease in one guarded transaction; a stale holder or a missing lease cannot', async () => {
    await publish('mig', new FakeDeviceSource([fakeDevice('m1')]));
    const [src, dst, third] = await Promise.all([claimant('src-bridge'), claimant('dst-bridge'), claimant('third')]);
    const claim = await src.claim(sel('host=mig'));
    const moved = await src.handTo(claim, { claimant: dst.identity, leaseId: dst.lease.leaseId! });
    expect(moved).to.include({ claimant: 'dst-bridge', lease: dst.lease.leaseId });
    expect(moved.token).to.not.equal(claim.record.token);
    // The source's record is stale now: moving it again (e.g. to a third party) fails, naming the holder.
    const stale = await rejection(moveClaim(conn, claim.key, claim.record, { claimant: 'third', leaseId: third.lease.leaseId! }));
    expect(stale.code).to.equal(Status.FAILED_PRECONDITION);
    expect(stale.message).to.include('held by dst-bridge');
    // The source leaves: the claim lives on under the destination's lease.
    await src.close();
    const [d] = await new FleetDirectory(conn, keys).list(sel('host=mig'));
    expect(d.claim).to.include({ claimant: 'dst-bridge' });
    expect((await rejection(third.claim(sel('host=mig')))).code).to.equal(Status.ALREADY_EXISTS);
    const held = dst.adopt(claim.key, moved, d);
    const noLease = await rejection(moveClaim(conn, claim.key, moved, { claimant: 'third', leaseId: '123456789' }));
    expect(noLease.code).to.equal(Status.FAILED_PRECONDITION);
    expect(noLease.message).to.include('lease 123456789 does not exist');
    // Moving back (a cancelled migration after the switch) works the same way.
    const back = await dst.handTo(held, { claimant: third.identity, leaseId: third.lease.leaseId! });
    expect(back.claimant).to.equal('third');
  });

  it('moves a claim to a destination\'s offer: guarded by the holder\'s record and the offer; no offer or a withdrawn one moves nothing', async () => {
    await publish('offer', new FakeDeviceSource([fakeDevice('o1')]));
    const [src, dst] = await Promise.all([claimant('src-bridge'), claimant('dst-bridge')]);
    const claim = await src.claim(sel('host=offer'));
    // No offer for the session: refused, the claim stays.
    const none = await rejection(src.handToOffer(claim, 'sess-1'));
    expect(none.code).to.equal(Status.FAILED_PRECONDITION);
    expect(none.message).to.include('offered to hold no claim');
    // An offer withdrawn (cancelled migration) before the move: the same.
    const o1 = await dst.offer('sess-1');
    await dst.withdraw(o1);
    expect((await rejection(src.handToOffer(claim, 'sess-1'))).code).to.equal(Status.FAILED_PRECONDITION);
    expect((await new FleetDirectory(conn, keys).list(sel('host=offer')))[0].claim).to.deep.equal(claim.record);
    // A standing offer: one transaction puts the offered record under the destination's lease and deletes the offer.
    const o2 = await dst.offer('sess-2');
    expect(await dst.findOffered(o2.offer)).to.equal(undefined);
    const moved = await src.handToOffer(claim, 'sess-2');
    expect(moved).to.include({ claimant: 'dst-bridge', lease: dst.lease.leaseId, token: o2.offer.token });
    expect(await conn.client.get(o2.key).string()).to.equal(null);
    const found = await dst.findOffered(o2.offer);
    expect(found?.record).to.deep.equal(moved);
    // The source's record is stale now: it cannot move the claim again, even to a new offer.
    await dst.offer('sess-3');
    const stale = await rejection(src.handToOffer(claim, 'sess-3'));
    expect(stale.code).to.equal(Status.FAILED_PRECONDITION);
    expect(stale.message).to.include('held by dst-bridge');
    // The destination moves it on the same way, to the next destination's offer.
    const o4 = await src.offer('sess-4');
    expect(await dst.handToOffer(found!, 'sess-4')).to.include({ claimant: 'src-bridge', token: o4.offer.token });
  });

  it('a claimant killed -9 frees its device once its lease TTL runs out', async () => {
    await publish('killed', new FakeDeviceSource([fakeDevice('k1', { serial: 'KILL-1' })]));
    const { child, claim } = await startClaimantProcess(etcd.endpoints, 'doomed', 'serial=KILL-1', TTL, keys.prefix);
    const other = await claimant('survivor');
    expect((await rejection(other.claim(sel('serial=KILL-1')))).message).to.include('claimed by doomed');
    const killedAt = Date.now();
    child.kill('SIGKILL');
    const got = await until('device freed after TTL', () => other.claim(sel('serial=KILL-1')).catch(() => undefined), (TTL + 5) * 1000);
    expect(got.record.claimant).to.equal('survivor');
    expect(Date.now() - killedAt).to.be.greaterThan(TTL * 1000 - 1000, `lease ${claim.lease} outlived the kill by about its TTL`);
  });

  it('etcd down: clear UNAVAILABLE errors, no new claims; back: leases and registrations recover by themselves', async () => {
    const src = new FakeDeviceSource([fakeDevice('e1', { serial: 'OUTAGE' })]);
    await publish('outage', src);
    const c = await claimant('patient');
    const dir = new FleetDirectory(conn, keys);
    await etcd.members[0].kill();
    const down = await rejection(c.claim(sel('serial=OUTAGE')));
    expect(down.code, down.message).to.equal(Status.UNAVAILABLE);
    expect(down.message).to.match(/etcd/);
    expect((await rejection(dir.list())).code).to.equal(Status.UNAVAILABLE);
    // Away longer than the TTL: both leases are lost...
    await until('claimant lease lost', () => !c.lease.leaseId, (TTL * 2 + 5) * 1000);
    src.add(fakeDevice('e2', { serial: 'ADDED-WHILE-DOWN' }));
    await etcd.members[0].restart();
    // ...and granted anew; the publisher republishes everything, including what changed meanwhile.
    await until('registration back', async () => (await dir.list(sel('serial=ADDED-WHILE-DOWN'))).length === 1, 30_000);
    const claim = await until('claims work again', () => c.claim(sel('serial=OUTAGE')).catch(() => undefined), 30_000);
    expect(claim.record.claimant).to.equal('patient');
  });
});
