// Creates, finds and ends sessions. Opening a session is where the device
// selector, the ACL and the exclusive claim meet.
import { randomUUID } from 'node:crypto';
import { status as Status } from '@grpc/grpc-js';
import type { Logger } from '../../common/log.js';
import type { Acl } from '../acl.js';
import type { DeviceInfo } from '../backends/types.js';
import { ClaimConflictError, type DeviceRegistry } from '../devices/registry.js';
import { describeSelector, isEmptySelector, matchesSelector, validateSelector, type Selector } from '../devices/selector.js';
import type { ServerObserver } from '../observe/observer.js';
import { ChannelProtocolError, Session, type SessionLimits } from './session.js';

export class SessionManager {
  private readonly sessions = new Map<string, Session>();
  /**
   * Asked before a new session opens its device (not on resume or hand-over); throws { code, message } to refuse.
   * The fleet sets it: a device whose etcd claim names someone else is refused (src/fleet/claim-guard.ts).
   */
  openGuard?: (device: DeviceInfo, identity: string, claimToken: string | undefined) => Promise<void>;

  constructor(
    private readonly registry: DeviceRegistry,
    private readonly acl: Acl,
    private readonly limits: SessionLimits,
    private readonly log: Logger,
    private readonly observer?: ServerObserver,
  ) {}

  /** Claim the one device matching `selector` for `identity` and start a session. */
  async create(identity: string, peer: string, rawSelector: Selector, claimToken?: string): Promise<Session> {
    let selector: Selector;
    try {
      selector = validateSelector(rawSelector);
    } catch (err) {
      throw new ChannelProtocolError(Status.INVALID_ARGUMENT, `bad device selector: ${(err as Error).message}`);
    }
    if (isEmptySelector(selector)) throw new ChannelProtocolError(Status.INVALID_ARGUMENT, 'open needs a device selector (id, vid:pid, serial or port path)');
    const matching = this.registry.list().filter((d) => matchesSelector(selector, d));
    if (matching.length === 0) throw new ChannelProtocolError(Status.NOT_FOUND, `no device matches ${describeSelector(selector)}`);
    const allowed = matching.filter((d) => this.acl.allows(identity, d));
    if (allowed.length === 0) {
      throw new ChannelProtocolError(Status.PERMISSION_DENIED, `identity "${identity}" may not use device ${matching.map((d) => d.id).join(', ')}`);
    }
    if (allowed.length > 1) {
      throw new ChannelProtocolError(
        Status.FAILED_PRECONDITION,
        `${allowed.length} devices match ${describeSelector(selector)} (${allowed.map((d) => d.id).join(', ')}): name one by id`,
      );
    }
    const device = allowed[0];
    if (this.openGuard) {
      await this.openGuard(device, identity, claimToken).catch((err: { code?: number; message: string }) => {
        throw new ChannelProtocolError(err.code ?? Status.UNAVAILABLE, err.message);
      });
    }
    const id = randomUUID();
    let handle;
    try {
      handle = await this.registry.claim(device.id, { identity, sessionId: id });
    } catch (err) {
      if (err instanceof ClaimConflictError) throw new ChannelProtocolError(Status.FAILED_PRECONDITION, err.message);
      throw new ChannelProtocolError(Status.UNAVAILABLE, `device ${device.id} could not be opened: ${(err as Error).message}`);
    }
    const log = this.log.child({ session: id, device: device.id, identity, peer });
    const session = new Session(id, identity, handle, this.limits, log);
    this.sessions.set(id, session);
    this.observer?.sessionCreated(session); // observe: metrics, capture, state-change logs
    session.on('handedOver', (newIdentity: string) => this.registry.transfer(device.id, id, newIdentity));
    session.once('closed', () => {
      this.sessions.delete(id);
      this.registry.release(device.id, id);
    });
    log.info({ product: device.product, serial: device.serial }, 'session opened; device claimed');
    return session;
  }

  /** The session to resume; only its owner may. */
  resume(identity: string, sessionId: string): Session {
    const s = this.sessions.get(sessionId);
    if (!s) throw new ChannelProtocolError(Status.NOT_FOUND, `session ${sessionId} is unknown or has expired`);
    if (s.identity !== identity) {
      throw new ChannelProtocolError(Status.PERMISSION_DENIED, `session ${sessionId} belongs to another identity than "${identity}"`);
    }
    return s;
  }

  /** The session a standby stream waits on; any identity the ACL allows for its device may take it over. */
  standby(identity: string, sessionId: string): Session {
    const s = this.sessions.get(sessionId);
    if (!s) throw new ChannelProtocolError(Status.NOT_FOUND, `session ${sessionId} is unknown or has expired`);
    if (!this.acl.allows(identity, s.device)) {
      throw new ChannelProtocolError(Status.PERMISSION_DENIED, `identity "${identity}" may not use device ${s.device.id}, so it may not take over session ${sessionId}`);
    }
    return s;
  }

  get(id: string): Session | undefined {
    return this.sessions.get(id);
  }

  list(): Session[] {
    return [...this.sessions.values()];
  }

  async closeAll(why: string): Promise<void> {
    await Promise.all(this.list().map((s) => s.close(why, { reset: true, code: Status.UNAVAILABLE, message: `server shutting down: ${why}` })));
  }
}
