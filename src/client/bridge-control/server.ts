// The bridge's control API (usbroam.v1.Bridge): a grpc-js server around a Bridge, for
// orchestrators and the `usbroam attach / detach / attachments` CLI. A unix socket (mode 0600,
// in a 0700 directory) by default; TCP with mutual TLS as an option (plaintext TCP only on
// loopback with `insecure`). The bridge's own credentials for USB host servers come from its
// configuration, never from a control request. grpc.health.v1 and reflection are served too.
import * as grpc from '@grpc/grpc-js';
import { chmodSync, existsSync, lstatSync, mkdirSync, unlinkSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { grpcJsServiceDefinition } from '../../common/grpc-definition.js';
import {
  bindServer,
  callLogInterceptor,
  HealthAndReflection,
  identityOf,
  mutualTlsCredentials,
  serviceError,
  stopServer,
  withIdentity,
  type AuthenticatedCall,
  type TlsFiles,
  type UnaryHandler,
} from '../../common/grpc-server-kit.js';
import { RequestDecodingServer } from '../../common/request-decoding.js';
import { loadTlsMaterial } from '../../common/tls-material.js';
import { TlsPeers, type ReloadableServerCredentials } from '../../common/tls-reload.js';
import { silentLogger, type Logger } from '../../common/log.js';
import { REPO_ROOT } from '../../common/repo-root.js';
import { QmpConnectError, QmpDisconnectedError, QmpError, QmpTimeoutError } from '../../qemu/qmp/client.js';
import {
  AttachmentState,
  BridgeDefinition,
  type Attachment as PbAttachment,
  type AttachDeviceRequest,
  type AttachDeviceResponse,
  type CancelIncomingRequest,
  type CancelIncomingResponse,
  type PrepareIncomingRequest,
  type PrepareIncomingResponse,
  type DetachDeviceRequest,
  type DetachDeviceResponse,
  type ListAttachmentsRequest,
  type ListAttachmentsResponse,
} from '../../gen/usbroam/v1/bridge.js';
import { Device } from '../../gen/usbroam/v1/usbhost.js';
import type { AttachmentInfo, Bridge } from '../bridge/bridge.js';
import type { DeviceSelector } from '../sdk/client.js';
import type { ConnectionOptions } from '../sdk/credentials.js';
import { ChannelClosedError } from '../sdk/remote-device.js';
import type { HeldClaim } from '../bridge/held-claim.js';
import { isLoopbackHost, parseControlAddress, type ControlAddress } from './address.js';

export { defaultControlSocket, defaultRunDir, isLoopbackHost, parseControlAddress, type ControlAddress } from './address.js';

export const BRIDGE_SERVICE = 'usbroam.v1.Bridge';
const PROTO_DIR = path.join(REPO_ROOT, 'protos');
const S = grpc.status;

export type ControlTlsFiles = TlsFiles;

export interface BridgeControlOptions {
  bridge: Bridge;
  /** Unix socket path (`unix:/p` or `/p`) or host:port. Default: defaultControlSocket(). */
  listen?: string;
  /** mTLS for TCP: the CA that signs orchestrator certificates, our certificate and key, and a CRL of that CA. */
  tls?: ControlTlsFiles;
  /** Plaintext TCP: loopback only. */
  insecure?: boolean;
  /** TCP+mTLS: identities (certificate CN, else first SAN) allowed to call. Empty: every certificate the CA signed. */
  allow?: string[];
  /** How the bridge reaches USB host servers: default address and its own client credentials. */
  servers?: ConnectionOptions;
  /** The fleet (src/fleet/bridge-fleet.ts): AttachDevice with fleet_select claims the device in etcd first. */
  fleet?: FleetAttach;
  log?: Logger;
}

/** What AttachDevice needs of the fleet: resolve a selector and claim the device under the bridge's lease. */
export interface FleetAttach {
  claim(selector: string, etcd?: string): Promise<{ claim: { device: { id: string; address: string } }; held: HeldClaim & { token: string } }>;
}

/** A failure with a gRPC status code, for the control API. */
export class ControlError extends Error {
  constructor(
    readonly code: grpc.status,
    message: string,
  ) {
    super(message);
    this.name = 'ControlError';
  }
}

const STATES: Record<string, AttachmentState> = {
  starting: AttachmentState.ATTACHMENT_STATE_STARTING,
  connected: AttachmentState.ATTACHMENT_STATE_CONNECTED,
  disconnecting: AttachmentState.ATTACHMENT_STATE_DISCONNECTING,
  closed: AttachmentState.ATTACHMENT_STATE_CLOSED,
};

/** AttachmentInfo (and, when the Bridge still has it, the full device description) -> protobuf. */
export function attachmentToProto(info: AttachmentInfo, device?: Device): PbAttachment {
  const d: Device = device
    ? { ...device }
    : Device.fromPartial({ id: info.deviceId, vendorId: info.vendorId, productId: info.productId, product: info.product, serial: info.serial });
  return {
    id: info.id,
    vm: info.vm,
    device: d,
    sessionId: info.sessionId,
    server: info.server,
    bus: info.bus,
    socketPath: info.socketPath,
    state: STATES[info.state] ?? AttachmentState.ATTACHMENT_STATE_UNSPECIFIED,
    hotPlugged: info.hotPlugged,
    fleetClaim: info.fleetClaim ?? '',
    counters: {
      bytesFromQemu: info.stats.bytesFromQemu,
      bytesToQemu: info.stats.bytesToQemu,
      packetsFromQemu: info.stats.packetsFromQemu,
      packetsToQemu: info.stats.packetsToQemu,
      urbsSubmitted: info.stats.urbsSubmitted,
      urbsCompleted: info.stats.urbsCompleted,
      urbsCancelled: info.stats.urbsCancelled,
      urbsInFlight: info.stats.inFlight,
    },
  };
}

/** Any failure of an attach/detach -> a gRPC status code and a message a person can act on. */
export function toControlError(err: unknown, ctx: { vm?: string; server?: string } = {}): ControlError {
  if (err instanceof ControlError) return err;
  if (err instanceof Error && err.name === 'FleetError') return new ControlError((err as Error & { code: grpc.status }).code, err.message);
  const e = err as Error & { code?: unknown; details?: string };
  const msg = e?.message ?? String(err);
  if (err instanceof ChannelClosedError || (typeof e.code === 'number' && e.details !== undefined)) {
    // The USB host server refused (or could not be reached): pass its code and message through.
    const code = typeof e.code === 'number' ? (e.code as grpc.status) : S.UNAVAILABLE;
    return new ControlError(code, `USB host server ${ctx.server ?? ''}: ${e.details ?? msg}`.replace(' :', ':'));
  }
  if (err instanceof QmpError) return new ControlError(S.FAILED_PRECONDITION, `VM ${ctx.vm}: QEMU refused: ${msg}`);
  if (err instanceof QmpConnectError || err instanceof QmpDisconnectedError || err instanceof QmpTimeoutError) {
    return new ControlError(S.UNAVAILABLE, `VM ${ctx.vm}: ${msg}`);
  }
  if (/^unknown VM /.test(msg)) return new ControlError(S.NOT_FOUND, msg);
  if (/^no attachment /.test(msg)) return new ControlError(S.NOT_FOUND, msg);
  if (/^no standby /.test(msg)) return new ControlError(S.NOT_FOUND, `${msg}: nothing was prepared with that id`);
  if (/is not waiting for an incoming migration/.test(msg)) return new ControlError(S.FAILED_PRECONDITION, `${msg}; start it with -incoming defer`);
  if (/exists already/.test(msg)) return new ControlError(S.ALREADY_EXISTS, msg);
  if (/mutual TLS needs/.test(msg)) return new ControlError(S.FAILED_PRECONDITION, `the bridge has no credentials for USB host servers: ${msg}`);
  if (/cannot connect to QEMU chardev/.test(msg)) return new ControlError(S.UNAVAILABLE, `VM ${ctx.vm}: ${msg}`);
  return new ControlError(S.INTERNAL, msg);
}

export class BridgeControlServer {
  readonly bridge: Bridge;
  private readonly log: Logger;
  private readonly grpcServer: grpc.Server;
  private readonly health: HealthAndReflection;
  private readonly listenAt: ControlAddress;
  private readonly vms = new Map<string, string | undefined>();
  private accepting = true;
  private creds?: ReloadableServerCredentials;
  private peers?: TlsPeers;
  /** `unix:/path` or host:port (with the real port when 0 was asked). */
  address = '';

  constructor(private readonly opts: BridgeControlOptions) {
    this.bridge = opts.bridge;
    this.log = opts.log ?? silentLogger;
    this.listenAt = parseControlAddress(opts.listen);
    if (this.listenAt.kind === 'tcp') {
      if (opts.insecure && !isLoopbackHost(this.listenAt.hostPort)) {
        throw new Error(`plaintext control is allowed only on loopback or a unix socket, not on ${this.listenAt.hostPort}`);
      }
      if (!opts.insecure && !opts.tls) throw new Error(`control over TCP (${this.listenAt.hostPort}) needs mutual TLS: --control-ca, --control-cert and --control-key (or --insecure on loopback)`);
    }
    const unix = this.listenAt.kind === 'unix';
    const identify = (call: AuthenticatedCall) => (unix ? 'local' : opts.insecure ? 'anonymous' : identityOf(call));
    this.grpcServer = new RequestDecodingServer({ interceptors: [callLogInterceptor(this.log, 'control call', false)] }, { log: this.log, identify });
    const definition = grpcJsServiceDefinition(BridgeDefinition);
    this.grpcServer.addService(
      definition,
      withIdentity(
        definition,
        {
          identify,
          refuse: (id) => {
            const allow = unix || opts.insecure ? [] : (opts.allow ?? []);
            return allow.length && !allow.includes(id) ? serviceError(S.PERMISSION_DENIED, `identity ${id} may not use this bridge's control API`) : undefined;
          },
          toStatus: (err, method, identity) => {
            const ce = toControlError(err);
            if (ce.code === S.INTERNAL) this.log.error({ method, identity, err: (err as Error)?.stack ?? String(err) }, 'control call failed');
            return serviceError(ce.code, ce.message);
          },
        },
        {
          AttachDevice: this.unary((r: AttachDeviceRequest) => this.attachDevice(r)),
          DetachDevice: this.unary((r: DetachDeviceRequest) => this.detachDevice(r)),
          ListAttachments: this.unary((r: ListAttachmentsRequest) => this.listAttachments(r)),
          PrepareIncoming: this.unary((r: PrepareIncomingRequest) => this.prepareIncoming(r)),
          CancelIncoming: this.unary((r: CancelIncomingRequest) => this.cancelIncoming(r)),
        },
      ),
    );
    this.health = new HealthAndReflection(this.grpcServer, BRIDGE_SERVICE, path.join(PROTO_DIR, 'usbroam/v1/bridge.proto'), PROTO_DIR);
  }

  /** Register a VM (name -> QMP socket) with the bridge. */
  addVm(name: string, qmpSocket: string): void {
    if (!name) throw new Error('a VM needs a name');
    this.bridge.addVm({ name, qmpSocket });
    this.vms.set(name, qmpSocket);
  }

  /** The VMs the control API knows, name -> QMP socket. */
  listVms(): Map<string, string | undefined> {
    return new Map(this.vms);
  }

  /** A control call: refused while the bridge shuts down. */
  private unary<Req, Res>(fn: (req: Req) => Promise<Res>): UnaryHandler<Req, Res> {
    return (call) => {
      if (!this.accepting) throw new ControlError(S.UNAVAILABLE, 'the bridge is shutting down');
      return fn(call.request);
    };
  }

  private knownVm(vm: string): void {
    if (!vm) throw new ControlError(S.INVALID_ARGUMENT, 'vm is required');
    if (!this.vms.has(vm)) {
      const known = [...this.vms.keys()];
      throw new ControlError(S.NOT_FOUND, `unknown VM ${vm}: the bridge knows ${known.length ? known.join(', ') : 'no VMs'} (register it with --vm ${vm}=QMP_SOCKET, its config file, or qmp_socket in the request)`);
    }
  }

  async attachDevice(req: AttachDeviceRequest): Promise<AttachDeviceResponse> {
    if (!req.vm) throw new ControlError(S.INVALID_ARGUMENT, 'vm is required');
    if (req.qmpSocket) {
      const known = this.vms.get(req.vm);
      if (known === undefined) this.addVm(req.vm, req.qmpSocket);
      else if (path.resolve(known) !== path.resolve(req.qmpSocket)) {
        throw new ControlError(S.FAILED_PRECONDITION, `VM ${req.vm} is registered with QMP socket ${known}, not ${req.qmpSocket}`);
      }
    }
    this.knownVm(req.vm);
    if (req.fleetSelect) return this.attachFromFleet(req);
    const sel = req.device ?? { id: '', vidPid: '', serial: '', portPath: '' };
    const selector: DeviceSelector = {};
    if (sel.id) selector.id = sel.id;
    if (sel.vidPid) selector.vidPid = sel.vidPid;
    if (sel.serial) selector.serial = sel.serial;
    if (sel.portPath) selector.portPath = sel.portPath;
    if (!Object.keys(selector).length) throw new ControlError(S.INVALID_ARGUMENT, 'device selector is empty: set id, vid_pid, serial or port_path');
    if (selector.vidPid && !/^[0-9a-fA-F]{4}:[0-9a-fA-F]{4}$/.test(selector.vidPid)) throw new ControlError(S.INVALID_ARGUMENT, `vid_pid "${selector.vidPid}" must be vvvv:pppp in hex`);
    const servers = this.opts.servers ?? {};
    const address = req.server || servers.address;
    if (!address) throw new ControlError(S.INVALID_ARGUMENT, 'server is required (the bridge has no default USB host server)');
    this.checkPlacement(req);
    return this.attachTo(req, address, selector);
  }

  private checkPlacement(req: AttachDeviceRequest): void {
    if (req.bus && !/^[A-Za-z0-9_.-]+$/.test(req.bus)) throw new ControlError(S.INVALID_ARGUMENT, `bus "${req.bus}" is not a QEMU bus name`);
    if (req.attachmentId && !/^[A-Za-z][A-Za-z0-9_.-]*$/.test(req.attachmentId)) {
      throw new ControlError(S.INVALID_ARGUMENT, `attachment id "${req.attachmentId}" must be a QEMU id: a letter, then letters, digits, "-", "_", "."`);
    }
    if (req.attachmentId && this.bridge.list().some((a) => a.id === req.attachmentId)) {
      throw new ControlError(S.ALREADY_EXISTS, `attachment ${req.attachmentId} exists already`);
    }
  }

  private async attachTo(req: AttachDeviceRequest, address: string, selector: DeviceSelector, claim?: HeldClaim & { token: string }): Promise<AttachDeviceResponse> {
    try {
      const info = await this.bridge.attach({
        vm: req.vm,
        server: { ...(this.opts.servers ?? {}), address },
        selector,
        bus: req.bus || undefined,
        filter: req.filter || undefined,
        id: req.attachmentId || undefined,
        coldPlugged: req.coldPlugSocket ? { socketPath: path.resolve(req.coldPlugSocket) } : undefined,
        claim,
      });
      this.log.info({ vm: req.vm, attachment: info.id, device: info.deviceId, server: info.server, fleetClaim: info.fleetClaim }, 'attached (control API)');
      return { attachment: this.toProto(info) };
    } catch (err) {
      throw toControlError(err, { vm: req.vm, server: address });
    }
  }

  /** fleet_select: claim the device in etcd under the bridge's lease, then attach it from the server that holds it. */
  private async attachFromFleet(req: AttachDeviceRequest): Promise<AttachDeviceResponse> {
    if (req.server || (req.device && Object.values(req.device).some(Boolean))) {
      throw new ControlError(S.INVALID_ARGUMENT, 'fleet_select names the device: leave server and device empty');
    }
    if (!this.opts.fleet) throw new ControlError(S.FAILED_PRECONDITION, 'this bridge is not in a fleet: start it with --etcd URL[,URL...]');
    this.checkPlacement(req);
    const { claim, held } = await this.opts.fleet.claim(req.fleetSelect, req.fleetEtcd || undefined).catch((err) => {
      throw toControlError(err, { vm: req.vm });
    });
    try {
      return await this.attachTo(req, claim.device.address, { id: claim.device.id }, held);
    } catch (err) {
      await held.release();
      throw err;
    }
  }

  /** Register the VM from a request's qmp_socket if the bridge does not know it yet. */
  private vmFromRequest(vm: string, qmpSocket: string): void {
    if (!vm) throw new ControlError(S.INVALID_ARGUMENT, 'vm is required');
    if (qmpSocket) {
      const known = this.vms.get(vm);
      if (known === undefined) this.addVm(vm, qmpSocket);
      else if (path.resolve(known) !== path.resolve(qmpSocket)) {
        throw new ControlError(S.FAILED_PRECONDITION, `VM ${vm} is registered with QMP socket ${known}, not ${qmpSocket}`);
      }
    }
    this.knownVm(vm);
  }

  async prepareIncoming(req: PrepareIncomingRequest): Promise<PrepareIncomingResponse> {
    this.vmFromRequest(req.vm, req.qmpSocket);
    if (!req.sessionId) throw new ControlError(S.INVALID_ARGUMENT, 'session_id is required: the source attachment\'s session');
    if (!/^[A-Za-z][A-Za-z0-9_.-]*$/.test(req.attachmentId)) {
      throw new ControlError(S.INVALID_ARGUMENT, `attachment id "${req.attachmentId}" must be the source's attachment id (a QEMU id)`);
    }
    if (req.bus && !/^[A-Za-z0-9_.-]+$/.test(req.bus)) throw new ControlError(S.INVALID_ARGUMENT, `bus "${req.bus}" is not a QEMU bus name`);
    const servers = this.opts.servers ?? {};
    const address = req.server || servers.address;
    if (!address) throw new ControlError(S.INVALID_ARGUMENT, 'server is required (the bridge has no default USB host server)');
    try {
      const r = await this.bridge.prepareIncoming({
        vm: req.vm,
        server: { ...servers, address },
        sessionId: req.sessionId,
        id: req.attachmentId,
        bus: req.bus || undefined,
        port: req.port || undefined,
        filter: req.filter || undefined,
      });
      r.attached.then(
        (info) => this.log.info({ vm: req.vm, attachment: info.id, session: info.sessionId }, 'incoming attachment took over'),
        (err) => this.log.warn({ vm: req.vm, attachment: req.attachmentId, err: (err as Error).message }, 'incoming attachment did not take over'),
      );
      this.log.info({ vm: req.vm, attachment: r.id, session: r.sessionId }, 'prepared incoming attachment (control API)');
      return { attachmentId: r.id, vm: r.vm, sessionId: r.sessionId, socketPath: r.socketPath };
    } catch (err) {
      throw toControlError(err, { vm: req.vm, server: address });
    }
  }

  async cancelIncoming(req: CancelIncomingRequest): Promise<CancelIncomingResponse> {
    this.knownVm(req.vm);
    try {
      await this.bridge.cancelIncoming(req.vm, req.attachmentId);
    } catch (err) {
      throw toControlError(err, { vm: req.vm });
    }
    return {};
  }

  async detachDevice(req: DetachDeviceRequest): Promise<DetachDeviceResponse> {
    this.knownVm(req.vm);
    if (!req.attachmentId) throw new ControlError(S.INVALID_ARGUMENT, 'attachment_id is required');
    const onVm = this.bridge.list(req.vm);
    if (!onVm.some((a) => a.id === req.attachmentId)) {
      const ids = onVm.map((a) => a.id);
      throw new ControlError(S.NOT_FOUND, `no attachment ${req.attachmentId} on VM ${req.vm} (${ids.length ? `it has ${ids.join(', ')}` : 'it has none'})`);
    }
    try {
      await this.bridge.detach(req.vm, req.attachmentId);
    } catch (err) {
      throw toControlError(err, { vm: req.vm });
    }
    this.log.info({ vm: req.vm, attachment: req.attachmentId }, 'detached (control API)');
    return {};
  }

  async listAttachments(req: ListAttachmentsRequest): Promise<ListAttachmentsResponse> {
    if (req.vm) this.knownVm(req.vm);
    return { attachments: this.bridge.list(req.vm || undefined).map((a) => this.toProto(a)) };
  }

  private toProto(info: AttachmentInfo): PbAttachment {
    return attachmentToProto(info, this.bridge.get(info.id)?.device.device);
  }

  async start(): Promise<string> {
    const { opts } = this;
    const at = this.listenAt;
    let creds: grpc.ServerCredentials;
    let target: string;
    if (at.kind === 'unix') {
      await prepareUnixSocket(at.path);
      creds = grpc.ServerCredentials.createInsecure();
      target = `unix:${at.path}`;
    } else if (opts.insecure) {
      this.log.warn({ listen: at.hostPort }, 'INSECURE: control API over plaintext TCP without client authentication');
      creds = grpc.ServerCredentials.createInsecure();
      target = at.hostPort;
    } else {
      creds = this.creds = mutualTlsCredentials(opts.tls!);
      target = at.hostPort;
    }
    // The socket file is created by bind: make it owner-only from birth, then chmod to be sure.
    const oldMask = at.kind === 'unix' ? process.umask(0o177) : undefined;
    let port: number;
    try {
      port = await bindServer(this.grpcServer, target, creds);
    } finally {
      if (oldMask !== undefined) process.umask(oldMask);
    }
    if (at.kind === 'unix') chmodSync(at.path, 0o600);
    if (this.creds) this.peers = new TlsPeers(this.grpcServer);
    this.address = at.kind === 'unix' ? target : at.hostPort.replace(/:\d+$/, `:${port}`);
    this.health.setServing(true);
    this.log.info({ address: this.address, tls: at.kind === 'tcp' && !opts.insecure, crl: opts.tls?.crl, vms: [...this.vms.keys()] }, 'bridge control API listening');
    return this.address;
  }

  /**
   * Re-read the control listener's TLS files (SIGHUP): new handshakes use them; connections of
   * certificates they no longer accept (revoked, another CA) are closed. Broken files: the old
   * material stays, the error is logged and returned. Attachments are not touched.
   */
  reloadTls(tls: ControlTlsFiles | undefined = this.opts.tls): { ok: boolean; error?: string; connectionsClosed: string[] } {
    if (!this.creds) {
      this.log.info({ reload: 'done', address: this.address }, 'control API reload: it runs without TLS, nothing to re-read');
      return { ok: true, connectionsClosed: [] };
    }
    let material;
    try {
      if (!tls) throw new Error('the new configuration has no control TLS material: the control API does not switch to plaintext (restart the bridge)');
      material = loadTlsMaterial(tls);
    } catch (err) {
      const error = (err as Error).message;
      this.log.error({ reload: 'refused', err: error, files: tls }, 'control API reload refused: keeping the previous TLS material');
      return { ok: false, error, connectionsClosed: [] };
    }
    this.creds.replace(material);
    const refused = this.peers?.refusedBy(material) ?? [];
    for (const p of refused) {
      this.log.warn({ reload: 'connection_closed', peer: p.peer, identity: p.identity, serial: p.serial, reason: `tls_${p.reason}`, err: p.message }, 'control connection closed by reload: its client certificate is no longer accepted');
      TlsPeers.close(p);
    }
    this.log.info({ reload: 'done', cert: tls.cert, ca: tls.ca, crl: tls.crl, revoked: material.crl?.count ?? 0, connectionsClosed: refused.length }, 'control API reloaded its TLS material');
    return { ok: true, connectionsClosed: refused.map((p) => p.peer) };
  }

  /** Refuse new calls, detach everything (clean unplugs), stop the server, remove the socket. */
  async stop(why = 'shutdown'): Promise<void> {
    this.accepting = false;
    this.health.setServing(false);
    await this.bridge.close();
    await stopServer(this.grpcServer);
    if (this.listenAt.kind === 'unix') {
      try {
        unlinkSync(this.listenAt.path);
      } catch {
        /* gone already */
      }
    }
    this.log.info({ why }, 'bridge control API stopped');
  }
}

/** Make the socket's directory (0700 if we create it) and remove a stale socket; refuse a live one. */
async function prepareUnixSocket(p: string): Promise<void> {
  const dir = path.dirname(p);
  if (!existsSync(dir)) mkdirSync(dir, { recursive: true, mode: 0o700 });
  let st;
  try {
    st = lstatSync(p);
  } catch {
    return;
  }
  if (!st.isSocket()) throw new Error(`${p} exists and is not a socket`);
  const live = await new Promise<boolean>((resolve) => {
    const s = net.connect(p);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
  if (live) throw new Error(`another bridge is listening on ${p}`);
  unlinkSync(p);
}
