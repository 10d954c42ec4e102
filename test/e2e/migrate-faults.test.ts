// Live migration under faults, real QEMU guests, the USB host server in its own process:
//  1. a 3 s network outage between the bridge and the server during guest I/O (no migration):
//     the session resumes by seq; the guest sees nothing (dmesg clean) and every write verifies;
//  2. kill -9 of the source bridge (its own process) while QEMU migrates: the documented outcome
//     is that the migration completes, the destination bridge's standby takes over after the
//     server's 3 s source-lost timeout (sourceLost: the position in the usbredir streams is
//     unknown), and does a clean device replug (device_disconnect + device_connect), logged as
//     such. The guest sees one unplug and replug of the disk, never corrupt data: the data
//     written before verifies, and so does every write the guest saw complete;
//  3. migrations while a READ and a WRITE of the disk are in flight: the server's disk holds each
//     command's data URB for --disk-latency-ms, and each migration starts once a bulk URB is in
//     flight, so every hand-off carries one (asserted); the READs return the data, the WRITEs land.
import { expect } from 'chai';
import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
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
  MarkListener,
  runMigration,
  startMarkedVm,
  startSlotWriter,
  stopSlotWriter,
  verifySlots,
  waitUsbDisk as waitDisk,
} from '../../src/devkit/migration-faults.js';
import { migrateWithHandOff, startVmGuest } from '../../src/devkit/migration-rig.js';
import { startServerProcess, type ServerProcess } from '../../src/devkit/server-process.js';
import { until, withTimeout } from '../helpers/wait.js';
import { TcpProxy } from '../helpers/tcp-proxy.js';
import { type Guest, type GuestImage } from '../../src/devkit/guest/guest.js';

