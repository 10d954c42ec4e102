import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect } from 'chai';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const script = path.join(root, 'scripts/make-certs.mjs');
const ALL = ['ca', 'server', 'bridge', 'viewer', 'other-ca', 'intruder'];

function run(args: string[], env: NodeJS.ProcessEnv = {}): string {
  return execFileSync(process.execPath, [script, ...args], {
    env: { ...process.env, ...env },
    encoding: 'utf8',
  });
}

function verify(dir: string, caFile: string, cert: string, purpose?: string): { ok: boolean; out: string } {
  const args = ['verify', '-CAfile', path.join(dir, caFile)];
  if (purpose) args.push('-purpose', purpose);
  args.push(path.join(dir, cert));
  const r = spawnSync('openssl', args, { encoding: 'utf8' });
  return { ok: r.status === 0, out: `${r.stdout}${r.stderr}` };
}

describe('scripts/make-certs.mjs', function () {
  this.timeout(30000);
  let tmp: string;
  let dir: string;

  before(function () {
    tmp = mkdtempSync(path.join(os.tmpdir(), 'usbroam-certs-test-'));
    dir = path.join(tmp, 'out');
    run(['--out', dir, '--client', 'alice']);
  });

  after(function () {
    rmSync(tmp, { recursive: true, force: true });
  });

  it('writes all files, keys with mode 0600', function () {
    for (const n of [...ALL, 'alice']) {
      expect(existsSync(path.join(dir, `${n}.pem`)), `${n}.pem`).to.equal(true);
      const key = path.join(dir, `${n}.key`);
      expect(existsSync(key), `${n}.key`).to.equal(true);
      expect(statSync(key).mode & 0o777, `${n}.key mode`).to.equal(0o600);
      expect(readFileSync(key, 'utf8')).to.match(/-----BEGIN (EC )?PRIVATE KEY-----/);
    }
  });

  it('server and client certs chain to ca.pem with the right purpose', function () {
    for (const [cert, purpose] of [
      ['server.pem', 'sslserver'],
      ['bridge.pem', 'sslclient'],
      ['viewer.pem', 'sslclient'],
      ['alice.pem', 'sslclient'],
    ] as const) {
      const r = verify(dir, 'ca.pem', cert, purpose);
      expect(r.ok, `${cert}: ${r.out}`).to.equal(true);
    }
  });

  it('client certs are not usable as server certs', function () {
    expect(verify(dir, 'ca.pem', 'bridge.pem', 'sslserver').ok).to.equal(false);
  });

  it('intruder does not chain to ca.pem but does to other-ca.pem', function () {
    expect(verify(dir, 'ca.pem', 'intruder.pem').ok).to.equal(false);
    expect(verify(dir, 'ca.pem', 'intruder.pem', 'sslclient').ok).to.equal(false);
    expect(verify(dir, 'other-ca.pem', 'intruder.pem', 'sslclient').ok).to.equal(true);
    expect(verify(dir, 'other-ca.pem', 'server.pem').ok).to.equal(false);
  });

  it('server SAN includes localhost, 127.0.0.1 and ::1', function () {
    const text = execFileSync('openssl', ['x509', '-in', path.join(dir, 'server.pem'), '-noout', '-text'], {
      encoding: 'utf8',
    });
    expect(text).to.include('IP Address:127.0.0.1');
    expect(text).to.include('DNS:localhost');
    expect(text).to.match(/IP Address:0:0:0:0:0:0:0:1|IP Address:::1/);
  });

  it('bridge cert has CN=bridge and a bridge SAN', function () {
    const text = execFileSync(
      'openssl',
      ['x509', '-in', path.join(dir, 'bridge.pem'), '-noout', '-subject', '-ext', 'subjectAltName'],
      { encoding: 'utf8' },
    );
    expect(text).to.match(/CN\s*=\s*bridge/);
    expect(text).to.match(/DNS:bridge|URI:[^,\s]*bridge/);
  });

  it('is idempotent, and --force regenerates', function () {
    const before = readFileSync(path.join(dir, 'ca.pem'), 'utf8');
    const out = run(['--out', dir, '--client', 'alice']);
    expect(out).to.match(/already present/);
    expect(readFileSync(path.join(dir, 'ca.pem'), 'utf8')).to.equal(before);
    run(['--out', dir, '--force', '--quiet']);
    expect(readFileSync(path.join(dir, 'ca.pem'), 'utf8')).to.not.equal(before);
    expect(verify(dir, 'ca.pem', 'server.pem', 'sslserver').ok).to.equal(true);
    // alice was issued by the old CA and was not regenerated without --client alice
    expect(verify(dir, 'ca.pem', 'alice.pem').ok).to.equal(false);
  });

  it('issues a missing extra client from the existing CA', function () {
    const ca = readFileSync(path.join(dir, 'ca.pem'), 'utf8');
    run(['--out', dir, '--client', 'carol', '--quiet']);
    expect(readFileSync(path.join(dir, 'ca.pem'), 'utf8')).to.equal(ca);
    expect(verify(dir, 'ca.pem', 'carol.pem', 'sslclient').ok).to.equal(true);
  });

  it('honours USBROAM_CERTS_DIR', function () {
    const envDir = path.join(tmp, 'env');
    run(['--quiet'], { USBROAM_CERTS_DIR: envDir });
    expect(verify(envDir, 'ca.pem', 'server.pem', 'sslserver').ok).to.equal(true);
  });

  it('rejects bad client names', function () {
    const r = spawnSync(process.execPath, [script, '--out', dir, '--client', '../evil'], { encoding: 'utf8' });
    expect(r.status).to.equal(2);
  });
});
