// A migration's claim move on a real etcd, driven through BridgeFleet as the
// bridges drive it: the destination moves the claim itself when the source dies
// (kill -9) after the hand-off, source and destination racing to move it move it
// once, a third claimant trying throughout never wins and the claim key is never
// absent, and a claim taken over this way is taken back under the destination's
// new lease after etcd was away longer than the TTL.
import { expect } from 'chai';
import type { IKeyValue, Watcher } from 'etcd3';
import { BridgeFleet } from '../../src/fleet/bridge-fleet.js';
import { FleetClaimant } from '../../src/fleet/claims.js';
import { FleetDirectory } from '../../src/fleet/directory.js';
import { connectEtcd, type EtcdConnection } from '../../src/fleet/etcd.js';
import { FleetError, Status } from '../../src/fleet/errors.js';
import { decodeRecord, FleetKeys, type ClaimRecord } from '../../src/fleet/keys.js';
import { FleetPublisher } from '../../src/fleet/publisher.js';
import { parseFleetSelector as sel } from '../../src/fleet/selector.js';
import { startEtcd, type EtcdCluster } from '../../src/devkit/etcd.js';
import { FakeDeviceSource, fakeDevice, startClaimantProcess, until } from '../../src/devkit/fleet-fakes.js';
import type { HeldClaim } from '../../src/client/bridge/held-claim.js';
import { sleep, untilLeaseGone } from '../helpers/wait.js';

const TTL = 2;

