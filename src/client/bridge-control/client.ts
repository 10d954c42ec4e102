// A small nice-grpc client of the bridge's control API (for the CLI and orchestrators written
// in TypeScript). A unix socket by default; TCP with mutual TLS (or plaintext with `insecure`
// for a bridge listening on loopback with --insecure).
import { ChannelCredentials } from '@grpc/grpc-js';
import { createChannel, createClient, type Channel, type Client } from 'nice-grpc';
import { readFileSync } from 'node:fs';
import { BridgeDefinition, type AttachDeviceRequest, type Attachment } from '../../gen/usbroam/v1/bridge.js';
import { parseControlAddress } from './address.js';

export interface BridgeControlConnection {
  /** Unix socket (`unix:/p` or `/p`) or host:port. Default: USBROAM_CONTROL, else the default socket. */
  address?: string;
  /** TCP: mutual TLS material (CA of the bridge's certificate, our certificate and key). */
  ca?: string;
  cert?: string;
  key?: string;
  insecure?: boolean;
}

export class BridgeControlClient {
  readonly channel: Channel;
  readonly rpc: Client<typeof BridgeDefinition>;
  /** `unix:/path` or host:port. */
  readonly address: string;

  constructor(o: BridgeControlConnection = {}) {
    const at = parseControlAddress(o.address);
    let creds: ChannelCredentials;
    let target: string;
    if (at.kind === 'unix') {
      this.address = `unix:${at.path}`;
      // unix:///abs/path: nice-grpc's createChannel passes a URI with an unknown scheme through
      // as it is (a bare `unix:/p` would get ":80" appended).
      target = `unix://${at.path}`;
      creds = ChannelCredentials.createInsecure();
    } else {
      this.address = at.hostPort;
      target = `dns:${at.hostPort}`;
      const env = process.env;
      const ca = o.ca ?? env.USBROAM_CONTROL_CA;
      const cert = o.cert ?? env.USBROAM_CONTROL_CERT;
      const key = o.key ?? env.USBROAM_CONTROL_KEY;
      if (o.insecure) creds = ChannelCredentials.createInsecure();
      else {
        const missing = Object.entries({ ca, cert, key })
          .filter(([, v]) => !v)
          .map(([k]) => k);
        if (missing.length) throw new Error(`the bridge's control API over TCP needs mutual TLS: --control-${missing.join(', --control-')} (or USBROAM_CONTROL_${missing.map((m) => m.toUpperCase()).join(', USBROAM_CONTROL_')})`);
        creds = ChannelCredentials.createSsl(readFileSync(ca!), readFileSync(key!), readFileSync(cert!));
      }
    }
    this.channel = createChannel(target, creds);
    this.rpc = createClient(BridgeDefinition, this.channel);
  }

  async attach(req: Partial<AttachDeviceRequest>, signal?: AbortSignal): Promise<Attachment> {
    const r = await this.rpc.attachDevice(req, { signal });
    if (!r.attachment) throw new Error('the bridge answered without an attachment');
    return r.attachment;
  }

  async detach(vm: string, attachmentId: string, signal?: AbortSignal): Promise<void> {
    await this.rpc.detachDevice({ vm, attachmentId }, { signal });
  }

  async list(vm?: string, signal?: AbortSignal): Promise<Attachment[]> {
    return (await this.rpc.listAttachments({ vm: vm ?? '' }, { signal })).attachments;
  }

  close(): void {
    this.channel.close();
  }
}
