// usbroam under libvirt: two private libvirtd instances on this machine (each in its own mount
// namespace, src/libvirt/daemon.ts), a type='qemu' domain defined with what
// `usbroam qemu-args --libvirt` prints (a cold-plugged <redirdev> and the bridge's own QMP
// monitor as <qemu:commandline>), the bridge serving the redirdev, and `virsh migrate --live`
// from A to B under guest I/O: the destination's libvirt hook (`usbroam libvirt-hook`) prepares
// B's bridge (a `usbroam bridge` process) at 'started begin', A's bridge hands the session over
// at 'completed'. Every block written during the migration reads back; dmesg shows no
// disconnect or reset.
import { expect } from 'chai';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { Bridge, type AttachmentInfo, type HandOffEvent } from '../../src/client/bridge/bridge.js';
import { UsbHostClient } from '../../src/client/sdk/client.js';
import { REPO_ROOT } from '../../src/common/repo-root.js';
import { badKernelLines, e2eImageOrSkip, testLog } from '../../src/devkit/bridge-guest.js';
import { clientTls } from '../../src/devkit/certs.js';
import type { GuestImage } from '../../src/devkit/guest/guest.js';
import { startServerProcess, type ServerProcess } from '../../src/devkit/server-process.js';
import { LibvirtDaemon, libvirtdBinary, sharedCapsCacheDir } from '../../src/libvirt/daemon.js';
import { attachmentsMetadataXml, METADATA_KEY, METADATA_URI } from '../../src/libvirt/domain-xml.js';
import { listenConsole, startLibvirtGuest, type LibvirtGuestConsole } from '../../src/libvirt/guest.js';
import { hookScript } from '../../src/libvirt/hook.js';
import { guestLines, sleep, untilAtLeast } from '../helpers/wait.js';

const run = promisify(execFile);
const CLI = [process.execPath, path.join(REPO_ROOT, 'bin/usbroam.js')];
const log = (l: string) => {
  if (process.env.USBROAM_E2E_QUIET !== '1') process.stderr.write(`      ${l}\n`);
};

