// The FTDI FT232R-like echo port across live migrations: QEMU's usb-redir serves its bulk IN by
// usbredir bulk receiving (QEMU's quirk list buffers FTDI bulk IN: start_bulk_receiving, then
// buffered_bulk_packets streamed by the device side, framed with FTDI status bytes that QEMU
// strips). In the guest, ftdi_sio; a writer sends numbered lines through /dev/ttyUSB0 while a
// reader collects the echo; the VM migrates A -> B -> A -> B meanwhile (xHCI). Buffered bulk
// data in flight at a switchover (written to QEMU and not read, or streaming at the server)
// must reach the destination: the echoed stream is exactly the lines sent, in order.
import { expect } from 'chai';
import path from 'node:path';
import { Bridge, type AttachmentInfo } from '../../src/client/bridge/bridge.js';
import type { StreamState } from '../../src/client/bridge/redir-streams.js';
import { testLog as log } from '../../src/devkit/bridge-guest.js';
import { classifyDmesg } from '../../src/devkit/migration-faults.js';
import { migrateWithHandOff, startVmGuest, type Host } from '../../src/devkit/migration-rig.js';
import type { Guest } from '../../src/devkit/guest/guest.js';
import { useMigrationSetup } from '../helpers/bridge-guest-fixture.js';
import { guestLines, sleep, untilAtLeast, untilGrows, untilGuestHasOpen } from '../helpers/wait.js';

const TTY = '/dev/ttyUSB0';
/** Lines between the writer's 20 ms pauses (USBROAM_SERIAL_BURST: more writes in flight at the switchovers). */
const LINES_PER_PAUSE = Number(process.env.USBROAM_SERIAL_BURST ?? 4);
/** What the guest's xHCI driver says when the controller completes TDs it does not expect. */
/** Lines echoed before the first migration and on each destination before the next (I/O running across each switchover). */
const ECHOED_BETWEEN = 100;
const XHCI_CONFUSED = /TRB DMA ptr not part of current TD|ERROR Transfer event|WARN Event TRB|Stopped on No-op/;

/** The receiving stream of the attachment on the FTDI bulk IN endpoint (the bridge's usbredir host, read for the test). */
function receivingOn(bridge: Bridge, id: string): StreamState | undefined {
  const e = (bridge as unknown as { attachments: Map<string, { att: { host: { snapshot(): { streams: StreamState[] } } } }> }).attachments.get(id);
  return e?.att.host.snapshot().streams.find((s) => s.endpoint === 0x81);
}

