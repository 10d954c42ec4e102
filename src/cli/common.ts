// What every client subcommand shares: endpoint flags, output and errors.
import { Option, type Command } from 'commander';
import type { Device } from '../gen/usbroam/v1/usbhost.js';
import { UsbHostClient } from '../client/sdk/client.js';
import { speedName } from '../client/sdk/format.js';
import type { Logger } from '../common/log.js';

export interface ConnectionFlags {
  server?: string;
  ca?: string;
  cert?: string;
  key?: string;
  insecure?: boolean;
  json?: boolean;
}

/** A flag: its commander syntax, help text and the environment variable that sets it. */
type FlagSpec = readonly [flags: string, description: string, env: string];

/** How a subcommand reaches a gRPC endpoint: its address, the mutual-TLS files, plaintext. */
export interface EndpointFlagSpec {
  address: FlagSpec;
  ca: FlagSpec;
  cert: FlagSpec;
  key: FlagSpec;
  insecure: string;
}

/** Adds an endpoint's flags and --json: the one definition of the client subcommands' flag set. */
export function withEndpointFlags(cmd: Command, s: EndpointFlagSpec): Command {
  for (const [flags, description, env] of [s.address, s.ca, s.cert, s.key]) cmd.addOption(new Option(flags, description).env(env));
  return cmd.option('--insecure', s.insecure).option('--json', 'machine-readable output');
}

export function withConnectionFlags(cmd: Command): Command {
  return withEndpointFlags(cmd, {
    address: ['-s, --server <address>', 'server address, host:port or unix:/path', 'USBROAM_SERVER'],
    ca: ['--ca <file>', 'CA certificate that signed the server certificate', 'USBROAM_CA'],
    cert: ['--cert <file>', 'client certificate (its CN is your identity)', 'USBROAM_CERT'],
    key: ['--key <file>', 'client private key', 'USBROAM_KEY'],
    insecure: 'plaintext, for a server started with --insecure',
  });
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

/**
 * SIGTERM or SIGINT runs `stop` once (logged with `what` and `fields`), then exits 0, or 1 if it
 * failed: how the long-running subcommands (serve, bridge) end.
 */
export function exitOnSignals(log: Logger, what: string, stop: (signal: string) => Promise<unknown>, fields: () => object = () => ({})): void {
  let stopping = false;
  const onSignal = (signal: string) => {
    if (stopping) return;
    stopping = true;
    log.info({ signal, ...fields() }, what);
    stop(signal).then(
      () => process.exit(0),
      (err) => {
        log.error({ err: (err as Error).message }, 'stop failed');
        process.exit(1);
      },
    );
  };
  process.once('SIGTERM', () => onSignal('SIGTERM'));
  process.once('SIGINT', () => onSignal('SIGINT'));
}

/**
 * SIGHUP runs `reload` (one at a time; a SIGHUP during a reload runs it once more after), logged
 * with `what`. A reload that throws is logged and the process goes on: SIGHUP never ends it.
 */
export function reloadOnSighup(log: Logger, what: string, reload: () => Promise<unknown>): void {
  let running: Promise<void> | undefined;
  let again = false;
  const run = (): void => {
    log.info({ signal: 'SIGHUP' }, what);
    running = reload()
      .catch((err: Error) => log.error({ reload: 'refused', err: err.message }, 'reload refused: keeping the previous configuration'))
      .then(() => {
        running = undefined;
        if (again) {
          again = false;
          run();
        }
      });
  };
  process.on('SIGHUP', () => {
    if (running) again = true;
    else run();
  });
}

/** Print a failure the way a person can act on it, and set the exit code. */
export function reportError(err: unknown): void {
  const e = err as Error & { details?: string; code?: number };
  process.stderr.write(`usbroam: ${e.details ?? e.message}\n`);
  process.exitCode = 1;
}
