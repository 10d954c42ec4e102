#!/usr/bin/env node
// The usbroam CLI: build/usbroam.mjs (the bundle `npm run build` makes; npm ci runs it) while it is
// newer than every source file, otherwise the TypeScript sources through tsx's loader.
// USBROAM_FROM_SOURCE=1 always runs the sources.
import { pathToFileURL } from 'node:url';
import { BUNDLE, bundleIsCurrent } from '../scripts/cli-bundle.mjs';

// grpc-js passes an IP address as TLS SNI when the server is named by IP
// (127.0.0.1:7470); Node warns about that on every connection. The
// certificate is still verified against the IP SAN, so the warning is noise.
process.removeAllListeners('warning');
process.on('warning', (w) => {
  if (w.code !== 'DEP0123') process.stderr.write(`${w.name}: ${w.message}\n`);
});

if (process.env.USBROAM_FROM_SOURCE !== '1' && bundleIsCurrent()) {
  globalThis.usbroamRunsFrom = 'build/usbroam.mjs';
  await import(pathToFileURL(BUNDLE).href);
} else {
  globalThis.usbroamRunsFrom = 'sources through tsx';
  const { register } = await import('tsx/esm/api');
  register();
  await import('../src/cli/main.ts');
}
