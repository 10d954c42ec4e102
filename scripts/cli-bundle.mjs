// Where the bundled CLI lives (scripts/build.mjs writes it) and whether it is current: bin/usbroam.js
// runs it only while it is newer than every file under src/, so an edited source is never shadowed
// by a stale bundle.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const BUNDLE = path.join(ROOT, 'build', 'usbroam.mjs');
export const SOURCES = path.join(ROOT, 'src');

/** The newest modification time (ms) of a file under `dir`. */
function newestMtime(dir) {
  let newest = 0;
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    const t = e.isDirectory() ? newestMtime(p) : fs.statSync(p).mtimeMs;
    if (t > newest) newest = t;
  }
  return newest;
}

/** True when `bundle` exists and no file under `sources` is newer. */
export function bundleIsCurrent(bundle = BUNDLE, sources = SOURCES) {
  let built;
  try {
    built = fs.statSync(bundle).mtimeMs;
  } catch {
    return false;
  }
  return newestMtime(sources) <= built;
}
