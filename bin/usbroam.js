#!/usr/bin/env node
// The usbroam CLI. Runs the TypeScript sources through tsx's loader.
import { register } from 'tsx/esm/api';

// grpc-js passes an IP address as TLS SNI when the server is named by IP
// (127.0.0.1:7470); Node warns about that on every connection. The
// certificate is still verified against the IP SAN, so the warning is noise.
process.removeAllListeners('warning');
process.on('warning', (w) => {
  if (w.code !== 'DEP0123') process.stderr.write(`${w.name}: ${w.message}\n`);
});

register();
await import('../src/client/cli/main.ts');
