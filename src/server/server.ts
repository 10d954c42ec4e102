// The USB host server: a grpc-js server with UsbHost, grpc.health.v1 and
// server reflection (v1 and v1alpha), mutual TLS unless told otherwise.
import * as grpc from '@grpc/grpc-js';
import type * as http2 from 'node:http2';
import type * as net from 'node:net';
import path from 'node:path';
import type { Logger } from '../common/log.js';
import { REPO_ROOT } from '../common/repo-root.js';
import { grpcJsServiceDefinition } from '../common/grpc-definition.js';
import { bindServer, callLogInterceptor, HealthAndReflection, identityOf, mutualTlsCredentials, stopServer, type TlsFiles } from '../common/grpc-server-kit.js';
import { TlsPeers, type ReloadableServerCredentials } from '../common/tls-reload.js';
import { reloadServer, tlsSummary, type ReloadOutcome, type ServerReload } from './reload.js';
import { RequestDecodingServer } from '../common/request-decoding.js';
import { UsbHostDefinition } from '../gen/usbroam/v1/usbhost.js';
import { Acl, type AclConfig } from './acl.js';
import type { UsbBackend } from './backends/types.js';
import { DeviceRegistry } from './devices/registry.js';
import { createUsbHostHandlers } from './service.js';
import { SessionManager } from './sessions/manager.js';
import { defaultLimits, type SessionLimits } from './sessions/session.js';
import { newRegistry, serveMetrics, type MetricsEndpoint } from '../common/observe/prom-kit.js';
import { captureHandler } from './observe/capture-service.js';
import { ServerMetrics } from './observe/metrics.js';
import { ServerObservability } from './observe/observability.js';
import { watchTlsRefusals } from './observe/tls-refusals.js';

export const PROTO_DIR = path.join(REPO_ROOT, 'protos');
export const USBHOST_SERVICE = 'usbroam.v1.UsbHost';

export type { TlsFiles } from '../common/grpc-server-kit.js';

export interface ServerOptions {
  /** host:port, or unix:/path. */
  listen: string;
  /** mTLS material; required unless `insecure`. */
  tls?: TlsFiles;
  /** Plaintext, loopback or unix socket only. */
  insecure?: boolean;
  /** Identity given to every client when insecure. */
  insecureIdentity?: string;
  backends: UsbBackend[];
  acl: AclConfig;
  admins?: string[];
  limits?: Partial<SessionLimits>;
  log: Logger;
  /** Serve Prometheus metrics at http://HOST:PORT/metrics. */
  metricsListen?: string;
}

/** Channel/server options shared by both ends of a URB channel. */
export const GRPC_CHANNEL_OPTIONS: grpc.ChannelOptions = {
  'grpc.max_receive_message_length': 64 * 1024 * 1024,
  'grpc.max_send_message_length': 64 * 1024 * 1024,
  'grpc-node.flow_control_window': 8 * 1024 * 1024,
  'grpc.enable_channelz': 0,
  'grpc.keepalive_time_ms': 10_000,
  'grpc.keepalive_timeout_ms': 5_000,
  'grpc.keepalive_permit_without_calls': 1,
  'grpc.http2.min_ping_interval_without_data_ms': 5_000,
};

export function isLoopbackAddress(listen: string): boolean {
  if (listen.startsWith('unix:')) return true;
  const host = listen.replace(/:\d+$/, '').replace(/^\[|\]$/g, '');
  return host === 'localhost' || host === '::1' || /^127\./.test(host);
}

export class UsbHostServer {
  readonly registry: DeviceRegistry;
  readonly sessions: SessionManager;
  private readonly grpcServer: grpc.Server;
  private readonly health: HealthAndReflection;
  private accepting = true;
  /** The bound address (with the real port when 0 was asked). */
  address = '';
  /** Metrics, URB capture and state-change logs. */
  readonly observe: ServerObservability;
  private metricsEndpoint?: MetricsEndpoint;
  private readonly acl: Acl;
  private creds?: ReloadableServerCredentials;
  private peers?: TlsPeers;
  private reloading: Promise<unknown> = Promise.resolve();

