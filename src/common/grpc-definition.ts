// A grpc-js service definition from a ts-proto generic definition, so the
// server (plain grpc-js, for health and reflection) and the nice-grpc client
// share one source: protos/.
import type * as grpc from '@grpc/grpc-js';
import type { ServerMessage } from '../gen/usbroam/v1/usbhost.js';
import { ScratchBuffer } from './encode-buffers.js';
import { encodeClientMessage, encodeServerMessage } from './frame-codec.js';
import { decodeClientMessage, decodeServerMessage } from './frame-decode.js';

interface MessageType<T> {
  encode(message: T): { finish(): Uint8Array };
  decode(input: Uint8Array): T;
}

interface GenericMethod {
  name: string;
  requestType: MessageType<any>;
  responseType: MessageType<any>;
  requestStream: boolean;
  responseStream: boolean;
}

const toBuffer = (u: Uint8Array) => Buffer.from(u.buffer, u.byteOffset, u.byteLength);

export function grpcJsServiceDefinition(def: { fullName: string; methods: Record<string, GenericMethod> }): grpc.ServiceDefinition {
  const out: Record<string, grpc.MethodDefinition<unknown, unknown>> = {};
  for (const m of Object.values(def.methods)) {
    out[m.name] = {
      path: `/${def.fullName}/${m.name}`,
      requestStream: m.requestStream,
      responseStream: m.responseStream,
      requestSerialize: (v: unknown) => toBuffer(m.requestType.encode(v).finish()),
      requestDeserialize: (b: Buffer) => m.requestType.decode(b),
      responseSerialize: (v: unknown) => toBuffer(m.responseType.encode(v).finish()),
      responseDeserialize: (b: Buffer) => m.responseType.decode(b),
      originalName: m.name[0].toLowerCase() + m.name.slice(1),
    };
  }
  // The URB channel's hot messages: encoded with one allocation, URB data copied once; decoded
  // without ts-proto's per-field costs (frame-decode.ts).
  const connect = out.Connect;
  if (def.fullName === 'usbroam.v1.UsbHost' && connect) {
    connect.requestSerialize = encodeClientMessage as (v: unknown) => Buffer;
    connect.requestDeserialize = decodeClientMessage;
    connect.responseDeserialize = decodeServerMessage;
    // grpc-js's server copies what a serializer returns into its own frame before write() returns
    // (BaseServerInterceptingCall.serializeMessage), so the server encodes into one reused buffer.
    // Its client copies later, after promise turns: the SDK encodes requests into a BufferPool and
    // gives each buffer back in the write callback (src/client/sdk/client.ts).
    const scratch = new ScratchBuffer();
    connect.responseSerialize = ((v: ServerMessage) => encodeServerMessage(v, scratch)) as (v: unknown) => Buffer;
  }
  return out;
}
