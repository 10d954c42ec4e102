// The UsbHost gRPC service: thin handlers that authenticate, then hand over
// to the registry (devices) and the session manager (URB channels).
import * as grpc from '@grpc/grpc-js';
import type { Logger } from '../common/log.js';
import {
  DeviceEvent_Kind,
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
import { identityOf } from './identity.js';
import type { RefusalReason, ServerObserver } from './observe/observer.js';
import type { SessionManager } from './sessions/manager.js';
import { ChannelProtocolError, type Session, type SessionStream } from './sessions/session.js';

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
}

/** The refusal reason (a bounded metric label) of a status that refused a channel at open. */
function refusalOf(code: grpc.status): RefusalReason {
  const known: Partial<Record<grpc.status, RefusalReason>> = {
    [S.UNAUTHENTICATED]: 'unauthenticated',
    [S.PERMISSION_DENIED]: 'permission_denied',
    [S.NOT_FOUND]: 'not_found',
    [S.FAILED_PRECONDITION]: 'failed_precondition',
    [S.INVALID_ARGUMENT]: 'invalid_argument',
    [S.UNAVAILABLE]: 'unavailable',
  };
  return known[code] ?? 'other';
}

function fail(code: grpc.status, details: string): grpc.ServiceError {
  return Object.assign(new Error(details), { code, details, metadata: new grpc.Metadata() });
}

