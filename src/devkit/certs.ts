// Real certificates for tests, benches and the guest harness: made once per process by the
// project's own script, in a temporary directory.
import { execFileSync } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { REPO_ROOT } from '../common/repo-root.js';

let dir: string | undefined;

export function testCerts(): { dir: string; file: (name: string) => string } {
  if (!dir) {
    dir = mkdtempSync(path.join(os.tmpdir(), 'usbroam-certs-'));
    execFileSync(process.execPath, [path.join(REPO_ROOT, 'scripts/make-certs.mjs'), '--out', dir, '--quiet'], { stdio: 'inherit' });
  }
  const d = dir;
  return { dir: d, file: (name) => path.join(d, name) };
}

export function clientTls(identity: string, ca = 'ca.pem') {
  const c = testCerts();
  return { ca: c.file(ca), cert: c.file(`${identity}.pem`), key: c.file(`${identity}.key`) };
}
