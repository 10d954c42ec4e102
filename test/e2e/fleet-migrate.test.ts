// The fleet claim across a real QEMU live migration: a `usbroam serve --etcd` process with a
// disk, bridge A (identity "bridge") attaching it by fleet selector through its control API,
// bridge B (identity "viewer") as the destination, a third claimant trying to take the disk
// the whole time. At the hand-off the claim moves from A's lease to B's in one transaction:
// the claim key is never absent, every attempt of the third claimant is refused, the claim
// ends under B's lease with B's identity, moves back with the migration back, and a cancelled
// migration leaves it exactly where it was. The guest's checksummed writes stay byte-exact.
import { expect } from 'chai';
import path from 'node:path';
import type { IKeyValue } from 'etcd3';
import { Bridge, type AttachmentInfo, type PrepareIncomingRequest } from '../../src/client/bridge/bridge.js';
import { BridgeControlServer } from '../../src/client/bridge-control/server.js';
import { AttachDeviceRequest } from '../../src/gen/usbroam/v1/bridge.js';
import { testLog } from '../../src/devkit/bridge-guest.js';
import { clientTls } from '../../src/devkit/certs.js';
import { startEtcd, type EtcdCluster } from '../../src/devkit/etcd.js';
import { until } from '../../src/devkit/fleet-fakes.js';
import type { Guest } from '../../src/devkit/guest/guest.js';
import { migrateWithHandOff, startVmGuest, type MigrationHost } from '../../src/devkit/migration-rig.js';
import { BridgeFleet } from '../../src/fleet/bridge-fleet.js';
import { FleetClaimant, readClaim } from '../../src/fleet/claims.js';
import { FleetDirectory } from '../../src/fleet/directory.js';
import { connectEtcd, type EtcdConnection } from '../../src/fleet/etcd.js';
import { FleetError, Status } from '../../src/fleet/errors.js';
import { decodeRecord, FleetKeys, type ClaimRecord } from '../../src/fleet/keys.js';
import { parseFleetSelector as sel } from '../../src/fleet/selector.js';
import { useMigrationSetup } from '../helpers/bridge-guest-fixture.js';
import { guestLines, sleep, untilAtLeast, untilGrows } from '../helpers/wait.js';

const BAD = /USB disconnect|reset (low|full|high|super|SuperSpeed)[^\n]*USB device|error -110|I\/O error|DID_NO_CONNECT/;
const SERIAL = 'USBROAM-MSC-0001';
const HOST = 'lab-1';

// 64 KiB blocks tagged with a sequence number, written with O_DIRECT+fsync; each block's sha to /tmp/wlog.
const WRITER = `
i=0
while [ ! -e /tmp/stop ]; do
  { printf 'BLOCK %08d ' $i; head -c 65521 /dev/urandom; } > /tmp/blk
  s=$(sha256sum /tmp/blk | cut -d' ' -f1)
  dd if=/tmp/blk of=/dev/sda bs=65536 seek=$((i + 64)) oflag=direct conv=fsync 2>/dev/null || echo "ERR $i" >> /tmp/wlog
  echo "$i $s" >> /tmp/wlog
  i=$(( (i + 1) % 256 ))
done
echo DONE >> /tmp/wlog
`;

/** Blocks the guest writes before the first migration and on each destination before the next. */
const WRITTEN_BETWEEN = 8;

/** A third claimant asking for the disk again and again: every outcome, until stopped. */
function intruder(c: FleetClaimant): { stop(): Promise<{ refused: number; codes: string[]; won: number }> } {
  let stopped = false;
  const out = { refused: 0, codes: [] as string[], won: 0 };
  const loop = (async () => {
    while (!stopped) {
      try {
        const got = await c.claim(sel(`serial=${SERIAL}`));
        out.won++;
        await c.release(got);
      } catch (err) {
        const e = err as FleetError;
        if (e instanceof FleetError && e.code === Status.ALREADY_EXISTS && /claimed by (bridge|viewer)/.test(e.message)) out.refused++;
        else out.codes.push(`${Status[e.code] ?? '?'}: ${e.message}`);
      }
      await sleep(20); // pacing of the intruder's attempts, not a wait
    }
  })();
  return {
    stop: async () => {
      stopped = true;
      await loop;
      return out;
    },
  };
}

