// End to end: a USB host server (own process) with an emulated 64 MiB disk, a real QEMU guest,
// the Bridge attaching the disk through QMP hot-plug (usb-redir). The guest's own kernel
// enumerates it, writes 32 MiB with fsync, reads it back after dropping caches; the server's
// image file holds the same bytes. Over xHCI and EHCI. Detach is a clean unplug; re-attach works.
import { expect } from 'chai';
import { openSync, closeSync } from 'node:fs';
import path from 'node:path';
import { HOST_CONTROLLERS, MiB, sha256OfFileRange, timedDd, waitGoneInGuest } from '../../src/devkit/bridge-guest.js';
import { servedDevice, useBridgeGuest } from '../helpers/bridge-guest-fixture.js';

export const ddFigures: Record<string, { writeMBps: number; readMBps: number }> = {};

for (const hc of (['xhci', 'ehci'] as const).map((key) => ({ key, ...HOST_CONTROLLERS[key] }))) {
  describe(`e2e bridge: emulated mass storage into a QEMU guest over ${hc.name}`, function () {
    this.timeout(600_000);
    const rig = useBridgeGuest({ name: `bridge-${hc.name.toLowerCase()}`, hc: hc.key });
    let product = '';
    let attachmentId = '';

    before(async () => {
      product = (await servedDevice(rig, 'USBROAM-MSC-0001')).product;
    });

    it('attaches through QMP; the guest enumerates the disk with the served strings', async () => {
      const g = rig.guest;
      const t0 = Date.now();
      const info = await rig.bridge.attach({ vm: 'vm1', server: rig.serverOpts, selector: { serial: 'USBROAM-MSC-0001' }, bus: hc.bus });
      attachmentId = info.id;
      expect(info.id).to.equal(`usbroam-${info.deviceId}`);
      await g.waitForPath('/sys/block/sda', { timeoutMs: 120_000 });
      console.log(`      /sys/block/sda ${Date.now() - t0} ms after attach`);
      expect((await g.sh('cat /sys/block/sda/size')).trim()).to.equal(String((64 * MiB) / 512));
      const dmesg = await g.dmesg();
      expect(dmesg).to.include(`Product: ${product}`);
      expect(dmesg).to.include('SerialNumber: USBROAM-MSC-0001');
      expect(rig.bridge.list()).to.have.length(1);
      expect(rig.bridge.list()[0]!.state).to.equal('connected');
    });

    it('writes 32 MiB with fsync, reads it back after dropping caches; the server image matches', async () => {
      const g = rig.guest;
      if (!(await g.run('test -b /dev/sda')).exitCode) {
        /* ok */
      } else await g.waitForPath('/dev/sda');
      await g.sh('dd if=/dev/urandom of=/tmp/x bs=1M count=32 2>/dev/null');
      const want = (await g.sh('sha256sum /tmp/x')).split(/\s+/)[0]!;
      const writeMBps = await timedDd(g, 'dd if=/tmp/x of=/dev/sda bs=1M oflag=direct conv=fsync', 32 * MiB);
      await g.sh('sync; echo 3 > /proc/sys/vm/drop_caches');
      const readMBps = await timedDd(g, 'dd if=/dev/sda of=/tmp/y bs=1M count=32 iflag=direct', 32 * MiB);
      const got = (await g.sh('sha256sum /tmp/y')).split(/\s+/)[0]!;
      expect(got).to.equal(want);
      ddFigures[hc.name] = { writeMBps, readMBps };
      console.log(`      ${hc.name} through the bridge: write ${writeMBps.toFixed(1)} MB/s, read ${readMBps.toFixed(1)} MB/s`);
      // The server's image holds the same bytes at offset 0.
      expect(sha256OfFileRange(path.join(rig.dir, 'disk.img'), 0, 32 * MiB)).to.equal(want);
      await g.sh('rm -f /tmp/y');
      const errors = (await g.dmesg()).split('\n').filter((l) => /error -110|reset (high|super|full)[^\n]*USB device|DID_NO_CONNECT|USB disconnect/.test(l));
      expect(errors, errors.join('\n')).to.deep.equal([]);
    });

    it('for scale: the same dd against a QEMU-local usb-storage on the same controller', async function () {
      if (process.env.USBROAM_BRIDGE_BASELINE === '0') this.skip();
      const g = rig.guest;
      await rig.bridge.detach('vm1', attachmentId);
      await waitGoneInGuest(g, '/sys/block/sda', 60_000);
      const img = path.join(rig.dir, 'local.img');
      closeSync(openSync(img, 'w'));
      await import('node:fs').then((fs) => fs.truncateSync(img, 64 * MiB));
      await g.qmp.execute('blockdev-add', { driver: 'raw', 'node-name': 'local0', file: { driver: 'file', filename: img } });
      await g.qmp.execute('device_add', { driver: 'usb-storage', id: 'local', drive: 'local0', bus: hc.bus, serial: 'LOCAL0001' });
      await g.waitForPath('/sys/block/sda', { timeoutMs: 60_000 });
      await g.waitForPath('/dev/sda');
      const writeMBps = await timedDd(g, 'dd if=/tmp/x of=/dev/sda bs=1M oflag=direct conv=fsync', 32 * MiB);
      await g.sh('sync; echo 3 > /proc/sys/vm/drop_caches');
      const readMBps = await timedDd(g, 'dd if=/dev/sda of=/tmp/y bs=1M count=32 iflag=direct', 32 * MiB);
      await g.sh('rm -f /tmp/y');
      const b = ddFigures[hc.name]!;
      console.log(`      ${hc.name} QEMU-local usb-storage: write ${writeMBps.toFixed(1)} MB/s, read ${readMBps.toFixed(1)} MB/s; ` +
        `bridge/local: write ${(b.writeMBps / writeMBps).toFixed(2)}x, read ${(b.readMBps / readMBps).toFixed(2)}x`);
      const gone = g.qmp.waitForEvent('DEVICE_DELETED', (ev) => ev.data?.device === 'local', { timeoutMs: 30_000 });
      await g.qmp.execute('device_del', { id: 'local' });
      await gone;
      await g.qmp.execute('blockdev-del', { 'node-name': 'local0' });
      await waitGoneInGuest(g, '/sys/block/sda', 60_000);
      attachmentId = (await rig.bridge.attach({ vm: 'vm1', server: rig.serverOpts, selector: { serial: 'USBROAM-MSC-0001' }, bus: hc.bus })).id;
      await g.waitForPath('/sys/block/sda', { timeoutMs: 120_000 });
    });

    it('detach is a clean unplug in the guest; attaching again works', async () => {
      const g = rig.guest;
      const before = (await g.dmesg()).split('\n').length;
      await rig.bridge.detach('vm1', attachmentId);
      expect(rig.bridge.list()).to.deep.equal([]);
      await waitGoneInGuest(g, '/sys/block/sda', 60_000);
      const after = (await g.dmesg()).split('\n').slice(before - 1);
      expect(after.some((l) => /USB disconnect, device number/.test(l)), after.join('\n')).to.equal(true);
      // A surprise removal (like pulling the plug, or device_del of a QEMU-local usb-storage):
      // the sd driver's final SYNCHRONIZE CACHE fails with DID_NO_CONNECT; nothing else may.
      const bad = after.filter((l) => /error -110|DID_NO_CONNECT|reset .*USB device/.test(l) && !/Synchronize Cache/.test(l));
      expect(bad, bad.join('\n')).to.deep.equal([]);
      // The server released the claim: attach again.
      const info = await rig.bridge.attach({ vm: 'vm1', server: rig.serverOpts, selector: { serial: 'USBROAM-MSC-0001' }, bus: hc.bus });
      expect(info.id).to.equal(attachmentId);
      await g.waitForPath('/sys/block/sda', { timeoutMs: 120_000 });
      await g.waitForPath('/dev/sda');
      // The data written before is still there.
      const head = await g.sh('dd if=/dev/sda bs=1M count=1 iflag=direct 2>/dev/null | sha256sum');
      expect(head.split(/\s+/)[0]).to.equal(sha256OfFileRange(path.join(rig.dir, 'disk.img'), 0, MiB));
      await rig.bridge.detach('vm1', info.id);
    });
  });
}
