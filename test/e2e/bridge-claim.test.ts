// End to end: while a real QEMU guest does I/O on the emulated disk attached through the Bridge,
// a second client (another identity the ACL allows) tries to open the same device. It is refused
// with FAILED_PRECONDITION naming the holder; the guest's I/O carries on and completes with the
// right checksums; its kernel log shows nothing bad; the bridge's session is the same one.
import { expect } from 'chai';
import { ClientError, Status } from 'nice-grpc';
import { UsbHostClient } from '../../src/client/sdk/client.js';
import { clientTls } from '../../src/devkit/certs.js';
import { MiB, badKernelLines, sha256OfFileRange, dmesgLines, guestSha256, waitForDisk } from '../../src/devkit/bridge-guest.js';
import { useBridgeGuest } from '../helpers/bridge-guest-fixture.js';
import { until } from '../helpers/wait.js';

async function refusal(p: Promise<{ close(): Promise<unknown> }>): Promise<{ code: number | undefined; message: string }> {
  try {
    const dev = await p;
    await dev.close();
  } catch (err) {
    if (err instanceof ClientError) return { code: err.code, message: err.details };
    const e = err as { code?: number; message?: string };
    return { code: e.code, message: e.message ?? String(err) };
  }
  throw new Error('the second client was given the device');
}

describe('e2e bridge: a second client cannot claim a device the guest is using', function () {
  this.timeout(600_000);
  const rig = useBridgeGuest({
    name: 'bridge-claim',
    inProcessServer: { acl: { bridge: '*', viewer: '*' } },
    beforeTeardown: async (r) => {
      await r.guest.run('kill $(cat /tmp/io.pid 2>/dev/null) 2>/dev/null; true', { timeoutMs: 5000 });
    },
  });
  let viewer: UsbHostClient | undefined;

  before(() => {
    viewer = new UsbHostClient({ address: rig.serverOpts.address, ...clientTls('viewer') });
  });

  after(() => viewer?.close());

  it('refuses the second claim with FAILED_PRECONDITION naming the holder; the guest I/O is untouched', async () => {
    const g = rig.guest;
    const info = await rig.bridge.attach({ vm: 'vm1', server: rig.serverOpts, selector: { serial: 'USBROAM-MSC-0001' }, bus: rig.bus });
    await waitForDisk(g);
    const before = (await dmesgLines(g)).length;
    const rounds = 6;
    await g.sh('dd if=/dev/urandom of=/tmp/x bs=1M count=8 2>/dev/null');
    const want = await guestSha256(g, 'cat /tmp/x');
    // The I/O loop, in the background: write 8 MiB (O_DIRECT, fsync), read it back (O_DIRECT), checksum.
    await g.sh(
      `rm -f /tmp/sums /tmp/io-done; ( i=0; while [ $i -lt ${rounds} ]; do ` +
        `dd if=/tmp/x of=/dev/sda bs=1M seek=$((i % 2 * 8)) oflag=direct conv=fsync 2>/dev/null || echo "write-failed $i" >> /tmp/sums; ` +
        `dd if=/dev/sda of=/tmp/y bs=1M skip=$((i % 2 * 8)) count=8 iflag=direct 2>/dev/null || echo "read-failed $i" >> /tmp/sums; ` +
        `sha256sum /tmp/y >> /tmp/sums; i=$((i+1)); done; echo done > /tmp/io-done ) >/dev/null 2>&1 & echo $! > /tmp/io.pid`,
    );
    const dev = rig.srv!.backend.get('emu-1-1')!;
    const tries: Array<{ code: number | undefined; message: string }> = [];
    for (let k = 0; k < 3; k++) {
      const executed = dev.stats.executed;
      await until('guest I/O in progress', () => dev.stats.executed > executed + 10, 60_000, 20);
      tries.push(await refusal(viewer!.openDevice({ serial: 'USBROAM-MSC-0001' })));
      tries.push(await refusal(viewer!.openDevice({ id: 'emu-1-1' })));
    }
    for (const t of tries) {
      expect(t.code, t.message).to.equal(Status.FAILED_PRECONDITION);
      expect(t.message).to.contain(`claimed by bridge (session ${info.sessionId})`);
    }
    const listed = (await viewer!.listDevices()).find((d) => d.id === 'emu-1-1')!;
    expect(listed.claim).to.deep.include({ claimed: true, identity: 'bridge', sessionId: info.sessionId });

    await until('the guest I/O loop to finish', async () => (await g.run('test -e /tmp/io-done')).exitCode === 0, 300_000, 500);
    const sums = (await g.sh('cat /tmp/sums')).trim().split('\n');
    expect(sums).to.have.length(rounds);
    for (const line of sums) expect(line.split(/\s+/)[0], sums.join('\n')).to.equal(want);
    // And the server's image holds the data at both offsets.
    expect(sha256OfFileRange(rig.srv!.imagePath, 0, 8 * MiB)).to.equal(want);
    expect(sha256OfFileRange(rig.srv!.imagePath, 8 * MiB, 8 * MiB)).to.equal(want);
    const after = (await dmesgLines(g)).slice(before);
    const bad = badKernelLines(after);
    expect(bad, after.join('\n')).to.deep.equal([]);
    expect(after.filter((l) => /USB disconnect|new (high|super|full)-speed USB device/.test(l)), after.join('\n')).to.deep.equal([]);
    const [a] = rig.bridge.list();
    expect(a).to.deep.include({ state: 'connected', sessionId: info.sessionId });
    console.log(`      ${tries.length} refusals during ${rounds} rounds of 8 MiB write+read; first: ${tries[0]!.message}`);
  });
});
