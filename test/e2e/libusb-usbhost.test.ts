// End to end on a real kernel USB stack: a "USB host guest" (QEMU with
// QEMU-emulated usb-storage and usb-kbd on xHCI) runs `usbroam serve` with the
// libusb backend (host root over 9p, chroot). From the host: `usbroam devices`
// lists the stick with the guest kernel's descriptors and strings; the bridge
// attaches it to a second QEMU guest (the VM): same descriptors there,
// checksummed write and read (the image file holds the bytes); the keyboard's
// interrupt endpoint carries QMP-injected key presses to the VM's evdev;
// QMP device_del of the stick in the USB host guest is a clean disconnect in
// the VM, and the server carries on.
import { expect } from 'chai';
import { execFile } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, rmSync, truncateSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { Bridge } from '../../src/client/bridge/bridge.js';
import { createLogger, silentLogger } from '../../src/common/log.js';
import { clientTls } from '../../src/devkit/certs.js';
import { startGuest, type Guest, type GuestImage } from '../../src/devkit/guest/guest.js';
import { startUsbHostGuest, type UsbHostGuest } from '../../src/devkit/guest/usbhost-guest.js';
import { MiB, e2eImageOrSkip, sha256OfFileRange, timedDd } from '../../src/devkit/bridge-guest.js';
import { sleep, until, untilGuestHasOpen } from '../helpers/wait.js';

const IO_MIB = Number(process.env.USBROAM_LIBUSB_IO_MIB ?? 16);
const log = process.env.USBROAM_TEST_LOG ? createLogger({ level: process.env.USBROAM_TEST_LOG }) : silentLogger;
const run = promisify(execFile);

/** The sysfs directory (under /sys/bus/usb/devices) of the device with this vid:pid, in a guest. */
async function sysfsDir(g: Guest, vid: string, pid: string): Promise<string> {
  const out = await g.sh(
    `for d in /sys/bus/usb/devices/*; do [ -f $d/idVendor ] && [ "$(cat $d/idVendor):$(cat $d/idProduct)" = "${vid}:${pid}" ] && echo $d; done; true`,
  );
  const dir = out.trim().split('\n').filter(Boolean)[0];
  if (!dir) throw new Error(`no ${vid}:${pid} in the guest's sysfs`);
  return dir;
}

/** What both kernels say about a device: strings, ids and the raw descriptors (sysfs "descriptors": device + configs). */
async function kernelView(g: Guest, dir: string, root = '') {
  const cat = async (f: string) => (await g.sh(`cat ${root}${dir}/${f} 2>/dev/null || true`)).trim();
  return {
    idVendor: await cat('idVendor'),
    idProduct: await cat('idProduct'),
    bcdDevice: await cat('bcdDevice'),
    manufacturer: await cat('manufacturer'),
    product: await cat('product'),
    serial: await cat('serial'),
    descriptors: (await g.sh(`od -An -tx1 -v ${root}${dir}/descriptors | tr -d ' \\n'`)).trim(),
  };
}

