// Several devices on one VM through live migrations: the emulated disk and the CDC-ACM
// echo device attached to the same VM (xHCI), each through its own session, both bridges and the
// server in separate processes. While the VM migrates A -> B -> A, the guest writes tagged,
// checksummed 64 KiB blocks to the disk (O_DIRECT + fsync) and sends numbered lines through
// /dev/ttyACM0 while reading the echo. Afterwards every block on the disk is the last one
// written to it, the echo is exactly the lines sent (every byte compared, none lost or
// repeated), each migration handed both sessions off, and dmesg is clean.
import { expect } from 'chai';
import type { AttachmentInfo } from '../../src/client/bridge/bridge.js';
import { classifyDmesg } from '../../src/devkit/migration-faults.js';
import { migrateWithHandOff, startVmGuest } from '../../src/devkit/migration-rig.js';
import type { Guest } from '../../src/devkit/guest/guest.js';
import { useBridgeHosts, useMigrationSetup } from '../helpers/bridge-guest-fixture.js';
import { guestLines, sleep, untilAtLeast, untilGuestHasOpen } from '../helpers/wait.js';

const TTY = '/dev/ttyACM0';
/** Progress of both workloads before the first migration and on each destination before the next: lines echoed, blocks written. */
const ECHOED_BETWEEN = 100;
const WRITTEN_BETWEEN = 12;

/** Waits until the serial echo and the disk writer have both made that much progress in `g` from now on. */
async function bothProgress(g: Guest, where: string): Promise<void> {
  const echoed = await guestLines(g, '/tmp/echo');
  const written = await guestLines(g, '/tmp/wlog');
  await untilAtLeast(`lines echoed ${where}`, () => guestLines(g, '/tmp/echo'), echoed + ECHOED_BETWEEN, 120_000);
  await untilAtLeast(`blocks written ${where}`, () => guestLines(g, '/tmp/wlog'), written + WRITTEN_BETWEEN, 120_000);
}

const DISK_WRITER = `
i=0
while [ ! -e /tmp/stop ]; do
  { printf 'BLOCK %08d ' $i; head -c 65521 /dev/urandom; } > /tmp/blk
  s=$(sha256sum /tmp/blk | cut -d' ' -f1)
  dd if=/tmp/blk of=/dev/sda bs=65536 seek=$((i + 64)) oflag=direct conv=fsync 2>/dev/null || echo "ERR $i" >> /tmp/wlog
  echo "$i $s" >> /tmp/wlog
  i=$(( (i + 1) % 256 ))
done
echo DONE >> /tmp/wlog
`;

const SERIAL_WRITER = `
exec 3>${TTY}
i=0
while [ ! -e /tmp/stop ]; do printf 'L%06d\\n' $i >&3; i=$((i + 1)); [ $((i % 4)) = 0 ] && sleep 0.02; done
printf 'END\\n' >&3
echo $i > /tmp/sent
`;

