// The CDC-ACM echo device across a live migration (issue 4): in the guest, a writer sends a
// stream of numbered lines through /dev/ttyACM0 while a reader collects what the device echoes
// back; the VM migrates A -> B in the middle. Afterwards the echoed stream is exactly the lines
// sent, in order: none lost, none repeated; dmesg clean.
import { expect } from 'chai';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Bridge } from '../../src/client/bridge/bridge.js';
import { createLogger, silentLogger } from '../../src/common/log.js';
import { clientTls } from '../helpers/certs.js';
import { classifyDmesg, delay } from '../helpers/migration-faults.js';
import { migrateWithHandOff, startVmGuest } from '../helpers/migration-rig.js';
import { startServerProcess, type ServerProcess } from '../helpers/server-process.js';
import { ensureGuestImage, guestAvailability, type Guest, type GuestImage } from './harness/guest.js';

const log = process.env.USBROAM_TEST_LOG ? createLogger({ level: process.env.USBROAM_TEST_LOG }) : silentLogger;
const TTY = '/dev/ttyACM0';

describe('e2e migration: the CDC-ACM echo stream survives live migration byte-exact', function () {
  this.timeout(600_000);
  let image: GuestImage;
  let server: ServerProcess | undefined;
  let dir: string;
  const guests: Guest[] = [];
  let bridgeA: Bridge | undefined;
  let bridgeB: Bridge | undefined;

  before(async function () {
    this.timeout(900_000);
    if (process.env.USBROAM_E2E === '0') this.skip();
    try {
      image = await ensureGuestImage();
    } catch (err) {
      if (process.getuid?.() !== 0 && !guestAvailability().ok) {
        console.warn(`skipping e2e: ${(err as Error).message}`);
        this.skip();
      }
      throw err;
    }
    dir = mkdtempSync(path.join(os.tmpdir(), 'ums-'));
    server = await startServerProcess(['--allow', 'bridge=*', '--disk-image', path.join(dir, 'disk.img'), '--disk-size-mib', '16']);
  });

  after(async () => {
    for (const g of guests) await g.run(`kill $(cat /tmp/cat.pid 2>/dev/null) 2>/dev/null; true`, { timeoutMs: 3000 }).catch(() => {});
    await bridgeA?.close().catch(() => {});
    await bridgeB?.close().catch(() => {});
    await Promise.allSettled(guests.map((g) => g.stop()));
    await server?.stop();
    if (dir && !process.env.USBROAM_E2E_KEEP) rmSync(dir, { recursive: true, force: true });
  });

  it('numbered lines echoed through /dev/ttyACM0 while the VM migrates: none lost or repeated', async () => {
    const serverOpts = { address: server!.address.replace('127.0.0.1', 'localhost'), ...clientTls('bridge') };
    bridgeA = new Bridge({ log: log.child({ host: 'A' }), runDir: path.join(dir, 'A') });
    bridgeB = new Bridge({ log: log.child({ host: 'B' }), runDir: path.join(dir, 'B') });
    const { guest, bridgeQmp } = await startVmGuest({ image, dir, name: 's0' });
    guests.push(guest);
    bridgeA.addVm({ name: 's0', qmpSocket: bridgeQmp });
    const att = await bridgeA.attach({ vm: 's0', server: serverOpts, selector: { serial: 'USBROAM-ACM-0001' }, bus: 'xhci.0' });
    await guest.waitForPath(TTY, { timeoutMs: 120_000 });
    // Reader first (keeps the tty open), raw mode, then the writer: one line every ~10 ms, from
    // a child process holding the tty open (not the shell: it must not become its ctty).
    await guest.sh(`rm -f /tmp/echo /tmp/stop /tmp/sent; cat ${TTY} > /tmp/echo & echo $! > /tmp/cat.pid`);
    await guest.sh(`stty -F ${TTY} raw -echo -echoe -echok -echoctl -echoke -ixon -ixoff`).catch(() => guest.sh(`stty -F ${TTY} raw -echo`));
    await delay(300);
    await guest.sh(`cat > /tmp/s.sh <<'EOS'
exec 3>${TTY}
i=0
while [ ! -e /tmp/stop ]; do printf 'L%06d\\n' $i >&3; i=$((i + 1)); [ $((i % 4)) = 0 ] && sleep 0.02; done
printf 'END\\n' >&3
echo $i > /tmp/sent
EOS
(sh /tmp/s.sh > /dev/null 2>&1 &)`);
    await delay(3000);
    const r = await migrateWithHandOff({ image, dir, src: guest, srcVm: 's0', srcHost: { name: 'A', bridge: bridgeA }, dstHost: { name: 'B', bridge: bridgeB }, dstVm: 's1', attachment: att, server: serverOpts, log });
    guests.push(r.dst);
    expect(r.status).to.equal('completed');
    expect(r.handOff?.ok, r.handOff?.error).to.equal(true);
    void guest.stop();
    const g = r.dst;
    await delay(3000);
    await g.sh('touch /tmp/stop');
    const deadline = Date.now() + 60_000;
    while ((await g.run('grep -q END /tmp/echo && test -s /tmp/sent')).exitCode !== 0) {
      if (Date.now() > deadline) throw new Error(`the echo of END did not arrive: ${await g.sh('tail -c 200 /tmp/echo; cat /tmp/sent 2>/dev/null; true')}`);
      await delay(500);
    }
    await delay(300);
    const sent = Number((await g.sh('cat /tmp/sent')).trim());
    // Compare in the guest (the stream is long): the expected text, then its checksum.
    const cmp = await g.sh(`i=0; : > /tmp/want; while [ $i -lt ${sent} ]; do printf 'L%06d\\n' $i; i=$((i + 1)); done > /tmp/want; printf 'END\\n' >> /tmp/want; ` +
      `sha256sum /tmp/want /tmp/echo | cut -d' ' -f1; wc -l < /tmp/echo; grep -c '^L' /tmp/echo; sort /tmp/echo | uniq -d | wc -l`, { timeoutMs: 120_000 });
    const [want, got, lines, numbered, dups] = cmp.trim().split('\n').map((x) => x.trim());
    let firstDiff = '';
    if (want !== got) firstDiff = await g.sh('cmp /tmp/want /tmp/echo 2>&1 | head -n 2; diff /tmp/want /tmp/echo 2>&1 | head -n 20; true');
    const hi = r.handOff!.info!;
    console.log(`      ${sent} lines sent; ${lines} lines echoed (${numbered} numbered, ${dups} repeated); downtime ${r.downtimeMs} ms; hand-off: in flight ${hi.inFlight}, unread ${hi.unreadInSocket} B, re-sent ${hi.toQemuBytes} B`);
    expect(sent).to.be.greaterThan(100);
    expect(got, `echoed stream differs from the lines sent: ${firstDiff}`).to.equal(want);
    expect(Number(dups)).to.equal(0);
    expect(classifyDmesg(await g.dmesg()).bad).to.deep.equal([]);
  });
});
