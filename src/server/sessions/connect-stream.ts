// One Connect stream at the server: the frame pump between a grpc-js duplex call and a session.
//
// Frames are handled synchronously as messages arrive (submits, cancels and acks need no turn
// of the event loop); only opening a session, device ops, close, and a full in-flight window
// make the following frames wait. While they wait, or while a few messages are queued, the
// call is paused: backpressure through HTTP/2 flow control.
import * as grpc from '@grpc/grpc-js';
import { serviceError } from '../../common/grpc-server-kit.js';
import type { Logger } from '../../common/log.js';
import type { ClientFrame, ClientMessage, Open, ServerFrame, ServerMessage } from '../../gen/usbroam/v1/usbhost.js';
import { deviceToProto } from '../convert.js';
import type { DeviceRegistry } from '../devices/registry.js';
import type { SessionManager } from './manager.js';
import type { Session } from './session.js';
import { ChannelProtocolError, type SessionStream } from './session-types.js';
import { claimTokenOf } from '../../fleet/claim-token.js';
import type { RefusalReason, ServerObserver } from '../observe/observer.js';

const S = grpc.status;
/** Queued messages beyond which the call is paused. */
const HIGH_WATER = 4;

export interface ConnectDeps {
  sessions: SessionManager;
  registry: DeviceRegistry;
  log: Logger;
  /** While false new streams are refused (shutting down). */
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


/**
 * Where the pump is:
 * - `ready`: frames are handled as they arrive (before the open frame: the first one must be it);
 * - `waiting`: an async step runs (open, device op, close, a free slot); frames queue meanwhile;
 * - `finished`: the stream is over for the session (detached, handed over or closed).
 */
type PumpState = 'ready' | 'waiting' | 'finished';

/** The session's view of the call: writes until the stream is ended, then drops. */
class CallStream implements SessionStream {
  ended = false;
  readonly peer: string;

  constructor(private readonly call: grpc.ServerDuplexStream<ClientMessage, ServerMessage>) {
    this.peer = call.getPeer();
  }
  write(m: ServerMessage): boolean {
    return this.ended ? true : this.call.write(m);
  }
  onceDrain(cb: () => void): void {
    this.call.once('drain', cb);
  }
  end(code: grpc.status, message: string): void {
    if (this.ended) return;
    this.ended = true;
    if (code === S.OK) this.call.end();
    else this.call.emit('error', serviceError(code, message));
  }
}

export function runConnectStream(call: grpc.ServerDuplexStream<ClientMessage, ServerMessage>, identity: string, deps: ConnectDeps): void {
  const stream = new CallStream(call);
  if (!deps.accepting()) return stream.end(S.UNAVAILABLE, 'server is shutting down');
  new ConnectPump(call, stream, identity, deps).start();
}

class ConnectPump {
  private state: PumpState = 'ready';
  private session?: Session;
  private readonly queue: ClientMessage[] = [];
  /** Next frame of queue[0]. */
  private index = 0;
  /** The client's side is over: undefined while it sends, else how it ended. */
  private input?: { error?: Error };
  /** The call is paused (too many queued messages). */
  private paused = false;

  constructor(
    private readonly call: grpc.ServerDuplexStream<ClientMessage, ServerMessage>,
    private readonly stream: CallStream,
    private readonly identity: string,
    private readonly deps: ConnectDeps,
  ) {}

  start(): void {
    const { call } = this;
    call.on('data', (m: ClientMessage) => {
      if (this.state === 'finished') return;
      this.queue.push(m);
      if (this.queue.length >= HIGH_WATER && !this.paused) {
        this.paused = true;
        call.pause();
      }
      this.pump();
    });
    call.on('end', () => this.endInput());
    call.on('error', (e: Error) => this.endInput(e));
    call.on('close', () => this.endInput());
  }

  private endInput(error?: Error): void {
    if (this.input) return;
    this.input = { error };
    if (!this.queue.length) this.pump();
  }

  /** Handle queued frames until they run out or one has to wait. */
  private pump(): void {
    if (this.state !== 'ready') return;
    try {
      while (this.queue.length) {
        if (!this.session) return this.open(this.queue[0].frames[0]);
        if (!this.handleQueued(this.session)) return;
      }
      if (this.paused && this.queue.length < HIGH_WATER) {
        this.paused = false;
        this.call.resume();
      }
      if (this.input) {
        if (this.input.error) this.fail(this.input.error);
        else this.finish();
      }
    } catch (err) {
      this.fail(err);
    }
  }

  private open(first: ClientFrame | undefined): void {
    if (!first || first.kind?.$case !== 'open') {
      throw new ChannelProtocolError(S.INVALID_ARGUMENT, 'the first frame of a URB channel must be open');
    }
    this.index = 1;
    this.wait(
      this.openSession(first.kind.value).then((s) => {
        this.session = s;
      }),
    );
  }

