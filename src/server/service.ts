// The UsbHost gRPC service: thin handlers. Every one runs behind the identity middleware
// (grpc-server-kit.ts); devices come from the registry, URB channels are pumped into sessions
// by connect-stream.ts.
import * as grpc from '@grpc/grpc-js';
import { identityOf, serviceError, withIdentity, type BidiHandler, type ServerStreamHandler, type UnaryHandler } from '../common/grpc-server-kit.js';
import type { Logger } from '../common/log.js';
import {
  DeviceEvent_Kind,
  type CaptureEvent,
  type CaptureRequest,
  type ClientMessage,
  type CloseSessionRequest,
  type CloseSessionResponse,
  type DeviceEvent,
  type ListDevicesRequest,
  type ListDevicesResponse,
  type ListSessionsRequest,
  type ListSessionsResponse,
  type ServerMessage,
  type Session as PbSession,
  type WatchDevicesRequest,
} from '../gen/usbroam/v1/usbhost.js';
import type { Acl } from './acl.js';
import { deviceToProto } from './convert.js';
import type { DeviceRegistry, RegistryEvent } from './devices/registry.js';
import { runConnectStream } from './sessions/connect-stream.js';
import type { ServerObserver } from './observe/observer.js';
import type { SessionManager } from './sessions/manager.js';
import type { Session } from './sessions/session.js';

const S = grpc.status;

export interface ServiceDeps {
  registry: DeviceRegistry;
  sessions: SessionManager;
  acl: Acl;
  /** Identities that may list and close every session. */
  admins: string[];
  /** Identity used for every client when the server runs without TLS. */
  insecureIdentity?: string;
  log: Logger;
  /** While false the server refuses new streams (shutting down). */
  accepting: () => boolean;
  /** Metrics and logs of refused channels. */
  observer?: ServerObserver;
  /** The Capture RPC (observe/capture-service.ts). */
  capture: ServerStreamHandler<CaptureRequest, CaptureEvent>;
}

export function createUsbHostHandlers(def: grpc.ServiceDefinition, deps: ServiceDeps): grpc.UntypedServiceImplementation {
  const { registry, sessions, acl } = deps;
  const visible = (identity: string) => registry.list().filter((d) => acl.allows(identity, d));
  const withClaim = (id: string) => registry.claimOf(id);

  const listDevices: UnaryHandler<ListDevicesRequest, ListDevicesResponse> = (_call, identity) => ({
    devices: visible(identity).map((d) => deviceToProto(d, withClaim(d.id))),
  });

  const watchDevices: ServerStreamHandler<WatchDevicesRequest, DeviceEvent> = (call, identity) => {
    const kinds: Record<RegistryEvent['kind'], DeviceEvent_Kind> = {
      added: DeviceEvent_Kind.KIND_ADDED,
      removed: DeviceEvent_Kind.KIND_REMOVED,
      claimed: DeviceEvent_Kind.KIND_CLAIMED,
      released: DeviceEvent_Kind.KIND_RELEASED,
    };
    const onEvent = (ev: RegistryEvent) => {
      if (!acl.allows(identity, ev.device)) return;
      const claim = ev.kind === 'claimed' ? ev.claim : ev.kind === 'removed' || ev.kind === 'released' ? undefined : withClaim(ev.device.id);
      call.write({ kind: kinds[ev.kind], device: deviceToProto(ev.device, claim) });
    };
    for (const d of visible(identity)) call.write({ kind: DeviceEvent_Kind.KIND_PRESENT, device: deviceToProto(d, withClaim(d.id)) });
    call.write({ kind: DeviceEvent_Kind.KIND_SNAPSHOT_END, device: undefined });
    registry.on('event', onEvent);
    const stop = () => registry.off('event', onEvent);
    call.on('cancelled', stop);
    call.on('close', stop);
    call.on('error', stop);
  };

  const connect: BidiHandler<ClientMessage, ServerMessage> = (call, identity) => runConnectStream(call, identity, deps);

  const toPb = (s: Session): PbSession => ({
    id: s.id,
    deviceId: s.device.id,
    identity: s.identity,
    peer: s.peer,
    state: s.state,
    urbsSubmitted: s.stats.urbsSubmitted,
    urbsCompleted: s.stats.urbsCompleted,
    urbsInFlight: s.inFlightCount,
    journalBytes: s.journalBytes,
    createdUnixMs: s.createdAt,
    detachedUnixMs: s.state === 'detached' ? s.detachedAt : 0,
  });

  const listSessions: UnaryHandler<ListSessionsRequest, ListSessionsResponse> = (_call, identity) => {
    const admin = deps.admins.includes(identity);
    return { sessions: sessions.list().filter((s) => admin || s.identity === identity).map(toPb) };
  };

  const closeSession: UnaryHandler<CloseSessionRequest, CloseSessionResponse> = async (call, identity) => {
    const s = sessions.get(call.request.sessionId);
    if (!s) throw serviceError(S.NOT_FOUND, `session ${call.request.sessionId} is unknown or has ended`);
    if (s.identity !== identity && !deps.admins.includes(identity)) {
      throw serviceError(S.PERMISSION_DENIED, `identity "${identity}" may not close session ${s.id} of "${s.identity}"`);
    }
    s.log.info({ by: identity }, 'session closed by admin request');
    await s.close(`closed by ${identity}`, { reset: true, code: S.ABORTED, message: `session ${s.id} closed by ${identity}` });
    return {};
  };

  return withIdentity(
    def,
    { identify: (call) => identityOf(call, deps.insecureIdentity) },
    { ListDevices: listDevices, WatchDevices: watchDevices, Connect: connect, ListSessions: listSessions, CloseSession: closeSession, Capture: deps.capture },
  );
}
