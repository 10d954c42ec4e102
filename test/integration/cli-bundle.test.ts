// The bundled CLI (scripts/build.mjs -> build/usbroam.mjs): bin/usbroam.js runs it while it is
// newer than every source file and falls back to the sources through tsx otherwise, so an edited
// source is never shadowed by a stale bundle. Both give the same CLI.
import { expect } from 'chai';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { REPO_ROOT } from '../../src/common/repo-root.js';

const run = promisify(execFile);
const usbroam = (args: string[], env: Record<string, string> = {}) =>
  run(process.execPath, [path.join(REPO_ROOT, 'bin/usbroam.js'), ...args], { cwd: REPO_ROOT, env: { ...process.env, ...env }, timeout: 60_000 });

interface CliBundle {
  BUNDLE: string;
  bundleIsCurrent(bundle?: string, sources?: string): boolean;
}

describe('the bundled CLI', function () {
  this.timeout(120_000);
  let cb: CliBundle;

  before(async () => {
    await run(process.execPath, [path.join(REPO_ROOT, 'scripts/build.mjs')], { cwd: REPO_ROOT, timeout: 60_000 });
    const spec = path.join(REPO_ROOT, 'scripts/cli-bundle.mjs'); // plain JS beside bin/, untyped
    cb = (await import(spec)) as CliBundle;
  });

  it('bin/usbroam.js runs build/usbroam.mjs when it is current, the sources with USBROAM_FROM_SOURCE=1; same commands either way', async () => {
    expect(cb.bundleIsCurrent()).to.equal(true);
    const version = JSON.parse(fs.readFileSync(path.join(REPO_ROOT, 'package.json'), 'utf8')).version as string;
    expect((await usbroam(['--version'])).stdout.trim()).to.equal(`${version} (build/usbroam.mjs)`);
    expect((await usbroam(['--version'], { USBROAM_FROM_SOURCE: '1' })).stdout.trim()).to.equal(`${version} (sources through tsx)`);
    const [fromBundle, fromSources] = await Promise.all([usbroam(['--help']), usbroam(['--help'], { USBROAM_FROM_SOURCE: '1' })]);
    expect(fromBundle.stdout).to.include('serve').and.include('bridge').and.include('qemu-args');
    expect(fromBundle.stdout).to.equal(fromSources.stdout);
  });

  it('a bundle is current only while it exists and no source file (at any depth) is newer', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ubundle-'));
    try {
      const src = path.join(dir, 'src');
      fs.mkdirSync(path.join(src, 'a', 'b'), { recursive: true });
      const deep = path.join(src, 'a', 'b', 'x.ts');
      fs.writeFileSync(deep, '');
      fs.writeFileSync(path.join(src, 'y.ts'), '');
      const bundle = path.join(dir, 'usbroam.mjs');
      expect(cb.bundleIsCurrent(bundle, src), 'missing').to.equal(false);
      fs.writeFileSync(bundle, '');
      const t = Date.now() / 1000;
      for (const f of [deep, path.join(src, 'y.ts')]) fs.utimesSync(f, t - 60, t - 60);
      fs.utimesSync(bundle, t - 30, t - 30);
      expect(cb.bundleIsCurrent(bundle, src), 'built after the sources').to.equal(true);
      fs.utimesSync(deep, t, t); // an edit three directories down
      expect(cb.bundleIsCurrent(bundle, src), 'a source edited after the build').to.equal(false);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
