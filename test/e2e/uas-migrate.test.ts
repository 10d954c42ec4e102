// Live migration with the emulated UAS disk attached (bulk streams on qemu-xhci), with readers
// keeping commands in flight on their streams (the disk answers each command after 200 ms, so
// stream TDs are in flight at the switchover every time): the migration completes, the hand-off
// succeeds, the xHCI stream rewind skips nothing, every read during and after it returns the data
// written before, and dmesg shows no UAS abort or reset.
//
// What QEMU 7.2's xHCI gets wrong with streams across a migration, and the bridge mends at
// pre-switchover (src/client/bridge/handoff/xhci-streams.ts): post_load kicks a Running stream
// endpoint with stream 0 and aborts (assert in xhci_find_stream); the endpoint context's TR
// dequeue field, which post_load reads as the stream context array, holds the last kicked
// stream's dequeue pointer; a stream ring is restarted with cycle state 1 whatever its DCS bit;
// and stream TDs in flight are never fetched again.
import { expect } from 'chai';
import path from 'node:path';
import type { AttachmentInfo } from '../../src/client/bridge/bridge.js';
import { BridgeChild } from '../../src/devkit/migration-faults.js';
import { migrateWithHandOff, startVmGuest, type MigrationHost } from '../../src/devkit/migration-rig.js';
import type { Guest } from '../../src/devkit/guest/guest.js';
import { useMigrationSetup } from '../helpers/bridge-guest-fixture.js';
import { guestLines, until, untilAtLeast } from '../helpers/wait.js';

const BAD = /USB disconnect|reset (low|full|high|super|SuperSpeed)[^\n]*USB device|error -110|I\/O error|DID_NO_CONNECT|uas_eh/;

describe('e2e migration: the UAS disk (bulk streams) across live migration', function () {
  this.timeout(900_000);
  const m = useMigrationSetup({ name: 'uas-migrate', diskMiB: 16, extraServerArgs: () => ['--emulated-uas', path.join(m.dir, 'uas.img'), '--disk-latency-ms', '200'] });
  let childA: BridgeChild | undefined;
  let childB: BridgeChild | undefined;
  let hostA: MigrationHost;
  let hostB: MigrationHost;
  let src: Guest;
  let att: AttachmentInfo;

  before(async function () {
    this.timeout(120_000);
    if (!m.image.modules.includes('uas')) throw new Error(`the guest image ${m.image.dir} has no uas module`);
    childA = new BridgeChild(path.join(m.dir, 'A'));
    childB = new BridgeChild(path.join(m.dir, 'B'));
    m.children.push(childA, childB);
    await Promise.all([childA.ready(), childB.ready()]);
    hostA = { name: 'A', bridge: childA.host() };
    hostB = { name: 'B', bridge: childB.host() };
  });

  it('binds uas on the source and migrates with stream commands in flight; every read is byte-exact', async () => {
    const { guest, bridgeQmp } = await startVmGuest({ image: m.image, dir: m.dir, name: 'vm0' });
    m.guests.push(guest);
    src = guest;
    await hostA.bridge.addVm({ name: 'vm0', qmpSocket: bridgeQmp });
    att = await childA!.host().attach({ vm: 'vm0', server: m.serverOpts, selector: { serial: 'USBROAM-UAS-0001' }, bus: 'xhci.0' });
    await guest.waitForPath('/sys/block/sda', { timeoutMs: 120_000 });
    await guest.waitForPath('/dev/sda');
    expect(await guest.sh('ls /sys/bus/usb/drivers/uas/')).to.match(/\d+-[\d.]+:1\.0/);
    await guest.sh('dd if=/dev/urandom of=/tmp/x bs=1M count=4 2>/dev/null; dd if=/tmp/x of=/dev/sda bs=1M oflag=direct conv=fsync 2>/dev/null; sha256sum /tmp/x | cut -d" " -f1 > /tmp/x.sha');
    // Readers keep several commands (streams) in flight: 4 parallel 1 MiB O_DIRECT reads in a loop.
    await guest.sh(
      `rm -f /tmp/stop /tmp/rlog /tmp/rdone; for j in 0 1 2 3; do (while [ ! -e /tmp/stop ]; do s=$(dd if=/dev/sda bs=1M skip=$j count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1); echo "$j $s" >> /tmp/rlog; done; echo $j >> /tmp/rdone) > /dev/null 2>&1 & done`,
    );
    await until('reads on the source', async () => Number(await guest.sh('cat /tmp/rlog 2>/dev/null | wc -l')) > 8 || undefined, 60_000, 500);
    const r = await migrateWithHandOff({ image: m.image, dir: m.dir, src, srcVm: 'vm0', srcHost: hostA, dstHost: hostB, dstVm: 'vm1', attachment: att, server: m.serverOpts });
    m.guests.push(r.dst);
    expect(r.status).to.equal('completed');
    expect(r.handOff?.ok, r.handOff?.error).to.equal(true);
    const xr = r.handOff!.xhciRewind;
    expect(xr?.skipped, 'stream endpoints the rewind skipped').to.deep.equal([]);
    expect(xr?.patched, 'stream contexts rewritten').to.be.greaterThan(0);
    const g = r.dst;
    const n0 = Number(await g.sh('wc -l < /tmp/rlog', { timeoutMs: 60_000 }));
    await until('reads on the destination', async () => Number(await g.sh('wc -l < /tmp/rlog')) > n0 + 8 || undefined, 120_000, 500);
    await g.sh('touch /tmp/stop');
    await untilAtLeast('the 4 readers to stop', () => guestLines(g, '/tmp/rdone'), 4, 60_000);
    const want = new Map<string, string>();
    for (let j = 0; j < 4; j++) want.set(String(j), (await g.sh(`dd if=/tmp/x bs=1M skip=${j} count=1 2>/dev/null | sha256sum | cut -d' ' -f1`)).trim());
    const lines = (await g.sh('cat /tmp/rlog', { timeoutMs: 60_000 })).trim().split('\n');
    const bad = lines.filter((l) => want.get(l.split(' ')[0]!) !== l.split(' ')[1]);
    console.log(`      ${lines.length} reads across the migration (downtime ${r.downtimeMs} ms, in flight ${r.handOff!.info!.inFlight}); ${bad.length} differed`);
    expect(bad).to.deep.equal([]);
    expect((await g.dmesg()).split('\n').filter((l) => BAD.test(l))).to.deep.equal([]);
  });
});
