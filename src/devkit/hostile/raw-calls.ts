// gRPC calls at the byte level, for hostile-input tests and benches: what a broken or
// malicious client sends, past every encoder of ours. Every call carries a deadline, so a
// server that never answers shows as DEADLINE_EXCEEDED, never as a hang.
import * as grpc from '@grpc/grpc-js';
import { readFileSync } from 'node:fs';
import { ClientFrame, ClientMessage, ServerMessage, type ServerFrame } from '../../gen/usbroam/v1/usbhost.js';

export interface TlsPaths {
  ca: string;
  cert: string;
  key: string;
}

const raw = (b: Buffer) => b;

/** A grpc-js client for raw calls: mutual TLS with these files, or a plaintext unix socket (`unix:/p`). */
export function rawClient(address: string, tls?: TlsPaths, options: grpc.ChannelOptions = {}): grpc.Client {
  const creds = tls ? grpc.credentials.createSsl(readFileSync(tls.ca), readFileSync(tls.key), readFileSync(tls.cert)) : grpc.credentials.createInsecure();
  return new grpc.Client(address, creds, { 'grpc.max_send_message_length': 128 * 1024 * 1024, 'grpc.max_receive_message_length': 128 * 1024 * 1024, ...options });
}

/** Data frames of the server (they consume a seq); opened, ack, error and take_over do not. */
export function isServerDataFrame(f: ServerFrame): boolean {
  const k = f.kind?.$case;
  return k === 'complete' || k === 'opResult' || k === 'received' || k === 'deviceGone' || k === 'closed';
}

/** One unary call with raw request bytes; resolves with its status (and response bytes if OK). */
export function rawUnary(client: grpc.Client, method: string, body: Uint8Array, deadlineMs = 10_000): Promise<{ status: grpc.StatusObject; response?: Buffer }> {
  return new Promise((resolve) => {
    let response: Buffer | undefined;
    const call = client.makeUnaryRequest(method, raw, raw, Buffer.from(body), new grpc.Metadata(), { deadline: Date.now() + deadlineMs }, (_err, r) => {
      response = r;
    });
    call.on('status', (status) => setImmediate(() => resolve({ status, response })));
  });
}

/** A Connect stream written and read as bytes; server frames are decoded for the caller. */
export class RawConnect {
  readonly frames: ServerFrame[] = [];
  status?: grpc.StatusObject;
  readonly call: grpc.ClientDuplexStream<Buffer, Buffer>;
  private waiters: (() => void)[] = [];

  constructor(client: grpc.Client, deadlineMs = 60_000, private readonly onFrame?: (f: ServerFrame) => void) {
    this.call = client.makeBidiStreamRequest('/usbroam.v1.UsbHost/Connect', raw, raw, new grpc.Metadata(), { deadline: Date.now() + deadlineMs });
    this.call.on('data', (b: Buffer) => {
      for (const f of ServerMessage.decode(b).frames) {
        this.frames.push(f);
        this.onFrame?.(f);
      }
      this.wake();
    });
    this.call.on('status', (s) => {
      this.status = s;
      this.wake();
    });
    this.call.on('error', () => {});
  }

  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  get ended(): boolean {
    return this.status !== undefined;
  }

  sendRaw(b: Uint8Array): void {
    if (!this.ended) this.call.write(Buffer.from(b));
  }

  send(...frames: ClientFrame[]): void {
    this.sendRaw(ClientMessage.encode({ frames }).finish());
  }

  /** Wait until `pred` holds; throws after `ms` naming what was seen. */
  async until<T>(what: string, pred: () => T | undefined, ms = 10_000): Promise<T> {
    const end = Date.now() + ms;
    for (;;) {
      const v = pred();
      if (v) return v;
      const left = end - Date.now();
      if (left <= 0) {
        throw new Error(`timed out after ${ms} ms waiting for ${what}; frames: ${this.frames.map((f) => f.kind?.$case).join(',')}; status: ${this.status ? `${grpc.status[this.status.code]} ${this.status.details}` : 'none'}`);
      }
      await new Promise<void>((r) => {
        const t = setTimeout(r, Math.min(left, 200));
        this.waiters.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
  }

  /** The call's status, once it ends. */
  ending(what: string, ms = 10_000): Promise<grpc.StatusObject> {
    return this.until(`the end of the stream (${what})`, () => this.status, ms);
  }

  cancel(): void {
    this.call.cancel();
  }
}
