// Live migration under faults, real QEMU guests, the USB host server in its own process:
//  1. a 3 s network outage between the bridge and the server during guest I/O (no migration):
//     the session resumes by seq; the guest sees nothing (dmesg clean) and every write verifies;
//  2. kill -9 of the source bridge (its own process) while QEMU migrates: the documented outcome
//     is that the migration completes, the destination bridge's standby takes over after the
//     server's 3 s source-lost timeout (sourceLost: the position in the usbredir streams is
//     unknown), and does a clean device replug (device_disconnect + device_connect), logged as
//     such. The guest sees one unplug and replug of the disk, never corrupt data: the data
//     written before verifies, and so does every write the guest saw complete;
//  3. migration while a large read and a large write are in flight (bulk URBs outstanding at the
//     switchover): every read returns the data, the written region holds the last write.
import { expect } from 'chai';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Bridge, type AttachmentInfo } from '../../src/client/bridge/bridge.js';
import { createLogger, silentLogger } from '../../src/common/log.js';
import { clientTls } from '../../src/devkit/certs.js';
import { e2eImageOrSkip } from '../../src/devkit/bridge-guest.js';
import {
  BridgeChild,
  capturingLogger,
  classifyDmesg,
  runMigration,
  startMarkedVm,
  startSlotWriter,
  stopSlotWriter,
  verifySlots,
} from '../../src/devkit/migration-faults.js';
import { migrateWithHandOff, startVmGuest } from '../../src/devkit/migration-rig.js';
import { startServerProcess, type ServerProcess } from '../../src/devkit/server-process.js';
import { sleep } from '../helpers/wait.js';
import { TcpProxy } from '../helpers/tcp-proxy.js';
import { type Guest, type GuestImage } from '../../src/devkit/guest/guest.js';

const log = process.env.USBROAM_TEST_LOG ? createLogger({ level: process.env.USBROAM_TEST_LOG }) : silentLogger;
const SERIAL = 'USBROAM-MSC-0001';

async function waitDisk(g: Guest, timeoutMs = 120_000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const r = await g.run('for d in /sys/block/sd*; do [ -e "$d" ] && [ -e /dev/${d##*/} ] && echo ${d##*/}; done');
    const m = /\bsd[a-z]+\b/.exec(r.output);
    if (m) return m[0];
    if (Date.now() > deadline) {
      const dm = (await g.dmesg()).split('\n').filter((l) => /usb|sd[a-z]|scsi/i.test(l)).slice(-25).join('\n');
      throw new Error(`no USB disk in the guest; dmesg:\n${dm}\nQEMU:\n${g.qemuLog().slice(-1500)}`);
    }
    await sleep(500);
  }
}

/** Write `mib` MiB of random data at `offMib`; returns its sha256. */
async function writeRef(g: Guest, offMib: number, mib: number): Promise<string> {
  return (
    await g.sh(`dd if=/dev/urandom of=/tmp/ref bs=1M count=${mib} 2>/dev/null; dd if=/tmp/ref of=/dev/sda bs=1M seek=${offMib} oflag=direct conv=fsync 2>/dev/null; sha256sum /tmp/ref | cut -d' ' -f1; rm -f /tmp/ref`, { timeoutMs: 120_000 })
  ).trim();
}

async function readRef(g: Guest, offMib: number, mib: number): Promise<string> {
  return (await g.sh(`set -- /sys/block/sd*; dd if=/dev/\${1##*/} bs=1M skip=${offMib} count=${mib} iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1`, { timeoutMs: 120_000 })).trim();
}