describe('fleet claim across a migration hand-off (BridgeFleet on etcd)', function () {
  this.timeout(90_000);
  let etcd: EtcdCluster;
  let conn: EtcdConnection;
  const keys = new FleetKeys('/usbroam-handoff/');
  const cleanup: (() => Promise<unknown> | unknown)[] = [];

  before(async () => {
    etcd = await startEtcd(1);
    conn = await connectEtcd(etcd.endpoints);
  });
  after(async () => {
    conn?.close();
    await etcd?.stop();
  });
  afterEach(async () => {
    for (const c of cleanup.splice(0).reverse()) await Promise.resolve(c()).catch(() => {});
  });

  /** A host with one device whose server-side session `s-<id>` is open for `identity` (the source bridge). */
  async function host(name: string, id: string) {
    const src = new FakeDeviceSource([fakeDevice(id)]);
    const p = new FleetPublisher(conn, src, { host: name, address: '127.0.0.1:7999', leaseTtlS: TTL, keys });
    cleanup.push(() => p.stop());
    p.start();
    await until(`host ${name} registered`, async () => (await new FleetDirectory(conn, keys).list(sel(`host=${name}`))).length === 1);
    return src;
  }

  function bridgeFleet(identity: string): BridgeFleet {
    const f = new BridgeFleet({ etcd: etcd.endpoints, identity, leaseTtlS: TTL, prefix: keys.prefix });
    cleanup.push(() => f.close());
    return f;
  }

  async function readClaim(key: string): Promise<ClaimRecord | undefined> {
    const b = await conn.client.get(key).buffer();
    return b ? decodeRecord<ClaimRecord>(key, b) : undefined;
  }

  /** Every change of the claim key from now on, and a third claimant trying to take the device the whole time. */
  async function watchAndRace(key: string, selector: string) {
    const changes: { deleted: boolean; record?: ClaimRecord }[] = [];
    const w: Watcher = await conn.client.watch().key(key).create();
    w.on('put', (kv: IKeyValue) => changes.push({ deleted: false, record: decodeRecord<ClaimRecord>(key, kv.value) }));
    w.on('delete', () => changes.push({ deleted: true }));
    const third = await FleetClaimant.create(await connectEtcd(etcd.endpoints).then((e) => (cleanup.push(() => e.close()), e)), { claimant: 'third', leaseTtlS: TTL, keys });
    cleanup.push(() => third.close());
    const outcomes: string[] = [];
    let racing = true;
    const race = (async () => {
      while (racing) {
        try {
          const won = await third.claim(sel(selector));
          outcomes.push(`WON ${won.key}`);
        } catch (err) {
          outcomes.push(err instanceof FleetError ? Status[err.code] : (err as Error).message);
        }
        await sleep(20); // pacing of the third claimant's attempts, not a wait
      }
    })();
    return {
      changes,
      outcomes,
      async stop() {
        racing = false;
        await race;
        await w.cancel();
      },
    };
  }

  it('the source is killed -9 after the hand-off before moving the claim: the destination moves it; the third claimant never wins', async () => {
    const dev = await host('mig-a', 'a1');
    const key = keys.claim('mig-a', 'a1');
    const { child, claim } = await startClaimantProcess(etcd.endpoints, 'doomed-src', 'host=mig-a', TTL, keys.prefix);
    cleanup.push(() => child.kill('SIGKILL'));
    dev.claim('a1', 'doomed-src'); // the server's session s-a1 is the source's
    await until('session published', async () => (await new FleetDirectory(conn, keys).list(sel('host=mig-a')))[0]?.session?.sessionId === 's-a1');
    const race = await watchAndRace(key, 'host=mig-a');
    const dst = bridgeFleet('dst-bridge');
    const incoming = await dst.offer('s-a1');
    expect(incoming).to.not.equal(undefined);
    // The hand-off happened; the source dies before it moves the claim.
    child.kill('SIGKILL');
    await new Promise((r) => child.once('exit', r));
    const held: HeldClaim = incoming!.takenOver();
    const dstLease = (await dst.claimant()).lease.leaseId;
    const moved = await until('claim moved by the destination', async () => {
      const r = await readClaim(key);
      return r?.claimant === 'dst-bridge' ? r : undefined;
    });
    expect(moved.lease).to.equal(dstLease);
    expect(moved.lease).to.not.equal(claim.lease);
    expect(held.label).to.equal('mig-a/a1');
    expect(await conn.client.get(keys.offer('s-a1')).string()).to.equal(null, 'the offer went with the move');
    // Past the dead source's TTL: the claim stays the destination's.
    await untilLeaseGone(conn.client, claim.lease, (TTL + 10) * 1000);
    expect((await readClaim(key))?.claimant).to.equal('dst-bridge');
    await race.stop();
    expect(race.outcomes.length).to.be.greaterThan(20);
    expect(race.outcomes.filter((o) => o !== 'ALREADY_EXISTS'), 'every attempt of the third claimant').to.deep.equal([]);
    expect(race.changes.filter((c) => c.deleted), 'the claim key is never deleted').to.deep.equal([]);
    expect(race.changes.map((c) => c.record?.claimant)).to.deep.equal(['dst-bridge'], 'one move, nothing else');
    // The destination's attachment ends: it gives the claim up.
    await held.release();
    expect(await readClaim(key)).to.equal(undefined);
  });

  it('source and destination both move the claim at once: one transaction moves it, the other finds it done, nothing is deleted', async () => {
    for (let round = 0; round < 5; round++) {
      const dev = await host(`mig-b${round}`, 'b1');
      const key = keys.claim(`mig-b${round}`, 'b1');
      const src = bridgeFleet(`src-${round}`);
      const { held: srcHeld } = await src.claim(`host=mig-b${round}`);
      dev.claim('b1', `src-${round}`);
      await until('session published', async () => (await new FleetDirectory(conn, keys).list(sel(`host=mig-b${round}`)))[0]?.session?.sessionId === 's-b1');
      const race = await watchAndRace(key, `host=mig-b${round}`);
      const dst = bridgeFleet(`dst-${round}`);
      const incoming = await dst.offer('s-b1');
      // Source and destination at the same moment (the source first in odd rounds).
      const [held] = round % 2 ? [(await srcHeld.handedOff('s-b1'), incoming!.takenOver())] : [incoming!.takenOver(), await srcHeld.handedOff('s-b1')];
      await until('claim at the destination', async () => (await readClaim(key))?.claimant === `dst-${round}`);
      await until('destination holds it', () => held!.label === `mig-b${round}/b1`);
      await sleep(500); // proves the claim key does not change again (no delete, no second put) within 500 ms
      await race.stop();
      expect(race.outcomes.filter((o) => o !== 'ALREADY_EXISTS')).to.deep.equal([]);
      expect(race.changes.map((c) => (c.deleted ? 'deleted' : c.record?.claimant)), `round ${round}`).to.deep.equal([`dst-${round}`]);
      expect((await readClaim(key))?.lease).to.equal((await dst.claimant()).lease.leaseId);
      await held!.release();
      expect(await readClaim(key)).to.equal(undefined);
      for (const c of cleanup.splice(0).reverse()) await Promise.resolve(c()).catch(() => {});
    }
  });

  it('a claim taken over from a dead source is taken back under the destination\'s new lease after etcd was away', async () => {
    const dev = await host('mig-c', 'c1');
    const key = keys.claim('mig-c', 'c1');
    const { child } = await startClaimantProcess(etcd.endpoints, 'doomed-c', 'host=mig-c', TTL, keys.prefix);
    cleanup.push(() => child.kill('SIGKILL'));
    dev.claim('c1', 'doomed-c');
    await until('session published', async () => (await new FleetDirectory(conn, keys).list(sel('host=mig-c')))[0]?.session?.sessionId === 's-c1');
    const dst = bridgeFleet('dst-c');
    const incoming = await dst.offer('s-c1');
    child.kill('SIGKILL');
    const held = incoming!.takenOver();
    const taken = await until('claim moved by the destination', async () => {
      const r = await readClaim(key);
      return r?.claimant === 'dst-c' ? r : undefined;
    });
    const oldLease = (await dst.claimant()).lease.leaseId;
    expect(taken.lease).to.equal(oldLease);
    const dstClaimant = await dst.claimant();
    await etcd.members[0]!.kill();
    await until('the destination to lose its lease on its side', () => dstClaimant.lease.leaseId === undefined, (TTL + 10) * 1000);
    await etcd.members[0]!.restart();
    const newLease = await until('a new lease', async () => {
      const l = (await dst.claimant()).lease.leaseId;
      return l && l !== oldLease ? l : undefined;
    }, 30_000);
    const back = await until('claim under the new lease', async () => {
      const r = await readClaim(key).catch(() => undefined);
      return r?.lease === newLease ? r : undefined;
    }, 30_000);
    expect(back).to.include({ claimant: 'dst-c', token: taken.token });
    await untilLeaseGone(conn.client, oldLease!, (TTL + 10) * 1000);
    expect((await readClaim(key))?.lease).to.equal(newLease);
    // Still exclusive, and still released by the attachment's end.
    const third = bridgeFleet('third');
    const refused = await third.claim('host=mig-c').then(() => 'claimed', (err: FleetError) => Status[err.code]);
    expect(refused).to.equal('ALREADY_EXISTS');
    await held.release();
    expect(await readClaim(key)).to.equal(undefined);
  });
});