describe('e2e libusb backend: a USB host guest exports QEMU usb-storage and usb-kbd to a VM', function () {
  this.timeout(900_000);
  let image: GuestImage;
  let host: UsbHostGuest | undefined;
  let vm: Guest | undefined;
  let bridge: Bridge | undefined;
  let dir: string;
  let stickImg: string;
  let serverOpts: { address: string; ca: string; cert: string; key: string };
  let stickAttachment = '';

  before(async function () {
    this.timeout(900_000);
    image = await e2eImageOrSkip(this);
    dir = mkdtempSync(path.join(os.tmpdir(), 'ubr-libusb-'));
    stickImg = path.join(dir, 'stick.img');
    closeSync(openSync(stickImg, 'w'));
    truncateSync(stickImg, 64 * MiB);
    const vmQmp = path.join(dir, 'vm-qmp.sock');
    const t0 = Date.now();
    [host, vm] = await Promise.all([
      startUsbHostGuest({ image, storage: { image: stickImg, serial: 'STICK0001' }, keyboard: true }),
      startGuest({ name: 'libusb-vm', image, memoryMb: 256, extraArgs: ['-device', 'qemu-xhci,id=xhci', '-qmp', `unix:${vmQmp},server=on,wait=off`] }),
    ]);
    console.log(`      USB host guest serving after ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    serverOpts = { address: host.address, ...clientTls('bridge') };
    bridge = new Bridge({ log, runDir: dir });
    bridge.addVm({ name: 'vm', qmpSocket: vmQmp });
  });

  after(async () => {
    await bridge?.close().catch(() => {});
    await vm?.stop();
    if (host && process.env.USBROAM_E2E_KEEP) console.log(await host.serverLog().catch(() => ''));
    await host?.stop();
    if (dir && !process.env.USBROAM_E2E_KEEP) rmSync(dir, { recursive: true, force: true });
  });

  it('usbroam devices (host CLI) lists the stick with the USB host guest kernel\'s ids and strings; no hubs', async () => {
    const c = clientTls('bridge');
    const { stdout } = await run(process.execPath, ['bin/usbroam.js', 'devices', '--json', '--server', host!.address, '--ca', c.ca, '--cert', c.cert, '--key', c.key]);
    const devices = JSON.parse(stdout) as Array<Record<string, unknown>>;
    const stick = devices.find((d) => d.serial === 'STICK0001');
    expect(stick, stdout).to.not.equal(undefined);
    const hg = host!.guest;
    const k = await kernelView(hg, await sysfsDir(hg, '46f4', '0001'));
    expect(k.serial).to.equal('STICK0001');
    expect(stick!.manufacturer).to.equal(k.manufacturer);
    expect(stick!.product).to.equal(k.product);
    expect(Number(stick!.vendorId ?? 0)).to.equal(parseInt(k.idVendor, 16));
    expect(Number(stick!.productId ?? 0)).to.equal(parseInt(k.idProduct, 16));
    expect(Number(stick!.bcdDevice ?? 0)).to.equal(parseInt(k.bcdDevice, 16));
    expect(stick!.backend ?? 'libusb').to.equal('libusb');
    expect(devices.some((d) => d.vendorId === 0x0627 || d.vendorId === 1575), 'the keyboard is listed').to.equal(true);
    expect(devices.every((d) => Number(d.deviceClass ?? 0) !== 9), 'no hubs').to.equal(true);
  });

  it('the bridge attaches the stick to the VM: same descriptors and strings there', async () => {
    const t0 = Date.now();
    const info = await bridge!.attach({ vm: 'vm', server: serverOpts, selector: { serial: 'STICK0001' }, bus: 'xhci.0' });
    stickAttachment = info.id;
    await vm!.waitForPath('/sys/block/sda', { timeoutMs: 300_000 });
    console.log(`      /sys/block/sda in the VM ${Date.now() - t0} ms after attach`);
    const inVm = await kernelView(vm!, await sysfsDir(vm!, '46f4', '0001'));
    const hg = host!.guest;
    const inHost = await kernelView(hg, await sysfsDir(hg, '46f4', '0001'));
    expect(inVm).to.deep.equal(inHost);
    expect((await vm!.sh('cat /sys/block/sda/size')).trim()).to.equal(String((64 * MiB) / 512));
  });

  it(`checksummed ${IO_MIB} MiB write and read through the libusb backend; the image file holds the bytes`, async () => {
    const g = vm!;
    await g.waitForPath('/dev/sda');
    await g.sh(`dd if=/dev/urandom of=/tmp/x bs=1M count=${IO_MIB} 2>/dev/null`);
    const want = (await g.sh('sha256sum /tmp/x')).split(/\s+/)[0]!;
    const w = await timedDd(g, `dd if=/tmp/x of=/dev/sda bs=1M oflag=direct conv=fsync`, IO_MIB * MiB, 600_000);
    await g.sh('sync; echo 3 > /proc/sys/vm/drop_caches');
    const r = await timedDd(g, `dd if=/dev/sda of=/tmp/y bs=1M count=${IO_MIB} iflag=direct`, IO_MIB * MiB, 600_000);
    const got = (await g.sh('sha256sum /tmp/y')).split(/\s+/)[0]!;
    console.log(`      VM dd through usbroam + libusb backend: write ${w.toFixed(2)} MB/s, read ${r.toFixed(2)} MB/s`);
    expect(got).to.equal(want);
    expect(sha256OfFileRange(stickImg, 0, IO_MIB * MiB)).to.equal(want);
    await g.sh('rm -f /tmp/y');
    const bad = (await g.dmesg()).split('\n').filter((l) => /error -110|reset (high|super|full)[^\n]*USB device|DID_NO_CONNECT|USB disconnect/.test(l));
    expect(bad, bad.join('\n')).to.deep.equal([]);
  });

  it('the keyboard: key events injected into the USB host guest (QMP input-send-event) reach the VM\'s evdev', async () => {
    const g = vm!;
    const before = (await g.sh('ls /dev/input/ 2>/dev/null || true')).split(/\s+/).filter((x) => x.startsWith('event'));
    await bridge!.attach({ vm: 'vm', server: serverOpts, selector: { vidPid: '0627:0001' }, bus: 'xhci.0' });
    let ev = '';
    const deadline = Date.now() + 300_000;
    while (!ev) {
      const now = (await g.sh('ls /dev/input/ 2>/dev/null || true')).split(/\s+/).filter((x) => x.startsWith('event'));
      ev = now.find((e) => !before.includes(e)) ?? '';
      if (!ev) {
        if (Date.now() > deadline) throw new Error('no new /dev/input/event* in the VM');
        await sleep(500);
      }
    }
    // Record raw input_events (24 bytes on x86_64) in the background.
    await g.sh(`dd if=/dev/input/${ev} of=/tmp/ev bs=24 count=8 > /dev/null 2>&1 & echo $! > /tmp/ev.pid`);
    await untilGuestHasOpen(g, '/tmp/ev.pid', `/dev/input/${ev}`);
    const recorded = async () => Number((await g.sh('stat -c %s /tmp/ev 2>/dev/null || echo 0')).trim()) >= 24 * 8;
    const keys = ['a', 'b'];
    for (let i = 0; i < 10; i++) {
      for (const k of keys) {
        for (const down of [true, false]) {
          // No `device`: with -display none no console is bound; the usb-kbd is the active keyboard handler.
          await host!.guest.qmp.execute('input-send-event', { events: [{ type: 'key', data: { down, key: { type: 'qcode', data: k } } }] });
          await sleep(100); // pacing of the key presses, not a wait
        }
      }
      // Recorded within 2 s, or another round of presses.
      if (await until('the key events recorded', recorded, 2_000, 100).catch(() => false)) break;
    }
    const hex = (await g.sh('od -An -tx1 -v /tmp/ev | tr -d " \\n"')).trim();
    const bytes = Buffer.from(hex, 'hex');
    // struct input_event { timeval (16), u16 type, u16 code, s32 value }: EV_KEY=1, KEY_A=30, KEY_B=48.
    const events: Array<{ type: number; code: number; value: number }> = [];
    for (let o = 0; o + 24 <= bytes.length; o += 24) events.push({ type: bytes.readUInt16LE(o + 16), code: bytes.readUInt16LE(o + 18), value: bytes.readInt32LE(o + 20) });
    const keyEvents = events.filter((e) => e.type === 1);
    expect(keyEvents.length, JSON.stringify(events)).to.be.greaterThan(0);
    expect(keyEvents[0]).to.deep.equal({ type: 1, code: 30, value: 1 });
    if (keyEvents.length > 1) expect(keyEvents[1]).to.deep.equal({ type: 1, code: 30, value: 0 });
  });

  it('QMP device_del of the stick in the USB host guest mid-transfer: a clean disconnect in the VM; the server carries on', async () => {
    const g = vm!;
    const before = (await g.dmesg()).split('\n').length;
    // Keep bulk transfers in flight while the stick goes: the VM reads it in a loop.
    await g.sh('rm -f /tmp/rd; (while dd if=/dev/sda of=/dev/null bs=1M count=8 iflag=direct 2>/dev/null; do echo r >> /tmp/rd; done; echo END >> /tmp/rd) >/dev/null 2>&1 &');
    const t0 = Date.now();
    while (!(await g.sh('cat /tmp/rd 2>/dev/null || true')).includes('r')) {
      if (Date.now() - t0 > 120_000) throw new Error('the reader loop in the VM did not get going');
      await sleep(200);
    }
    const gone = host!.guest.qmp.waitForEvent('DEVICE_DELETED', (e) => e.data?.device === 'stick0', { timeoutMs: 60_000 });
    await host!.guest.qmp.execute('device_del', { id: 'stick0' });
    await gone;
    const deadline = Date.now() + 120_000;
    while ((await g.run('test -e /sys/block/sda')).exitCode === 0) {
      if (Date.now() > deadline) throw new Error('sda still present in the VM after the stick was removed');
      await sleep(500);
    }
    const rd = Date.now() + 60_000;
    while (!(await g.sh('cat /tmp/rd')).includes('END')) {
      if (Date.now() > rd) throw new Error('the reader loop in the VM did not end with the stick');
      await sleep(500);
    }
    const after = (await g.dmesg()).split('\n').slice(before - 1);
    expect(after.some((l) => /USB disconnect, device number/.test(l)), after.join('\n')).to.equal(true);
    const bad = after.filter((l) => /error -110|reset .*USB device/.test(l));
    expect(bad, bad.join('\n')).to.deep.equal([]);
    // The attachment ended by itself; the keyboard's goes on.
    const dl2 = Date.now() + 30_000;
    while (bridge!.list().some((a) => a.id === stickAttachment)) {
      if (Date.now() > dl2) throw new Error('the stick attachment is still listed');
      await sleep(250);
    }
    expect(bridge!.list().map((a) => a.vendorId)).to.deep.equal([0x0627]);
    const c = clientTls('bridge');
    const { stdout } = await run(process.execPath, ['bin/usbroam.js', 'devices', '--json', '--server', host!.address, '--ca', c.ca, '--cert', c.cert, '--key', c.key]);
    const devices = JSON.parse(stdout) as Array<Record<string, unknown>>;
    expect(devices.some((d) => d.serial === 'STICK0001')).to.equal(false);
    expect(devices.some((d) => Number(d.vendorId) === 0x0627)).to.equal(true);
    const serverLog = await host!.serverLog();
    expect(serverLog).to.match(/device gone|libusb device removed/);
  });
});
