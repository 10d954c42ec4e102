// End-to-end proof of the guest harness: boot a real Linux guest under QEMU
// TCG, drive its console, hot-plug a QEMU usb-storage stick via QMP and read
// known bytes back inside the guest.
import { expect } from 'chai';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { QmpError } from '../../src/qemu/qmp/client.js';
import { ensureGuestImage, guestAvailability, startGuest, type Guest, type GuestImage } from '../../src/devkit/guest/guest.js';

describe('e2e harness: boot a guest, hot-plug usb-storage', function () {
  this.timeout(300_000);
  let image: GuestImage;
  let guest: Guest | undefined;

  before(async function () {
    this.timeout(900_000); // first run downloads and builds the image
    if (process.env.USBROAM_E2E === '0') this.skip();
    try {
      image = await ensureGuestImage();
    } catch (err) {
      // Without root we cannot install QEMU; skip rather than fail then.
      if (process.getuid?.() !== 0 && !guestAvailability().ok) {
        console.warn(`skipping e2e: ${(err as Error).message}`);
        this.skip();
      }
      throw err;
    }
    guest = await startGuest({ name: 'boot', image, extraArgs: ['-device', 'qemu-xhci,id=xhci'] });
  });

  after(async () => {
    await guest?.stop();
  });

  it('booted the cached kernel and drives the console', async () => {
    const g = guest!;
    expect(g.bootMs).to.be.a('number');
    const uname = await g.run('uname -r');
    expect(uname).to.deep.equal({ output: `${image.kernelVersion}\n`, exitCode: 0 });
    const cmdline = await g.run('cat /proc/cmdline');
    expect(cmdline.exitCode).to.equal(0);
    expect(cmdline.output).to.match(/console=ttyS0/);
    expect(await g.run('false')).to.deep.equal({ output: '', exitCode: 1 });
    expect(await g.run("echo 'a b'; echo err >&2; sh -c 'exit 7'")).to.deep.equal({ output: 'a b\nerr\n', exitCode: 7 });
    // stdin is /dev/null, so a command reading stdin cannot swallow the markers.
    expect(await g.run('cat')).to.deep.equal({ output: '', exitCode: 0 });
    const lsmod = await g.sh('cat /proc/modules');
    for (const m of ['xhci_pci', 'usb_storage', 'sd_mod', 'cdc_acm', 'usbhid']) expect(lsmod).to.include(m);
  });

  it('QMP answers on both sockets, with typed errors', async () => {
    const g = guest!;
    const status = await g.qmp.execute<{ status: string; running: boolean }>('query-status');
    expect(status).to.include({ status: 'running', running: true });
    expect(g.qmp.greeting?.version.qemu.major).to.be.greaterThanOrEqual(7);
    const st2 = await g.events.execute<{ status: string }>('query-status');
    expect(st2.status).to.equal('running');
    const err = await g.qmp.execute('device_del', { id: 'no-such-device' }).catch((e: unknown) => e);
    expect(err).to.be.instanceOf(QmpError);
    expect((err as QmpError).errorClass).to.equal('DeviceNotFound');
  });

  it('hot-plugs a usb-storage stick; the guest reads the known bytes back; unplug emits DEVICE_DELETED', async () => {
    const g = guest!;
    const size = 4 * 1024 * 1024;
    const data = crypto.randomBytes(size);
    const sha = crypto.createHash('sha256').update(data).digest('hex');
    const md5 = crypto.createHash('md5').update(data).digest('hex');
    const img = path.join(g.dir, 'stick.raw');
    fs.writeFileSync(img, data);

    expect((await g.run('test -e /sys/block/sda')).exitCode).to.equal(1);
    await g.qmp.execute('blockdev-add', { driver: 'raw', 'node-name': 'stick0', file: { driver: 'file', filename: img } });
    const t0 = Date.now();
    await g.qmp.execute('device_add', { driver: 'usb-storage', id: 'stick', drive: 'stick0', bus: 'xhci.0', serial: 'USBROAM0001' });
    await g.waitForPath('/sys/block/sda', { timeoutMs: 60_000 });
    console.log(`      /sys/block/sda appeared ${Date.now() - t0} ms after device_add`);
    expect((await g.sh('cat /sys/block/sda/size')).trim()).to.equal(String(size / 512));
    await g.waitForPath('/dev/sda');
    const sums = await g.sh('dd if=/dev/sda bs=1M count=4 2>/dev/null | sha256sum; dd if=/dev/sda bs=64k 2>/dev/null | md5sum', { timeoutMs: 120_000 });
    const [shaLine, md5Line] = sums.trim().split('\n');
    expect(shaLine!.split(/\s+/)[0]).to.equal(sha);
    expect(md5Line!.split(/\s+/)[0]).to.equal(md5);
    const dmesg = await g.dmesg();
    expect(dmesg).to.match(/usb-storage \d+-\d+:1\.0: USB Mass Storage device detected/);
    expect(dmesg).to.match(/sd \d+:\d+:\d+:\d+: \[sda\]/);

    const deleted = g.events.waitForEvent('DEVICE_DELETED', (ev) => ev.data.device === 'stick', { timeoutMs: 60_000 });
    await g.qmp.execute('device_del', { id: 'stick' });
    const ev = await deleted;
    expect(ev.data.device).to.equal('stick');
    const gone = await g.run('i=0; while [ -e /sys/block/sda ] && [ $i -lt 300 ]; do usleep 100000; i=$((i+1)); done; [ ! -e /sys/block/sda ]', { timeoutMs: 60_000 });
    expect(gone.exitCode).to.equal(0);
    expect(await g.dmesg()).to.match(/USB disconnect/);
    await g.qmp.execute('blockdev-del', { 'node-name': 'stick0' });
  });

  it('stop() kills QEMU and removes the temp dir', async () => {
    const g = guest!;
    await g.stop();
    expect(g.hasExited).to.equal(true);
    expect(fs.existsSync(g.dir)).to.equal(false);
    await g.stop(); // idempotent
  });
});