describe('e2e fleet: the claim moves with the VM across live migration', function () {
  this.timeout(900_000);
  let etcd: EtcdCluster;
  let conn: EtcdConnection;
  const keys = new FleetKeys();
  const fleets: BridgeFleet[] = [];
  const bridges: Bridge[] = [];
  let control: BridgeControlServer | undefined;
  let third: FleetClaimant | undefined;
  let claimKey = '';
  const history: { kind: 'put' | 'delete'; record?: ClaimRecord }[] = [];

  before(async function () {
    this.timeout(60_000);
    etcd = await startEtcd(1);
  });
  const m = useMigrationSetup({
    name: 'fleet-migrate',
    diskMiB: 32,
    extraServerArgs: () => ['--allow', 'viewer=*', '--etcd', etcd.endpoints.join(','), '--host-name', HOST, '--lease-ttl', '3'],
    beforeTeardown: async () => {
      await control?.stop('test over').catch(() => {});
      for (const b of bridges) await b.close().catch(() => {});
      for (const f of fleets) await f.close();
      await third?.close();
    },
  });
  after(async () => {
    conn?.close();
    await etcd?.stop();
  });

  let hostA: MigrationHost;
  let hostB: MigrationHost;
  let cur: Guest;
  let curHost: MigrationHost;
  let att: AttachmentInfo;
  let vmSeq = 0;

  function host(name: string, identity: string): { host: MigrationHost; bridge: Bridge; fleet: BridgeFleet } {
    const tls = clientTls(identity);
    const fleet = new BridgeFleet({ etcd: etcd.endpoints, identity, leaseTtlS: 3, log: testLog });
    const bridge = new Bridge({ log: testLog, runDir: path.join(m.dir, name), incomingClaims: fleet });
    fleets.push(fleet);
    bridges.push(bridge);
    return {
      fleet,
      bridge,
      host: {
        name,
        bridge: {
          addVm: (spec) => bridge.addVm(spec),
          // Each bridge reaches the server with its own certificate (its fleet identity).
          prepareIncoming: (req: PrepareIncomingRequest) => bridge.prepareIncoming({ ...req, server: { ...req.server, ...tls } }),
          on: (ev, fn) => bridge.on(ev, fn),
          off: (ev, fn) => bridge.off(ev, fn),
        },
      },
    };
  }

  before(async function () {
    this.timeout(60_000);
    conn = await connectEtcd(etcd.endpoints);
    await until('the server registered its disk', async () => (await new FleetDirectory(conn, keys).list(sel(`serial=${SERIAL}`))).length === 1, 30_000);
    const a = host('A', 'bridge');
    const b = host('B', 'viewer');
    hostA = a.host;
    hostB = b.host;
    control = new BridgeControlServer({ bridge: a.bridge, listen: path.join(m.dir, 'A-control.sock'), servers: clientTls('bridge'), fleet: a.fleet, log: testLog });
    await control.start();
    third = await FleetClaimant.create(conn, { claimant: 'intruder', leaseTtlS: 3 });
    await Promise.all([a.fleet.claimant(), b.fleet.claimant()]);
  });

  /** Each bridge's lease, by identity. */
  const leases: Record<string, string> = {};

  async function migrate(opts: { cancelAfterMs?: number } = {}) {
    const dstHost = curHost === hostA ? hostB : hostA;
    const dstVm = `vm${++vmSeq}`;
    const r = await migrateWithHandOff({
      image: m.image,
      dir: m.dir,
      src: cur,
      srcVm: `vm${vmSeq - 1}`,
      srcHost: curHost,
      dstHost,
      dstVm,
      attachment: att,
      server: { address: att.server, ...clientTls('bridge') },
      cancelAfterMs: opts.cancelAfterMs,
    });
    m.guests.push(r.dst);
    if (r.status === 'completed') {
      const old = cur;
      cur = r.dst;
      curHost = dstHost;
      att = r.attached!;
      void old.stop();
    } else {
      vmSeq--;
      void r.dst.stop();
    }
    return r;
  }

  it('attaches the disk by fleet selector through the control API; the claim is under bridge A\'s lease', async () => {
    for (const f of fleets) leases[f.identity] = (await f.claimant()).lease.leaseId!;
    const { guest, bridgeQmp } = await startVmGuest({ image: m.image, dir: m.dir, name: 'vm0' });
    m.guests.push(guest);
    cur = guest;
    curHost = hostA;
    control!.addVm('vm0', bridgeQmp);
    const res = await control!.attachDevice(AttachDeviceRequest.fromPartial({ vm: 'vm0', fleetSelect: `serial=${SERIAL}`, bus: 'xhci.0' }));
    const pb = res.attachment!;
    att = bridges[0]!.list('vm0').find((x) => x.id === pb.id)!;
    expect(pb.fleetClaim).to.match(new RegExp(`^${HOST}/`));
    claimKey = keys.claim(HOST, pb.device!.id);
    const rec = await readClaim(conn, keys, HOST, pb.device!.id);
    expect(rec?.claimant).to.equal('bridge');
    expect(rec?.lease).to.equal(leases.bridge);
    const w = await conn.client.watch().key(claimKey).withPreviousKV().create();
    w.on('put', (kv: IKeyValue) => history.push({ kind: 'put', record: decodeRecord<ClaimRecord>(claimKey, kv.value) }));
    w.on('delete', () => history.push({ kind: 'delete' }));
    await guest.waitForPath('/sys/block/sda', { timeoutMs: 120_000 });
    await guest.waitForPath('/dev/sda');
    await guest.sh('dd if=/dev/urandom of=/tmp/x bs=1M count=4 2>/dev/null; dd if=/tmp/x of=/dev/sda bs=1M oflag=direct conv=fsync 2>/dev/null; sha256sum /tmp/x > /tmp/x.sha');
  });

  it('migrates A -> B and back under guest I/O with a third claimant trying all along: the claim moves each time, never free', async () => {
    await cur.sh(`cat > /tmp/w.sh <<'EOS'\n${WRITER}\nEOS\nrm -f /tmp/stop /tmp/wlog; (sh /tmp/w.sh > /dev/null 2>&1 &)`);
    await untilAtLeast('blocks written before the first migration', () => guestLines(cur, '/tmp/wlog'), WRITTEN_BETWEEN, 120_000);
    const t = intruder(third!);
    const expectHolder: string[] = [];
    for (const [to, identity] of [
      [hostB, 'viewer'],
      [hostA, 'bridge'],
    ] as const) {
      const r = await migrate();
      expect(r.status).to.equal('completed');
      expect(curHost).to.equal(to);
      expect(r.handOff?.ok, r.handOff?.error).to.equal(true);
      const rec = await until(`claim held by ${identity}`, async () => {
        const c = await readClaim(conn, keys, HOST, att.deviceId);
        return c?.claimant === identity ? c : undefined;
      }, 20_000);
      expect(rec.lease).to.equal(leases[identity]);
      // The destination bridge knows it holds the claim (it gives it up on detach, moves it on the next migration).
      await until('the destination adopted the claim', () => (curHost === hostA ? bridges[0]! : bridges[1]!).list().some((x) => x.fleetClaim === `${HOST}/${att.deviceId}`), 20_000);
      expectHolder.push(identity);
      const on = cur;
      await untilGrows(`blocks written on ${identity}'s host`, () => guestLines(on, '/tmp/wlog'), WRITTEN_BETWEEN, 120_000);
    }
    const outcome = await t.stop();
    console.log(`      third claimant: ${outcome.refused} attempts refused with ALREADY_EXISTS, ${outcome.won} won, other errors: ${outcome.codes.length}`);
    expect(outcome.won, 'the third claimant never got the disk').to.equal(0);
    expect(outcome.codes).to.deep.equal([]);
    expect(outcome.refused).to.be.greaterThan(5);
    expect(history.filter((h) => h.kind === 'delete'), 'the claim key was never absent').to.deep.equal([]);
    expect(history.map((h) => h.record?.claimant)).to.deep.equal(expectHolder);

    const g = cur;
    await g.sh('touch /tmp/stop');
    await until('writer stopped', async () => /DONE\s*$/.test(await g.sh('tail -n1 /tmp/wlog')), 60_000);
    const wlog = (await g.sh('grep -v DONE /tmp/wlog | tail -n 256', { timeoutMs: 60_000 })).trim().split('\n');
    expect(wlog.filter((l) => l.startsWith('ERR'))).to.deep.equal([]);
    const latest = new Map<number, string>();
    for (const l of wlog) {
      const [i, s] = l.split(' ');
      latest.set(Number(i), s!);
    }
    const sums = await g.sh(`for i in ${[...latest.keys()].join(' ')}; do echo "$i $(dd if=/dev/sda bs=65536 skip=$((i + 64)) count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"; done`, { timeoutMs: 300_000 });
    const bad = sums.trim().split('\n').filter((l) => latest.get(Number(l.split(' ')[0])) !== l.split(' ')[1]);
    console.log(`      ${latest.size} blocks verified after the migrations, ${bad.length} bad`);
    expect(bad).to.deep.equal([]);
    const out = await g.sh('dd if=/dev/sda of=/tmp/y bs=1M count=4 iflag=direct 2>/dev/null; sha256sum /tmp/y | cut -d" " -f1; cut -d" " -f1 /tmp/x.sha', { timeoutMs: 120_000 });
    const [got, want] = out.trim().split('\n');
    expect(got).to.equal(want);
    expect((await g.dmesg()).split('\n').filter((l) => BAD.test(l))).to.deep.equal([]);
  });

  it('a cancelled migration leaves the claim exactly where it was (same holder, token and lease), and the offer withdrawn', async () => {
    const before = await readClaim(conn, keys, HOST, att.deviceId);
    const n = history.length;
    const r = await migrate({ cancelAfterMs: 100 });
    expect(r.status).to.equal('cancelled');
    expect(await readClaim(conn, keys, HOST, att.deviceId)).to.deep.equal(before);
    expect(history.length, 'no write to the claim key').to.equal(n);
    await until('the destination withdrew its offer', async () => (await conn.client.getAll().prefix(keys.offers).keys()).length === 0, 20_000);
    const out = await cur.sh('dd if=/dev/sda of=/tmp/y bs=1M count=4 iflag=direct 2>/dev/null; sha256sum /tmp/y | cut -d" " -f1; cut -d" " -f1 /tmp/x.sha', { timeoutMs: 120_000 });
    const [got, want] = out.trim().split('\n');
    expect(got).to.equal(want);
  });

  it('detach on the bridge that holds it now frees the claim', async () => {
    await bridges[0]!.detach(`vm${vmSeq}`, att.id);
    await until('claim released', async () => !(await readClaim(conn, keys, HOST, att.deviceId)), 20_000);
  });
});
