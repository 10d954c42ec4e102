// Real certificates for tests, benches and the guest harness: made by the project's own script
// (scripts/make-certs.mjs), in temporary directories.
import { execFileSync } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { REPO_ROOT } from '../common/repo-root.js';

const SCRIPT = path.join(REPO_ROOT, 'scripts/make-certs.mjs');

export interface CertDir {
  dir: string;
  file: (name: string) => string;
}

let shared: CertDir | undefined;

/** The certificates every test of this process shares (never revoke in them: use certDir()). */
export function testCerts(): CertDir {
  shared ??= certDir();
  return shared;
}

/** A directory of its own: CA, server, bridge, viewer, other-ca, intruder, plus `clients`. */
export function certDir(clients: string[] = []): CertDir {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'usbroam-certs-'));
  execFileSync(process.execPath, [SCRIPT, '--out', dir, '--quiet', ...clients.flatMap((c) => ['--client', c])], { stdio: 'inherit' });
  return { dir, file: (name) => path.join(dir, name) };
}

/** `make-certs revoke`: revoke `names` (NAME.pem in the dir) and rewrite its crl.pem; none: just (re)write crl.pem. Returns the CRL's path. */
export function revokeCerts(c: CertDir, names: string[] = []): string {
  const args = names.length ? ['revoke', '--dir', c.dir, ...names.flatMap((n) => ['--name', n])] : ['crl', '--dir', c.dir];
  execFileSync(process.execPath, [SCRIPT, ...args, '--quiet'], { stdio: 'inherit' });
  return c.file('crl.pem');
}

export function clientTls(identity: string, ca = 'ca.pem', c: CertDir = testCerts()) {
  return { ca: c.file(ca), cert: c.file(`${identity}.pem`), key: c.file(`${identity}.key`) };
}
