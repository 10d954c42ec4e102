// Live migration of the VM under I/O over the libusb backend (the checks of migrate-basic):
// a "USB host guest" serves its QEMU usb-storage through `usbroam serve --libusb` (real kernel
// USB stack: xhci-hcd + usbfs under libusb), the VM guest uses it through bridge A, and the VM
// live-migrates to a fresh destination QEMU served by bridge B (PrepareIncoming before
// migrate-incoming; the source bridge hands the session off on its own). Three QEMU processes
// under TCG.
//
// In the VM a writer keeps writing 64 KiB blocks tagged with their sequence number (and
// checksummed) with O_DIRECT + fsync, and reads each one back to verify it; a reader keeps
// re-reading a 4 MiB region written before and checks it. Afterwards: every write succeeded and
// verified, every slot on the disk holds its latest block (checked in the VM and, independently,
// in the stick's image file on the host), every read matched, the VM wrote on the destination,
// and neither the VM's dmesg nor the USB host guest's shows a disconnect, reset or I/O error.
//
// USBROAM_LIBUSB_MIGRATIONS=N: migrate N times (A -> B -> A ...), default 1.
import { expect } from 'chai';
import { closeSync, mkdtempSync, openSync, readSync, rmSync, truncateSync } from 'node:fs';
import { createHash } from 'node:crypto';
import os from 'node:os';
import path from 'node:path';
import { Bridge, type AttachmentInfo } from '../../src/client/bridge/bridge.js';
import { clientTls } from '../../src/devkit/certs.js';
import { e2eImageOrSkip, testLog as log } from '../../src/devkit/bridge-guest.js';
import { BAD_LINE } from '../../src/devkit/migration-faults.js';
import { migrateWithHandOff, startVmGuest, type Host } from '../../src/devkit/migration-rig.js';
import { type Guest, type GuestImage } from '../../src/devkit/guest/guest.js';
import { startUsbHostGuest, type UsbHostGuest } from '../../src/devkit/guest/usbhost-guest.js';
import { sleep } from '../helpers/wait.js';

const MiB = 1024 * 1024;
const BLOCK = 65536;
/** Tagged blocks go to SLOTS slots of 64 KiB from BASE (in 64 KiB units: 4 MiB in). */
const SLOTS = 128;
const BASE = 64;
const MIGRATIONS = Number(process.env.USBROAM_LIBUSB_MIGRATIONS ?? 1);
const RESET_LINE = /reset (low|full|high|super|SuperSpeed)[^\n]*USB device/;

// Writer: block i = "BLOCK %08d " + random bytes (65536 in all) -> slot i % SLOTS, written with
// O_DIRECT + fsync, then read back with O_DIRECT and compared. /tmp/wlog: "i sha ok|BAD|ERR".
const WRITER = `
i=0
while [ ! -e /tmp/stop ]; do
  { printf 'BLOCK %08d ' $i; head -c 65521 /dev/urandom; } > /tmp/blk
  s=$(sha256sum /tmp/blk | cut -d' ' -f1)
  o=$(( (i % ${SLOTS}) + ${BASE} ))
  if dd if=/tmp/blk of=/dev/sda bs=${BLOCK} seek=$o oflag=direct conv=fsync 2>/dev/null; then
    r=$(dd if=/dev/sda bs=${BLOCK} skip=$o count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    if [ "$r" = "$s" ]; then echo "$i $s ok" >> /tmp/wlog; else echo "$i $s BAD" >> /tmp/wlog; fi
  else
    echo "$i $s ERR" >> /tmp/wlog
  fi
  i=$((i + 1))
done
echo DONE >> /tmp/wlog
`;

// Reader: the first 4 MiB (written before the writer started), 1 MiB bulk INs; its sha each time.
const READER = `
while [ ! -e /tmp/stop ]; do
  s=$(dd if=/dev/sda bs=1M count=4 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
  echo "$s" >> /tmp/rlog
done
echo DONE >> /tmp/rlog
`;

function readImage(file: string, offset: number, length: number): Buffer {
  const fd = openSync(file, 'r');
  try {
    const buf = Buffer.alloc(length);
    let got = 0;
    while (got < length) {
      const n = readSync(fd, buf, got, length - got, offset + got);
      if (n <= 0) throw new Error(`short read of ${file} at ${offset + got}`);
      got += n;
    }
    return buf;
  } finally {
    closeSync(fd);
  }
}

const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

async function wlogLines(g: Guest): Promise<string[]> {
  return (await g.sh('cat /tmp/wlog 2>/dev/null || true', { timeoutMs: 60_000 })).trim().split('\n').filter((l) => /^\d+ [0-9a-f]{64} \w+$/.test(l));
}

