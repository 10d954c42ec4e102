// End to end: the emulated disk at SuperSpeed (usbroam serve --disk-speed super) attached through
// the Bridge (usb-redir) to a QEMU guest on qemu-xhci. The guest enumerates a SuperSpeed device
// on a USB 3 root port; Linux usb-storage then allows 1 MiB SCSI commands (max_sectors 2048,
// /sys/block/sda/queue/max_sectors_kb = 1024) instead of 120 KiB at high speed: ~8x fewer
// CBW/data/CSW round trips per MiB. A 32 MiB checksummed write/read passes and the server's image
// holds the bytes. The same disk at high speed on the same guest, for contrast (120 KiB).
// Not on EHCI: QEMU 7.2's usb-redir does attach a SuperSpeed device to a USB 2 port (its
// speedmask keeps high speed as compatible), but the guest refuses it ("Invalid ep0 maxpacket: 9",
// "unable to enumerate USB device"), so EHCI setups keep the disk at high speed (the default).
import { expect } from 'chai';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Bridge } from '../../src/client/bridge/bridge.js';
import { clientTls } from '../../src/devkit/certs.js';
import { startServerProcess, type ServerProcess } from '../../src/devkit/server-process.js';
import {
  MiB,
  badKernelLines,
  dmesgLines,
  e2eImageOrSkip,
  guestSha256,
  sha256OfFileRange,
  startBridgeGuest,
  testLog,
  timedDd,
  waitForDisk,
  waitGoneInGuest,
} from '../../src/devkit/bridge-guest.js';
import type { Guest } from '../../src/devkit/guest/guest.js';

const SERIAL = 'USBROAM-MSC-0001';

async function diskServer(dir: string, speed: 'super' | 'high'): Promise<{ server: ServerProcess; image: string; opts: { address: string; ca: string; cert: string; key: string } }> {
  const image = path.join(dir, `disk-${speed}.img`);
  const server = await startServerProcess(['--allow', 'bridge=*', '--disk-image', image, '--disk-size-mib', '64', '--disk-speed', speed]);
  return { server, image, opts: { address: server.address.replace('127.0.0.1', 'localhost'), ...clientTls('bridge') } };
}

