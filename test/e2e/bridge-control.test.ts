// End to end through the control API, every part its own process: a USB host server
// (`usbroam serve`), a real QEMU guest, the bridge daemon (`usbroam bridge --vm guest=<qmp>`),
// and the CLI (`usbroam attach / attachments / detach`). The guest enumerates the emulated disk,
// writes and reads a few MiB through it (the server's image holds the same bytes); detach is a
// clean unplug; SIGTERM on the bridge detaches what is left and exits 0.
import { expect } from 'chai';
import { execFile, type ChildProcess } from 'node:child_process';
import { statSync } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { UsbHostClient } from '../../src/client/sdk/client.js';
import { clientTls } from '../../src/devkit/certs.js';
import { MiB, sha256OfFileRange, waitGoneInGuest } from '../../src/devkit/bridge-guest.js';
import { spawnUntilReady } from '../../src/devkit/child-process-lines.js';
import { servedDevice, useBridgeGuest } from '../helpers/bridge-guest-fixture.js';

const run = promisify(execFile);

async function cli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const r = await run(process.execPath, ['bin/usbroam.js', ...args], { timeout: 120_000 });
    return { code: 0, stdout: r.stdout, stderr: r.stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string };
    return { code: typeof e.code === 'number' ? e.code : -1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

interface BridgeProcess {
  child: ChildProcess;
  logs: string[];
  exited: Promise<number | null>;
}

async function startBridgeProcess(args: string[]): Promise<BridgeProcess> {
  const { child, logs, exited } = await spawnUntilReady(process.execPath, ['bin/usbroam.js', 'bridge', ...args], {
    name: 'bridge',
    ready: (j) => (j.msg === 'bridge control API listening' ? true : undefined),
    echoPrefix: process.env.USBROAM_TEST_LOG ? '      bridge: ' : undefined,
  });
  return { child, logs, exited };
}

describe('e2e bridge control API: usbroam bridge + attach/attachments/detach with a QEMU guest', function () {
  this.timeout(600_000);
  let bridge: BridgeProcess | undefined;
  let control: string;
  let serverAddress: string;
  let product = '';
  let serial = '';
  let attachmentId = '';
  const rig = useBridgeGuest({
    name: 'bridge-control',
    hc: 'xhci',
    noBridge: true,
    beforeTeardown: async () => {
      if (bridge && bridge.child.exitCode === null) {
        bridge.child.kill('SIGTERM');
        await bridge.exited;
      }
    },
  });

  before(async function () {
    this.timeout(120_000);
    serverAddress = rig.serverOpts.address;
    const msc = await servedDevice(rig, 'USBROAM-MSC-0001');
    product = msc.product;
    serial = msc.serial;
    control = path.join(rig.dir, 'ctl', 'bridge.sock');
    const tls = clientTls('bridge');
    bridge = await startBridgeProcess([
      '--control',
      control,
      '--run-dir',
      path.join(rig.dir, 'run'),
      '--vm',
      `guest=${rig.bridgeQmp}`,
      '--server-ca',
      tls.ca,
      '--server-cert',
      tls.cert,
      '--server-key',
      tls.key,
    ]);
  });

  it('the control socket is owner-only', () => {
    expect((statSync(control).mode & 0o777).toString(8)).to.equal('600');
  });

  it('usbroam attach: the guest enumerates the disk with the served strings', async () => {
    const g = rig.guest;
    const t0 = Date.now();
    const r = await cli(['attach', '--control', control, '--vm', 'guest', '--server', serverAddress, '--device', 'serial=USBROAM-MSC-0001', '--json']);
    expect(r.code, r.stderr).to.equal(0);
    const a = JSON.parse(r.stdout);
    attachmentId = a.id;
    expect(a.id).to.equal(`usbroam-${a.device.id}`);
    expect(a.vm).to.equal('guest');
    expect(a.bus).to.equal('xhci.0');
    expect(a.hotPlugged).to.equal(true);
    expect(a.device.serial).to.equal('USBROAM-MSC-0001');
    await g.waitForPath('/sys/block/sda', { timeoutMs: 120_000 });
    await g.waitForPath('/dev/sda');
    console.log(`      /sys/block/sda ${Date.now() - t0} ms after "usbroam attach" started`);
    const dmesg = await g.dmesg();
    expect(dmesg).to.include(`Product: ${product}`);
    expect(dmesg).to.include(`SerialNumber: ${serial}`);
  });

  it('the guest writes and reads 4 MiB through it; the server image holds the same bytes', async () => {
    const g = rig.guest;
    await g.sh('dd if=/dev/urandom of=/tmp/x bs=1M count=4 2>/dev/null');
    const want = (await g.sh('sha256sum /tmp/x')).split(/\s+/)[0]!;
    await g.sh('dd if=/tmp/x of=/dev/sda bs=1M oflag=direct conv=fsync 2>/dev/null');
    await g.sh('sync; echo 3 > /proc/sys/vm/drop_caches');
    const got = (await g.sh('dd if=/dev/sda bs=1M count=4 iflag=direct 2>/dev/null | sha256sum')).split(/\s+/)[0]!;
    expect(got).to.equal(want);
    expect(sha256OfFileRange(path.join(rig.dir, 'disk.img'), 0, 4 * MiB)).to.equal(want);
  });

  it('usbroam attachments lists it (JSON and text)', async () => {
    const r = await cli(['attachments', '--control', control, '--json']);
    expect(r.code, r.stderr).to.equal(0);
    const list = JSON.parse(r.stdout);
    expect(list).to.have.length(1);
    expect(list[0].id).to.equal(attachmentId);
    expect(list[0].state).to.equal('ATTACHMENT_STATE_CONNECTED');
    expect(list[0].device.serial).to.equal('USBROAM-MSC-0001');
    expect(list[0].server).to.equal(serverAddress);
    expect(Number(list[0].counters.bytesFromQemu)).to.be.greaterThan(4 * MiB);
    const vm = await cli(['attachments', '--control', control, '--vm', 'guest']);
    expect(vm.stdout).to.include(attachmentId).and.include('connected');
  });

  it('usbroam detach: a clean USB disconnect in the guest; the disk disappears', async () => {
    const g = rig.guest;
    const before = (await g.dmesg()).split('\n').length;
    const r = await cli(['detach', '--control', control, '--vm', 'guest', attachmentId]);
    expect(r.code, r.stderr).to.equal(0);
    await waitGoneInGuest(g, '/sys/block/sda');
    const after = (await g.dmesg()).split('\n').slice(before - 1);
    expect(after.some((l) => /USB disconnect, device number/.test(l)), after.join('\n')).to.equal(true);
    const list = await cli(['attachments', '--control', control, '--json']);
    expect(JSON.parse(list.stdout)).to.deep.equal([]);
    // Detaching it again: NOT_FOUND, exit 1.
    const again = await cli(['detach', '--control', control, '--vm', 'guest', attachmentId]);
    expect(again.code).to.equal(1);
    expect(again.stderr).to.match(/no attachment/);
  });

  it('SIGTERM on the bridge: what is attached is unplugged cleanly, exit 0', async () => {
    const g = rig.guest;
    const r = await cli(['attach', '--control', control, '--vm', 'guest', '--server', serverAddress, '--device', 'serial=USBROAM-MSC-0001']);
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stdout).to.match(/^attached usbroam-/);
    await g.waitForPath('/sys/block/sda', { timeoutMs: 120_000 });
    const before = (await g.dmesg()).split('\n').length;
    bridge!.child.kill('SIGTERM');
    expect(await bridge!.exited).to.equal(0);
    await waitGoneInGuest(g, '/sys/block/sda');
    const after = (await g.dmesg()).split('\n').slice(before - 1);
    expect(after.some((l) => /USB disconnect, device number/.test(l)), after.join('\n')).to.equal(true);
    // The server released the claim.
    const c = new UsbHostClient({ address: serverAddress, ...clientTls('bridge') });
    try {
      const msc = (await c.listDevices()).find((d) => d.serial === 'USBROAM-MSC-0001');
      expect(msc?.claim?.claimed).to.equal(false);
    } finally {
      c.close();
    }
    expect(() => statSync(control)).to.throw();
  });
});
