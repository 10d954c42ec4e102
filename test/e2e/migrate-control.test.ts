// Concurrent control transfers on ep0 across live migrations (xHCI). The server's loopback device
// answers its SLOW_READ vendor request (IN 0x5d) after --control-latency-ms; in the guest, usbctl
// (scripts/guest/usbctl.c, built into the initramfs) runs several processes, each sending
// SLOW_READ through usbfs back to back and checking every answer byte-exact. Each process is
// always inside its ioctl, so the guest has that many control URBs queued on ep0 at every
// switchover: QEMU's USB core sends them to usb-redir one at a time and keeps the rest queued,
// and neither that queue nor the xHCI's transfers migrate (the bridge points ep0's context at
// the oldest control TD in flight; src/client/bridge/handoff/xhci-dequeue.ts). Afterwards every
// process must have had every transfer answered, exact, none timed out; dmesg clean.
import { expect } from 'chai';
import path from 'node:path';
import { Bridge, type AttachmentInfo } from '../../src/client/bridge/bridge.js';
import { testLog as log } from '../../src/devkit/bridge-guest.js';
import { classifyDmesg } from '../../src/devkit/migration-faults.js';
import { migrateWithHandOff, startVmGuest, type Host } from '../../src/devkit/migration-rig.js';
import { useMigrationSetup } from '../helpers/bridge-guest-fixture.js';
import { qemuLogReport } from '../helpers/stall-report.js';
import { sleep, untilGrows } from '../helpers/wait.js';

const LATENCY_MS = 150;
const PROCESSES = 4;
const LENGTH = 200;
const SERIAL = 'USBROAM-LOOP-0001';
/** Control transfers answered (the bridge's URBs completed) before the first migration and on each destination before the next. */
const ANSWERED_BETWEEN = 20;

