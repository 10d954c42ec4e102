// End to end: the emulated CDC-ACM echo device (server in its own process) attached through the
// Bridge to a real QEMU guest over xHCI. The guest's cdc_acm driver binds it as /dev/ttyACM0; in
// raw mode a line written comes back, and so does a 64 KiB random payload (sha256 compared).
import { expect } from 'chai';
import path from 'node:path';
import { badKernelLines, dmesgLines, guestSha256 } from '../../src/devkit/bridge-guest.js';
import type { Guest } from '../../src/devkit/guest/guest.js';
import { servedDevice, useBridgeGuest } from '../helpers/bridge-guest-fixture.js';
import { sleep, until, untilGuestHasOpen } from '../helpers/wait.js';

const TTY = '/dev/ttyACM0';

/** The number on a line of its own, e.g. `wc -c` output (the interactive guest shell may add job-status lines). */
function numberIn(out: string): number {
  const m = /^\s*(\d+)\s*$/m.exec(out);
  return m ? Number(m[1]) : NaN;
}

describe('e2e bridge: CDC-ACM serial echo device in a QEMU guest', function () {
  this.timeout(600_000);
  const rig = useBridgeGuest({
    name: 'bridge-serial',
    serverArgs: (dir) => ['--allow', 'bridge=*', '--disk-image', path.join(dir, 'disk.img'), '--disk-size-mib', '16'],
    beforeTeardown: async (r) => {
      await r.guest.run('kill $(cat /tmp/cat.pid 2>/dev/null) 2>/dev/null; true', { timeoutMs: 5000 });
    },
  });
  let product = '';

  before(async () => {
    product = (await servedDevice(rig, 'USBROAM-ACM-0001')).product;
  });

  /** Start a reader in the background (it keeps the tty open), set raw mode. */
  async function startReader(g: Guest, out: string): Promise<void> {
    await g.sh(`rm -f ${out}; cat ${TTY} > ${out} & echo $! > /tmp/cat.pid`);
    await g.sh(`stty -F ${TTY} raw -echo -echoe -echok -echoctl -echoke -ixon -ixoff`).catch(async () => {
      // older busybox stty: fewer flags
      await g.sh(`stty -F ${TTY} raw -echo`);
    });
    await untilGuestHasOpen(g, '/tmp/cat.pid', TTY);
  }

  /**
   * Stop the reader and wait until it is gone, so that the file it wrote is final. The kill is
   * sent from the background a moment later, so that the reader (and the killer) end while the
   * console shell waits for its next command, which is when a plain `kill` often took effect
   * under load: the shell must survive the SIGCHLDs (the detach test checks the transcript for a
   * shell restart).
   */
  async function stopReader(g: Guest): Promise<void> {
    const pid = numberIn(await g.sh('cat /tmp/cat.pid'));
    expect(pid, "the reader's pid").to.be.greaterThan(1);
    await g.sh(`rm -f /tmp/cat.pid; (usleep 300000; kill ${pid}) >/dev/null 2>&1 &`);
    await until('the reader gone', async () => (await g.run(`kill -0 ${pid} 2>/dev/null`)).exitCode !== 0, 30_000, 100);
  }

  it('attaches; the guest binds cdc_acm and /dev/ttyACM0 appears', async () => {
    const g = rig.guest;
    const info = await rig.bridge.attach({ vm: 'vm1', server: rig.serverOpts, selector: { serial: 'USBROAM-ACM-0001' }, bus: rig.bus });
    expect(info.serial).to.equal('USBROAM-ACM-0001');
    await g.waitForPath(TTY, { timeoutMs: 120_000 });
    const dmesg = await g.dmesg();
    expect(dmesg).to.include(`Product: ${product}`);
    expect(dmesg).to.include('SerialNumber: USBROAM-ACM-0001');
    expect(dmesg).to.match(/cdc_acm [^\n]*ttyACM0: USB ACM device/);
  });

  it('echoes a line written in raw mode', async () => {
    const g = rig.guest;
    await startReader(g, '/tmp/echo');
    // Not `printf > tty`: the guest shell is a session leader without a controlling terminal, so
    // opening the tty itself would make it the shell's controlling tty (and a hang-up on unplug
    // would kill the shell). A child process opens it instead.
    await g.sh(`printf 'hello-usbroam-123\\n' | dd of=${TTY} 2>/dev/null`);
    await until('the echo', async () => (await g.run('grep -q hello-usbroam-123 /tmp/echo')).exitCode === 0, 30_000, 250);
    await stopReader(g);
    // Exactly the line, nothing more (no tty echo, no CR/LF translation).
    expect((await g.run(`[ "$(cat /tmp/echo)" = 'hello-usbroam-123' ]`)).exitCode, await g.sh('od -c /tmp/echo')).to.equal(0);
    expect(numberIn(await g.sh('wc -c < /tmp/echo'))).to.equal('hello-usbroam-123\n'.length);
  });

  it('echoes a 64 KiB random payload byte for byte', async () => {
    const g = rig.guest;
    const size = 64 * 1024;
    await g.sh(`dd if=/dev/urandom of=/tmp/payload bs=1024 count=64 2>/dev/null`);
    const want = await guestSha256(g, 'cat /tmp/payload');
    await startReader(g, '/tmp/echo64');
    const t0 = Date.now();
    await g.sh(`dd if=/tmp/payload of=${TTY} bs=4096 2>/dev/null`, { timeoutMs: 120_000 });
    await until('the whole payload back', async () => {
      const r = await g.run('wc -c < /tmp/echo64');
      return numberIn(r.output) >= size;
    }, 120_000, 250);
    console.log(`      64 KiB echoed in ${Date.now() - t0} ms`);
    await sleep(300); // proves nothing extra arrives within 300 ms after the payload
    await stopReader(g);
    expect(numberIn(await g.sh('wc -c < /tmp/echo64'))).to.equal(size);
    expect(await guestSha256(g, 'cat /tmp/echo64')).to.equal(want);
    const bad = badKernelLines(await dmesgLines(g));
    expect(bad, bad.join('\n')).to.deep.equal([]);
  });

  it('detach is a clean unplug: /dev/ttyACM0 goes away', async () => {
    const g = rig.guest;
    const [a] = rig.bridge.list();
    await rig.bridge.detach('vm1', a!.id);
    await until('ttyACM0 gone', async () => (await g.run(`test -e ${TTY}`)).exitCode !== 0, 60_000, 250);
    const lines = await dmesgLines(g);
    expect(lines.some((l) => /USB disconnect, device number/.test(l))).to.equal(true);
    expect(g.console.transcript(), 'the guest shell survived the readers ending and the tty going away').to.not.include('USBROAM-GUEST-SHELL-RESTART');
    const bad = badKernelLines(lines);
    expect(bad, bad.join('\n')).to.deep.equal([]);
  });
});
