// How a client reaches a server: address and mTLS material, from options or
// the environment (USBROAM_SERVER, USBROAM_CA, USBROAM_CERT, USBROAM_KEY).
import { ChannelCredentials } from '@grpc/grpc-js';
import { readFileSync } from 'node:fs';

export interface ConnectionOptions {
  /** host:port or unix:/path. */
  address?: string;
  ca?: string;
  cert?: string;
  key?: string;
  /** Plaintext (the server must run with --insecure). */
  insecure?: boolean;
}

export function resolveConnection(o: ConnectionOptions = {}): Required<Pick<ConnectionOptions, 'address'>> & ConnectionOptions {
  const env = process.env;
  return {
    address: o.address ?? env.USBROAM_SERVER ?? '127.0.0.1:7470',
    ca: o.ca ?? env.USBROAM_CA,
    cert: o.cert ?? env.USBROAM_CERT,
    key: o.key ?? env.USBROAM_KEY,
    insecure: o.insecure ?? env.USBROAM_INSECURE === '1',
  };
}

export function channelCredentials(o: ConnectionOptions): ChannelCredentials {
  if (o.insecure) return ChannelCredentials.createInsecure();
  const missing = (['ca', 'cert', 'key'] as const).filter((k) => !o[k]);
  if (missing.length) {
    throw new Error(`mutual TLS needs --${missing.join(', --')} (or USBROAM_${missing.map((m) => m.toUpperCase()).join(', USBROAM_')}); run "npm run certs" for development certificates`);
  }
  return ChannelCredentials.createSsl(readFileSync(o.ca!), readFileSync(o.key!), readFileSync(o.cert!));
}
