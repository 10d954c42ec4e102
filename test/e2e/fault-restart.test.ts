// End to end: the USB host server dies (kill -9) under a guest writing checksummed blocks, and
// comes back on the same port with the same disk image; then QEMU itself is killed.
//  - Server kill -9 and restart: a session cannot outlive its server process, so the guest sees
//    a stall while the bridge tries to resume, then a clean unplug (the restarted server does
//    not know the session) and a replug once the bridge has claimed the device again; every
//    slot whose last write succeeded holds exactly that block (the image was not corrupted).
//  - QEMU killed: the bridge sees its chardev close and closes the session, the server releases
//    the claim (well within the grace period), and another client can claim the device.
import { expect } from 'chai';
import path from 'node:path';
import { Bridge } from '../../src/client/bridge/bridge.js';
import { UsbHostClient } from '../../src/client/sdk/client.js';
import { waitForDisk } from '../../src/devkit/bridge-guest.js';
import { dmesgLineCount, faultServerArgs, guestView, markPortArgs, MarkListener, nextWriteMark, portOf, restartServerOnPort } from '../../src/devkit/guest-faults.js';
import { capturingLogger, startSlotWriter, stopSlotWriter, verifySlots } from '../../src/devkit/migration-faults.js';
import { useBridgeGuest } from '../helpers/bridge-guest-fixture.js';
import { until } from '../helpers/wait.js';

const GRACE_MS = 8000;

describe('e2e faults: the server restarts, QEMU dies', function () {
  this.timeout(600_000);
  const marks = new MarkListener();
  const cap = capturingLogger('info');
  let markSock = '';
  let image = '';
  const rig = useBridgeGuest({
    name: 'fault-restart',
    serverArgs: (dir) => faultServerArgs((image = path.join(dir, 'disk.img')), GRACE_MS),
    noBridge: true,
    beforeGuest: (r) => {
      r.serverOpts = { ...r.serverOpts };
      r.bridge = new Bridge({ log: cap.log, runDir: r.dir, reattachWindowMs: 120_000, resumeWindowMs: 6000 });
      const m = markPortArgs(r.dir, 'fault-restart');
      markSock = m.sock;
      return m.args;
    },
    beforeTeardown: async () => marks.close(),
  });

  it('server kill -9 and restart: a stall, a clean unplug, a replug; no corrupt block', async () => {
    const g = rig.guest;
    await marks.connect(markSock);
    const info = await rig.bridge.attach({ vm: 'vm1', server: rig.serverOpts, selector: { serial: 'USBROAM-MSC-0001' }, bus: rig.bus });
    await waitForDisk(g);
    const tWriter = performance.now();
    await startSlotWriter(g, { marks: true });
    await until('the guest writer running (5 completed writes)', () => marks.count(/^W /, tWriter) >= 5, 60_000, 50);

    const d0 = await dmesgLineCount(g);
    const port = portOf(rig.server!.address);
    const t0 = performance.now();
    rig.server!.child.kill('SIGKILL');
    await rig.server!.stop();
    await until('the bridge to see its URB channel gone', () => cap.records.some((r) => r.session === info.sessionId && /URB channel lost|session lost/.test(String(r.msg))), 60_000, 50);
    rig.server = await restartServerOnPort(port, image, GRACE_MS);
    const tBack = performance.now();
    const again = await until('the re-attached device', () => rig.bridge.list().find((a) => a.sessionId !== info.sessionId), 120_000, 50);
    const tAttached = performance.now();
    const next = await nextWriteMark(marks, tAttached, 120_000);
    const v = await guestView(g, marks, t0, next, d0);
    const firstErr = marks.marks.find((m) => m.t > t0 && /^E /.test(m.line));
    console.log(
      `      server back ${Math.round(tBack - t0)} ms after the kill; first failed write (unplug) at ${firstErr ? Math.round(firstErr.t - t0) : '-'} ms; re-attached at ${Math.round(tAttached - t0)} ms; first write on the replugged disk at ${Math.round(next - t0)} ms; ${v.failedWrites} failed writes; dmesg ${JSON.stringify({ ...v.dmesg, bad: v.dmesg.bad.length })}`,
    );
    expect(again!.deviceId).to.equal(info.deviceId);
    expect(v.dmesg.disconnects, 'a clean unplug').to.be.greaterThan(0);
    expect(v.dmesg.resets, 'no USB reset').to.equal(0);
    expect(v.dmesg.bad.filter((l) => /error -110/.test(l)), 'no timeouts').to.deep.equal([]);
    expect(cap.records.some((r) => r.session === info.sessionId && /session lost/.test(String(r.msg))), 'the bridge logged the lost session').to.equal(true);
    await stopSlotWriter(g);
    const s = await verifySlots(g);
    console.log(`      slots: ${JSON.stringify(s)}`);
    expect(s.bad, 'slots whose last completed write is not on the disk').to.deep.equal([]);
    expect(s.verified).to.be.greaterThan(0);
  });

  it('QEMU killed: the server releases the claim and another client claims the device', async () => {
    const [a] = rig.bridge.list();
    expect(a, 'an attachment').to.not.equal(undefined);
    const other = new UsbHostClient(rig.serverOpts);
    try {
      const t0 = performance.now();
      process.kill(rig.guest.pid, 'SIGKILL');
      await rig.guest.exited;
      await until('the session to end at the server', async () => !(await other.listSessions()).some((s) => s.id === a!.sessionId), GRACE_MS, 50);
      const released = performance.now() - t0;
      const dev = await other.openDevice({ id: a!.deviceId });
      const claimed = performance.now() - t0;
      console.log(`      QEMU killed: claim released after ${Math.round(released)} ms (grace ${GRACE_MS} ms); claimed by another client after ${Math.round(claimed)} ms`);
      expect(dev.sessionId).to.not.equal(a!.sessionId);
      await dev.close();
      await until('the bridge to drop the attachment', () => rig.bridge.list().length === 0, 30_000);
    } finally {
      other.close();
    }
  });
});