  constructor(private readonly opts: ServerOptions) {
    if (!opts.insecure && !opts.tls) throw new Error('mutual TLS needs --ca, --cert and --key (or --insecure on loopback)');
    if (opts.insecure && !isLoopbackAddress(opts.listen)) {
      throw new Error(`--insecure is allowed only on loopback or a unix socket, not on ${opts.listen}`);
    }
    const limits = { ...defaultLimits, ...opts.limits };
    const acl = (this.acl = new Acl(opts.acl));
    this.registry = new DeviceRegistry(opts.backends);
    this.observe = new ServerObservability(opts.log);
    this.sessions = new SessionManager(this.registry, acl, limits, opts.log, this.observe);
    if (opts.metricsListen) {
      const hub = this.observe.capture;
      this.observe.metrics = new ServerMetrics(newRegistry(), () => this.sessions.list(), () => hub.active);
      this.observe.metrics.droppedFrom(hub);
    }
    const admins = opts.admins ?? [];
    const insecureIdentity = opts.insecure ? (opts.insecureIdentity ?? 'anonymous') : undefined;
    this.grpcServer = new RequestDecodingServer(
      { ...GRPC_CHANNEL_OPTIONS, interceptors: [callLogInterceptor(opts.log, 'call', true)] },
      { log: opts.log, identify: (call) => identityOf(call, insecureIdentity) },
    );
    const definition = grpcJsServiceDefinition(UsbHostDefinition);
    this.grpcServer.addService(
      definition,
      createUsbHostHandlers(definition, {
        registry: this.registry,
        sessions: this.sessions,
        acl,
        admins,
        insecureIdentity,
        log: opts.log,
        accepting: () => this.accepting,
        observer: this.observe,
        capture: captureHandler({ sessions: this.sessions, registry: this.registry, hub: this.observe.capture, admins, log: opts.log }),
      }),
    );
    this.health = new HealthAndReflection(this.grpcServer, USBHOST_SERVICE, path.join(PROTO_DIR, 'usbroam/v1/usbhost.proto'), PROTO_DIR);
  }

  async start(): Promise<string> {
    const { opts } = this;
    let creds: grpc.ServerCredentials;
    if (opts.insecure) {
      opts.log.warn({ listen: opts.listen }, 'INSECURE: serving plaintext without client authentication; every client is "' + (opts.insecureIdentity ?? 'anonymous') + '"');
      creds = grpc.ServerCredentials.createInsecure();
    } else {
      creds = this.creds = mutualTlsCredentials(opts.tls!);
    }
    const port = await bindServer(this.grpcServer, opts.listen, creds);
    raiseReceiveWindows(this.grpcServer, RECEIVE_WINDOW_BYTES);
    if (!opts.insecure) this.peers = new TlsPeers(this.grpcServer);
    if (!opts.insecure) watchTlsRefusals(this.grpcServer, (reason, peer, err) => this.observe.refused(reason, { peer, message: `TLS handshake refused: ${err.message}` }));
    if (opts.metricsListen && this.observe.metrics) this.metricsEndpoint = await serveMetrics(this.observe.metrics.registry, opts.metricsListen, opts.log);
    this.address = opts.listen.startsWith('unix:') ? opts.listen : opts.listen.replace(/:\d+$/, `:${port}`);
    this.health.setServing(true);
    opts.log.info({ address: this.address, tls: !opts.insecure, ...(this.creds ? tlsSummary(this.creds.current) : {}), devices: this.registry.list().length }, 'USB host server listening');
    return this.address;
  }

  /** Re-read TLS material and ACL (SIGHUP); see reload.ts. Reloads run one at a time. */
  reload(next: ServerReload): Promise<ReloadOutcome> {
    const run = this.reloading.then(() => reloadServer({ log: this.opts.log, acl: this.acl, sessions: this.sessions, creds: this.creds, peers: this.peers }, next));
    this.reloading = run.catch(() => {});
    return run;
  }

  /** Stop accepting, end sessions (cancel in flight, release claims), stop. */
  async stop(why = 'shutdown'): Promise<void> {
    this.accepting = false;
    this.health.setServing(false);
    await this.sessions.closeAll(why);
    await stopServer(this.grpcServer);
    await this.registry.close();
    await this.metricsEndpoint?.close();
    this.opts.log.info({ why }, 'USB host server stopped');
  }

  /** host:port of the metrics endpoint, once started with metricsListen. */
  get metricsAddress(): string | undefined {
    return this.metricsEndpoint?.address;
  }
}

const RECEIVE_WINDOW_BYTES = 8 * 1024 * 1024;

/**
 * grpc-js has no server-side receive-window option: every stream advertises
 * Node's default 64 KiB, which caps client->server bulk OUT at about half of
 * what the transport carries. Raise the connection and per-stream windows on
 * each HTTP/2 session as it starts. (grpc-js keeps its http2 servers in a
 * private map; without it this is a no-op.)
 */
function raiseReceiveWindows(server: grpc.Server, bytes: number): void {
  const servers = (server as unknown as { http2Servers?: Map<http2.Http2Server | http2.Http2SecureServer, unknown> }).http2Servers;
  for (const h of servers?.keys() ?? []) {
    if ((h as { usbroamWindow?: boolean }).usbroamWindow) continue;
    (h as { usbroamWindow?: boolean }).usbroamWindow = true;
    // Nagle is on for accepted sockets (only grpc-js's client side sets TCP_NODELAY): the tail of
    // each completion then waits for the peer's delayed ACK.
    h.on('connection', (socket: net.Socket) => socket.setNoDelay(true));
    h.on('session', (session: http2.ServerHttp2Session) => {
      try {
        session.setLocalWindowSize(bytes);
        session.settings({ initialWindowSize: bytes });
      } catch {
        /* a session that is already closing */
      }
    });
  }
}
