// The bridge's control API (usbroam.v1.Bridge) without QEMU: a control server in this process
// around a Bridge, an in-process USB host server, a fake QEMU usb-redir peer for a cold-plugged
// attachment; typed errors; the unix socket's mode; TCP needs mutual TLS; the CLI against it;
// `usbroam qemu-args`.
import { ChannelCredentials } from '@grpc/grpc-js';
import { expect } from 'chai';
import { execFile, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { createChannel, createClient, ClientError, Status } from 'nice-grpc';
import { Bridge } from '../../src/client/bridge/bridge.js';
import { BridgeControlClient } from '../../src/client/bridge-control/client.js';
import { parseSelector } from '../../src/cli/control-common.js';
import { BridgeControlServer } from '../../src/client/bridge-control/server.js';
import { createLogger, silentLogger } from '../../src/common/log.js';
import { AttachmentState, BridgeDefinition } from '../../src/gen/usbroam/v1/bridge.js';
import { FakeQemu } from '../helpers/bridge-fake-qemu.js';
import { clientTls, testCerts } from '../../src/devkit/certs.js';
import { startInProcessServer, type InProcessServer } from '../helpers/in-process.js';

const log = process.env.USBROAM_TEST_LOG ? createLogger({ level: process.env.USBROAM_TEST_LOG }) : silentLogger;
const run = promisify(execFile);

async function expectStatus(p: Promise<unknown>, code: Status, re: RegExp): Promise<ClientError> {
  try {
    await p;
  } catch (err) {
    expect(err, String(err)).to.be.instanceOf(ClientError);
    const e = err as ClientError;
    expect(Status[e.code], e.details).to.equal(Status[code]);
    expect(e.details).to.match(re);
    return e;
  }
  throw new Error(`expected ${Status[code]}, the call succeeded`);
}

/** The CLI as a separate process; resolves with exit code, stdout and stderr. */
async function cli(args: string[], env: NodeJS.ProcessEnv = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const r = await run(process.execPath, ['bin/usbroam.js', ...args], { env: { ...process.env, ...env }, timeout: 30_000 });
    return { code: 0, stdout: r.stdout, stderr: r.stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string };
    return { code: typeof e.code === 'number' ? e.code : -1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

/** A small well-formedness check of an XML fragment (tags balance, attributes quoted). */
function checkXmlFragment(xml: string): string[] {
  const stack: string[] = [];
  const roots: string[] = [];
  const re = /<(\/?)([A-Za-z][\w.-]*)((?:\s+[A-Za-z][\w.:-]*=(?:'[^'<&]*'|"[^"<&]*"))*)\s*(\/?)>/g;
  let last = 0;
  for (let m; (m = re.exec(xml)); ) {
    const between = xml.slice(last, m.index);
    if (/[<>]/.test(between)) throw new Error(`malformed XML near: ${between}`);
    last = re.lastIndex;
    const [, close, name, , self] = m;
    if (close) {
      if (stack.pop() !== name) throw new Error(`unbalanced </${name}>`);
    } else if (!self) {
      if (!stack.length) roots.push(name!);
      stack.push(name!);
    } else if (!stack.length) roots.push(name!);
  }
  if (/[<>]/.test(xml.slice(last))) throw new Error(`malformed XML at the end: ${xml.slice(last)}`);
  if (stack.length) throw new Error(`unclosed <${stack.join('>, <')}>`);
  return roots;
}

describe('bridge control API (integration, no QEMU)', function () {
  this.timeout(30_000);
  let srv: InProcessServer;
  let dir: string;
  let bridge: Bridge;
  let control: BridgeControlServer;
  let sock: string;
  let client: BridgeControlClient;
  let serverAddress: string;

  before(async () => {
    srv = await startInProcessServer();
    serverAddress = srv.address.replace('127.0.0.1', 'localhost');
    dir = mkdtempSync(path.join(os.tmpdir(), 'ubc-'));
    sock = path.join(dir, 'control', 'bridge.sock');
    bridge = new Bridge({ log, runDir: path.join(dir, 'run') });
    control = new BridgeControlServer({ bridge, listen: sock, servers: { ...clientTls('bridge') }, log });
    // A VM whose QMP socket does not exist: nothing below that needs QEMU reaches it.
    control.addVm('vm1', path.join(dir, 'no-qemu-here.qmp'));
    expect(await control.start()).to.equal(`unix:${sock}`);
    client = new BridgeControlClient({ address: sock });
  });

  after(async () => {
    client?.close();
    await control?.stop('test over');
    await srv?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('listens on a unix socket of mode 0600 in a 0700 directory', () => {
    const st = statSync(sock);
    expect(st.isSocket()).to.equal(true);
    expect((st.mode & 0o777).toString(8)).to.equal('600');
    expect((statSync(path.dirname(sock)).mode & 0o777).toString(8)).to.equal('700');
  });

  it('ListAttachments: empty', async () => {
    expect(await client.list()).to.deep.equal([]);
    expect(await client.list('vm1')).to.deep.equal([]);
  });

  it('AttachDevice to an unknown VM: NOT_FOUND naming the VM and the known ones', async () => {
    await expectStatus(client.attach({ vm: 'nope', server: serverAddress, device: { id: '', vidPid: '', serial: 'USBROAM-MSC-0001', portPath: '' } }), Status.NOT_FOUND, /unknown VM nope.*vm1/);
    await expectStatus(client.list('nope'), Status.NOT_FOUND, /unknown VM nope/);
  });

  it('AttachDevice with bad arguments: INVALID_ARGUMENT', async () => {
    await expectStatus(client.attach({ vm: '', server: serverAddress }), Status.INVALID_ARGUMENT, /vm is required/);
    await expectStatus(client.attach({ vm: 'vm1', server: serverAddress }), Status.INVALID_ARGUMENT, /selector is empty/);
    await expectStatus(client.attach({ vm: 'vm1', device: { id: 'x', vidPid: '', serial: '', portPath: '' } }), Status.INVALID_ARGUMENT, /server is required/);
    await expectStatus(client.attach({ vm: 'vm1', server: serverAddress, device: { id: '', vidPid: 'zz', serial: '', portPath: '' } }), Status.INVALID_ARGUMENT, /vvvv:pppp/);
  });

  it('AttachDevice of a device the server does not have: the server\'s NOT_FOUND passed through', async () => {
    const e = await expectStatus(client.attach({ vm: 'vm1', server: serverAddress, device: { id: '', vidPid: '', serial: 'NOPE', portPath: '' } }), Status.NOT_FOUND, /no device matches/);
    expect(e.details).to.include(serverAddress);
    expect(await client.list()).to.deep.equal([]);
  });

  it('AttachDevice when the USB host server is down: UNAVAILABLE', async () => {
    const port = await new Promise<number>((r) => {
      const s = net.createServer().listen(0, '127.0.0.1', () => {
        const p = (s.address() as net.AddressInfo).port;
        s.close(() => r(p));
      });
    });
    await expectStatus(client.attach({ vm: 'vm1', server: `localhost:${port}`, device: { id: '', vidPid: '', serial: 'USBROAM-MSC-0001', portPath: '' } }), Status.UNAVAILABLE, /USB host server/);
  });

  it('AttachDevice when the VM\'s QMP socket is missing: UNAVAILABLE, and the device is released', async function () {
    this.timeout(40_000);
    await expectStatus(client.attach({ vm: 'vm1', server: serverAddress, device: { id: '', vidPid: '', serial: 'USBROAM-ACM-0001', portPath: '' } }), Status.UNAVAILABLE, /VM vm1: .*QMP/);
    // The claim was released: the device can be opened again.
    const devs = srv.server.registry.list().filter((d) => d.serial === 'USBROAM-ACM-0001');
    expect(devs).to.have.length(1);
    expect(srv.server.registry.claimOf(devs[0]!.id)).to.equal(undefined);
  });

  it('PrepareIncoming / CancelIncoming: clear refusals', async () => {
    const base = { vm: 'vm1', server: serverAddress, sessionId: 's-1', attachmentId: 'usbroam-emu-1-1', qmpSocket: '', bus: '', port: '', filter: '' };
    await expectStatus(client.rpc.prepareIncoming({ ...base, vm: 'nope' }), Status.NOT_FOUND, /unknown VM nope/);
    await expectStatus(client.rpc.prepareIncoming({ ...base, sessionId: '' }), Status.INVALID_ARGUMENT, /session_id is required/);
    await expectStatus(client.rpc.prepareIncoming({ ...base, attachmentId: '1bad id' }), Status.INVALID_ARGUMENT, /must be the source's attachment id/);
    // vm1's QMP socket does not exist: the bridge cannot ask QEMU whether it waits for a migration.
    await expectStatus(client.rpc.prepareIncoming(base), Status.UNAVAILABLE, /VM vm1/);
    await expectStatus(client.rpc.cancelIncoming({ vm: 'vm1', attachmentId: 'usbroam-emu-1-1' }), Status.NOT_FOUND, /no standby usbroam-emu-1-1/);
  });

  it('DetachDevice of an unknown attachment or VM: NOT_FOUND', async () => {
    await expectStatus(client.detach('vm1', 'usbroam-nothing'), Status.NOT_FOUND, /no attachment usbroam-nothing on VM vm1/);
    await expectStatus(client.detach('nope', 'usbroam-nothing'), Status.NOT_FOUND, /unknown VM nope/);
  });

  it('a cold-plugged attachment (fake QEMU on the chardev socket): attach, list with the device, detach', async () => {
    const chardev = path.join(dir, 'cold.sock');
    const listener = net.createServer();
    await new Promise<void>((r) => listener.listen(chardev, r));
    const accepted = new Promise<net.Socket>((r) => listener.once('connection', r));
    let qemu: FakeQemu | undefined;
    try {
      const attached = client.attach({
        vm: 'vm1',
        server: serverAddress,
        device: { id: '', vidPid: '', serial: 'USBROAM-LOOP-0001', portPath: '' },
        coldPlugSocket: chardev,
        attachmentId: 'loop0',
      });
      qemu = new FakeQemu(await accepted);
      const a = await attached;
      expect(a.id).to.equal('loop0');
      expect(a.vm).to.equal('vm1');
      expect(a.hotPlugged).to.equal(false);
      expect(a.socketPath).to.equal(chardev);
      expect(a.bus).to.equal('xhci.0');
      expect(a.server).to.equal(serverAddress);
      expect(a.sessionId).to.match(/\S/);
      expect(a.device?.serial).to.equal('USBROAM-LOOP-0001');
      expect(a.device?.product).to.match(/\S/);
      expect(a.device?.vendorId).to.be.greaterThan(0);
      qemu.hello();
      await qemu.waitFor('device_connect');
      const [l] = await client.list('vm1');
      expect(l?.id).to.equal('loop0');
      expect(l?.state).to.equal(AttachmentState.ATTACHMENT_STATE_CONNECTED);
      expect(l?.counters?.bytesToQemu).to.be.greaterThan(0);
      // The same id again: ALREADY_EXISTS.
      await expectStatus(client.attach({ vm: 'vm1', server: serverAddress, device: { id: '', vidPid: '', serial: 'USBROAM-MSC-0001', portPath: '' }, attachmentId: 'loop0' }), Status.ALREADY_EXISTS, /loop0/);
      // The device is claimed by the bridge: a second attach of it is the server's refusal, passed through.
      const second = await client.attach({ vm: 'vm1', server: serverAddress, device: { id: '', vidPid: '', serial: 'USBROAM-LOOP-0001', portPath: '' }, coldPlugSocket: chardev, attachmentId: 'loop1' }).then(
        () => undefined,
        (e: ClientError) => e,
      );
      expect(second, 'a claimed device is refused').to.be.instanceOf(ClientError);
      expect(second!.code).to.not.equal(Status.INTERNAL);
      expect(second!.details).to.include(serverAddress);
      // Detach: device_disconnect to QEMU; ack it.
      const q = qemu;
      const detached = client.detach('vm1', 'loop0');
      await q.waitFor('device_disconnect');
      q.send({ type: 'device_disconnect_ack', id: 0n });
      await detached;
      expect(await client.list()).to.deep.equal([]);
    } finally {
      qemu?.socket.destroy();
      listener.close();
    }
  });

  it('the CLI against the daemon: attachments, typed errors on stderr with exit 1', async () => {
    const env = { USBROAM_CONTROL: sock };
    const list = await cli(['attachments', '--json'], env);
    expect(list.code, list.stderr).to.equal(0);
    expect(JSON.parse(list.stdout)).to.deep.equal([]);
    const human = await cli(['attachments'], env);
    expect(human.stdout.trim()).to.equal('no attachments');
    const bad = await cli(['attach', '--vm', 'nope', '--server', serverAddress, '--device', 'serial=USBROAM-MSC-0001'], env);
    expect(bad.code).to.equal(1);
    expect(bad.stderr).to.match(/usbroam: unknown VM nope/);
    const refused = await cli(['attach', '--control', sock, '--vm', 'vm1', '--server', serverAddress, '--device', 'serial=NOPE']);
    expect(refused.code).to.equal(1);
    expect(refused.stderr).to.match(/no device matches/);
    const det = await cli(['detach', '--control', `unix:${sock}`, '--vm', 'vm1', 'usbroam-x']);
    expect(det.code).to.equal(1);
    expect(det.stderr).to.match(/no attachment usbroam-x on VM vm1/);
  });

  it('usbroam bridge --config: VMs and server credentials from JSON; a bad config is a clear error; SIGTERM exits 0', async function () {
    this.timeout(40_000);
    const cfgDir = path.join(dir, 'cfg');
    const ctl = path.join(cfgDir, 'ctl.sock');
    const tls = clientTls('bridge');
    const cfgFile = path.join(dir, 'bridge.json');
    writeFileSync(cfgFile, JSON.stringify({ control: ctl, runDir: path.join(cfgDir, 'run'), vms: { alpha: path.join(dir, 'a.qmp') }, server: { address: serverAddress, ...tls } }));
    const child = spawn(process.execPath, ['bin/usbroam.js', 'bridge', '--config', cfgFile, '--vm', 'beta=unix:' + path.join(dir, 'b.qmp')], { stdio: ['ignore', 'pipe', 'pipe'] });
    const exited = new Promise<number | null>((r) => child.once('exit', (c) => r(c)));
    try {
      let out = '';
      await new Promise<void>((resolve, reject) => {
        const t = setTimeout(() => reject(new Error(`bridge did not start: ${out}`)), 20_000);
        child.stdout!.on('data', (d: Buffer) => {
          out += d.toString();
          if (out.includes('bridge control API listening')) {
            clearTimeout(t);
            resolve();
          }
        });
        child.stderr!.on('data', (d: Buffer) => (out += d.toString()));
        void exited.then(() => reject(new Error(`bridge exited: ${out}`)));
      });
      const listening = out
        .split('\n')
        .filter((l) => l.includes('bridge control API listening'))
        .map((l) => JSON.parse(l) as { vms: string[] })[0]!;
      expect(listening.vms).to.have.members(['alpha', 'beta']);
      expect((statSync(ctl).mode & 0o777).toString(8)).to.equal('600');
      const env = { USBROAM_CONTROL: ctl };
      expect((await cli(['attachments', '--vm', 'alpha', '--json'], env)).stdout.trim()).to.equal('[]');
      expect((await cli(['attachments', '--vm', 'beta', '--json'], env)).stdout.trim()).to.equal('[]');
      // No --server: the bridge's default server (from its config) is used, with its own credentials.
      const refused = await cli(['attach', '--vm', 'alpha', '--device', 'serial=NOPE'], env);
      expect(refused.stderr).to.match(new RegExp(`USB host server ${serverAddress}: no device matches`));
      child.kill('SIGTERM');
      expect(await exited).to.equal(0);
      expect(existsSync(ctl)).to.equal(false);
    } finally {
      if (child.exitCode === null) child.kill('SIGKILL');
    }
    writeFileSync(cfgFile, JSON.stringify({ vmz: {} }));
    const bad = await cli(['bridge', '--config', cfgFile, '--control', path.join(dir, 'bad.sock')]);
    expect(bad.code).to.equal(1);
    expect(bad.stderr).to.match(/unknown key\(s\) vmz/);
  });

  it('device selector syntax', () => {
    expect(parseSelector('1-1')).to.deep.equal({ id: '1-1' });
    expect(parseSelector('1D6B:0104')).to.deep.equal({ vidPid: '1d6b:0104' });
    expect(parseSelector('serial=ABC')).to.deep.equal({ serial: 'ABC' });
    expect(parseSelector('port=1-4.2')).to.deep.equal({ portPath: '1-4.2' });
    expect(parseSelector('0951:1666,serial=X')).to.deep.equal({ vidPid: '0951:1666', serial: 'X' });
    expect(() => parseSelector('port=4')).to.throw(/bus-port/);
    expect(() => parseSelector('colour=red')).to.throw(/unknown key/);
  });

  describe('over TCP', () => {
    const c = () => testCerts();
    let tcp: BridgeControlServer;
    let addr: string;

    before(async () => {
      tcp = new BridgeControlServer({
        bridge: new Bridge({ log, runDir: path.join(dir, 'run-tcp') }),
        listen: '127.0.0.1:0',
        tls: { ca: c().file('ca.pem'), cert: c().file('server.pem'), key: c().file('server.key') },
        allow: ['viewer'],
        log,
      });
      tcp.addVm('vm2', path.join(dir, 'none.qmp'));
      addr = (await tcp.start()).replace('127.0.0.1', 'localhost');
    });
    after(async () => {
      await tcp?.stop('test over');
    });

    it('an allowed client certificate works', async () => {
      const cl = new BridgeControlClient({ address: addr, ...clientTls('viewer') });
      try {
        expect(await cl.list()).to.deep.equal([]);
        await expectStatus(cl.detach('vm2', 'x'), Status.NOT_FOUND, /no attachment x on VM vm2/);
      } finally {
        cl.close();
      }
    });

    it('a client without a certificate is refused', async () => {
      const ch = createChannel(`dns:${addr}`, ChannelCredentials.createSsl(Buffer.from(await import('node:fs').then((f) => f.readFileSync(c().file('ca.pem'))))));
      const cl = createClient(BridgeDefinition, ch);
      try {
        await expectStatus(cl.listAttachments({ vm: '' }, { signal: AbortSignal.timeout(5000) }), Status.UNAVAILABLE, /./);
      } finally {
        ch.close();
      }
    });

    it('a certificate from another CA is refused; a valid one not in the allow list gets PERMISSION_DENIED', async () => {
      const intruder = new BridgeControlClient({ address: addr, ca: c().file('ca.pem'), cert: c().file('intruder.pem'), key: c().file('intruder.key') });
      const bridgeId = new BridgeControlClient({ address: addr, ...clientTls('bridge') });
      try {
        await expectStatus(intruder.list(undefined, AbortSignal.timeout(5000)), Status.UNAVAILABLE, /./).catch(async (err) => {
          // An aborted call (timeout) also means refused.
          if (!/CANCELLED|ABORT/i.test(String(err))) throw err;
        });
        await expectStatus(bridgeId.list(), Status.PERMISSION_DENIED, /identity bridge may not use/);
      } finally {
        intruder.close();
        bridgeId.close();
      }
    });

    it('the CLI needs the mTLS material for TCP', async () => {
      const r = await cli(['attachments', '--control', addr]);
      expect(r.code).to.equal(1);
      expect(r.stderr).to.match(/needs mutual TLS: --control-ca, --control-cert, --control-key/);
      const ok = await cli(['attachments', '--control', addr, '--json', '--control-ca', c().file('ca.pem'), '--control-cert', c().file('viewer.pem'), '--control-key', c().file('viewer.key')]);
      expect(ok.code, ok.stderr).to.equal(0);
      expect(JSON.parse(ok.stdout)).to.deep.equal([]);
    });

    it('plaintext TCP is refused except on loopback with insecure; TCP without TLS material is refused', () => {
      const b = new Bridge({ log, runDir: path.join(dir, 'run-x') });
      expect(() => new BridgeControlServer({ bridge: b, listen: '0.0.0.0:0', insecure: true })).to.throw(/only on loopback/);
      expect(() => new BridgeControlServer({ bridge: b, listen: '127.0.0.1:0' })).to.throw(/needs mutual TLS/);
      expect(() => new BridgeControlServer({ bridge: b, listen: '127.0.0.1:0', insecure: true })).to.not.throw();
    });
  });

  it('a second bridge on the same socket is refused; a stale socket file is replaced', async () => {
    const other = new BridgeControlServer({ bridge: new Bridge({ log, runDir: path.join(dir, 'run-2') }), listen: sock, log });
    let err: Error | undefined;
    await other.start().catch((e: Error) => (err = e));
    expect(err?.message).to.match(/another bridge is listening/);
    const staleSock = path.join(dir, 'stale.sock');
    const s = net.createServer();
    await new Promise<void>((r) => s.listen(staleSock, r));
    // Simulate a crashed bridge: close the listener but keep the file.
    (s as unknown as { _handle?: { close(): void } })._handle?.close();
    const fresh = new BridgeControlServer({ bridge: new Bridge({ log, runDir: path.join(dir, 'run-3') }), listen: staleSock, log });
    try {
      await fresh.start();
      expect((statSync(staleSock).mode & 0o777).toString(8)).to.equal('600');
    } finally {
      await fresh.stop();
    }
  });

  it('usbroam qemu-args: -chardev and -device arguments and libvirt XML (no daemon needed)', async () => {
    const socketPath = path.join(dir, 'guest.redir.sock');
    const r = await cli(['qemu-args', '--vm', 'guest', '--device-id', '1-1', '--socket', socketPath, '--json']);
    expect(r.code, r.stderr).to.equal(0);
    const j = JSON.parse(r.stdout) as { args: string[]; libvirtXml: string; id: string; chardevId: string; socketPath: string };
    expect(j.id).to.equal('usbroam-1-1');
    expect(j.args).to.deep.equal([
      '-chardev',
      `socket,id=usbroam-1-1-chr,path=${socketPath},server=on,wait=off`,
      '-device',
      'usb-redir,chardev=usbroam-1-1-chr,id=usbroam-1-1,bus=xhci.0',
    ]);
    expect(checkXmlFragment(j.libvirtXml)).to.deep.equal(['redirdev']);
    expect(j.libvirtXml).to.include(`<redirdev bus='usb' type='unix'>`);
    expect(j.libvirtXml).to.include(`<source mode='bind' path='${socketPath}'/>`);

    const human = await cli(['qemu-args', '--vm', 'guest', '--device-id', '1-1', '--socket', socketPath, '--bus', 'ehci.0', '--filter', '0x08:-1:-1:-1:1|-1:-1:-1:-1:0']);
    expect(human.code, human.stderr).to.equal(0);
    expect(human.stdout).to.include(`-chardev socket,id=usbroam-1-1-chr,path=${socketPath},server=on,wait=off`);
    expect(human.stdout).to.include(`-device 'usb-redir,chardev=usbroam-1-1-chr,id=usbroam-1-1,bus=ehci.0,filter=0x08:-1:-1:-1:1|-1:-1:-1:-1:0'`);
    const xml = human.stdout.slice(human.stdout.indexOf('<redirdev'), human.stdout.indexOf('</redirfilter>') + '</redirfilter>'.length);
    expect(checkXmlFragment(xml)).to.deep.equal(['redirdev', 'redirfilter']);
    expect(xml).to.include(`<usbdev class='0x08' allow='yes'/>`);
    expect(human.stdout).to.include(`usbroam attach --vm guest --device id=1-1 --cold-plug-socket ${socketPath} --bus ehci.0`);

    // Default socket: <run dir>/<vm>.<id>.sock
    const def = await cli(['qemu-args', '--vm', 'guest', '--device-id', '1-1', '--run-dir', path.join(dir, 'rd'), '--json']);
    expect(JSON.parse(def.stdout).socketPath).to.equal(path.join(dir, 'rd', 'guest.usbroam-1-1.sock'));
  });
});
