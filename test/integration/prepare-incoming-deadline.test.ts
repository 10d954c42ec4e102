// PrepareIncoming (the bridge's control API) pointed at a USB host server it cannot reach ends
// with a clear status naming the server, and never hangs: a port where nothing listens, and one
// that accepts TCP but never answers the TLS handshake. A fake QMP stands in for a destination
// QEMU started with -incoming defer (query-status: inmigrate; the usb-redir chardev listens).
import { expect } from 'chai';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { ClientError, Status } from 'nice-grpc';
import { Bridge } from '../../src/client/bridge/bridge.js';
import { BridgeControlClient } from '../../src/client/bridge-control/client.js';
import { BridgeControlServer } from '../../src/client/bridge-control/server.js';
import { silentLogger } from '../../src/common/log.js';
import { clientTls } from '../../src/devkit/certs.js';

type Cmd = { execute?: string; arguments?: Record<string, unknown>; id?: unknown };

/** Just enough of a destination QEMU's QMP for PrepareIncoming; chardev-add listens where asked. */
class FakeIncomingQemu {
  readonly commands: string[] = [];
  private readonly servers: net.Server[] = [];
  private readonly sockets = new Set<net.Socket>();
  private qmp?: net.Server;

  constructor(readonly qmpPath: string) {}

  async start(): Promise<void> {
    this.qmp = net.createServer((sock) => this.serve(sock));
    await new Promise<void>((r) => this.qmp!.listen(this.qmpPath, r));
  }

  private serve(sock: net.Socket): void {
    this.sockets.add(sock);
    sock.on('error', () => {});
    sock.on('close', () => this.sockets.delete(sock));
    const write = (o: unknown) => sock.write(JSON.stringify(o) + '\r\n');
    write({ QMP: { version: { qemu: { major: 8, minor: 2, micro: 0 }, package: 'fake' }, capabilities: [] } });
    let buf = '';
    sock.on('data', (d) => {
      buf += d.toString('utf8');
      for (let i; (i = buf.indexOf('\n')) >= 0; ) {
        const line = buf.slice(0, i).trim();
        buf = buf.slice(i + 1);
        if (!line) continue;
        const cmd = JSON.parse(line) as Cmd;
        this.commands.push(cmd.execute ?? '');
        switch (cmd.execute) {
          case 'query-status':
            write({ return: { status: 'inmigrate', running: false }, id: cmd.id });
            break;
          case 'qom-get':
            write({ error: { class: 'DeviceNotFound', desc: 'no such device' }, id: cmd.id });
            break;
          case 'query-chardev':
            write({ return: [], id: cmd.id });
            break;
          case 'chardev-add': {
            const p = (cmd.arguments as { backend: { data: { addr: { data: { path: string } } } } }).backend.data.addr.data.path;
            const s = net.createServer((c) => {
              this.sockets.add(c);
              c.on('error', () => {});
            });
            this.servers.push(s);
            s.listen(p, () => write({ return: {}, id: cmd.id }));
            break;
          }
          case 'device_del':
            write({ return: {}, id: cmd.id });
            write({ event: 'DEVICE_DELETED', data: { device: cmd.arguments?.id }, timestamp: { seconds: 1, microseconds: 0 } });
            break;
          default:
            write({ return: {}, id: cmd.id });
        }
      }
    });
  }

  async stop(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    for (const s of [...this.servers, this.qmp!]) await new Promise<void>((r) => s.close(() => r()));
  }
}

/** A loopback port nothing listens on (bound, then closed). */
async function deadPort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

/** The bridge's bound on the standby open (default 10 s; shorter here to keep the test short). */
const STANDBY_MS = 3000;

describe('PrepareIncoming against an unreachable USB host server (control API, fake QEMU)', function () {
  this.timeout(60_000);
  let dir: string;
  let qemu: FakeIncomingQemu;
  let bridge: Bridge;
  let control: BridgeControlServer;
  let client: BridgeControlClient;
  let silent: net.Server;
  const held: net.Socket[] = [];

  before(async () => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'usbroam-pi-'));
    qemu = new FakeIncomingQemu(path.join(dir, 'qmp.sock'));
    await qemu.start();
    bridge = new Bridge({ log: silentLogger, runDir: path.join(dir, 'run'), standbyOpenTimeoutMs: STANDBY_MS });
    control = new BridgeControlServer({ bridge, listen: path.join(dir, 'control.sock'), servers: { ...clientTls('bridge') }, log: silentLogger });
    control.addVm('dst', qemu.qmpPath);
    await control.start();
    client = new BridgeControlClient({ address: path.join(dir, 'control.sock') });
    // Accepts TCP, never says a word: a TLS handshake that never completes.
    silent = net.createServer((s) => {
      held.push(s);
      s.on('error', () => {});
    });
    await new Promise<void>((r) => silent.listen(0, '127.0.0.1', r));
  });
  after(async () => {
    client?.close();
    await control?.stop('test over');
    for (const s of held) s.destroy();
    await new Promise<void>((r) => silent.close(() => r()));
    await qemu?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  const prepare = async (server: string, attachmentId: string): Promise<ClientError> => {
    try {
      // The caller's own deadline is far away: the bridge must answer first, and say why.
      await client.rpc.prepareIncoming({ vm: 'dst', sessionId: '00000000-0000-4000-8000-000000000000', attachmentId, server }, { signal: AbortSignal.timeout(45_000) });
    } catch (err) {
      expect(err, String(err)).to.be.instanceOf(ClientError);
      return err as ClientError;
    }
    throw new Error('PrepareIncoming succeeded against an unreachable server');
  };

  for (const [what, address, code, re] of [
    ['a port where nothing listens', async () => `127.0.0.1:${await deadPort()}`, 'UNAVAILABLE', /./],
    ['a server that never answers the TLS handshake', async () => `127.0.0.1:${(silent.address() as net.AddressInfo).port}`, 'DEADLINE_EXCEEDED', new RegExp(`no answer within ${STANDBY_MS} ms to the standby for session`)],
  ] as const) {
    it(`ends with ${code} naming the server: ${what}`, async () => {
      const server = await address();
      const id = `a${held.length}x${qemu.commands.length}`;
      const e = await prepare(server, id);
      expect(Status[e.code], e.details).to.equal(code);
      expect(e.details).to.contain(`USB host server ${server}`);
      expect(e.details).to.match(re);
      // Nothing is left behind: the usb-redir device plugged for the standby is unplugged again.
      expect(qemu.commands).to.include('device_del');
      expect(await client.list('dst')).to.deep.equal([]);
    });
  }
});
