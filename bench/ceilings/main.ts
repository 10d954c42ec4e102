// Standalone transport ceilings: `npx tsx bench/ceilings/main.ts [--duration MS] [--certs DIR]
//   [--channel-options JSON] [--server-options JSON]`. Progress on stderr; the JSON result is the last stdout line.
import { parseArgs } from 'node:util';
import { measureCeilings } from './client.js';

const { values } = parseArgs({
  options: {
    duration: { type: 'string' },
    certs: { type: 'string' },
    'chunk-size': { type: 'string' },
    'channel-options': { type: 'string' },
    'server-options': { type: 'string' },
  },
});

const result = await measureCeilings({
  durationMs: values.duration ? Number(values.duration) : undefined,
  certsDir: values.certs,
  chunkSize: values['chunk-size'] ? Number(values['chunk-size']) : undefined,
  grpcChannelOptions: values['channel-options'] ? JSON.parse(values['channel-options']) : undefined,
  grpcServerOptions: values['server-options'] ? JSON.parse(values['server-options']) : undefined,
});
process.stdout.write(JSON.stringify(result) + '\n');
