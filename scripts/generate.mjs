// Regenerates src/gen from protos/ with buf + ts-proto (offline). Never edit src/gen by hand.
import { execFileSync } from 'node:child_process';
import { rmSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
rmSync(path.join(root, 'src/gen'), { recursive: true, force: true });
execFileSync(process.execPath, [path.join(root, 'node_modules/@bufbuild/buf/bin/buf'), 'generate'], {
  cwd: root,
  stdio: 'inherit',
});
console.log('generated src/gen from protos/');
