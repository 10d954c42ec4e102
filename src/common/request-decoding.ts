// Requests reach our servers as bytes and become messages here, in one place.
//
// grpc-js runs a method's request deserializer before any handler or interceptor sees the
// message, and answers INTERNAL ("Error deserializing request") when it throws: a client that
// sends bytes that do not parse is told the server failed, and nothing is logged. A
// RequestDecodingServer registers every service (ours, health, reflection) with a passthrough
// deserializer and decodes in its own interceptor with the method's original deserializer
// (for Connect: the one grpc-definition.ts sets, where a faster codec can replace it). A
// failure ends the call with INVALID_ARGUMENT and a message that says what was wrong, and is
// logged with the client's identity and peer. The wire format does not change: grpcurl and
// generated clients see the same service.
import * as grpc from '@grpc/grpc-js';
import { identityOf, type AuthenticatedCall } from './grpc-server-kit.js';
import type { Logger } from './log.js';

type Decode = (bytes: Buffer) => unknown;
const passthrough = (b: Buffer): Buffer => b;

/** Bytes of a request that do not parse as the method's message. */
export class RequestDecodeError extends Error {
  constructor(
    readonly method: string,
    readonly bytes: number,
    cause: unknown,
  ) {
    super(`the request message to ${method} (${bytes} bytes) is not a valid protobuf message of its type: ${(cause as Error)?.message ?? String(cause)}`);
    this.name = 'RequestDecodeError';
  }
}

/** The one place a request's bytes become its message; throws RequestDecodeError. */
export function decodeRequest(method: string, decode: Decode, bytes: Buffer): unknown {
  try {
    return decode(bytes);
  } catch (err) {
    throw new RequestDecodeError(method, bytes.length, err);
  }
}

export interface RequestDecodingOptions {
  log: Logger;
  /** The caller's identity for the log line (default: its certificate's CN or first SAN). */
  identify?: (call: AuthenticatedCall) => string | undefined;
}

/**
 * A grpc.Server whose services get their requests as bytes and decode them in an interceptor
 * that runs after `options.interceptors` (so their call logs see its INVALID_ARGUMENT).
 */
export class RequestDecodingServer extends grpc.Server {
  private readonly decoders: Map<string, Decode>;

  constructor(options: grpc.ServerOptions, decoding: RequestDecodingOptions) {
    const decoders = new Map<string, Decode>();
    super({ ...options, interceptors: [...(options.interceptors ?? []), requestDecodingInterceptor(decoders, decoding)] });
    this.decoders = decoders;
  }

  override addService(service: grpc.ServiceDefinition, implementation: grpc.UntypedServiceImplementation): void {
    const raw: Record<string, grpc.MethodDefinition<unknown, unknown>> = {};
    for (const [name, m] of Object.entries(service)) {
      // Kept by path: the interceptor sees the path, not the definition.
      if (m.requestDeserialize !== passthrough) this.decoders.set(m.path, m.requestDeserialize as Decode);
      raw[name] = { ...m, requestDeserialize: passthrough };
    }
    super.addService(raw, implementation);
  }
}

function requestDecodingInterceptor(decoders: Map<string, Decode>, opts: RequestDecodingOptions): grpc.ServerInterceptor {
  return (method, call) => {
    const decode = decoders.get(method.path);
    if (!decode) return new grpc.ServerInterceptingCall(call);
    const path = method.path;
    let refused = false;
    const intercepted: grpc.ServerInterceptingCall = new grpc.ServerInterceptingCall(call, {
      start: (next) =>
        next({
          onReceiveMessage: (bytes: Buffer, pass) => {
            if (refused) return;
            let message: unknown;
            try {
              message = decodeRequest(path, decode, bytes);
            } catch (err) {
              refused = true;
              const identity = (opts.identify ?? identityOf)(call);
              opts.log.warn({ method: path, identity, peer: call.getPeer(), bytes: bytes.length, err: (err as Error).message }, 'request refused: its bytes do not parse');
              intercepted.sendStatus({ code: grpc.status.INVALID_ARGUMENT, details: (err as Error).message, metadata: new grpc.Metadata() });
              return;
            }
            pass(message);
          },
        }),
    });
    return intercepted;
  };
}