describe('e2e migration faults: network outage, source bridge killed, bulk URBs in flight', function () {
  this.timeout(600_000);
  let image: GuestImage;
  let server: ServerProcess;
  let dir: string;
  let serverOpts: { address: string; ca: string; cert: string; key: string };
  const guests: Guest[] = [];
  const cleanups: (() => Promise<unknown>)[] = [];

  before(async function () {
    this.timeout(900_000);
    image = await e2eImageOrSkip(this);
    dir = mkdtempSync(path.join(os.tmpdir(), 'umf-'));
    server = await startServerProcess(['--allow', 'bridge=*', '--disk-image', path.join(dir, 'disk.img'), '--disk-size-mib', '64']);
    serverOpts = { address: server.address.replace('127.0.0.1', 'localhost'), ...clientTls('bridge') };
  });

  afterEach(async () => {
    // Each case leaves the device free for the next one.
    for (const c of cleanups.splice(0).reverse()) await c().catch(() => {});
    await Promise.allSettled(guests.splice(0).map((g) => g.stop()));
  });

  after(async () => {
    await server?.stop();
    if (dir && !process.env.USBROAM_E2E_KEEP) rmSync(dir, { recursive: true, force: true });
  });

  it('a 3 s network outage between the bridge and the server during guest I/O: no guest-visible error, data verifies', async () => {
    const port = Number(server.address.split(':').pop());
    const proxy = new TcpProxy('127.0.0.1', port);
    await proxy.start();
    cleanups.push(() => proxy.stop());
    const bridge = new Bridge({ log: log.child({ host: 'A' }), runDir: path.join(dir, 'net') });
    cleanups.push(() => bridge.close());
    const { guest, bridgeQmp } = await startMarkedVm({ image, dir, name: 'net0' });
    guests.push(guest);
    bridge.addVm({ name: 'net0', qmpSocket: bridgeQmp });
    await bridge.attach({ vm: 'net0', server: { ...serverOpts, address: `localhost:${proxy.port}` }, selector: { serial: SERIAL }, bus: 'xhci.0' });
    await waitDisk(guest);
    const ref = await writeRef(guest, 0, 4);
    await startSlotWriter(guest);
    await sleep(4000);
    const before = Number((await guest.sh('grep -c ok /tmp/wlog || true')).trim());
    const t0 = Date.now();
    await proxy.outage(3000);
    const outageMs = Date.now() - t0;
    // The bridge reconnects through the proxy once it accepts again; I/O carries on.
    await sleep(6000);
    const after = Number((await guest.sh('grep -c ok /tmp/wlog || true')).trim());
    expect(proxy.connections, 'the bridge reconnected through the proxy').to.be.greaterThan(0);
    await stopSlotWriter(guest);
    const v = await verifySlots(guest);
    const dm = classifyDmesg(await guest.dmesg());
    console.log(`      outage ${outageMs} ms; writes ${v.writes} (${before} before the cut, ${after} 6 s after it began), failed ${v.failedWrites}, verified ${v.verified} slots, bad ${v.bad.length}`);
    expect(after, 'writes completed after the outage').to.be.greaterThan(before);
    expect(v.failedWrites).to.equal(0);
    expect(v.bad).to.deep.equal([]);
    expect(await readRef(guest, 0, 4)).to.equal(ref);
    expect(dm.bad).to.deep.equal([]);
  });

  it('kill -9 of the source bridge during migration: the destination takes over (sourceLost) with a clean replug; no corruption', async () => {
    const child = new BridgeChild(path.join(dir, 'kill-A'));
    cleanups.push(() => child.kill());
    await child.ready();
    const { log: dstLog, records } = capturingLogger('info');
    const bridgeB = new Bridge({ log: dstLog, runDir: path.join(dir, 'kill-B') });
    cleanups.push(() => bridgeB.close());
    const src = await startMarkedVm({ image, dir, name: 'k0' });
    guests.push(src.guest);
    await child.call('addVm', { name: 'k0', qmpSocket: src.bridgeQmp });
    const att = await child.call<AttachmentInfo>('attach', { vm: 'k0', server: serverOpts, selector: { serial: SERIAL }, bus: 'xhci.0' });
    await waitDisk(src.guest);
    const ref = await writeRef(src.guest, 0, 4);
    await startSlotWriter(src.guest);
    await sleep(3000);
    let attached: Promise<AttachmentInfo> | undefined;
    let tKill = 0;
    let pausedAtSwitchover = false;
    const r = await runMigration({
      image,
      dir,
      src: src.guest,
      dstName: 'k1',
      prepareDst: async (dst) => {
        bridgeB.addVm({ name: 'k1', qmpSocket: dst.bridgeQmp });
        const inc = await bridgeB.prepareIncoming({ vm: 'k1', server: serverOpts, sessionId: att.sessionId, id: att.id, bus: att.bus });
        attached = inc.attached;
        attached.catch(() => {});
      },
      whileMigrating: async () => {
        await sleep(200);
        tKill = Date.now();
        await child.kill('SIGKILL');
        // The source bridge had turned pause-before-switchover on: with it gone, the migration
        // waits at 'pre-switchover' (documented) until the orchestrator continues it, which is
        // what an orchestrator that sees its bridge gone does. If the bridge had already
        // continued before it died, the migration completes by itself.
        const next = src.guest.events.waitForEvent<{ status: string }>('MIGRATION', (e) => ['pre-switchover', 'completed', 'failed', 'cancelled'].includes(e.data.status), { timeoutMs: 120_000 });
        next.catch(() => {});
        const st = await src.guest.qmp.execute<{ status: string }>('query-migrate');
        const status = ['pre-switchover', 'completed', 'failed', 'cancelled'].includes(st.status) ? st.status : (await next).data.status;
        if (status === 'pre-switchover') {
          pausedAtSwitchover = true;
          await src.guest.qmp.execute('migrate-continue', { state: 'pre-switchover' });
        }
      },
    });
    guests.push(r.dst.guest);
    void src.guest.stop();
    expect(r.status, 'QEMU completes the migration').to.equal('completed');
    const info = await Promise.race([attached!, sleep(60_000).then(() => undefined)]);
    expect(info, 'the destination took the session over').to.not.equal(undefined);
    const tTake = Date.now();
    expect(child.events.filter((e) => e.event === 'handOff'), 'the killed source never handed off').to.deep.equal([]);
    const lost = records.filter((x) => typeof x.msg === 'string' && /source bridge was lost.*clean replug/.test(x.msg as string));
    expect(lost.length, 'the destination logs the source-lost replug').to.equal(1);
    const g = r.dst.guest;
    const disk = await waitDisk(g);
    // The writer carries on against the replugged disk.
    const n0 = Number((await g.sh('grep -c ok /tmp/wlog || true')).trim());
    const deadline = Date.now() + 120_000;
    while (Number((await g.sh('grep -c ok /tmp/wlog || true')).trim()) < n0 + 5) {
      if (Date.now() > deadline) throw new Error('no writes completed after the replug');
      await sleep(1000);
    }
    await stopSlotWriter(g);
    const v = await verifySlots(g);
    const dm = classifyDmesg(await g.dmesg());
    console.log(`      killed during the migration (${pausedAtSwitchover ? 'it then waited at pre-switchover; the test continued it' : 'it completed by itself'}; downtime ${r.downtimeMs} ms); take-over ${tTake - tKill} ms after the kill; disk now ${disk}; ` +
      `writes ${v.writes}, failed ${v.failedWrites} (during the replug), verified ${v.verified}, skipped ${v.skipped}, bad ${v.bad.length}; dmesg: ${dm.disconnects} disconnect(s), ${dm.resets} reset(s), ${dm.ioErrors} I/O error line(s)`);
    // The documented outcome: one clean unplug + replug in the guest, no data corruption.
    expect(dm.disconnects, 'the guest saw the device unplugged (clean replug)').to.be.at.least(1);
    expect((await g.dmesg()).split('\n').filter((l) => /New USB device found/.test(l)).length, 'and plugged again').to.be.at.least(2);
    expect(v.bad, 'every write the guest saw complete is on the disk').to.deep.equal([]);
    expect(await readRef(g, 0, 4), 'data written before the migration').to.equal(ref);
  });

  it('migrates while a large read and a large write are in flight: checksums verify', async () => {
    const bridgeA = new Bridge({ log: log.child({ host: 'A' }), runDir: path.join(dir, 'bulk-A') });
    const bridgeB = new Bridge({ log: log.child({ host: 'B' }), runDir: path.join(dir, 'bulk-B') });
    cleanups.push(() => bridgeA.close(), () => bridgeB.close());
    // 384 MiB: with 128 MiB the two 8 MiB images in tmpfs plus the direct-I/O buffers of both loops
    // got the guest shell OOM-killed.
    const memoryMb = 384;
    const { guest, bridgeQmp } = await startVmGuest({ image, dir, name: 'b0', memoryMb });
    guests.push(guest);
    bridgeA.addVm({ name: 'b0', qmpSocket: bridgeQmp });
    const att = await bridgeA.attach({ vm: 'b0', server: serverOpts, selector: { serial: SERIAL }, bus: 'xhci.0' });
    await waitDisk(guest);
    // Each loop in a subshell of its own: no job notices of the guest shell in later outputs.
    // A third loop only reads (no checksum in the guest), so that the device is nearly always
    // busy and bulk URBs are outstanding at the switchover.
    // R: 8 MiB at 0 (read over and over, 2 MiB per read(2)); W: 8 MiB at 32 MiB (written over and over, two
    // alternating random images so the last write is identifiable).
    const ref = await writeRef(guest, 0, 8);
    await guest.sh(`for k in 0 1; do dd if=/dev/urandom of=/tmp/big.$k bs=1M count=8 2>/dev/null; sha256sum /tmp/big.$k | cut -d' ' -f1 > /tmp/big.$k.sha; done`, { timeoutMs: 60_000 });
    await guest.sh(`rm -f /tmp/stop /tmp/rlog /tmp/bwlog
( (while [ ! -e /tmp/stop ]; do dd if=/dev/sda bs=2M count=4 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1 >> /tmp/rlog; done; echo DONE >> /tmp/rlog) > /dev/null 2>&1 &)
( (k=0; while [ ! -e /tmp/stop ]; do if dd if=/tmp/big.$((k % 2)) of=/dev/sda bs=2M seek=16 oflag=direct conv=fsync 2>/dev/null; then echo "$k ok" >> /tmp/bwlog; else echo "$k ERR" >> /tmp/bwlog; fi; k=$((k + 1)); done; echo DONE >> /tmp/bwlog) > /dev/null 2>&1 &)
( (while [ ! -e /tmp/stop ]; do dd if=/dev/sda of=/dev/null bs=2M count=8 iflag=direct 2>/dev/null; done) > /dev/null 2>&1 &)`);
    await sleep(3000);
    // Whether a bulk request is outstanding at the switchover is timing: migrate on (A -> B -> A ...)
    // until a hand-off carried one (in flight, or its completion unread by QEMU), at most 20 times
    // (usb-storage has one command at a time, and under TCG the guest spends most of its time between
    // URBs, so a switchover finds one pending only now and then: 1-5 migrations were needed, once more than 10).
    const hosts = [{ name: 'A', bridge: bridgeA }, { name: 'B', bridge: bridgeB }];
    let cur = { guest, vm: 'b0', att };
    let r!: Awaited<ReturnType<typeof migrateWithHandOff>>;
    let migrations = 0;
    for (let i = 1; i <= 20; i++) {
      r = await migrateWithHandOff({ image, dir, src: cur.guest, srcVm: cur.vm, srcHost: hosts[(i - 1) % 2]!, dstHost: hosts[i % 2]!, dstVm: `b${i}`, attachment: cur.att, server: serverOpts, log, memoryMb });
      migrations = i;
      guests.push(r.dst);
      void cur.guest.stop();
      expect(r.status).to.equal('completed');
      expect(r.handOff?.ok, r.handOff?.error).to.equal(true);
      if (r.handOff!.info!.inFlight > 0 || r.handOff!.info!.unreadInSocket > 0) break;
      cur = { guest: r.dst, vm: `b${i}`, att: r.attached! };
      await sleep(1000);
    }
    const hi = r.handOff!.info!;
    const g = r.dst;
    // Let both loops finish at least one more whole transfer on the destination.
    const count = async (f: string) => Number((await g.sh(`grep -c . ${f} || true`)).trim());
    const [r0, w0] = [await count('/tmp/rlog'), await count('/tmp/bwlog')];
    const deadline = Date.now() + 180_000;
    while ((await count('/tmp/rlog')) < r0 + 1 || (await count('/tmp/bwlog')) < w0 + 1) {
      if (Date.now() > deadline) throw new Error(`no bulk transfer completed on the destination within 180 s (dmesg: ${classifyDmesg(await g.dmesg()).bad.join(' | ')})`);
      await sleep(1000);
    }
    await g.sh('touch /tmp/stop');
    const stopBy = Date.now() + 180_000;
    while (!/DONE[\s\S]*DONE/.test(await g.sh('tail -n1 /tmp/rlog; tail -n1 /tmp/bwlog'))) {
      if (Date.now() > stopBy) throw new Error('the bulk loops did not stop');
      await sleep(500);
    }
    const reads = (await g.sh('grep -v DONE /tmp/rlog || true')).trim().split('\n').filter(Boolean);
    const writes = (await g.sh('grep -v DONE /tmp/bwlog || true')).trim().split('\n').filter(Boolean);
    const lastW = writes[writes.length - 1]!.split(' ');
    const wantW = (await g.sh(`cat /tmp/big.${Number(lastW[0]) % 2}.sha`)).trim();
    const gotW = (await g.sh('dd if=/dev/sda bs=2M skip=16 count=4 iflag=direct 2>/dev/null | sha256sum | cut -d" " -f1', { timeoutMs: 120_000 })).trim();
    const dm = classifyDmesg(await g.dmesg());
    console.log(`      ${migrations} migration(s); downtime ${r.downtimeMs} ms; hand-off +${r.handOff!.sinceCompletedMs!.toFixed(1)} ms: in flight ${hi.inFlight}, unread ${hi.unreadInSocket} B, re-sent ${hi.toQemuBytes} B; ` +
      `${reads.length} reads of 8 MiB (${reads.filter((x) => x !== ref).length} differed), ${writes.length} writes of 8 MiB (${writes.filter((x) => x.endsWith('ERR')).length} failed)`);
    // Outstanding for the guest at the switchover: URBs still at the server (in flight), or
    // completions already in the chardev socket that QEMU had not read (re-sent by the destination).
    expect(hi.inFlight + hi.unreadInSocket, 'bulk URBs were outstanding at the switchover (in flight or their completions unread)').to.be.greaterThan(0);
    expect(reads.filter((x) => x !== ref)).to.deep.equal([]);
    expect(writes.filter((x) => x.endsWith('ERR'))).to.deep.equal([]);
    expect(lastW[1]).to.equal('ok');
    expect(gotW).to.equal(wantW);
    expect(dm.bad).to.deep.equal([]);
  });
});
