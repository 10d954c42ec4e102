// The checkout's root (protos/, scripts/, certs/, .cache/), found from the running module rather
// than by a fixed number of '..': the same code runs from its sources (src/<dir>/<file>.ts) and
// from the bundled CLI (build/usbroam.mjs), which sit at different depths.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** The nearest directory at or above `start` holding protos/usbroam. */
export function findRepoRoot(start: string): string {
  for (let dir = start; ; dir = path.dirname(dir)) {
    if (fs.existsSync(path.join(dir, 'protos', 'usbroam'))) return dir;
    if (path.dirname(dir) === dir) throw new Error(`no usbroam checkout (a directory with protos/usbroam) at or above ${start}`);
  }
}

export const REPO_ROOT = findRepoRoot(path.dirname(fileURLToPath(import.meta.url)));