  /** The frames of queue[0] from `index` on; false when the pump must stop (waiting or finished). */
  private handleQueued(session: Session): boolean {
    const { stream } = this;
    const frames = this.queue[0].frames;
    while (this.index < frames.length) {
      const f = frames[this.index];
      if (!session.isCurrent(stream)) {
        if (session.isStandby(stream)) {
          // A standby only listens until it takes over; its acks carry nothing yet.
          if (f.kind?.$case === 'ack') {
            this.index++;
            continue;
          }
          throw new ChannelProtocolError(S.FAILED_PRECONDITION, `a standby for session ${session.id} may not send ${f.kind?.$case ?? 'frames'} before it takes over`, f.seq);
        }
        this.index = frames.length; // superseded or handed over: this stream is done
        break;
      }
      if (f.kind?.$case === 'submit' && !session.hasSlot()) {
        this.wait(session.waitForSlot());
        return false;
      }
      if (stream.ended) break;
      this.index++;
      const r = session.handleFrame(f);
      if (r) {
        this.wait(r);
        return false;
      }
    }
    this.queue.shift();
    this.index = 0;
    if (stream.ended || session.state === 'closed') {
      this.finish();
      return false;
    }
    return true;
  }

  private wait(p: Promise<unknown>): void {
    this.state = 'waiting';
    p.then(
      () => {
        if (this.state !== 'waiting') return;
        this.state = 'ready';
        this.pump();
      },
      (err) => {
        if (this.state !== 'waiting') return;
        this.state = 'ready';
        this.fail(err);
      },
    );
  }

  /** The stream failed: refused by protocol, gone with the client, or broken. */
  private fail(err: unknown): void {
    if (this.state === 'finished') return;
    this.state = 'finished';
    const { stream, session, identity } = this;
    const e = err as Error & { code?: number };
    if (err instanceof ChannelProtocolError) {
      const l = session ? session.log : this.deps.log.child({ identity, peer: stream.peer });
      l.warn({ code: S[err.code], err: err.message }, 'URB channel refused');
      // A channel refused at open counts as a refused connection.
      if (!session) this.deps.observer?.refused(refusalOf(err.code), { peer: stream.peer, identity, message: err.message });
      const refusal: ServerFrame = { seq: session?.highestServerSeq ?? 0, kind: { $case: 'error', value: { code: err.code, message: err.message, clientSeq: err.clientSeq } } };
      stream.write({ frames: [refusal] });
      stream.end(err.code, err.message);
    } else if (stream.ended || e.code === S.CANCELLED || this.call.cancelled) {
      // the client went away
    } else {
      this.deps.log.error({ err: e.message, stack: e.stack, identity, peer: stream.peer }, 'URB channel failed');
      stream.end(S.INTERNAL, `internal error: ${e.message}`);
    }
    if (session && session.state !== 'closed') session.detach(stream, e.message);
  }

  /** The stream is done without an error. */
  private finish(): void {
    if (this.state === 'finished') return;
    this.state = 'finished';
    const { session } = this;
    if (session && session.state !== 'closed') session.detach(this.stream, 'client ended its stream without close');
  }

  private async openSession(open: Open): Promise<Session> {
    const { sessions, registry } = this.deps;
    const { identity, stream } = this;
    const peer = stream.peer;
    const opened = (s: Session, lastClientSeq: number, resumed: boolean, standby: boolean) => (seq: number): ServerFrame => ({
      seq,
      kind: { $case: 'opened', value: { sessionId: s.id, device: deviceToProto(s.device, registry.claimOf(s.device.id)), lastClientSeq, resumed, standby } },
    });
    const t = open.target;
    if (t?.$case === 'device') {
      const s = await sessions.create(identity, peer, t.value, claimTokenOf(this.call.metadata)); // fleet claim token, checked at session open
      s.attach(stream, 0, opened(s, 0, false, false));
      return s;
    }
    if (t?.$case === 'resume') {
      const s = sessions.resume(identity, t.value.sessionId);
      s.attach(stream, t.value.lastServerSeq, opened(s, s.lastClientSeq, true, false));
      s.log.info({ peer, lastServerSeq: t.value.lastServerSeq, lastClientSeq: s.lastClientSeq }, 'session resumed');
      return s;
    }
    if (t?.$case === 'standby') {
      const s = sessions.standby(identity, t.value.sessionId);
      s.addStandby(stream, identity, opened(s, s.lastClientSeq, false, true));
      return s;
    }
    throw new ChannelProtocolError(S.INVALID_ARGUMENT, 'open names neither a device, a session to resume nor one to stand by for');
  }
}
