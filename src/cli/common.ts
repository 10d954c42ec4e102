// What every client subcommand shares: connection flags and output.
import { Option, type Command } from 'commander';
import type { Device } from '../gen/usbroam/v1/usbhost.js';
import { UsbHostClient } from '../client/sdk/client.js';
import { speedName } from '../client/sdk/format.js';

export interface ConnectionFlags {
  server?: string;
  ca?: string;
  cert?: string;
  key?: string;
  insecure?: boolean;
  json?: boolean;
}

export function withConnectionFlags(cmd: Command): Command {
  return cmd
    .addOption(new Option('-s, --server <address>', 'server address, host:port or unix:/path').env('USBROAM_SERVER'))
    .addOption(new Option('--ca <file>', 'CA certificate that signed the server certificate').env('USBROAM_CA'))
    .addOption(new Option('--cert <file>', 'client certificate (its CN is your identity)').env('USBROAM_CERT'))
    .addOption(new Option('--key <file>', 'client private key').env('USBROAM_KEY'))
    .option('--insecure', 'plaintext, for a server started with --insecure')
    .option('--json', 'machine-readable output');
}

export function clientFrom(f: ConnectionFlags): UsbHostClient {
  return new UsbHostClient({ address: f.server, ca: f.ca, cert: f.cert, key: f.key, insecure: f.insecure });
}

export function describeDevice(d: Device): string {
  const vp = `${d.vendorId.toString(16).padStart(4, '0')}:${d.productId.toString(16).padStart(4, '0')}`;
  const claim = d.claim?.claimed ? `claimed by ${d.claim.identity} (session ${d.claim.sessionId})` : 'free';
  const port = `${d.bus}-${d.portPath.join('.')}`;
  return `${d.id.padEnd(10)} ${vp}  ${port.padEnd(6)} ${speedName(d.speed).padEnd(6)} ${`${d.manufacturer} ${d.product}`.trim()} [serial ${d.serial || '-'}]  ${claim}`;
}

/** Print a failure the way a person can act on it, and set the exit code. */
export function reportError(err: unknown): void {
  const e = err as Error & { details?: string; code?: number };
  process.stderr.write(`usbroam: ${e.details ?? e.message}\n`);
  process.exitCode = 1;
}
