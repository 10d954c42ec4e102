// What an operator reads in the server's pino output: every refused TLS handshake with peer and
// reason (real certificates: another CA, none, expired), and every session state change with
// session, device, identity and peer.
import { expect } from 'chai';
import { ChannelCredentials } from '@grpc/grpc-js';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createChannel, createClient } from 'nice-grpc';
import { pino } from 'pino';
import { UsbHostClient } from '../../src/client/sdk/client.js';
import { createDefaultEmulatedBackend } from '../../src/server/backends/emulated/emulated-backend.js';
import { UsbHostServer } from '../../src/server/server.js';
import { UsbHostDefinition } from '../../src/gen/usbroam/v1/usbhost.js';
import { clientTls, testCerts } from '../../src/devkit/certs.js';
import { TcpProxy } from '../helpers/tcp-proxy.js';

type Line = Record<string, unknown> & { msg: string };

/** A client certificate from the test CA that expired yesterday. */
function expiredCert(dir: string): { ca: string; cert: string; key: string } {
  const c = testCerts();
  const key = path.join(dir, 'expired.key');
  const cert = path.join(dir, 'expired.pem');
  const ext = path.join(dir, 'expired.cnf');
  writeFileSync(ext, 'basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature, keyAgreement\nextendedKeyUsage = clientAuth\n');
  execFileSync('openssl', ['ecparam', '-name', 'prime256v1', '-genkey', '-noout', '-out', key]);
  const csr = execFileSync('openssl', ['req', '-new', '-key', key, '-subj', '/CN=expired'], { stdio: ['ignore', 'pipe', 'ignore'] });
  const pem = execFileSync('openssl', ['x509', '-req', '-CA', c.file('ca.pem'), '-CAkey', c.file('ca.key'), '-set_serial', '4242', '-days', '-1', '-extfile', ext], { input: csr, stdio: ['pipe', 'pipe', 'ignore'] });
  writeFileSync(cert, pem);
  return { ca: c.file('ca.pem'), cert, key };
}

describe('operator logs: refused TLS handshakes and session state changes (pino output)', function () {
  this.timeout(60_000);
  let server: UsbHostServer;
  let address: string;
  let dir: string;
  const lines: Line[] = [];

  const waitFor = async (pred: (l: Line) => boolean, what: string): Promise<Line> => {
    for (let i = 0; i < 600; i++) {
      const hit = lines.find(pred);
      if (hit) return hit;
      await new Promise((r) => setTimeout(r, 25));
    }
    throw new Error(`no log line ${what}; got:\n${lines.map((l) => JSON.stringify(l)).join('\n')}`);
  };

  before(async () => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'usbroam-logs-'));
    const c = testCerts();
    const log = pino({ level: 'info' }, { write: (s: string) => lines.push(JSON.parse(s) as Line) });
    server = new UsbHostServer({
      listen: '127.0.0.1:0',
      tls: { ca: c.file('ca.pem'), cert: c.file('server.pem'), key: c.file('server.key') },
      backends: [await createDefaultEmulatedBackend({ imagePath: path.join(dir, 'disk.img'), imageSizeBytes: 4 * 1024 * 1024 })],
      acl: { bridge: '*', viewer: '*' },
      admins: ['bridge'],
      // Long enough for a resume on a loaded machine; the expiry case waits it out once.
      limits: { graceMs: 3000, standbyTakeoverMs: 200 },
      log,
    });
    address = await server.start();
  });
  after(async () => {
    await server.stop('test over');
    rmSync(dir, { recursive: true, force: true });
  });

  const refusedTls = async (reason: string, connect: () => Promise<unknown>) => {
    lines.length = 0;
    await connect().catch(() => {});
    const l = await waitFor((x) => x.msg === 'connection refused' && x.reason === reason, `refusing with ${reason}`);
    expect(l.peer).to.match(/^127\.0\.0\.1:\d+$/);
    expect(String(l.err)).to.match(/^TLS handshake refused: /);
    expect(l.level).to.equal(40);
  };

  it('logs a client certificate from another CA as tls_unknown_ca, with the peer', async () => {
    const client = new UsbHostClient({ address, ...clientTls('intruder') });
    await refusedTls('tls_unknown_ca', () => client.listDevices(AbortSignal.timeout(5000)));
    client.close();
  });

  it('logs a client without a certificate as tls_no_certificate', async () => {
    const channel = createChannel(`dns:${address}`, ChannelCredentials.createSsl(readFileSync(testCerts().file('ca.pem'))));
    await refusedTls('tls_no_certificate', () => createClient(UsbHostDefinition, channel).listDevices({}, { signal: AbortSignal.timeout(5000) }));
    channel.close();
  });

  it('logs an expired client certificate as tls_expired', async () => {
    const client = new UsbHostClient({ address, ...expiredCert(dir) });
    await refusedTls('tls_expired', () => client.listDevices(AbortSignal.timeout(5000)));
    client.close();
  });

  it('logs open, lost stream, resumed, handed off, expired and closed with session, device, identity and peer', async () => {
    lines.length = 0;
    const proxy = new TcpProxy('127.0.0.1', Number(address.split(':').pop()));
    const viaProxy = await proxy.start();
    const a = new UsbHostClient({ address: viaProxy, ...clientTls('bridge') });
    const b = new UsbHostClient({ address, ...clientTls('viewer') });
    const state = (event: string, session: string) => waitFor((l) => l.sessionEvent === event && l.session === session, `session ${event} of ${session}`);
    try {
      const src = await a.openDevice({ serial: 'USBROAM-LOOP-0001' });
      const sid = src.sessionId;
      const opened = await state('opened', sid);
      expect(opened).to.include({ device: src.device.id, identity: 'bridge', msg: 'session opened' });
      expect(opened.peer).to.match(/^(ipv4:)?127\.0\.0\.1:\d+$/);

      proxy.cut(); // the SDK reconnects and resumes
      expect((await state('lost', sid)).identity).to.equal('bridge');
      const resumed = await state('resumed', sid);
      expect(resumed).to.include({ device: src.device.id, identity: 'bridge' });
      expect(resumed.peer).to.match(/^(ipv4:)?127\.0\.0\.1:\d+$/);

      const dst = await b.standbySession(sid);
      await src.handOff(new Uint8Array([1]));
      await dst.takeOver;
      const handed = await state('handed_off', sid);
      expect(handed).to.include({ device: src.device.id, identity: 'viewer' });
      expect(lines.filter((l) => l.session === sid && l.sessionEvent === 'resumed')).to.have.length(1); // the take-over is not a resume
      await dst.close();
      expect(await state('closed', sid)).to.include({ identity: 'viewer', device: src.device.id });

      // A session whose client goes away for good: lost, then expired after the grace period.
      const gone = await a.openDevice({ serial: 'USBROAM-ACM-0001' });
      const gid = gone.sessionId;
      await state('opened', gid);
      await proxy.stop(); // no way back
      await state('lost', gid);
      const expired = await state('expired', gid);
      expect(expired).to.include({ identity: 'bridge', device: gone.device.id });
      expect(expired.peer).to.match(/^(ipv4:)?127\.0\.0\.1:\d+$/);
      await gone.close().catch(() => {});
    } finally {
      a.close();
      b.close();
      await proxy.stop();
    }
  });
});