describe('e2e bridge: the emulated disk at SuperSpeed on qemu-xhci', function () {
  this.timeout(600_000);
  let guest: Guest | undefined;
  let bridge: Bridge | undefined;
  let ss: Awaited<ReturnType<typeof diskServer>> | undefined;
  let hs: Awaited<ReturnType<typeof diskServer>> | undefined;
  let dir = '';
  let bus = '';
  let attachmentId = '';

  before(async function () {
    this.timeout(900_000);
    const image = await e2eImageOrSkip(this);
    dir = mkdtempSync(path.join(os.tmpdir(), 'ubss-'));
    ss = await diskServer(dir, 'super');
    hs = await diskServer(dir, 'high');
    const bg = await startBridgeGuest({ name: 'bridge-ss', image, dir, hc: 'xhci' });
    guest = bg.guest;
    bus = bg.bus;
    bridge = new Bridge({ log: testLog, runDir: dir });
    bridge.addVm({ name: 'vm1', qmpSocket: bg.bridgeQmp });
  });

  after(async () => {
    await bridge?.close().catch(() => {});
    await guest?.stop();
    await ss?.server.stop();
    await hs?.server.stop();
    if (dir && !process.env.USBROAM_E2E_KEEP) rmSync(dir, { recursive: true, force: true });
  });

  it('enumerates as a SuperSpeed device on a USB 3 port; usb-storage allows 1 MiB commands', async () => {
    const g = guest!;
    const before = (await dmesgLines(g)).length;
    const info = await bridge!.attach({ vm: 'vm1', server: ss!.opts, selector: { serial: SERIAL }, bus });
    attachmentId = info.id;
    await waitForDisk(g);
    const lines = (await dmesgLines(g)).slice(before);
    const enumLine = lines.find((l) => /new SuperSpeed( Gen \d+x\d+| Plus)? USB device/.test(l));
    expect(enumLine, lines.join('\n')).to.not.equal(undefined);
    console.log(`      ${enumLine!.trim()}`);
    // The device is on a root port of the USB 3 root hub (bus speed 5000 Mb/s).
    const usbDev = /usb (\d+-[\d.]+):/.exec(enumLine!)![1]!;
    expect((await g.sh(`cat /sys/bus/usb/devices/${usbDev}/speed`)).trim()).to.equal('5000');
    expect((await g.sh(`cat /sys/bus/usb/devices/${usbDev}/version`)).trim()).to.match(/^3\./);
    expect((await g.sh('cat /sys/block/sda/queue/max_sectors_kb')).trim()).to.equal('1024');
    expect((await g.sh('cat /sys/block/sda/size')).trim()).to.equal(String((64 * MiB) / 512));
    expect(badKernelLines(lines), lines.join('\n')).to.deep.equal([]);
  });

  it('writes 32 MiB with fsync and reads it back (O_DIRECT); checksums and the server image match', async () => {
    const g = guest!;
    const before = (await dmesgLines(g)).length;
    await g.sh('dd if=/dev/urandom of=/tmp/x bs=1M count=32 2>/dev/null');
    const want = await guestSha256(g, 'cat /tmp/x');
    const w = await timedDd(g, 'dd if=/tmp/x of=/dev/sda bs=1M oflag=direct conv=fsync', 32 * MiB);
    await g.sh('sync; echo 3 > /proc/sys/vm/drop_caches');
    const r = await timedDd(g, 'dd if=/dev/sda of=/tmp/y bs=1M count=32 iflag=direct', 32 * MiB);
    expect(await guestSha256(g, 'cat /tmp/y')).to.equal(want);
    await g.sh('rm -f /tmp/y');
    expect(sha256OfFileRange(ss!.image, 0, 32 * MiB)).to.equal(want);
    // Buffered I/O too (page cache writeback, readahead): other request sizes.
    await g.sh('dd if=/tmp/x of=/dev/sda bs=64k seek=512 2>/dev/null; sync; echo 3 > /proc/sys/vm/drop_caches');
    expect(await guestSha256(g, 'dd if=/dev/sda bs=64k skip=512 count=512 2>/dev/null')).to.equal(want);
    console.log(`      SuperSpeed over xHCI: write ${w.toFixed(1)} MB/s, read ${r.toFixed(1)} MB/s`);
    const lines = (await dmesgLines(g)).slice(before);
    expect(badKernelLines(lines), lines.join('\n')).to.deep.equal([]);
  });

  it('detach is a clean unplug; the same disk at high speed gets 120 KiB commands', async () => {
    const g = guest!;
    await bridge!.detach('vm1', attachmentId);
    await waitGoneInGuest(g, '/sys/block/sda');
    const before = (await dmesgLines(g)).length;
    const info = await bridge!.attach({ vm: 'vm1', server: hs!.opts, selector: { serial: SERIAL }, bus });
    await waitForDisk(g);
    const lines = (await dmesgLines(g)).slice(before);
    expect(lines.some((l) => /new high-speed USB device/.test(l)), lines.join('\n')).to.equal(true);
    expect((await g.sh('cat /sys/block/sda/queue/max_sectors_kb')).trim()).to.equal('120');
    const w = await timedDd(g, 'dd if=/tmp/x of=/dev/sda bs=1M oflag=direct conv=fsync', 32 * MiB);
    await g.sh('sync; echo 3 > /proc/sys/vm/drop_caches');
    const r = await timedDd(g, 'dd if=/dev/sda of=/tmp/y bs=1M count=32 iflag=direct', 32 * MiB);
    expect(await guestSha256(g, 'cat /tmp/y')).to.equal(await guestSha256(g, 'cat /tmp/x'));
    await g.sh('rm -f /tmp/y');
    console.log(`      high speed over xHCI:  write ${w.toFixed(1)} MB/s, read ${r.toFixed(1)} MB/s`);
    await bridge!.detach('vm1', info.id);
    await waitGoneInGuest(g, '/sys/block/sda');
  });
});
