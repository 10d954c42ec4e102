// The development certificates work for Node mutual TLS: bridge/viewer are accepted, intruder (foreign CA)
// is rejected, and the client verifies the server by IP SAN 127.0.0.1.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import { fileURLToPath } from 'node:url';
import { expect } from 'chai';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

describe('development certificates with Node mutual TLS', function () {
  this.timeout(30000);
  let tmp: string;
  let server: tls.Server;
  let port: number;
  const read = (f: string): Buffer => readFileSync(path.join(tmp, f));

  before(async function () {
    tmp = mkdtempSync(path.join(os.tmpdir(), 'usbroam-certs-tls-'));
    execFileSync(process.execPath, [path.join(root, 'scripts/make-certs.mjs'), '--out', tmp, '--quiet']);
    server = tls.createServer(
      { ca: read('ca.pem'), cert: read('server.pem'), key: read('server.key'), requestCert: true, rejectUnauthorized: true },
      (sock) => sock.end(String(sock.getPeerCertificate().subject?.CN ?? '')),
    );
    server.on('tlsClientError', () => {});
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    port = (server.address() as AddressInfo).port;
  });

  after(function () {
    server?.close();
    rmSync(tmp, { recursive: true, force: true });
  });

  function connect(name: string, ca = 'ca.pem'): Promise<string> {
    return new Promise((resolve, reject) => {
      const sock = tls.connect({ host: '127.0.0.1', port, ca: read(ca), cert: read(`${name}.pem`), key: read(`${name}.key`) });
      let data = '';
      sock.on('data', (d) => (data += d));
      sock.on('end', () => resolve(data));
      sock.on('error', reject);
    });
  }

  it('accepts bridge and viewer and sees their CN', async function () {
    expect(await connect('bridge')).to.equal('bridge');
    expect(await connect('viewer')).to.equal('viewer');
  });

  it('rejects intruder (signed by other-ca)', async function () {
    let err: unknown;
    try {
      const cn = await connect('intruder');
      err = cn === '' ? new Error('closed without data') : undefined;
    } catch (e) {
      err = e;
    }
    expect(err, 'intruder must not get through').to.be.instanceOf(Error);
  });

  it('client rejects the server when trusting only other-ca', async function () {
    let err: unknown;
    try {
      await connect('bridge', 'other-ca.pem');
    } catch (e) {
      err = e;
    }
    expect(err).to.be.instanceOf(Error);
  });
});
