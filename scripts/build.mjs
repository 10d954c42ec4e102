#!/usr/bin/env node
// Bundles the usbroam CLI into one ES module, build/usbroam.mjs, which bin/usbroam.js runs while it
// is newer than every source file (otherwise it runs the sources through tsx). One file instead of
// a few hundred, and no TypeScript transform at start-up: `usbroam --help` takes about 0.5 s here
// instead of 1.1-1.8 s.
// Left outside the bundle: native addons (usb, koffi) and packages that find their own files
// through __dirname (grpc-js's channelz and ORCA protos, pino's transport workers,
// grpc-health-check, @grpc/reflection, @grpc/proto-loader, etcd3's rpc.proto), which a bundle would break.
import { build } from 'esbuild';
import path from 'node:path';
import { BUNDLE, ROOT as root } from './cli-bundle.mjs';

const ifPossible = process.argv.includes('--if-possible'); // npm ci's prepare: a failed build is not fatal
const t0 = Date.now();
const result = await build({
  absWorkingDir: root,
  entryPoints: ['src/cli/main.ts'],
  outfile: BUNDLE,
  bundle: true,
  platform: 'node',
  format: 'esm',
  target: 'node20',
  external: ['usb', 'koffi', '@grpc/grpc-js', 'pino', 'grpc-health-check', '@grpc/reflection', '@grpc/proto-loader', 'etcd3'],
  // Bundled CommonJS packages call require() for Node's built-ins.
  banner: { js: "import { createRequire as __usbroamCreateRequire } from 'node:module'; const require = __usbroamCreateRequire(import.meta.url);" },
  sourcemap: 'linked',
  logLevel: 'warning',
  metafile: true,
}).catch((err) => {
  if (!ifPossible) throw err;
  console.warn(`[build] no bundle, the CLI will run its sources through tsx: ${err.message}`);
  process.exit(0);
});
const inputs = Object.keys(result.metafile.inputs).length;
console.log(`[build] ${path.relative(root, BUNDLE)}: ${inputs} modules in ${Date.now() - t0} ms`);
