// What both gRPC servers (the USB host server, the bridge's control API) need around their
// service: the caller's identity from its TLS certificate, one middleware that requires it for
// every handler, grpc.health.v1 and reflection, mutual-TLS credentials, one log line per call,
// and a graceful stop.
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { ReflectionService } from '@grpc/reflection';
import { HealthImplementation, protoPath as healthProtoPath } from 'grpc-health-check';
import type { PeerCertificate } from 'node:tls';
import type { Logger } from './log.js';
import { loadTlsMaterial, type TlsFiles } from './tls-material.js';
import { ReloadableServerCredentials } from './tls-reload.js';

export type { TlsFiles } from './tls-material.js';

/** A call whose TLS peer can be asked for (every grpc-js server call). */
export interface AuthenticatedCall {
  getAuthContext(): { sslPeerCertificate?: PeerCertificate };
}

/**
 * A client's identity comes from its TLS certificate only (CN, else the first SAN), never from
 * anything it sends. Without a certificate: `insecureIdentity` (plaintext servers), else undefined.
 */
export function identityOf(call: AuthenticatedCall, insecureIdentity?: string): string | undefined {
  const cert = call.getAuthContext?.().sslPeerCertificate;
  if (cert && Object.keys(cert).length > 0) {
    const cn = cert.subject?.CN;
    if (typeof cn === 'string' && cn) return cn;
    const san = cert.subjectaltname?.split(',')[0]?.trim();
    if (san) return san.replace(/^(DNS|URI|IP Address):/, '');
  }
  return insecureIdentity;
}

/** An error that becomes a gRPC status with this code and message. */
export function serviceError(code: grpc.status, details: string): grpc.ServiceError {
  return Object.assign(new Error(details), { code, details, metadata: new grpc.Metadata() });
}

export const NO_IDENTITY = 'no client identity: a client certificate is required';

/** Handlers that get the caller's identity: unary ones return (or throw) instead of calling back. */
export type UnaryHandler<Req, Res> = (call: grpc.ServerUnaryCall<Req, Res>, identity: string) => Promise<Res> | Res;
export type ServerStreamHandler<Req, Res> = (call: grpc.ServerWritableStream<Req, Res>, identity: string) => void;
export type BidiHandler<Req, Res> = (call: grpc.ServerDuplexStream<Req, Res>, identity: string) => void;
// Each method has its own call type; withIdentity pairs them by the service definition.
type AnyHandler = (call: any, identity: string) => unknown;

export interface IdentityPolicy {
  /** The caller's identity; undefined refuses the call with UNAUTHENTICATED. */
  identify(call: AuthenticatedCall): string | undefined;
  /** An identity that may not call at all: the error to refuse it with. */
  refuse?(identity: string): grpc.ServiceError | undefined;
  /** What a unary handler's thrown error becomes (default: its `code` if it has one, else INTERNAL). */
  toStatus?(err: unknown, method: string, identity: string): grpc.ServiceError;
}

/**
 * Middleware: every handler of `def` runs only for an identified caller, and gets its identity.
 * Unary handlers return their response (or throw: the error becomes the call's status).
 */
