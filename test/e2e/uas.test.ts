// End to end: the emulated UAS disk (usbroam serve --emulated-uas) attached through the Bridge
// (usb-redir, which negotiates the usbredir bulk_streams cap) to a QEMU guest on qemu-xhci at
// SuperSpeed. The guest's uas driver binds (alt 1, protocol 0x62), allocates bulk streams on the
// status and data pipes through usbredir alloc_bulk_streams, and every SCSI command travels as a
// command IU with its status and data URBs on the command's stream. A checksummed 32 MiB write
// and read pass and the server's image holds the bytes.
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

const SERIAL = 'USBROAM-UAS-0001';

describe('e2e bridge: the emulated UAS disk (bulk streams) on qemu-xhci', function () {
  this.timeout(600_000);
  let guest: Guest | undefined;
  let bridge: Bridge | undefined;
  let server: ServerProcess | undefined;
  let dir = '';
  let bus = '';
  let image = '';
  let attachmentId = '';

  before(async function () {
    this.timeout(900_000);
    const guestImage = await e2eImageOrSkip(this);
    if (!guestImage.modules.includes('uas')) throw new Error(`the guest image ${guestImage.dir} has no uas module (rebuild it: scripts/guest/build-guest.sh)`);
    dir = mkdtempSync(path.join(os.tmpdir(), 'ubuas-'));
    image = path.join(dir, 'uas.img');
    server = await startServerProcess(['--allow', 'bridge=*', '--emulated-uas', image]);
    const bg = await startBridgeGuest({ name: 'bridge-uas', image: guestImage, dir, hc: 'xhci' });
    guest = bg.guest;
    bus = bg.bus;
    bridge = new Bridge({ log: testLog, runDir: dir });
    bridge.addVm({ name: 'vm1', qmpSocket: bg.bridgeQmp });
  });

  after(async () => {
    await bridge?.close().catch(() => {});
    await guest?.stop();
    await server?.stop();
    if (dir && !process.env.USBROAM_E2E_KEEP) rmSync(dir, { recursive: true, force: true });
  });

  it('enumerates at SuperSpeed and the guest binds uas (not usb-storage), with streams', async () => {
    const g = guest!;
    const before = (await dmesgLines(g)).length;
    const opts = { address: server!.address.replace('127.0.0.1', 'localhost'), ...clientTls('bridge') };
    const info = await bridge!.attach({ vm: 'vm1', server: opts, selector: { serial: SERIAL }, bus });
    attachmentId = info.id;
    await waitForDisk(g);
    const lines = (await dmesgLines(g)).slice(before);
    const enumLine = lines.find((l) => /new SuperSpeed( Gen \d+x\d+| Plus)? USB device/.test(l));
    expect(enumLine, lines.join('\n')).to.not.equal(undefined);
    const usbDev = /usb (\d+-[\d.]+):/.exec(enumLine!)![1]!;
    const intf = `${usbDev}:1.0`;
    expect((await g.sh(`ls /sys/bus/usb/drivers/uas/`)).split(/\s+/), lines.join('\n')).to.include(intf);
    expect((await g.sh(`ls /sys/bus/usb/drivers/usb-storage/ 2>/dev/null || true`)).split(/\s+/)).to.not.include(intf);
    expect((await g.sh(`cat /sys/bus/usb/devices/${intf}/bAlternateSetting`)).trim()).to.equal('1');
    expect((await g.sh(`cat /sys/bus/usb/devices/${intf}/bInterfaceProtocol`)).trim()).to.equal('62');
    // The uas driver runs with streams: more than one command queued per device.
    const qdepth = Number((await g.sh('cat /sys/block/sda/device/queue_depth')).trim());
    console.log(`      ${enumLine!.trim()}; uas queue_depth ${qdepth}`);
    expect(qdepth).to.be.greaterThan(1);
    expect(badKernelLines(lines), lines.join('\n')).to.deep.equal([]);
  });

  it('writes 32 MiB with fsync and reads it back (O_DIRECT and buffered); checksums and the server image match', async () => {
    const g = guest!;
    const before = (await dmesgLines(g)).length;
    await g.sh('dd if=/dev/urandom of=/tmp/x bs=1M count=32 2>/dev/null');
    const want = await guestSha256(g, 'cat /tmp/x');
    const w = await timedDd(g, 'dd if=/tmp/x of=/dev/sda bs=1M oflag=direct conv=fsync', 32 * MiB);
    await g.sh('sync; echo 3 > /proc/sys/vm/drop_caches');
    const r = await timedDd(g, 'dd if=/dev/sda of=/tmp/y bs=1M count=32 iflag=direct', 32 * MiB);
    expect(await guestSha256(g, 'cat /tmp/y')).to.equal(want);
    await g.sh('rm -f /tmp/y');
    expect(sha256OfFileRange(image, 0, 32 * MiB)).to.equal(want);
    // Buffered I/O: page cache writeback and readahead, several commands in flight on their streams.
    await g.sh('dd if=/tmp/x of=/dev/sda bs=64k seek=512 2>/dev/null; sync; echo 3 > /proc/sys/vm/drop_caches');
    expect(await guestSha256(g, 'dd if=/dev/sda bs=64k skip=512 count=512 2>/dev/null')).to.equal(want);
    expect(sha256OfFileRange(image, 32 * MiB, 32 * MiB)).to.equal(want);
    console.log(`      UAS over xHCI: write ${w.toFixed(1)} MB/s, read ${r.toFixed(1)} MB/s`);
    const lines = (await dmesgLines(g)).slice(before);
    expect(badKernelLines(lines), lines.join('\n')).to.deep.equal([]);
  });

  it('detach is a clean unplug', async () => {
    await bridge!.detach('vm1', attachmentId);
    await waitGoneInGuest(guest!, '/sys/block/sda');
  });
});
