// End to end: the emulated disk attached through the Bridge to a real QEMU guest; then the device
// vanishes on the USB host (an emulated unplug on the server, in this process). The guest sees a
// clean disconnect (no timeouts, resets or oopses; /sys/block/sda goes), the Attachment emits
// 'deviceGone', the Bridge drops the attachment and removes its usb-redir device from QEMU.
// Re-plugged on the server, the device can be attached again.
import { expect } from 'chai';
import type { EmulatedDevice } from '../../src/server/backends/emulated/emulated-device.js';
import { badKernelLines, dmesgLines, guestSha256, waitForDisk, waitGoneInGuest } from '../../src/devkit/bridge-guest.js';
import type { Guest } from '../../src/devkit/guest/guest.js';
import { useBridgeGuest } from '../helpers/bridge-guest-fixture.js';
import { until } from '../helpers/wait.js';

describe('e2e bridge: the device vanishes on the USB host', function () {
  this.timeout(600_000);
  const rig = useBridgeGuest({ name: 'bridge-unplug', inProcessServer: { acl: { bridge: '*' } } });
  let removed: EmulatedDevice | undefined;

  async function peripherals(g: Guest): Promise<string[]> {
    const r = await g.qmp.execute<Array<{ name: string }>>('qom-list', { path: '/machine/peripheral' });
    return r.map((p) => p.name);
  }

  it('an emulated unplug on the server is a clean disconnect in the guest and a device-gone at the bridge', async () => {
    const g = rig.guest;
    const info = await rig.bridge.attach({ vm: 'vm1', server: rig.serverOpts, selector: { serial: 'USBROAM-MSC-0001' }, bus: rig.bus });
    await waitForDisk(g);
    expect(await peripherals(g)).to.include(info.id);
    // Some data through it first, so the device is in use (and its cache dirty) when it goes.
    await g.sh('dd if=/dev/urandom of=/tmp/x bs=1M count=2 2>/dev/null; dd if=/tmp/x of=/dev/sda bs=1M oflag=direct conv=fsync 2>/dev/null');
    expect(await guestSha256(g, 'dd if=/dev/sda bs=1M count=2 iflag=direct 2>/dev/null')).to.equal(await guestSha256(g, 'cat /tmp/x'));
    const before = (await dmesgLines(g)).length;

    const att = rig.bridge.get(info.id)!;
    const gone = new Promise<string>((resolve) => att.once('deviceGone', (r: string) => resolve(String(r))));
    const closed = new Promise<{ reason: string }>((resolve) => att.once('closed', (ci: { reason: string }) => resolve(ci)));
    const deleted = g.events.waitForEvent<{ device?: string }>('DEVICE_DELETED', (ev) => ev.data?.device === info.id, { timeoutMs: 60_000 });
    deleted.catch(() => {});
    removed = rig.srv!.backend.get('emu-1-1');
    expect(removed, 'the emulated disk').to.not.equal(undefined);
    const t0 = Date.now();
    expect(await rig.srv!.backend.remove('emu-1-1', { dispose: false })).to.equal(true);

    const reason = await gone;
    console.log(`      deviceGone at the bridge after ${Date.now() - t0} ms: ${reason}`);
    const ci = await closed;
    console.log(`      attachment closed after ${Date.now() - t0} ms: ${ci.reason}`);
    await waitGoneInGuest(g, '/sys/block/sda', 60_000);
    console.log(`      /sys/block/sda gone after ${Date.now() - t0} ms`);
    await deleted;
    console.log(`      usb-redir device deleted from QEMU after ${Date.now() - t0} ms`);
    await until('the bridge to drop the attachment', () => rig.bridge.list().length === 0, 30_000);
    expect(await peripherals(g)).to.not.include(info.id);

    const after = (await dmesgLines(g)).slice(before);
    expect(after.some((l) => /USB disconnect, device number/.test(l)), after.join('\n')).to.equal(true);
    const bad = badKernelLines(after, { allowRemovalSync: true });
    expect(bad, after.join('\n')).to.deep.equal([]);
  });

  it('re-plugged on the server, the device attaches again and holds the data', async function () {
    const g = rig.guest;
    if (!removed) this.skip();
    rig.srv!.backend.add(removed);
    const info = await rig.bridge.attach({ vm: 'vm1', server: rig.serverOpts, selector: { serial: 'USBROAM-MSC-0001' }, bus: rig.bus });
    await waitForDisk(g);
    expect(await guestSha256(g, 'dd if=/dev/sda bs=1M count=2 iflag=direct 2>/dev/null')).to.equal(await guestSha256(g, 'cat /tmp/x'));
    await rig.bridge.detach('vm1', info.id);
    await waitGoneInGuest(g, '/sys/block/sda', 60_000);
  });
});