describe('e2e migration: concurrent control transfers on ep0 survive the switchover, byte-exact', function () {
  this.timeout(900_000);
  const hostA: Host = { name: 'A', bridge: undefined as unknown as Bridge };
  const hostB: Host = { name: 'B', bridge: undefined as unknown as Bridge };
  const m = useMigrationSetup({
    name: 'migrate-control',
    diskMiB: 16,
    serverArgs: ['--control-latency-ms', String(LATENCY_MS)],
    beforeTeardown: async () => {
      await hostA.bridge?.close().catch(() => {});
      await hostB.bridge?.close().catch(() => {});
    },
  });

  it(`${PROCESSES} processes sending slow vendor control reads while the VM migrates A -> B -> A: every answer arrives, exact`, async () => {
    // USBROAM_XHCI_REWIND=0: without the work-around, to see what it fixes (the test fails).
    const rewindXhciOnSwitchover = process.env.USBROAM_XHCI_REWIND !== '0';
    hostA.bridge = new Bridge({ log: log.child({ host: 'A' }), runDir: path.join(m.dir, 'A'), rewindXhciOnSwitchover });
    hostB.bridge = new Bridge({ log: log.child({ host: 'B' }), runDir: path.join(m.dir, 'B'), rewindXhciOnSwitchover });
    const { guest, bridgeQmp } = await startVmGuest({ image: m.image, dir: m.dir, name: 'c0' });
    m.guests.push(guest);
    hostA.bridge.addVm({ name: 'c0', qmpSocket: bridgeQmp });
    let att: AttachmentInfo = await hostA.bridge.attach({ vm: 'c0', server: m.serverOpts, selector: { serial: SERIAL }, bus: 'xhci.0' });
    expect((await guest.run('test -x /bin/usbctl')).exitCode, 'the guest image has no /bin/usbctl (gcc missing when it was built?)').to.equal(0);
    // The loopback device's usbfs node, from its serial in sysfs.
    let dev = '';
    const deadline0 = Date.now() + 120_000;
    while (!dev) {
      dev = (await guest.sh(`for d in /sys/bus/usb/devices/*; do [ "$(cat $d/serial 2>/dev/null)" = ${SERIAL} ] && printf '/dev/bus/usb/%03d/%03d' $(cat $d/busnum) $(cat $d/devnum); done; true`)).trim();
      if (!dev || (await guest.run(`test -c ${dev}`)).exitCode !== 0) {
        dev = '';
        if (Date.now() > deadline0) throw new Error(`no usbfs node for ${SERIAL} in the guest`);
        await sleep(500);
      }
    }
    await guest.sh(`rm -f /tmp/cstop /tmp/ctl.out; (usbctl slowread ${dev} ${PROCESSES} ${LENGTH} /tmp/cstop > /tmp/ctl.out 2>&1; echo "rc=$?" >> /tmp/ctl.out) > /dev/null 2>&1 &`);
    await untilGrows('control transfers answered before the first migration', () => hostA.bridge.get(att.id)?.stats.urbsCompleted ?? 0, ANSWERED_BETWEEN, 120_000, 100);
    const n = Number(process.env.USBROAM_CONTROL_MIGRATIONS ?? 2);
    let cur = guest;
    let curHost = hostA;
    const figures: string[] = [];
    let rewound = 0;
    for (let i = 0; i < n; i++) {
      const dstHost = curHost === hostA ? hostB : hostA;
      const r = await migrateWithHandOff({ image: m.image, dir: m.dir, src: cur, srcVm: `c${i}`, srcHost: curHost, dstHost, dstVm: `c${i + 1}`, attachment: att, server: m.serverOpts, log });
      m.guests.push(r.dst);
      expect(r.status).to.equal('completed');
      expect(r.handOff?.ok, r.handOff?.error).to.equal(true);
      const xr = r.handOff!.xhciRewind;
      if (rewindXhciOnSwitchover) expect(xr?.error, 'xHCI rewind at pre-switchover').to.equal(undefined);
      rewound += xr?.patched ?? 0;
      figures.push(`${curHost.name}->${dstHost.name}: downtime ${r.downtimeMs} ms, URBs in flight at the server ${r.handOff!.info!.inFlight} (TDs QEMU had in flight: ${xr?.inFlight ?? 0}; contexts rewound ${xr?.patched ?? 0}, already right ${xr?.unchanged ?? 0}${xr?.skipped.length ? `, skipped: ${xr.skipped.join('; ')}` : ''})`);
      void cur.stop();
      cur = r.dst;
      curHost = dstHost;
      att = r.attached!;
      const on = curHost;
      // Known issue (README, Live migration): rarely, I/O stalls after a migration. Between
      // migrations a stall is reported and the test goes on (the next switchover's rewind fetches
      // the TDs again); after the last one it fails the test.
      const last = i === n - 1;
      await untilGrows(`control transfers answered on ${on.name}`, () => on.bridge.get(att.id)?.stats.urbsCompleted ?? 0, ANSWERED_BETWEEN, last ? 120_000 : 15_000, 100).catch((err: Error) => {
        const qemu = qemuLogReport(cur);
        if (last) throw new Error(`${err.message}; ${figures.join('; ')}\n${qemu}`);
        figures.push(`STALL after migration ${i + 1} (known issue): ${err.message}\n${qemu}`);
      });
    }
    const g = cur;
    await g.sh('touch /tmp/cstop');
    const deadline = Date.now() + 90_000;
    while ((await g.run('grep -q "^rc=" /tmp/ctl.out')).exitCode !== 0) {
      if (Date.now() > deadline) throw new Error(`usbctl did not finish: ${await g.sh('cat /tmp/ctl.out; true')}; ${figures.join('; ')}`);
      await sleep(500);
    }
    const out = await g.sh('cat /tmp/ctl.out');
    console.log(`      ${out.trim().split('\n').join('\n      ')}`);
    console.log(`      ${figures.join('\n      ')}`);
    const lines = out.split('\n').map((l) => /^(\d+) ok=(\d+) bad=(\d+) err=(\d+) last_errno=(\d+)/.exec(l.trim())).filter((x) => x !== null);
    expect(lines, out).to.have.length(PROCESSES);
    for (const l of lines) {
      expect(Number(l[3]), `process ${l[1]}: answers not exact: ${out}`).to.equal(0);
      expect(Number(l[4]), `process ${l[1]}: transfers failed (errno ${l[5]}): ${out}`).to.equal(0);
      // Each process ran through the migrations (ANSWERED_BETWEEN answers among them before the first and after each, at >= 4 * 150 ms a transfer).
      expect(Number(l[2]), `process ${l[1]}`).to.be.greaterThan(8);
    }
    expect(out).to.match(/rc=0/);
    expect(rewound, 'ep0 contexts rewound over all switchovers').to.be.greaterThan(0);
    const dmesg = await g.dmesg();
    expect(classifyDmesg(dmesg).bad).to.deep.equal([]);
  });
});
