// `make-certs revoke` / `make-certs crl` and how a server reads TLS material (tls-material.ts):
// CRLs made by the script, checked by openssl itself and by loadTlsMaterial/peerRefusal.
import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import { copyFileSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { loadTlsMaterial, normalizeSerial, peerRefusal } from '../../src/common/tls-material.js';
import { REPO_ROOT } from '../../src/common/repo-root.js';
import { certDir, revokeCerts, type CertDir } from '../../src/devkit/certs.js';

const script = path.join(REPO_ROOT, 'scripts/make-certs.mjs');

/** openssl verify with the CRL: does OpenSSL accept `name` as a client? */
function opensslAccepts(c: CertDir, name: string): boolean {
  const r = spawnSync('openssl', ['verify', '-crl_check', '-CAfile', c.file('ca.pem'), '-CRLfile', c.file('crl.pem'), '-purpose', 'sslclient', c.file(`${name}.pem`)], { encoding: 'utf8' });
  return r.status === 0;
}

const der = (c: CertDir, name: string) => Buffer.from(readFileSync(c.file(`${name}.pem`), 'latin1').replace(/-----[^-]+-----|\s+/g, ''), 'base64');

describe('make-certs revoke / crl and reading TLS material', function () {
  this.timeout(30_000);
  let c: CertDir;
  let other: CertDir;
  const files = () => ({ ca: c.file('ca.pem'), cert: c.file('server.pem'), key: c.file('server.key'), crl: c.file('crl.pem') });

  before(() => {
    c = certDir(['alice']);
    other = certDir();
  });
  after(() => {
    rmSync(c.dir, { recursive: true, force: true });
    rmSync(other.dir, { recursive: true, force: true });
  });

  it('crl writes an empty CRL signed by the CA; revoke lists exactly the revoked certificates', () => {
    revokeCerts(c);
    expect(opensslAccepts(c, 'viewer')).to.equal(true);
    expect(loadTlsMaterial(files()).crl?.count).to.equal(0);
    revokeCerts(c, ['viewer']);
    revokeCerts(c, ['viewer', 'alice']); // viewer again: listed once
    expect(opensslAccepts(c, 'viewer')).to.equal(false);
    expect(opensslAccepts(c, 'alice')).to.equal(false);
    expect(opensslAccepts(c, 'bridge')).to.equal(true);
    const m = loadTlsMaterial(files());
    expect(m.crl?.count).to.equal(2);
    expect(peerRefusal(m, der(c, 'viewer'))).to.include({ reason: 'revoked' });
    expect(peerRefusal(m, der(c, 'viewer'))?.message).to.match(/^certificate serial [0-9A-F]+ is revoked by the CRL /);
    expect(peerRefusal(m, der(c, 'bridge'))).to.equal(undefined);
    expect(peerRefusal(m, der(c, 'intruder'))).to.include({ reason: 'untrusted' });
  });

  it('refuses to revoke a certificate of another CA, or nothing', () => {
    const r = spawnSync(process.execPath, [script, 'revoke', '--dir', c.dir, '--cert', c.file('intruder.pem')], { encoding: 'utf8' });
    expect(r.status).to.equal(1);
    expect(r.stderr).to.match(/is not signed by/);
    expect(spawnSync(process.execPath, [script, 'revoke', '--dir', c.dir], { encoding: 'utf8' }).status).to.equal(2);
  });

  it('a CRL of another CA, an expired CRL, a broken one or a key of another certificate is refused with the file named', () => {
    const bad = path.join(c.dir, 'bad-crl.pem');
    copyFileSync(revokeCerts(other, ['viewer']), bad);
    expect(() => loadTlsMaterial({ ...files(), crl: bad })).to.throw(`CRL ${bad} is not signed by the CA in ${c.file('ca.pem')}`);
    // The CRL of make-certs is valid 365 days: 400 days on, it has expired.
    const later = new Date(Date.now() + 400 * 86_400_000);
    expect(() => loadTlsMaterial(files(), later)).to.throw(new RegExp(`CRL ${c.file('crl.pem')} expired at .*: it would refuse every client`));
    writeFileSync(bad, 'nothing here');
    expect(() => loadTlsMaterial({ ...files(), crl: bad })).to.throw(`CRL ${bad} holds no PEM "X509 CRL" block`);
    expect(() => loadTlsMaterial({ ...files(), key: c.file('bridge.key') })).to.throw(/TLS material refused/);
    expect(() => loadTlsMaterial({ ...files(), ca: path.join(c.dir, 'missing.pem') })).to.throw(/cannot read the CA certificate .*missing\.pem/);
  });

  it('normalizes serials as Node and CRLs spell them', () => {
    expect(normalizeSerial('00ab:cd')).to.equal('ABCD');
    expect(normalizeSerial('0')).to.equal('0');
  });
});