const log = process.env.USBROAM_TEST_LOG ? createLogger({ level: process.env.USBROAM_TEST_LOG }) : silentLogger;
const SERIAL = 'USBROAM-MSC-0001';

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
    const { guest, bridgeQmp, markSock } = await startMarkedVm({ image, dir, name: 'net0' });
    guests.push(guest);
    const marks = new MarkListener();
    cleanups.push(async () => marks.close());
    await marks.connect(markSock);
    bridge.addVm({ name: 'net0', qmpSocket: bridgeQmp });
    await bridge.attach({ vm: 'net0', server: { ...serverOpts, address: `localhost:${proxy.port}` }, selector: { serial: SERIAL }, bus: 'xhci.0' });
    await waitDisk(guest);
    const ref = await writeRef(guest, 0, 4);
    await startSlotWriter(guest, { marks: true });
    // The writer's marks (one per completed write, on /dev/ttyS1): it is writing.
    await marks.waitForCount(/^W /, 10, { what: '10 completed writes before the outage' });
    const before = marks.count(/^W /);
    const t0 = Date.now();
    await proxy.outage(3000);
    const outageMs = Date.now() - t0;
    const tBack = performance.now();
    // The bridge reconnects through the proxy once it accepts again; I/O carries on.
    await marks.waitForCount(/^W /, 5, { since: tBack, what: '5 writes completed after the outage' });
    const after = marks.count(/^W /, tBack);
    expect(proxy.connections, 'the bridge reconnected through the proxy').to.be.greaterThan(0);
    await stopSlotWriter(guest);
    const v = await verifySlots(guest);
    const dm = classifyDmesg(await guest.dmesg());
    console.log(`      outage ${outageMs} ms; writes ${v.writes} (${before} before the cut, ${after} after it), failed ${v.failedWrites}, verified ${v.verified} slots, bad ${v.bad.length}`);
    expect(after, 'writes completed after the outage').to.be.greaterThan(0);
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
    const marks = new MarkListener();
    cleanups.push(async () => marks.close());
    await marks.connect(src.markSock);
    await child.call('addVm', { name: 'k0', qmpSocket: src.bridgeQmp });
    const att = await child.call<AttachmentInfo>('attach', { vm: 'k0', server: serverOpts, selector: { serial: SERIAL }, bus: 'xhci.0' });
    await waitDisk(src.guest);
    const ref = await writeRef(src.guest, 0, 4);
    await startSlotWriter(src.guest, { marks: true });
    await marks.waitForCount(/^W /, 10, { what: '10 completed writes before the migration' });
    let active: Promise<unknown> | undefined;
    let attached: Promise<AttachmentInfo> | undefined;
    let tKill = 0;
    let pausedAtSwitchover = false;
    const r = await runMigration({
      image,
      dir,
      src: src.guest,
      dstName: 'k1',
      marks,
      prepareDst: async (dst) => {
        // Registered before `migrate`: the kill waits for QEMU to be sending RAM.
        active = src.guest.events.waitForEvent('MIGRATION', (e: { data: { status: string } }) => e.data.status === 'active', { timeoutMs: 120_000 });
        active.catch(() => {});
        bridgeB.addVm({ name: 'k1', qmpSocket: dst.bridgeQmp });
        const inc = await bridgeB.prepareIncoming({ vm: 'k1', server: serverOpts, sessionId: att.sessionId, id: att.id, bus: att.bus });
        attached = inc.attached;
        attached.catch(() => {});
      },
      whileMigrating: async () => {
        await active;
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
    const info = await withTimeout(attached!, 60_000, 'the destination to take the session over');
    expect(info, 'the destination took the session over').to.not.equal(undefined);
    const tTake = Date.now();
    expect(child.events.filter((e) => e.event === 'handOff'), 'the killed source never handed off').to.deep.equal([]);
    const lost = records.filter((x) => typeof x.msg === 'string' && /source bridge was lost.*clean replug/.test(x.msg as string));
    expect(lost.length, 'the destination logs the source-lost replug').to.equal(1);
    const g = r.dst.guest;
    const disk = await waitDisk(g);
    // The writer carries on against the replugged disk (its marks now come from the destination).
    await marks.waitForCount(/^W /, 5, { since: performance.now(), what: '5 writes completed after the replug' });
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

  it('migrates while a READ and a WRITE of the disk are in flight (disk latency): every hand-off carries a bulk URB in flight; the data verifies', async () => {
    // A server of its own whose disk holds the data URB of each READ/WRITE for LATENCY_MS: a
    // bulk URB stays in flight from the moment the guest issues a command. Its image is filled
    // from here: the guest reads it back through the migrations; what the guest writes is read
    // here from the image file.
    const LATENCY_MS = 4000;
    const BLK = 65536;
    const sdir = path.join(dir, 'lat');
    mkdirSync(sdir, { recursive: true });
    const img = path.join(sdir, 'disk.img');
    const content = Buffer.alloc(16 * 1024 * 1024);
    randomBytes(64 * BLK).copy(content);
    writeFileSync(img, content);
    const latServer = await startServerProcess(['--allow', 'bridge=*', '--disk-image', img, '--disk-latency-ms', String(LATENCY_MS)]);
    cleanups.push(() => latServer.stop());
    const latOpts = { ...serverOpts, address: latServer.address.replace('127.0.0.1', 'localhost') };
    const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
    const bridgeA = new Bridge({ log: log.child({ host: 'A' }), runDir: path.join(dir, 'bulk-A') });
    const bridgeB = new Bridge({ log: log.child({ host: 'B' }), runDir: path.join(dir, 'bulk-B') });
    cleanups.push(() => bridgeA.close(), () => bridgeB.close());
    const { guest, bridgeQmp } = await startVmGuest({ image, dir, name: 'b0' });
    guests.push(guest);
    bridgeA.addVm({ name: 'b0', qmpSocket: bridgeQmp });
    const att = await bridgeA.attach({ vm: 'b0', server: latOpts, selector: { serial: SERIAL }, bus: 'xhci.0' });
    await waitDisk(guest);
    const hosts = [{ name: 'A', bridge: bridgeA }, { name: 'B', bridge: bridgeB }];
    let cur = { guest, vm: 'b0', att };
    const figures: string[] = [];
    const MIGRATIONS = 2;
    for (let i = 1; i <= MIGRATIONS; i++) {
      const host = hosts[(i - 1) % 2]!;
      // One READ(10) of block i and one WRITE(10) of a fresh random block at 64 + i, each one
      // 64 KiB SCSI command, each in a process of its own; the disk takes them one at a time,
      // so a data URB is in flight for about 2 x LATENCY_MS from here on.
      await cur.guest.sh(`rm -f /tmp/r.${i} /tmp/w.${i}; head -c ${BLK} /dev/urandom > /tmp/blk.${i}; sha256sum /tmp/blk.${i} | cut -d' ' -f1 > /tmp/blk.${i}.sha
( (s=$(dd if=/dev/sda bs=${BLK} skip=${i} count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1); echo "$s" > /tmp/r.${i}.t; mv /tmp/r.${i}.t /tmp/r.${i}) > /dev/null 2>&1 &)
( (if dd if=/tmp/blk.${i} of=/dev/sda bs=${BLK} seek=$((64 + ${i})) oflag=direct conv=fsync 2>/dev/null; then echo ok > /tmp/w.${i}.t; else echo ERR > /tmp/w.${i}.t; fi; mv /tmp/w.${i}.t /tmp/w.${i}) > /dev/null 2>&1 &)`);
      // Migrate once the source bridge has a bulk URB of these commands at the server.
      await until('a bulk URB in flight at the server', () => host.bridge.list(cur.vm).find((a) => a.id === cur.att.id)!.stats.inFlight > 0, 60_000, 20);
      const r = await migrateWithHandOff({ image, dir, src: cur.guest, srcVm: cur.vm, srcHost: host, dstHost: hosts[i % 2]!, dstVm: `b${i}`, attachment: cur.att, server: latOpts, log });
      guests.push(r.dst);
      void cur.guest.stop();
      expect(r.status).to.equal('completed');
      expect(r.handOff?.ok, r.handOff?.error).to.equal(true);
      const hi = r.handOff!.info!;
      figures.push(`${host.name}->${hosts[i % 2]!.name}: migration ${r.totalMs} ms, downtime ${r.downtimeMs} ms; hand-off +${r.handOff!.sinceCompletedMs!.toFixed(1)} ms: in flight ${hi.inFlight}, unread ${hi.unreadInSocket} B, re-sent ${hi.toQemuBytes} B`);
      expect(hi.inFlight, `migration ${i}: bulk URBs in flight at the hand-off (${figures[i - 1]})`).to.be.greaterThan(0);
      // Both commands complete on the destination.
      await r.dst.waitForPath(`/tmp/r.${i}`, { timeoutMs: 120_000 });
      await r.dst.waitForPath(`/tmp/w.${i}`, { timeoutMs: 120_000 });
      const [got, wrote, blkSha] = (await r.dst.sh(`cat /tmp/r.${i} /tmp/w.${i} /tmp/blk.${i}.sha`)).trim().split('\n').map((x) => x.trim());
      expect(got, `READ of block ${i} in flight across migration ${i}`).to.equal(sha(content.subarray(i * BLK, (i + 1) * BLK)));
      expect(wrote, `WRITE ${i} in flight across migration ${i}`).to.equal('ok');
      const onDisk = readFileSync(img).subarray((64 + i) * BLK, (65 + i) * BLK);
      expect(sha(onDisk), `block ${64 + i} in the server's image holds WRITE ${i}`).to.equal(blkSha);
      cur = { guest: r.dst, vm: `b${i}`, att: r.attached! };
    }
    console.log(`      disk latency ${LATENCY_MS} ms; ${figures.join('; ')}`);
    expect(classifyDmesg(await cur.guest.dmesg()).bad).to.deep.equal([]);
  });
});
