// End to end: QEMU started with the usb-redir device already on its command line (the
// `-chardev socket,...,server=on -device usb-redir,...` arguments Bridge.qemuArgs() gives, i.e.
// libvirt's <redirdev type='unix'>), the Bridge serving it (attach with coldPlugged). The guest
// sees the disk and writes/reads it (checksums both sides, the server's image too). Detach
// disconnects the device but leaves the usb-redir device in QEMU; serving it again works.
import { expect } from 'chai';
import path from 'node:path';
import type { Bridge } from '../../src/client/bridge/bridge.js';
import {
  MiB,
  badKernelLines,
  dmesgLines,
  guestSha256,
  sha256OfFileRange,
  timedDd,
  waitForDisk,
  waitGoneInGuest,
} from '../../src/devkit/bridge-guest.js';
import { servedDevice, useBridgeGuest } from '../helpers/bridge-guest-fixture.js';

describe('e2e bridge: a cold-plugged usb-redir device (QEMU command line / libvirt redirdev)', function () {
  this.timeout(600_000);
  let deviceId = '';
  let product = '';
  let plug: ReturnType<Bridge['qemuArgs']>;
  const rig = useBridgeGuest({
    name: 'bridge-coldplug',
    hc: 'xhci',
    // The usb-redir device goes on QEMU's command line, so the bridge's plan comes before the guest.
    beforeGuest: async (r) => {
      const msc = await servedDevice(r, 'USBROAM-MSC-0001');
      deviceId = msc.id;
      product = msc.product;
      plug = r.bridge.qemuArgs('vm1', deviceId, { bus: 'xhci.0' });
      expect(plug.args[0]).to.equal('-chardev');
      expect(plug.libvirtXml).to.include(`<source mode='bind' path='${plug.socketPath}'/>`);
      return plug.args;
    },
  });

  it('QEMU runs with the usb-redir device on its command line and no peer yet: no disk in the guest', async () => {
    const g = rig.guest;
    const peripherals = (await g.qmp.execute<Array<{ name: string }>>('qom-list', { path: '/machine/peripheral' })).map((p) => p.name);
    expect(peripherals).to.include(plug.id);
    expect((await g.run('test -e /sys/block/sda')).exitCode).to.not.equal(0);
  });

  it('the bridge serves it: the guest enumerates the disk with the served strings', async () => {
    const g = rig.guest;
    const t0 = Date.now();
    const info = await rig.bridge.attach({ vm: 'vm1', server: rig.serverOpts, selector: { serial: 'USBROAM-MSC-0001' }, bus: plug.bus, coldPlugged: { socketPath: plug.socketPath } });
    expect(info).to.deep.include({ id: plug.id, hotPlugged: false, socketPath: plug.socketPath });
    await waitForDisk(g);
    console.log(`      /dev/sda ${Date.now() - t0} ms after attach`);
    expect((await g.sh('cat /sys/block/sda/size')).trim()).to.equal(String((64 * MiB) / 512));
    const dmesg = await g.dmesg();
    expect(dmesg).to.include(`Product: ${product}`);
    expect(dmesg).to.include('SerialNumber: USBROAM-MSC-0001');
  });

  it('writes 16 MiB with fsync and reads it back; the server image matches', async () => {
    const g = rig.guest;
    await g.sh('dd if=/dev/urandom of=/tmp/x bs=1M count=16 2>/dev/null');
    const want = await guestSha256(g, 'cat /tmp/x');
    const w = await timedDd(g, 'dd if=/tmp/x of=/dev/sda bs=1M seek=4 oflag=direct conv=fsync', 16 * MiB);
    await g.sh('sync; echo 3 > /proc/sys/vm/drop_caches');
    const r = await timedDd(g, 'dd if=/dev/sda of=/tmp/y bs=1M skip=4 count=16 iflag=direct', 16 * MiB);
    expect(await guestSha256(g, 'cat /tmp/y')).to.equal(want);
    expect(sha256OfFileRange(path.join(rig.dir, 'disk.img'), 4 * MiB, 16 * MiB)).to.equal(want);
    console.log(`      cold-plugged: write ${w.toFixed(1)} MB/s, read ${r.toFixed(1)} MB/s`);
    const bad = badKernelLines(await dmesgLines(g));
    expect(bad, bad.join('\n')).to.deep.equal([]);
  });

  it('detach disconnects the device (the usb-redir device stays); serving it again works', async () => {
    const g = rig.guest;
    const before = (await dmesgLines(g)).length;
    await rig.bridge.detach('vm1', plug.id);
    expect(rig.bridge.list()).to.deep.equal([]);
    await waitGoneInGuest(g, '/sys/block/sda', 60_000);
    const after = (await dmesgLines(g)).slice(before);
    expect(after.some((l) => /USB disconnect, device number/.test(l)), after.join('\n')).to.equal(true);
    const bad = badKernelLines(after, { allowRemovalSync: true });
    expect(bad, after.join('\n')).to.deep.equal([]);
    const peripherals = (await g.qmp.execute<Array<{ name: string }>>('qom-list', { path: '/machine/peripheral' })).map((p) => p.name);
    expect(peripherals).to.include(plug.id);

    await rig.bridge.attach({ vm: 'vm1', server: rig.serverOpts, selector: { id: deviceId }, bus: plug.bus, coldPlugged: { socketPath: plug.socketPath } });
    await waitForDisk(g);
    const head = await guestSha256(g, 'dd if=/dev/sda bs=1M skip=4 count=16 iflag=direct 2>/dev/null');
    expect(head).to.equal(await guestSha256(g, 'cat /tmp/x'));
    await rig.bridge.detach('vm1', plug.id);
    await waitGoneInGuest(g, '/sys/block/sda', 60_000);
  });
});