// 64 KiB blocks tagged with a sequence number, written O_DIRECT; their sha256 goes to /tmp/wlog.
const WRITER = `
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

/** Guest I/O before the migration and on the destination after it: blocks written, 4 MiB reads. */
const WRITTEN_BETWEEN = 8;
const READS_BETWEEN = 1;

/** Waits until the writer and the reader in `g` have made that much progress from now on. */
async function ioProgress(g: LibvirtGuestConsole, where: string): Promise<void> {
  const written = await guestLines(g, '/tmp/wlog');
  const read = await guestLines(g, '/tmp/rlog');
  await untilAtLeast(`blocks written ${where}`, () => guestLines(g, '/tmp/wlog'), written + WRITTEN_BETWEEN, 120_000);
  await untilAtLeast(`4 MiB reads ${where}`, () => guestLines(g, '/tmp/rlog'), read + READS_BETWEEN, 120_000);
}

/** A free loopback TCP port (bound to 0 and released) for QEMU's migration stream. */
async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', () => r()));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise((r) => s.close(r));
  return port;
}

describe('e2e libvirt: cold-plugged redirdev, virsh migrate --live between two libvirtd with the hook', function () {
  this.timeout(600_000);
  let image: GuestImage;
  let dir: string;
  let server: ServerProcess | undefined;
  let serverOpts: { address: string; ca: string; cert: string; key: string };
  let lvA: LibvirtDaemon | undefined;
  let lvB: LibvirtDaemon | undefined;
  let bridgeA: Bridge | undefined;
  let bridgeB: ChildProcess | undefined;
  const bridgeBLog: string[] = [];
  let controlB: string;
  let deviceId: string;
  let guest: LibvirtGuestConsole;
  const consoles: LibvirtGuestConsole[] = [];
  let plug: { id: string; socketPath: string; qmpSocket: string; redirdev: string; qemuCommandline: string; controller: string };
  let att: AttachmentInfo;

  before(async function () {
    this.timeout(300_000);
    image = await e2eImageOrSkip(this);
    if (!libvirtdBinary()) {
      if (process.getuid?.() !== 0) {
        console.warn('skipping libvirt e2e: libvirtd not installed');
        this.skip();
      }
      throw new Error('libvirtd not installed: apt-get install -y --no-install-recommends libvirt-daemon-system libvirt-clients');
    }
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lv-'));
    server = await startServerProcess(['--allow', 'bridge=*', '--disk-image', path.join(dir, 'disk.img'), '--disk-size-mib', '32']);
    serverOpts = { address: server.address.replace('127.0.0.1', 'localhost'), ...clientTls('bridge') };
    const c = new UsbHostClient(serverOpts);
    try {
      deviceId = (await c.listDevices()).find((d) => d.serial === 'USBROAM-MSC-0001')!.id;
    } finally {
      c.close();
    }
    // B: the destination's bridge as a daemon with its control socket, which the hook calls.
    controlB = path.join(dir, 'B-control.sock');
    fs.mkdirSync(path.join(dir, 'B-run'));
    bridgeB = spawn(
      CLI[0]!,
      [CLI[1]!, 'bridge', '--control', controlB, '--server', serverOpts.address, '--server-ca', serverOpts.ca, '--server-cert', serverOpts.cert, '--server-key', serverOpts.key, '--run-dir', path.join(dir, 'B-run')],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    bridgeB.stdout!.on('data', (d: Buffer) => bridgeBLog.push(d.toString()));
    bridgeB.stderr!.on('data', (d: Buffer) => bridgeBLog.push(d.toString()));
    bridgeA = new Bridge({ log: testLog, runDir: path.join(dir, 'A-run') });
    const hook = hookScript({ usbroam: CLI, control: controlB, stateDir: path.join(dir, 'B-hook'), logFile: path.join(dir, 'B-hook.log') });
    [lvA, lvB] = await Promise.all([
      LibvirtDaemon.start({ dir: path.join(dir, 'A'), capsCacheDir: sharedCapsCacheDir() }),
      LibvirtDaemon.start({ dir: path.join(dir, 'B'), capsCacheDir: sharedCapsCacheDir(), qemuHook: hook }),
    ]);
    for (let i = 0; !fs.existsSync(controlB); i++) {
      if (i > 300) throw new Error(`bridge B did not listen on ${controlB}: ${bridgeBLog.join('')}`);
      await sleep(100);
    }
  });

  after(async () => {
    for (const c of consoles) c.close();
    await bridgeA?.close().catch(() => {});
    await Promise.allSettled([lvA?.stop(), lvB?.stop()]);
    if (bridgeB && bridgeB.exitCode === null) {
      bridgeB.kill('SIGTERM');
      await new Promise((r) => bridgeB!.once('exit', r));
    }
    await server?.stop();
    if (dir && !process.env.USBROAM_E2E_KEEP) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('cold plug: the domain defined with `qemu-args --libvirt` boots, the bridge serves its redirdev, the guest reads back what it wrote', async () => {
    const { stdout } = await run(CLI[0]!, [CLI[1]!, 'qemu-args', '--vm', 'lv0', '--device-id', deviceId, '--libvirt', '--json', '--run-dir', path.join(dir, 'A-run')]);
    plug = JSON.parse(stdout);
    expect(plug.redirdev).to.match(/<redirdev bus='usb' type='unix'>/);
    expect(plug.qemuCommandline).to.contain(`unix:${plug.qmpSocket},server=on,wait=off`);
    const g = await startLibvirtGuest(lvA!, { name: 'lv0', image, dir, devices: [plug.redirdev], qemuCommandline: plug.qemuCommandline, log });
    guest = g.console;
    consoles.push(guest);
    bridgeA!.addVm({ name: 'lv0', qmpSocket: plug.qmpSocket });
    att = await bridgeA!.attach({ vm: 'lv0', server: serverOpts, selector: { id: deviceId }, id: plug.id, bus: 'usb.0', coldPlugged: { socketPath: plug.socketPath } });
    await guest.waitForPath('/sys/block/sda', 120_000);
    await guest.waitForPath('/dev/sda');
    const out = await guest.sh(
      'dd if=/dev/urandom of=/tmp/x bs=1M count=4 2>/dev/null; dd if=/tmp/x of=/dev/sda bs=1M oflag=direct conv=fsync 2>/dev/null; ' +
        'sha256sum /tmp/x | cut -d" " -f1 > /tmp/x.sha; dd if=/dev/sda bs=1M count=4 iflag=direct 2>/dev/null | sha256sum | cut -d" " -f1; cat /tmp/x.sha',
      { timeoutMs: 120_000 },
    );
    const [got, want] = out.trim().split('\n');
    expect(got).to.match(/^[0-9a-f]{64}$/);
    expect(got).to.equal(want);
    // The attachment in the domain's metadata, for the destination's hook.
    await lvA!.virsh(['metadata', 'lv0', '--uri', METADATA_URI, '--key', METADATA_KEY, '--live', '--set', attachmentsMetadataXml([{ id: att.id, session: att.sessionId, bus: att.bus }])]);
    expect(await lvA!.virsh(['dumpxml', 'lv0'])).to.contain(att.sessionId);
  });

  it('virsh migrate --live A -> B under guest I/O: the hook prepares B, the session is handed over, every block verified, no disconnect', async () => {
    expect(att, 'the cold-plug test ran').to.not.equal(undefined);
    await guest.sh(`cat > /tmp/w.sh <<'EOS'\n${WRITER}\nEOS\nrm -f /tmp/stop /tmp/wlog /tmp/rlog; (sh /tmp/w.sh > /dev/null 2>&1 &)`);
    await guest.sh(
      `(while [ ! -e /tmp/stop ]; do dd if=/dev/sda bs=1M count=4 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1 >> /tmp/rlog; done; echo DONE >> /tmp/rlog) > /dev/null 2>&1 &`,
    );
    await ioProgress(guest, 'before the migration');
    // The destination's domain XML: same machine, so its own console, redirdev and QMP sockets.
    const srcXml = await lvA!.virsh(['dumpxml', '--migratable', 'lv0']);
    const dstPaths = { con: path.join(dir, 'lv0-B-con.sock'), redir: path.join(dir, 'B-run', path.basename(plug.socketPath)), qmp: path.join(dir, 'B-run', path.basename(plug.qmpSocket)) };
    const dstXml = srcXml.split(guest.socketPath).join(dstPaths.con).split(plug.socketPath).join(dstPaths.redir).split(plug.qmpSocket).join(dstPaths.qmp);
    expect(dstXml).to.contain(dstPaths.redir).and.to.contain(dstPaths.qmp).and.to.contain(att.sessionId);
    fs.writeFileSync(path.join(dir, 'lv0-B.xml'), dstXml);
    const dst = await listenConsole(dstPaths.con, 'lv0@B', log);
    consoles.push(dst);
    const handOff = new Promise<HandOffEvent>((resolve) => bridgeA!.once('handOff', resolve));
    const port = await freePort();
    const t0 = Date.now();
    try {
      await lvA!.virsh(['migrate', '--live', '--xml', path.join(dir, 'lv0-B.xml'), 'lv0', lvB!.uri, '--migrateuri', `tcp:127.0.0.1:${port}`], { timeoutMs: 300_000 });
    } catch (err) {
      const hookLog = fs.existsSync(path.join(dir, 'B-hook.log')) ? fs.readFileSync(path.join(dir, 'B-hook.log'), 'utf8') : '';
      (err as Error).message += `\nhook log:\n${hookLog}\nbridge B:\n${bridgeBLog.join('').slice(-3000)}\nQEMU B:\n${lvB!.qemuLog('lv0')}`;
      throw err;
    }
    const migrateMs = Date.now() - t0;
    expect(await lvB!.runningDomains()).to.deep.equal(['lv0']);
    expect(await lvA!.runningDomains()).to.deep.equal([]);
    const ev = await handOff;
    expect(ev.ok, ev.error).to.equal(true);
    const hookLog = fs.readFileSync(path.join(dir, 'B-hook.log'), 'utf8');
    expect(hookLog).to.match(/started begin: prepared ua-usbroam-/);
    console.log(
      `      virsh migrate --live: ${migrateMs} ms; hand-off +${ev.sinceCompletedMs?.toFixed(1)} ms after 'completed', frozen before save ${ev.info?.frozenBeforeSave}, ` +
        `migration status after the freeze ${ev.libvirtStatusAfterFreeze}, in flight ${ev.info?.inFlight}, re-sent ${ev.info?.toQemuBytes} B, xHCI rewind ${JSON.stringify(ev.xhciRewind ?? null)}`,
    );
    // The guest now runs on B: its I/O carried on; stop it and verify every block.
    await dst.connected;
    guest = dst;
    await ioProgress(guest, 'on B');
    await guest.sh('touch /tmp/stop');
    for (let i = 0; !(await guest.sh('tail -n1 /tmp/wlog; tail -n1 /tmp/rlog')).match(/DONE\s+DONE/); i++) {
      if (i > 120) throw new Error('guest I/O did not stop');
      await sleep(500);
    }
    const wlog = (await guest.sh('grep -v DONE /tmp/wlog', { timeoutMs: 60_000 })).trim().split('\n');
    expect(wlog.filter((l) => l.startsWith('ERR'))).to.deep.equal([]);
    const latest = new Map<number, string>();
    for (const l of wlog) {
      const [i, s] = l.split(' ');
      latest.set(Number(i), s!);
    }
    const sums = await guest.sh(`for i in ${[...latest.keys()].join(' ')}; do echo "$i $(dd if=/dev/sda bs=65536 skip=$((i + 64)) count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"; done`, { timeoutMs: 300_000 });
    const bad = sums.trim().split('\n').filter((l) => latest.get(Number(l.split(' ')[0])) !== l.split(' ')[1]);
    const want = (await guest.sh('cat /tmp/x.sha')).trim();
    const reads = (await guest.sh('grep -v DONE /tmp/rlog || true')).trim().split('\n').filter(Boolean);
    console.log(`      ${wlog.length} blocks written (${latest.size} verified, ${bad.length} bad), ${reads.length} reads of 4 MiB (${reads.filter((r) => r !== want).length} differed)`);
    expect(latest.size).to.be.greaterThan(0);
    expect(bad).to.deep.equal([]);
    expect(reads.length).to.be.greaterThan(0);
    expect(reads.filter((r) => r !== want)).to.deep.equal([]);
    const dmesg = (await guest.dmesg()).split('\n');
    expect(dmesg.filter((l) => /USB disconnect/.test(l))).to.deep.equal([]);
    expect(badKernelLines(dmesg)).to.deep.equal([]);
  });
  it("hot plug on the migrated domain through the bridge's own monitor: device_add, the data reads back, detach unplugs it", async () => {
    const cli = async (...args: string[]) => (await run(CLI[0]!, [CLI[1]!, ...args, '--control', controlB], { timeout: 120_000 })).stdout;
    // B's bridge holds the attachment it took over (cold-plugged: libvirt's redirdev).
    const held = JSON.parse(await cli('attachments', '--json')) as { id: string; vm: string; hotPlugged?: boolean }[];
    expect(held.map((a) => [a.id, a.vm, !!a.hotPlugged])).to.deep.equal([[att.id, 'lv0', false]]);
    await cli('detach', '--vm', 'lv0', att.id);
    await guest.sh("i=0; while [ -e /sys/block/sda ] && [ $i -lt 300 ]; do usleep 100000; i=$((i+1)); done; [ ! -e /sys/block/sda ]", { timeoutMs: 60_000 });
    // Hot plug: chardev-add + device_add on the bridge's QMP socket of the libvirt domain.
    const a = JSON.parse(await cli('attach', '--vm', 'lv0', '--device', `id=${deviceId}`, '--id', 'usbroam-hot', '--bus', 'usb.0', '--json')) as { id: string; hotPlugged: boolean };
    expect([a.id, a.hotPlugged]).to.deep.equal(['usbroam-hot', true]);
    await guest.waitForPath('/sys/block/sda', 120_000);
    await guest.waitForPath('/dev/sda');
    const out = await guest.sh('dd if=/dev/sda bs=1M count=4 iflag=direct 2>/dev/null | sha256sum | cut -d" " -f1; cat /tmp/x.sha', { timeoutMs: 120_000 });
    const [got, want] = out.trim().split('\n');
    expect(got).to.equal(want);
    // libvirt does not know the hot-plugged device (its XML is unchanged) and does not mind it.
    expect(await lvB!.virsh(['dumpxml', 'lv0'])).to.not.contain('usbroam-hot');
    await cli('detach', '--vm', 'lv0', 'usbroam-hot');
    await guest.sh("i=0; while [ -e /sys/block/sda ] && [ $i -lt 300 ]; do usleep 100000; i=$((i+1)); done; [ ! -e /sys/block/sda ]", { timeoutMs: 60_000 });
    expect(JSON.parse(await cli('attachments', '--json'))).to.deep.equal([]);
  });
});
