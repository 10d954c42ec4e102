// End to end: the network between the bridge and the USB host server fails while the guest
// writes checksummed blocks to the remote disk (O_DIRECT + fsync, a mark per completed write on
// /dev/ttyS1, timestamped on the host).
//  - Blackholes shorter than the server's grace period (here 2 s and 5 s; the bench does 5 s and
//    20 s): the guest sees a stall, never an error (no failed write, no USB disconnect or reset in
//    dmesg), and the session is the same one afterwards.
//  - A cut (connections reset, new ones refused) longer than the grace period: the server ends
//    the session (a log line naming it and the reason), the guest sees a clean unplug, the bridge
//    re-attaches the device once the network is back (a replug), and every slot whose last write
//    succeeded holds exactly that block.
import { expect } from 'chai';
import path from 'node:path';
import { Bridge } from '../../src/client/bridge/bridge.js';
import { waitForDisk } from '../../src/devkit/bridge-guest.js';
import { faultServerArgs, guestView, markPortArgs, MarkListener, nextWriteMark, dmesgLineCount } from '../../src/devkit/guest-faults.js';
import { capturingLogger, startSlotWriter, stopSlotWriter, verifySlots } from '../../src/devkit/migration-faults.js';
import { useBridgeGuest } from '../helpers/bridge-guest-fixture.js';
import { TcpProxy } from '../helpers/tcp-proxy.js';
import { until } from '../helpers/wait.js';

const GRACE_MS = 8000;

describe('e2e faults: network cuts between the bridge and the server', function () {
  this.timeout(600_000);
  const proxy: { p?: TcpProxy } = {};
  const marks = new MarkListener();
  const cap = capturingLogger('info');
  let markSock = '';
  const rig = useBridgeGuest({
    name: 'fault-network',
    serverArgs: (dir) => faultServerArgs(path.join(dir, 'disk.img'), GRACE_MS),
    noBridge: true,
    beforeGuest: async (r) => {
      proxy.p = new TcpProxy('127.0.0.1', Number(r.server!.address.split(':').pop()));
      const at = await proxy.p.start();
      r.serverOpts = { ...r.serverOpts, address: at.replace('127.0.0.1', 'localhost') };
      r.bridge = new Bridge({ log: cap.log, runDir: r.dir, reattachWindowMs: 120_000, resumeWindowMs: 20_000 });
      const m = markPortArgs(r.dir, 'fault-network');
      markSock = m.sock;
      return m.args;
    },
    beforeTeardown: async (r) => {
      marks.close();
      await stopSlotWriter(r.guest, 30_000).catch(() => {});
    },
  });
  after(async () => {
    await proxy.p?.stop();
  });

  let sessionId = '';

  before(async function () {
    this.timeout(300_000);
    await marks.connect(markSock);
    const info = await rig.bridge.attach({ vm: 'vm1', server: rig.serverOpts, selector: { serial: 'USBROAM-MSC-0001' }, bus: rig.bus });
    sessionId = info.sessionId;
    await waitForDisk(rig.guest);
    await startSlotWriter(rig.guest, { marks: true });
    await nextWriteMark(marks, performance.now(), 60_000);
  });

  for (const cutMs of [2000, 5000]) {
    it(`a ${cutMs / 1000} s blackhole is a stall in the guest, no error, the same session after`, async () => {
      const g = rig.guest;
      const d0 = await dmesgLineCount(g);
      const t0 = performance.now();
      await proxy.p!.blackhole(cutMs);
      const healed = performance.now();
      const next = await nextWriteMark(marks, healed, 60_000);
      // A few more writes after the heal, so the view covers the recovery.
      await nextWriteMark(marks, next + 500, 60_000);
      const v = await guestView(g, marks, t0, performance.now(), d0);
      const dev = rig.bridge.list()[0];
      console.log(`      ${cutMs} ms blackhole: guest stall ${v.stallMs} ms, ${v.writes} writes, ${v.failedWrites} failed; first write ${Math.round(next - healed)} ms after the heal; dmesg ${JSON.stringify(v.dmesg)}`);
      expect(v.failedWrites, 'failed writes in the guest').to.equal(0);
      expect(v.dmesg.bad, 'bad kernel lines').to.deep.equal([]);
      expect(v.stallMs, 'the guest stalled for the cut').to.be.greaterThan(cutMs * 0.8);
      expect(dev?.sessionId, 'the same session').to.equal(sessionId);
    });
  }

  it('a cut longer than the grace period: the session ends (logged with the reason), a clean unplug, a replug, no corruption', async () => {
    const g = rig.guest;
    const d0 = await dmesgLineCount(g);
    const t0 = performance.now();
    const cutMs = GRACE_MS + 3000;
    await proxy.p!.outage(cutMs);
    const reattached = await until('the re-attached device', () => rig.bridge.list().find((a) => a.sessionId !== sessionId), 120_000, 100);
    const tReattached = performance.now();
    const next = await nextWriteMark(marks, tReattached, 120_000);
    const v = await guestView(g, marks, t0, next, d0);
    console.log(
      `      ${cutMs} ms cut: re-attached ${Math.round(tReattached - t0)} ms after the cut began; guest: no completed write for ${v.stallMs} ms, ${v.failedWrites} failed writes; dmesg ${JSON.stringify({ ...v.dmesg, bad: v.dmesg.bad.length })}`,
    );
    // The server said which session ended and why; the bridge said it lost it and why.
    const serverLine = rig.server!.logs.find((l) => l.includes('grace period expired') && l.includes(sessionId));
    expect(serverLine, 'server log line naming the session and the reason').to.not.equal(undefined);
    const bridgeLine = cap.records.find((r) => r.session === sessionId && /session lost/.test(String(r.msg)));
    expect(bridgeLine, 'bridge log line naming the session').to.not.equal(undefined);
    console.log(`      bridge: ${JSON.stringify({ msg: bridgeLine!.msg, session: bridgeLine!.session, why: bridgeLine!.why })}`);
    expect(v.dmesg.disconnects, 'a USB disconnect in the guest').to.be.greaterThan(0);
    expect(v.dmesg.resets, 'no USB reset').to.equal(0);
    expect(v.dmesg.bad.filter((l) => /error -110/.test(l)), 'no timeouts').to.deep.equal([]);
    expect(reattached!.sessionId).to.not.equal(sessionId);
    await stopSlotWriter(g);
    const s = await verifySlots(g);
    console.log(`      slots: ${JSON.stringify(s)}`);
    expect(s.bad, 'slots whose last completed write is not on the disk').to.deep.equal([]);
    expect(s.verified).to.be.greaterThan(0);
  });
});