export function withIdentity(def: grpc.ServiceDefinition, policy: IdentityPolicy, handlers: Record<string, AnyHandler>): grpc.UntypedServiceImplementation {
  const out: grpc.UntypedServiceImplementation = {};
  const toStatus = policy.toStatus ?? defaultStatus;
  for (const [name, m] of Object.entries(def)) {
    const h = handlers[name] ?? (m.originalName ? handlers[m.originalName] : undefined);
    if (!h) throw new Error(`no handler for ${m.path}`);
    const check = (call: AuthenticatedCall): string | grpc.ServiceError => {
      const identity = policy.identify(call);
      if (!identity) return serviceError(grpc.status.UNAUTHENTICATED, NO_IDENTITY);
      return policy.refuse?.(identity) ?? identity;
    };
    if (!m.requestStream && !m.responseStream) {
      out[name] = ((call: grpc.ServerUnaryCall<unknown, unknown>, cb: grpc.sendUnaryData<unknown>) => {
        const identity = check(call);
        if (typeof identity !== 'string') return cb(identity);
        let result: unknown;
        try {
          result = h(call, identity);
        } catch (err) {
          return cb(toStatus(err, name, identity));
        }
        Promise.resolve(result).then(
          (res) => cb(null, res),
          (err) => cb(toStatus(err, name, identity)),
        );
      }) as grpc.handleUnaryCall<unknown, unknown>;
    } else if (!m.requestStream) {
      out[name] = ((call: grpc.ServerWritableStream<unknown, unknown>) => {
        const identity = check(call);
        if (typeof identity !== 'string') return void call.emit('error', identity);
        h(call, identity);
      }) as grpc.handleServerStreamingCall<unknown, unknown>;
    } else {
      out[name] = ((call: grpc.ServerDuplexStream<unknown, unknown>) => {
        const identity = check(call);
        if (typeof identity !== 'string') return void call.emit('error', identity);
        h(call, identity);
      }) as grpc.handleBidiStreamingCall<unknown, unknown>;
    }
  }
  return out;
}

function defaultStatus(err: unknown): grpc.ServiceError {
  const e = err as Error & { code?: unknown };
  if (typeof e?.code === 'number' && e.code in grpc.status) return serviceError(e.code as grpc.status, e.message);
  return serviceError(grpc.status.INTERNAL, e?.message ?? String(err));
}

/** grpc.health.v1 for the server as a whole ('') and for `service`, plus v1 and v1alpha reflection of `protoFile`. */
export class HealthAndReflection {
  private readonly health: HealthImplementation;

  constructor(
    server: grpc.Server,
    private readonly service: string,
    protoFile: string,
    protoDir: string,
  ) {
    this.health = new HealthImplementation({ '': 'NOT_SERVING', [service]: 'NOT_SERVING' });
    this.health.addToServer(server);
    const pkg = protoLoader.loadSync([protoFile, healthProtoPath], { includeDirs: [protoDir] });
    new ReflectionService(pkg).addToServer(server);
  }

  setServing(serving: boolean): void {
    const s = serving ? 'SERVING' : 'NOT_SERVING';
    this.health.setStatus('', s);
    this.health.setStatus(this.service, s);
  }
}

/**
 * Server credentials for mutual TLS: a client certificate signed by `ca` (and not revoked by
 * `crl`) is required. Replaceable while serving (tls-reload.ts); throws on bad material.
 */
export function mutualTlsCredentials(t: TlsFiles): ReloadableServerCredentials {
  return new ReloadableServerCredentials(loadTlsMaterial(t));
}

export function bindServer(server: grpc.Server, target: string, creds: grpc.ServerCredentials): Promise<number> {
  return new Promise<number>((resolve, reject) => server.bindAsync(target, creds, (err, p) => (err ? reject(err) : resolve(p))));
}

/** Let calls in progress finish, for at most `forceAfterMs`; then cut them. */
export function stopServer(server: grpc.Server, forceAfterMs = 3000): Promise<void> {
  return new Promise<void>((resolve) => {
    const t = setTimeout(() => {
      server.forceShutdown();
      resolve();
    }, forceAfterMs);
    server.tryShutdown(() => {
      clearTimeout(t);
      resolve();
    });
  });
}

/** Middleware: one structured log line per call (`what` names the calls: "call", "control call"), with its outcome. */
export function callLogInterceptor(log: Logger, what: string, withPeer: boolean): grpc.ServerInterceptor {
  return (method, call) => {
    const started = Date.now();
    return new grpc.ServerInterceptingCall(call, {
      sendStatus: (status, next) => {
        const fields = { method: method.path, ...(withPeer ? { peer: call.getPeer() } : {}), code: grpc.status[status.code], ms: Date.now() - started };
        if (status.code === grpc.status.OK) log.debug(fields, `${what} ended`);
        else log.info({ ...fields, details: status.details }, `${what} ended with an error`);
        next(status);
      },
    });
  };
}