describe('e2e migration: the FTDI serial port (usbredir bulk receiving) across migrations, no byte lost or repeated', function () {
  this.timeout(900_000);
  const hostA: Host = { name: 'A', bridge: undefined as unknown as Bridge };
  const hostB: Host = { name: 'B', bridge: undefined as unknown as Bridge };
  const m = useMigrationSetup({
    name: 'migrate-ftdi',
    serverArgs: ['--emulated-ftdi'],
    diskMiB: 16,
    beforeTeardown: async () => {
      await hostA.bridge?.close().catch(() => {});
      await hostB.bridge?.close().catch(() => {});
    },
  });

  it('numbered lines echoed through /dev/ttyUSB0 (bulk IN by bulk receiving) while the VM migrates A -> B: every byte echoed once, in order', async () => {
    // USBROAM_XHCI_REWIND=0: without the work-around, to see what it fixes (the test fails).
    const rewindXhciOnSwitchover = process.env.USBROAM_XHCI_REWIND !== '0';
    hostA.bridge = new Bridge({ log: log.child({ host: 'A' }), runDir: path.join(m.dir, 'A'), rewindXhciOnSwitchover });
    hostB.bridge = new Bridge({ log: log.child({ host: 'B' }), runDir: path.join(m.dir, 'B'), rewindXhciOnSwitchover });
    const { guest, bridgeQmp } = await startVmGuest({ image: m.image, dir: m.dir, name: 'f0' });
    m.guests.push(guest);
    hostA.bridge.addVm({ name: 'f0', qmpSocket: bridgeQmp });
    let att: AttachmentInfo = await hostA.bridge.attach({ vm: 'f0', server: m.serverOpts, selector: { serial: 'USBROAM-FTDI-0001' }, bus: 'xhci.0' });
    await guest.waitForPath(TTY, { timeoutMs: 120_000 });
    // Reader first (keeps the tty open), raw mode, then the writer: 4 lines every ~20 ms, from a
    // child process holding the tty open (not the shell: it must not become its ctty).
    await guest.sh(`rm -f /tmp/echo /tmp/stop /tmp/sent; cat ${TTY} > /tmp/echo & echo $! > /tmp/cat.pid`);
    await guest.sh(`stty -F ${TTY} raw -echo -echoe -echok -echoctl -echoke -ixon -ixoff`).catch(() => guest.sh(`stty -F ${TTY} raw -echo`));
    await untilGuestHasOpen(guest, '/tmp/cat.pid', TTY);
    await guest.sh(`cat > /tmp/s.sh <<'EOS'
exec 3>${TTY}
i=0
while [ ! -e /tmp/stop ]; do printf 'L%06d\\n' $i >&3; i=$((i + 1)); [ $((i % ${LINES_PER_PAUSE})) = 0 ] && sleep 0.02; done
printf 'END\\n' >&3
echo $i > /tmp/sent
EOS
(sh /tmp/s.sh > /dev/null 2>&1 &)`);
    await untilAtLeast('lines echoed before the first migration', () => guestLines(guest, '/tmp/echo'), ECHOED_BETWEEN, 120_000);
    // A -> B -> A -> B (USBROAM_FTDI_MIGRATIONS: another count).
    const n = Number(process.env.USBROAM_FTDI_MIGRATIONS ?? 3);
    let cur = guest;
    let curHost = hostA;
    const figures: string[] = [];
    const receiving: boolean[] = [];
    /** The bulk receiving stream's next buffered_bulk_packet id on the destination right after the last switchover. */
    let idsAtSwitchover = 0n;
    for (let i = 0; i < n; i++) {
      receiving.push(receivingOn(curHost.bridge, att.id)?.kind === 'bulk');
      const dstHost = curHost === hostA ? hostB : hostA;
      const r = await migrateWithHandOff({ image: m.image, dir: m.dir, src: cur, srcVm: `f${i}`, srcHost: curHost, dstHost, dstVm: `f${i + 1}`, attachment: att, server: m.serverOpts, log });
      m.guests.push(r.dst);
      expect(r.status).to.equal('completed');
      expect(r.handOff?.ok, r.handOff?.error).to.equal(true);
      const xr = r.handOff!.xhciRewind;
      if (rewindXhciOnSwitchover) expect(xr?.error, 'xHCI rewind at pre-switchover').to.equal(undefined);
      figures.push(`${curHost.name}->${dstHost.name}: downtime ${r.downtimeMs} ms, in flight ${r.handOff!.info!.inFlight} (QEMU: ${xr?.inFlight ?? 0} bulk TDs; endpoint contexts rewound ${xr?.patched ?? 0}, of them bulk receiving ${xr?.receiving ?? 0}, already right ${xr?.unchanged ?? 0}${xr?.skipped.length ? `, skipped: ${xr.skipped.join('; ')}` : ''})`);
      void cur.stop();
      cur = r.dst;
      curHost = dstHost;
      att = r.attached!;
      idsAtSwitchover = receivingOn(curHost.bridge, att.id)?.nextId ?? 0n;
      await untilGrows(`lines echoed on ${dstHost.name}`, () => guestLines(cur, '/tmp/echo'), ECHOED_BETWEEN, 120_000);
    }
    const g = cur;
    await g.sh('touch /tmp/stop');
    const deadline = Date.now() + 60_000;
    while ((await g.run('grep -q END /tmp/echo && test -s /tmp/sent')).exitCode !== 0) {
      if (Date.now() > deadline) throw new Error(`the echo of END did not arrive: ${await g.sh('tail -c 200 /tmp/echo; cat /tmp/sent 2>/dev/null; true')}; ${figures.join('; ')}`);
      await sleep(500);
    }
    await sleep(300); // proves nothing more arrives after END within 300 ms (a repeated tail would differ below)
    const sent = Number((await g.sh('cat /tmp/sent')).trim());
    // Compare in the guest (the stream is long): the expected bytes, then both checksums.
    const cmp = await g.sh(
      `i=0; while [ $i -lt ${sent} ]; do printf 'L%06d\\n' $i; i=$((i + 1)); done > /tmp/want; printf 'END\\n' >> /tmp/want; ` +
        `sha256sum /tmp/want /tmp/echo | cut -d' ' -f1; wc -c < /tmp/want; wc -c < /tmp/echo; sort /tmp/echo | uniq -d | wc -l`,
      { timeoutMs: 120_000 },
    );
    const [want, got, wantBytes, gotBytes, dups] = cmp.trim().split('\n').map((x) => x.trim());
    let firstDiff = '';
    if (want !== got) firstDiff = await g.sh('cmp /tmp/want /tmp/echo 2>&1 | head -n 2; diff /tmp/want /tmp/echo 2>&1 | head -n 20; true');
    console.log(`      ${sent} lines (${wantBytes} bytes) sent; ${gotBytes} bytes echoed, ${dups} lines repeated`);
    console.log(`      ${figures.join('\n      ')}`);
    expect(sent).to.be.greaterThan(300);
    expect(Number(gotBytes), `echoed byte count differs: ${firstDiff}`).to.equal(Number(wantBytes));
    expect(got, `echoed stream differs from the lines sent: ${firstDiff}`).to.equal(want);
    expect(Number(dups)).to.equal(0);
    // Bulk IN ran by bulk receiving on every host, and it moved data after the last switchover.
    expect(receiving.every((r) => r), `bulk receiving on 0x81 before each migration: ${receiving}`).to.equal(true);
    expect(Number((receivingOn(curHost.bridge, att.id)?.nextId ?? 0n) - idsAtSwitchover), 'buffered bulk packets sent to the destination after the last switchover').to.be.greaterThan(0);
    const dmesg = await g.dmesg();
    expect(classifyDmesg(dmesg).bad).to.deep.equal([]);
    expect(dmesg.split('\n').filter((l) => XHCI_CONFUSED.test(l))).to.deep.equal([]);
  });
});