describe('e2e migration: two devices on one VM (disk and serial) stay byte-exact across A -> B -> A', function () {
  this.timeout(900_000);
  const m = useMigrationSetup({ name: 'migrate-multi', diskMiB: 32 });
  const hosts = useBridgeHosts(m);

  it('disk blocks and the serial echo stream verify after the migrations; both sessions handed off each time', async () => {
    const { A: hostA, B: hostB, childA } = hosts;
    const { guest, bridgeQmp } = await startVmGuest({ image: m.image, dir: m.dir, name: 'm0', memoryMb: 192 });
    m.guests.push(guest);
    await childA.host().addVm({ name: 'm0', qmpSocket: bridgeQmp });
    let atts: AttachmentInfo[] = [
      await childA.host().attach({ vm: 'm0', server: m.serverOpts, selector: { serial: 'USBROAM-MSC-0001' }, bus: 'xhci.0' }),
      await childA.host().attach({ vm: 'm0', server: m.serverOpts, selector: { serial: 'USBROAM-ACM-0001' }, bus: 'xhci.0' }),
    ];
    expect(new Set(atts.map((a) => a.sessionId)).size).to.equal(2);
    await guest.waitForPath('/sys/block/sda', { timeoutMs: 120_000 });
    await guest.waitForPath('/dev/sda');
    await guest.waitForPath(TTY, { timeoutMs: 120_000 });
    await guest.sh(`rm -f /tmp/echo /tmp/stop /tmp/sent /tmp/wlog; cat ${TTY} > /tmp/echo & echo $! > /tmp/cat.pid`);
    await guest.sh(`stty -F ${TTY} raw -echo -echoe -echok -echoctl -echoke -ixon -ixoff`).catch(() => guest.sh(`stty -F ${TTY} raw -echo`));
    await untilGuestHasOpen(guest, '/tmp/cat.pid', TTY);
    await guest.sh(`cat > /tmp/s.sh <<'EOS'\n${SERIAL_WRITER}\nEOS\ncat > /tmp/w.sh <<'EOS'\n${DISK_WRITER}\nEOS\n(sh /tmp/s.sh > /dev/null 2>&1 &); (sh /tmp/w.sh > /dev/null 2>&1 &)`);
    await untilAtLeast('lines echoed before the first migration', () => guestLines(guest, '/tmp/echo'), ECHOED_BETWEEN, 120_000);
    await untilAtLeast('blocks written before the first migration', () => guestLines(guest, '/tmp/wlog'), WRITTEN_BETWEEN, 120_000);
    const n = Number(process.env.USBROAM_MULTI_MIGRATIONS ?? 2);
    let cur = guest;
    let curHost = hostA;
    const figures: string[] = [];
    for (let i = 0; i < n; i++) {
      const dstHost = curHost === hostA ? hostB : hostA;
      const r = await migrateWithHandOff({ image: m.image, dir: m.dir, src: cur, srcVm: `m${i}`, srcHost: curHost, dstHost, dstVm: `m${i + 1}`, attachment: atts, server: m.serverOpts, memoryMb: 192 });
      m.guests.push(r.dst);
      expect(r.status).to.equal('completed');
      expect(r.handOffs!.map((h) => [h.attachment, h.ok, h.error])).to.deep.equal(atts.map((a) => [a.id, true, undefined]));
      expect(r.attachedAll!.map((a) => a.sessionId)).to.deep.equal(atts.map((a) => a.sessionId));
      figures.push(
        `${curHost.name}->${dstHost.name}: downtime ${r.downtimeMs} ms; ` +
          r.handOffs!.map((h) => `${h.attachment}: in flight ${h.info!.inFlight}, xHCI TDs ${h.xhciRewind?.inFlight ?? 0} (rewound ${h.xhciRewind?.patched ?? 0})`).join(', '),
      );
      void cur.stop();
      cur = r.dst;
      curHost = dstHost;
      atts = r.attachedAll!;
      await bothProgress(cur, `on ${dstHost.name}`);
    }
    const g = cur;
    await g.sh('touch /tmp/stop');
    const deadline = Date.now() + 90_000;
    while ((await g.run('grep -q END /tmp/echo && test -s /tmp/sent && grep -q DONE /tmp/wlog')).exitCode !== 0) {
      if (Date.now() > deadline) throw new Error(`the workloads did not finish: echo tail ${await g.sh('tail -c 100 /tmp/echo; tail -n 2 /tmp/wlog; true')}; ${figures.join('; ')}`);
      await sleep(500);
    }
    await sleep(300); // proves nothing more arrives after END within 300 ms (a repeated tail would differ below)
    // Serial: the whole stream, byte for byte.
    const sent = Number((await g.sh('cat /tmp/sent')).trim());
    const cmp = await g.sh(
      `i=0; while [ $i -lt ${sent} ]; do printf 'L%06d\\n' $i; i=$((i + 1)); done > /tmp/want; printf 'END\\n' >> /tmp/want; ` +
        `sha256sum /tmp/want /tmp/echo | cut -d' ' -f1; wc -c < /tmp/want; wc -c < /tmp/echo`,
      { timeoutMs: 120_000 },
    );
    const [want, got, wantBytes, gotBytes] = cmp.trim().split('\n').map((x) => x.trim());
    const diff = want === got ? '' : await g.sh('cmp /tmp/want /tmp/echo 2>&1 | head -n 2; true');
    // Disk: the last write of each block, read back.
    const wlog = (await g.sh('grep -v DONE /tmp/wlog', { timeoutMs: 60_000 })).trim().split('\n');
    const errs = wlog.filter((l) => l.startsWith('ERR'));
    const latest = new Map<number, string>();
    for (const l of wlog.filter((x) => !x.startsWith('ERR'))) {
      const [i, s] = l.split(' ');
      latest.set(Number(i), s!);
    }
    const sums = await g.sh(`for i in ${[...latest.keys()].join(' ')}; do echo "$i $(dd if=/dev/sda bs=65536 skip=$((i + 64)) count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"; done`, { timeoutMs: 300_000 });
    let bad = 0;
    for (const l of sums.trim().split('\n')) {
      const [i, s] = l.split(' ');
      if (latest.get(Number(i)) !== s) bad++;
    }
    console.log(`      serial: ${sent} lines (${wantBytes} bytes) sent, ${gotBytes} bytes echoed; disk: ${wlog.length} blocks written, ${latest.size} verified, ${bad} bad`);
    console.log(`      ${figures.join('\n      ')}`);
    expect(sent).to.be.greaterThan(200);
    expect(latest.size).to.be.greaterThan(20);
    expect(errs).to.deep.equal([]);
    expect(bad).to.equal(0);
    expect(Number(gotBytes), `echo byte count: ${diff}`).to.equal(Number(wantBytes));
    expect(got, `echoed stream differs: ${diff}`).to.equal(want);
    expect(classifyDmesg(await g.dmesg()).bad).to.deep.equal([]);
  });
});
