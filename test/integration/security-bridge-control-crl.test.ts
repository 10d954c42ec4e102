// The bridge's control API over TCP with a CRL (`usbroam bridge --control-crl`), the bridge in its
// own process, certificates and CRLs by scripts/make-certs.mjs: a revoked orchestrator is refused
// at the handshake; SIGHUP after a revocation closes that orchestrator's connection and refuses
// it from then on while others go on; a broken CRL on SIGHUP keeps the old one.
import { expect } from 'chai';
import { mkdtempSync, rmSync, writeFileSync, copyFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Status } from 'nice-grpc';
import { BridgeControlClient } from '../../src/client/bridge-control/client.js';
import { REPO_ROOT } from '../../src/common/repo-root.js';
import { certDir, clientTls, revokeCerts, type CertDir } from '../../src/devkit/certs.js';
import { spawnUntilReady, type ReadyChild } from '../../src/devkit/child-process-lines.js';
import { until } from '../helpers/wait.js';

type Line = Record<string, unknown> & { msg: string };

async function codeOf(p: Promise<unknown>): Promise<number> {
  try {
    await p;
  } catch (err) {
    return (err as { code?: number }).code ?? -1;
  }
  return Status.OK;
}

describe('bridge control API: CRL and SIGHUP reload (bridge in its own process)', function () {
  this.timeout(60_000);
  let certs: CertDir;
  let dir: string;
  let crl: string;
  let bridge: ReadyChild<string>;
  const clients: BridgeControlClient[] = [];
  const control = (identity: string) => {
    const c = new BridgeControlClient({ address: bridge.ready, ...clientTls(identity, 'ca.pem', certs) });
    clients.push(c);
    return c;
  };
  const logLines = (from: number): Line[] =>
    bridge.logs.slice(from).flatMap((l) => {
      try {
        return [JSON.parse(l) as Line];
      } catch {
        return [];
      }
    });
  const reload = async (): Promise<Line> => {
    const from = bridge.logs.length;
    bridge.child.kill('SIGHUP');
    return until('the control API reload outcome', () => logLines(from).find((l) => l.reload === 'done' || l.reload === 'refused'), 10_000, 20) as Promise<Line>;
  };
  const refused = Status.UNAVAILABLE;

  before(async () => {
    certs = certDir(['carol']);
    crl = revokeCerts(certs, ['carol']);
    dir = mkdtempSync(path.join(os.tmpdir(), 'usbroam-bcrl-'));
    const args = ['bridge', '--control', '127.0.0.1:0', '--control-ca', certs.file('ca.pem'), '--control-cert', certs.file('server.pem'), '--control-key', certs.file('server.key')];
    bridge = await spawnUntilReady(process.execPath, [path.join(REPO_ROOT, 'bin/usbroam.js'), ...args, '--control-crl', crl, '--run-dir', path.join(dir, 'run')], {
      name: 'bridge',
      ready: (j) => (j.msg === 'bridge control API listening' ? String(j.address) : undefined),
    });
  });
  afterEach(() => {
    for (const c of clients.splice(0)) c.close();
  });
  after(async () => {
    if (bridge && bridge.child.exitCode === null) {
      bridge.child.kill('SIGTERM');
      await bridge.exited;
    }
    if (dir) rmSync(dir, { recursive: true, force: true });
    if (certs) rmSync(certs.dir, { recursive: true, force: true });
  });

  it('refuses a revoked orchestrator certificate at the handshake, accepts the others', async () => {
    expect(await codeOf(control('carol').list(undefined, AbortSignal.timeout(10_000)))).to.equal(refused);
    expect(await control('viewer').list()).to.deep.equal([]);
  });

  it('SIGHUP after a revocation closes that connection and refuses it from then on; others go on', async () => {
    const viewer = control('viewer');
    const bridgeId = control('bridge');
    expect(await viewer.list()).to.deep.equal([]); // connected before the revocation
    expect(await bridgeId.list()).to.deep.equal([]);
    revokeCerts(certs, ['viewer']);
    const outcome = await reload();
    expect(outcome, JSON.stringify(outcome)).to.include({ reload: 'done', revoked: 2, connectionsClosed: 1 });
    const closed = logLines(0).find((l) => l.msg === 'control connection closed by reload: its client certificate is no longer accepted');
    expect(closed).to.include({ identity: 'viewer', reason: 'tls_revoked' });
    expect(String(closed?.peer)).to.match(/^127\.0\.0\.1:\d+$/);
    expect(String(closed?.serial)).to.match(/^[0-9A-F]+$/);
    // The old connection is gone and a new handshake is refused.
    expect(await codeOf(viewer.list(undefined, AbortSignal.timeout(10_000)))).to.equal(refused);
    expect(await bridgeId.list()).to.deep.equal([]);
    expect(await control('bridge').list()).to.deep.equal([]);
  });

  it('a broken CRL on SIGHUP keeps the previous one and the control API serving', async () => {
    const good = path.join(dir, 'crl.good.pem');
    copyFileSync(crl, good);
    try {
      writeFileSync(crl, 'not a CRL\n');
      const outcome = await reload();
      expect(outcome).to.include({ reload: 'refused', level: 50 });
      expect(String(outcome.err)).to.contain(`CRL ${crl} holds no PEM "X509 CRL" block`);
      expect(bridge.child.exitCode).to.equal(null);
      expect(await control('bridge').list()).to.deep.equal([]);
      expect(await codeOf(control('viewer').list(undefined, AbortSignal.timeout(10_000)))).to.equal(refused);
    } finally {
      copyFileSync(good, crl);
    }
  });
});