export function createUsbHostHandlers(deps: ServiceDeps) {
  const { registry, sessions, acl, log } = deps;
  const who = (call: Parameters<typeof identityOf>[0]) => identityOf(call, deps.insecureIdentity);
  const visible = (identity: string) => registry.list().filter((d) => acl.allows(identity, d));
  const withClaim = (id: string) => registry.claimOf(id);

  const listDevices: grpc.handleUnaryCall<ListDevicesRequest, ListDevicesResponse> = (call, cb) => {
    const identity = who(call);
    if (!identity) return cb(fail(S.UNAUTHENTICATED, 'no client identity: a client certificate is required'));
    cb(null, { devices: visible(identity).map((d) => deviceToProto(d, withClaim(d.id))) });
  };

  const watchDevices: grpc.handleServerStreamingCall<WatchDevicesRequest, DeviceEvent> = (call) => {
    const identity = who(call);
    if (!identity) return call.emit('error', fail(S.UNAUTHENTICATED, 'no client identity: a client certificate is required'));
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

  const connect: grpc.handleBidiStreamingCall<ClientMessage, ServerMessage> = (call) => {
    void runChannel(call);
  };

  /**
   * One Connect stream. Frames are handled synchronously as messages arrive
   * (submits, cancels and acks need no turn of the event loop); only opening
   * a session, device ops, close, and a full in-flight window make the
   * following frames wait. While they wait, or while a few messages are
   * queued, the call is paused: backpressure through HTTP/2 flow control.
   */
  function runChannel(call: grpc.ServerDuplexStream<ClientMessage, ServerMessage>): void {
    const peer = call.getPeer();
    const identity = who(call);
    let ended = false;
    const stream: SessionStream = {
      peer,
      write: (m) => (ended ? true : call.write(m)),
      onceDrain: (cb) => call.once('drain', cb),
      end: (code, message) => {
        if (ended) return;
        ended = true;
        if (code === S.OK) call.end();
        else call.emit('error', fail(code, message));
      },
    };
    if (!identity) return stream.end(S.UNAUTHENTICATED, 'no client identity: a client certificate is required');
    if (!deps.accepting()) return stream.end(S.UNAVAILABLE, 'server is shutting down');
    let session: Session | undefined;
    const queue: ClientMessage[] = [];
    let index = 0; // next frame of queue[0]
    let waiting = false; // an async step is running: frames wait for it
    let inputDone = false;
    let inputError: Error | undefined;
    let finished = false;
    let paused = false;
    const HIGH_WATER = 4;

    const onError = (err: unknown): void => {
      if (finished) return;
      finished = true;
      const e = err as Error & { code?: number };
      if (err instanceof ChannelProtocolError) {
        const l = session ? session.log : log.child({ identity, peer });
        l.warn({ code: S[err.code], err: err.message }, 'URB channel refused');
        // observe: a channel refused at open counts as a refused connection
        if (!session) deps.observer?.refused(refusalOf(err.code), { peer, identity, message: err.message });
        stream.write({ frames: [{ seq: session?.highestServerSeq ?? 0, kind: { $case: 'error', value: { code: err.code, message: err.message, clientSeq: err.clientSeq } } }] });
        stream.end(err.code, err.message);
      } else if (ended || e.code === S.CANCELLED || call.cancelled) {
        // the client went away
      } else {
        log.error({ err: e.message, stack: e.stack, identity, peer }, 'URB channel failed');
        stream.end(S.INTERNAL, `internal error: ${e.message}`);
      }
      if (session && session.state !== 'closed') session.detach(stream, e.message);
    };
    const finish = (): void => {
      if (finished) return;
      finished = true;
      if (session && session.state !== 'closed') session.detach(stream, 'client ended its stream without close');
    };
    const wait = (p: Promise<unknown>): void => {
      waiting = true;
      p.then(
        () => {
          waiting = false;
          pump();
        },
        (err) => {
          waiting = false;
          onError(err);
        },
      );
    };

    /** Handle queued frames until they run out or one has to wait. */
    const pump = (): void => {
      if (waiting || finished) return;
      try {
        while (queue.length) {
          const frames = queue[0].frames;
          if (!session) {
            const first = frames[0];
            if (!first || first.kind?.$case !== 'open') {
              throw new ChannelProtocolError(S.INVALID_ARGUMENT, 'the first frame of a URB channel must be open');
            }
            index = 1;
            return wait(
              openSession(identity, peer, first.kind.value, stream).then((s) => {
                session = s;
              }),
            );
          }
          while (index < frames.length) {
            const f = frames[index];
            if (!session.isCurrent(stream)) {
              // A standby only listens until it takes over; its acks carry nothing yet.
              if (session.isStandby(stream) && f.kind?.$case === 'ack') {
                index++;
                continue;
              }
              if (session.isStandby(stream)) throw new ChannelProtocolError(S.FAILED_PRECONDITION, `a standby for session ${session.id} may not send ${f.kind?.$case ?? 'frames'} before it takes over`, f.seq);
              index = frames.length; // superseded or handed over: this stream is done
              break;
            }
            if (f.kind?.$case === 'submit' && !session.hasSlot()) return wait(session.waitForSlot());
            if (ended) break;
            index++;
            const r = session.handleFrame(f);
            if (r) return wait(r);
          }
          queue.shift();
          index = 0;
          if (ended || session.state === 'closed') {
            finish();
            return;
          }
        }
        if (paused && queue.length < HIGH_WATER) {
          paused = false;
          call.resume();
        }
        if (inputDone) {
          if (inputError) onError(inputError);
          else finish();
        }
      } catch (err) {
        onError(err);
      }
    };

    call.on('data', (m: ClientMessage) => {
      if (finished) return;
      queue.push(m);
      if (queue.length >= HIGH_WATER && !paused) {
        paused = true;
        call.pause();
      }
      pump();
    });
    const endInput = (err?: Error) => {
      if (inputDone) return;
      inputDone = true;
      inputError = err;
      if (!queue.length) pump();
    };
    call.on('end', () => endInput());
    call.on('error', (e: Error) => endInput(e));
    call.on('close', () => endInput());
  }

  async function openSession(
    identity: string,
    peer: string,
    open: NonNullable<ClientMessage['frames'][number]['kind'] & { $case: 'open' }>['value'],
    stream: SessionStream,
  ): Promise<Session> {
    const t = open.target;
    if (t?.$case === 'device') {
      const s = await sessions.create(identity, peer, t.value);
      s.attach(stream, 0, (seq) => ({ seq, kind: { $case: 'opened', value: { sessionId: s.id, device: deviceToProto(s.device, withClaim(s.device.id)), lastClientSeq: 0, resumed: false, standby: false } } }));
      return s;
    }
    if (t?.$case === 'resume') {
      const s = sessions.resume(identity, t.value.sessionId);
      s.attach(stream, t.value.lastServerSeq, (seq) => ({
        seq,
        kind: { $case: 'opened', value: { sessionId: s.id, device: deviceToProto(s.device, withClaim(s.device.id)), lastClientSeq: s.lastClientSeq, resumed: true, standby: false } },
      }));
      s.log.info({ peer, lastServerSeq: t.value.lastServerSeq, lastClientSeq: s.lastClientSeq }, 'session resumed');
      return s;
    }
    if (t?.$case === 'standby') {
      const s = sessions.standby(identity, t.value.sessionId);
      s.addStandby(stream, identity, (seq) => ({
        seq,
        kind: { $case: 'opened', value: { sessionId: s.id, device: deviceToProto(s.device, withClaim(s.device.id)), lastClientSeq: s.lastClientSeq, resumed: false, standby: true } },
      }));
      return s;
    }
    throw new ChannelProtocolError(S.INVALID_ARGUMENT, 'open names neither a device, a session to resume nor one to stand by for');
  }

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

  const listSessions: grpc.handleUnaryCall<ListSessionsRequest, ListSessionsResponse> = (call, cb) => {
    const identity = who(call);
    if (!identity) return cb(fail(S.UNAUTHENTICATED, 'no client identity: a client certificate is required'));
    const admin = deps.admins.includes(identity);
    cb(null, { sessions: sessions.list().filter((s) => admin || s.identity === identity).map(toPb) });
  };

  const closeSession: grpc.handleUnaryCall<CloseSessionRequest, CloseSessionResponse> = (call, cb) => {
    const identity = who(call);
    if (!identity) return cb(fail(S.UNAUTHENTICATED, 'no client identity: a client certificate is required'));
    const s = sessions.get(call.request.sessionId);
    if (!s) return cb(fail(S.NOT_FOUND, `session ${call.request.sessionId} is unknown or has ended`));
    if (s.identity !== identity && !deps.admins.includes(identity)) {
      return cb(fail(S.PERMISSION_DENIED, `identity "${identity}" may not close session ${s.id} of "${s.identity}"`));
    }
    s.log.info({ by: identity }, 'session closed by admin request');
    s.close(`closed by ${identity}`, { reset: true, code: S.ABORTED, message: `session ${s.id} closed by ${identity}` }).then(
      () => cb(null, {}),
      (err) => cb(fail(S.INTERNAL, (err as Error).message)),
    );
  };

  return { ListDevices: listDevices, WatchDevices: watchDevices, Connect: connect, ListSessions: listSessions, CloseSession: closeSession };
}