describe('e2e libusb backend: live migration of the VM under I/O (USB host guest -> VM, two bridges)', function () {
  this.timeout(1_800_000);
  let image: GuestImage;
  let host: UsbHostGuest | undefined;
  let dir: string;
  let stickImg: string;
  let serverOpts: { address: string; ca: string; cert: string; key: string };
  const hostA: Host = { name: 'A', bridge: undefined as unknown as Bridge };
  const hostB: Host = { name: 'B', bridge: undefined as unknown as Bridge };
  const guests: Guest[] = [];
  let cur: Guest;
  let curHost: Host;
  let att: AttachmentInfo;
  let vmSeq = 0;
  let hostResetsBefore = 0;

  before(async function () {
    this.timeout(1_200_000);
    image = await e2eImageOrSkip(this);
    dir = mkdtempSync(path.join(os.tmpdir(), 'ubr-libusb-mig-'));
    stickImg = path.join(dir, 'stick.img');
    closeSync(openSync(stickImg, 'w'));
    truncateSync(stickImg, 64 * MiB);
    const t0 = Date.now();
    const [h, vm0] = await Promise.all([
      startUsbHostGuest({ image, storage: { image: stickImg, serial: 'MIGSTICK01' }, allow: ['46f4:*'] }),
      startVmGuest({ image, dir, name: 'vm0' }),
    ]);
    host = h;
    guests.push(vm0.guest);
    cur = vm0.guest;
    console.log(`      USB host guest serving and VM up after ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    serverOpts = { address: host.address, ...clientTls('bridge') };
    hostA.bridge = new Bridge({ log: log.child({ host: 'A' }), runDir: path.join(dir, 'A') });
    hostB.bridge = new Bridge({ log: log.child({ host: 'B' }), runDir: path.join(dir, 'B') });
    hostA.bridge.addVm({ name: 'vm0', qmpSocket: vm0.bridgeQmp });
    curHost = hostA;
  });

  after(async () => {
    await hostA.bridge?.close().catch(() => {});
    await hostB.bridge?.close().catch(() => {});
    await Promise.allSettled(guests.map((g) => g.stop()));
    if (host && process.env.USBROAM_E2E_KEEP) console.log(await host.serverLog().catch(() => ''));
    await host?.stop();
    if (dir && !process.env.USBROAM_E2E_KEEP) rmSync(dir, { recursive: true, force: true });
  });

  it('attaches the USB host guest\'s stick (libusb backend) to the VM and writes a reference region', async () => {
    att = await hostA.bridge.attach({ vm: 'vm0', server: serverOpts, selector: { serial: 'MIGSTICK01' }, bus: 'xhci.0' });
    await cur.waitForPath('/sys/block/sda', { timeoutMs: 300_000 });
    await cur.waitForPath('/dev/sda');
    await cur.sh('dd if=/dev/urandom of=/tmp/x bs=1M count=4 2>/dev/null; dd if=/tmp/x of=/dev/sda bs=1M oflag=direct conv=fsync 2>/dev/null; sha256sum /tmp/x | cut -d" " -f1 > /tmp/x.sha', {
      timeoutMs: 300_000,
    });
    const want = (await cur.sh('cat /tmp/x.sha')).trim();
    expect(sha256(readImage(stickImg, 0, 4 * MiB)), 'the stick image holds the reference region').to.equal(want);
    hostResetsBefore = (await host!.guest.dmesg()).split('\n').filter((l) => RESET_LINE.test(l)).length;
  });

  it(`migrates the VM ${MIGRATIONS}x while it writes and verifies tagged blocks; every block verifies, no disconnect/reset/error`, async () => {
    await cur.sh(`cat > /tmp/w.sh <<'EOS'\n${WRITER}\nEOS\ncat > /tmp/r.sh <<'EOS'\n${READER}\nEOS\nrm -f /tmp/stop /tmp/wlog /tmp/rlog; (sh /tmp/w.sh > /dev/null 2>&1 &); (sh /tmp/r.sh > /dev/null 2>&1 &)`);
    // Some blocks written on the source first.
    const t0 = Date.now();
    while ((await wlogLines(cur)).length < 8) {
      if (Date.now() - t0 > 300_000) throw new Error('the writer wrote fewer than 8 blocks in 300 s');
      await sleep(1000);
    }
    const figures: string[] = [];
    let writtenAtLast = 0;
    for (let m = 0; m < MIGRATIONS; m++) {
      const dstHost = curHost === hostA ? hostB : hostA;
      const dstVm = `vm${++vmSeq}`;
      const r = await migrateWithHandOff({
        image,
        dir,
        src: cur,
        srcVm: `vm${vmSeq - 1}`,
        srcHost: curHost,
        dstHost,
        dstVm,
        attachment: att,
        server: serverOpts,
        log,
      });
      guests.push(r.dst);
      expect(r.status, 'migration status').to.equal('completed');
      expect(r.handOff?.ok, r.handOff?.error).to.equal(true);
      const old = cur;
      cur = r.dst;
      curHost = dstHost;
      att = r.attached!;
      void old.stop();
      const h = r.handOff!;
      figures.push(
        `total ${r.totalMs} ms, downtime ${r.downtimeMs} ms, hand-off +${h.sinceCompletedMs?.toFixed(1)} ms after 'completed' ` +
          `(unread ${h.info?.unreadInSocket} B, re-sent ${h.info?.toQemuBytes} B, in flight ${h.info?.inFlight}, frozen before save ${h.info?.frozenBeforeSave})`,
      );
      writtenAtLast = (await wlogLines(cur)).length;
      // The guest goes on writing on the destination.
      const t1 = Date.now();
      while ((await wlogLines(cur)).length < writtenAtLast + 8) {
        if (Date.now() - t1 > 300_000) throw new Error(`the writer made no progress on the destination (${writtenAtLast} blocks before)`);
        await sleep(1000);
      }
    }
    const g = cur;
    await g.sh('touch /tmp/stop');
    const deadline = Date.now() + 300_000;
    while (!/DONE\s+DONE/.test(await g.sh('tail -n1 /tmp/wlog; tail -n1 /tmp/rlog'))) {
      if (Date.now() > deadline) throw new Error('the writer/reader did not stop');
      await sleep(1000);
    }
    const wlog = await wlogLines(g);
    const notOk = wlog.filter((l) => !l.endsWith(' ok'));
    // Tags: block i was written i-th (no gap, nothing repeated).
    const seqs = wlog.map((l) => Number(l.split(' ')[0]));
    expect(seqs, 'sequence numbers 0..n-1 in order').to.deep.equal(seqs.map((_, i) => i));
    const latest = new Map<number, { i: number; sha: string }>();
    for (const l of wlog) {
      const [is, sha] = l.split(' ');
      const i = Number(is);
      latest.set(i % SLOTS, { i, sha: sha! });
    }
    // Every slot's latest block, read back in the VM ...
    const sums = await g.sh(
      `for s in ${[...latest.keys()].join(' ')}; do echo "$s $(dd if=/dev/sda bs=${BLOCK} skip=$((s + ${BASE})) count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"; done`,
      { timeoutMs: 600_000 },
    );
    const badInVm: number[] = [];
    let readInVm = 0;
    for (const l of sums.trim().split('\n').filter((x) => /^\d+ [0-9a-f]{64}$/.test(x.trim()))) {
      const [ss, h] = l.trim().split(' ');
      readInVm++;
      if (latest.get(Number(ss))!.sha !== h) badInVm.push(Number(ss));
    }
    // ... and in the stick's image file on the host (what the USB host guest's usb-storage wrote).
    const badInImage: string[] = [];
    for (const [s, { i, sha }] of latest) {
      const b = readImage(stickImg, (s + BASE) * BLOCK, BLOCK);
      const tag = b.subarray(0, 15).toString('latin1');
      if (tag !== `BLOCK ${String(i).padStart(8, '0')} ` || sha256(b) !== sha) badInImage.push(`slot ${s}: want block ${i}, tag "${tag}"`);
    }
    const want = (await g.sh('cat /tmp/x.sha')).trim();
    const reads = (await g.sh('grep -v DONE /tmp/rlog || true', { timeoutMs: 60_000 })).trim().split('\n').filter(Boolean);
    const vmBad = (await g.dmesg()).split('\n').filter((l) => BAD_LINE.test(l));
    const hostLines = (await host!.guest.dmesg()).split('\n');
    const hostResets = hostLines.filter((l) => RESET_LINE.test(l)).length - hostResetsBefore;
    const hostBad = hostLines.filter((l) => /USB disconnect|error -110|I\/O error/.test(l));
    console.log(`      ${MIGRATIONS} migration(s): ${figures.join('; ')}`);
    console.log(
      `      ${wlog.length} tagged blocks written (${wlog.length - writtenAtLast} after the last switchover), ${notOk.length} not ok; ` +
        `${latest.size} slots verified in the VM (${badInVm.length} bad) and in the image (${badInImage.length} bad); ` +
        `${reads.length} reads of 4 MiB, ${reads.filter((r) => r !== want).length} differed`,
    );
    expect(notOk, 'every write succeeded and read back equal').to.deep.equal([]);
    expect(readInVm, 'every slot read back in the VM').to.equal(latest.size);
    expect(badInVm, 'slots whose content in the VM is not their latest block').to.deep.equal([]);
    expect(badInImage, 'slots whose content in the stick image is not their latest block').to.deep.equal([]);
    expect(reads.length, 'the reader ran').to.be.greaterThan(0);
    expect(reads.filter((r) => r !== want), 'reads of the reference region that differed').to.deep.equal([]);
    expect(vmBad, 'VM dmesg').to.deep.equal([]);
    expect(hostResets, 'device resets in the USB host guest during the migration(s)').to.equal(0);
    expect(hostBad, 'USB host guest dmesg').to.deep.equal([]);
    // The server handed the session over once per migration and never lost the device or the session.
    const serverLog = await host!.serverLog();
    expect(serverLog.split('\n').filter((l) => l.includes('session handed over')).length, 'hand-overs in the server log').to.equal(MIGRATIONS);
    expect(serverLog).to.not.match(/device gone|grace period expired|libusb device removed/);
  });
});
