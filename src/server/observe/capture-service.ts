// The Capture RPC: a live stream of one session's or one device's URB events. Admins may
// capture anything; a session's owner may capture that session (and only while it owns it).
import * as grpc from '@grpc/grpc-js';
import { serviceError, type ServerStreamHandler } from '../../common/grpc-server-kit.js';
import type { Logger } from '../../common/log.js';
import type { CaptureEvent, CaptureRequest } from '../../gen/usbroam/v1/usbhost.js';
import { deviceToProto } from '../convert.js';
import type { DeviceRegistry, RegistryEvent } from '../devices/registry.js';
import type { SessionManager } from '../sessions/manager.js';
import { MAX_SNAPLEN, type CaptureHub, type CaptureTarget } from './capture-hub.js';

const S = grpc.status;

export interface CaptureServiceDeps {
  sessions: SessionManager;
  registry: DeviceRegistry;
  hub: CaptureHub;
  admins: string[];
  log: Logger;
}

export function captureHandler(deps: CaptureServiceDeps): ServerStreamHandler<CaptureRequest, CaptureEvent> {
  return (call, identity) => {
    const peer = call.getPeer();
    const refuse = (code: grpc.status, message: string) => {
      deps.log.warn({ identity, peer, code: S[code], err: message }, 'capture refused');
      call.emit('error', serviceError(code, message));
    };
    const admin = deps.admins.includes(identity);
    const req = call.request;
    if (req.snaplen > MAX_SNAPLEN) return refuse(S.INVALID_ARGUMENT, `snaplen ${req.snaplen} exceeds the limit of ${MAX_SNAPLEN} bytes`);
    const t = req.target;
    let target: CaptureTarget;
    let deviceId: string;
    const session = t?.$case === 'sessionId' ? deps.sessions.get(t.value) : undefined;
    if (t?.$case === 'sessionId') {
      if (!session) return refuse(S.NOT_FOUND, `session ${t.value} is unknown or has ended`);
      if (!admin && session.identity !== identity) return refuse(S.PERMISSION_DENIED, `identity "${identity}" may not capture session ${t.value}: it is neither an admin nor the session's owner`);
      target = { sessionId: t.value };
      deviceId = session.device.id;
    } else if (t?.$case === 'deviceId') {
      if (!admin) return refuse(S.PERMISSION_DENIED, `identity "${identity}" may not capture device ${t.value}: only admins capture devices (a session's owner may capture its session)`);
      if (!deps.registry.list().some((d) => d.id === t.value)) return refuse(S.NOT_FOUND, `no device ${t.value}`);
      target = { deviceId: t.value };
      deviceId = t.value;
    } else {
      return refuse(S.INVALID_ARGUMENT, 'capture needs a session id or a device id');
    }
    const device = session?.device ?? deps.registry.list().find((d) => d.id === deviceId)!;
    const sub = deps.hub.subscribe(target, req.snaplen, { write: (ev) => call.write(ev), onceDrain: (cb) => call.once('drain', cb) });
    const log = deps.log.child({ identity, peer, ...(target.sessionId ? { session: target.sessionId } : {}), device: deviceId });
    log.info({ snaplen: sub.snaplen }, 'capture started');
    sub.control({ kind: { $case: 'started', value: { device: deviceToProto(device, deps.registry.claimOf(deviceId)), bus: device.bus || 1, address: deps.hub.addressOf(deviceId), snaplen: sub.snaplen } } });

    let over = false;
    const cleanups: (() => void)[] = [];
    const stop = (why: string, error?: grpc.ServiceError) => {
      if (over) return;
      over = true;
      deps.hub.unsubscribe(sub);
      for (const c of cleanups) c();
      log.info({ why, events: sub.delivered, dropped: sub.dropped }, 'capture ended');
      if (error) call.emit('error', error);
      else if (why !== 'client went away') call.end();
    };
    call.on('cancelled', () => stop('client went away'));
    call.on('close', () => stop('client went away'));
    call.on('error', () => stop('client went away'));
    if (session) {
      // What the session did is all out once the queue is: then end the stream.
      const onClosed = () => sub.finish(() => stop('session closed'));
      const onHandedOver = (newIdentity: string) => {
        if (!admin && newIdentity !== identity) stop('session handed over', serviceError(S.PERMISSION_DENIED, `session ${session.id} now belongs to "${newIdentity}"; identity "${identity}" may not capture it any more`));
      };
      session.once('closed', onClosed);
      session.on('handedOver', onHandedOver);
      cleanups.push(() => {
        session.off('closed', onClosed);
        session.off('handedOver', onHandedOver);
      });
    } else {
      const onEvent = (ev: RegistryEvent) => {
        if (ev.kind === 'removed' && ev.device.id === deviceId) stop('device removed');
      };
      deps.registry.on('event', onEvent);
      cleanups.push(() => deps.registry.off('event', onEvent));
    }
  };
}
