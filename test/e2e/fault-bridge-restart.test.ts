// End to end: the bridge daemon (`usbroam bridge --state-dir`) is killed with SIGKILL outside a
// migration while the guest writes checksummed blocks, and started again with the same flags.
// QEMU sees its usb-redir chardev close (the guest sees an unplug); the restarted bridge reads
// its state file, closes the session the dead bridge held (so the claim does not block the
// device for the server's grace period), claims the device again and connects to the chardev
// QEMU kept: the guest sees a replug, well before the grace period would have ended. Every slot
// whose last write succeeded holds exactly that block. A clean stop (SIGTERM) detaches and
// leaves an empty state file.
import { expect } from 'chai';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { BridgeControlClient } from '../../src/client/bridge-control/client.js';
import { waitForDisk } from '../../src/devkit/bridge-guest.js';
import { dmesgLineCount, faultServerArgs, guestView, markPortArgs, MarkListener, nextWriteMark, startBridgeDaemon, type BridgeDaemon } from '../../src/devkit/guest-faults.js';
import { startSlotWriter, stopSlotWriter, verifySlots } from '../../src/devkit/migration-faults.js';
import { useBridgeGuest } from '../helpers/bridge-guest-fixture.js';
import { until } from '../helpers/wait.js';

const GRACE_MS = 20_000;

describe('e2e faults: the bridge is killed and restarted', function () {
  this.timeout(600_000);
  const marks = new MarkListener();
  const daemons: BridgeDaemon[] = [];
  let markSock = '';
  const rig = useBridgeGuest({
    name: 'fault-bridge',
    serverArgs: (dir) => faultServerArgs(path.join(dir, 'disk.img'), GRACE_MS),
    noBridge: true,
    beforeGuest: (r) => {
      const m = markPortArgs(r.dir, 'fault-bridge');
      markSock = m.sock;
      return m.args;
    },
    beforeTeardown: async () => {
      marks.close();
      for (const d of daemons) await d.kill('SIGTERM').catch(() => {});
    },
  });

  const stateFile = () => path.join(rig.dir, 'state', 'bridge-state.json');
  const daemon = async () => {
    const d = await startBridgeDaemon({
      control: path.join(rig.dir, 'control.sock'),
      server: rig.serverOpts.address,
      args: ['--vm', `vm1=${rig.bridgeQmp}`, '--run-dir', path.join(rig.dir, 'run'), '--state-dir', path.join(rig.dir, 'state'), '--log-level', 'info'],
    });
    daemons.push(d);
    return d;
  };

  it('kill -9: an unplug in the guest; the restarted bridge re-attaches from its state file (a replug), no corrupt block', async () => {
    const g = rig.guest;
    await marks.connect(markSock);
    const first = await daemon();
    const control = new BridgeControlClient({ address: first.control });
    let sessionId: string;
    try {
      const att = await control.attach({ vm: 'vm1', device: { serial: 'USBROAM-MSC-0001', id: '', vidPid: '', portPath: '' }, bus: rig.bus });
      sessionId = att.sessionId;
    } finally {
      control.close();
    }
    const saved = JSON.parse(readFileSync(stateFile(), 'utf8'));
    expect(saved.attachments.map((a: { sessionId: string }) => a.sessionId)).to.deep.equal([sessionId]);
    await waitForDisk(g);
    const tWriter = performance.now();
    await startSlotWriter(g, { marks: true });
    await until('the guest writer running (5 completed writes)', () => marks.count(/^W /, tWriter) >= 5, 60_000, 50);

    const d0 = await dmesgLineCount(g);
    const t0 = performance.now();
    await first.kill('SIGKILL');
    const second = await daemon();
    const tStarted = performance.now();
    const re = await second.waitFor((r) => r.msg === 'device re-attached: the guest sees a replug', 60_000, 're-attach');
    const tAttached = performance.now();
    const next = await nextWriteMark(marks, tAttached, 120_000);
    const v = await guestView(g, marks, t0, next, d0);
    const firstErr = marks.marks.find((m) => m.t > t0 && /^E /.test(m.line));
    console.log(
      `      bridge restarted ${Math.round(tStarted - t0)} ms after the kill; first failed write (unplug) at ${firstErr ? Math.round(firstErr.t - t0) : '-'} ms; re-attached at ${Math.round(tAttached - t0)} ms (${JSON.stringify({ afterMs: re.afterMs, attempts: re.attempts })}); first write on the replugged disk at ${Math.round(next - t0)} ms; ${v.failedWrites} failed writes; dmesg ${JSON.stringify({ ...v.dmesg, bad: v.dmesg.bad.length })}`,
    );
    expect(tAttached - t0, 're-attached before the grace period of the old session ended').to.be.lessThan(GRACE_MS);
    expect(rig.server!.logs.some((l) => l.includes('session closed by admin request') && l.includes(sessionId)), 'the old session was closed by the new bridge').to.equal(true);
    expect(v.dmesg.disconnects, 'an unplug in the guest').to.be.greaterThan(0);
    expect(v.dmesg.resets, 'no USB reset').to.equal(0);
    expect(v.dmesg.bad.filter((l) => /error -110/.test(l)), 'no timeouts').to.deep.equal([]);

    const after = JSON.parse(readFileSync(stateFile(), 'utf8'));
    expect(after.attachments).to.have.length(1);
    expect(after.attachments[0].sessionId, 'the state file holds the new session').to.not.equal(sessionId);
    await stopSlotWriter(g);
    const s = await verifySlots(g);
    console.log(`      slots: ${JSON.stringify(s)}`);
    expect(s.bad, 'slots whose last completed write is not on the disk').to.deep.equal([]);
    expect(s.verified).to.be.greaterThan(0);

    // A clean stop detaches: nothing is left to restore.
    await second.kill('SIGTERM');
    expect((await second.exited).code).to.equal(0);
    await until('an empty state file', () => JSON.parse(readFileSync(stateFile(), 'utf8')).attachments.length === 0, 10_000);
  });
});
