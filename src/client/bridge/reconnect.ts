// Re-attaching a device whose session was lost for good: the server died (a restarted server
// knows no session, so the resume fails) or the URB channel could not resume within its window
// (a network cut longer than the server's grace period), or this bridge itself was restarted
// (the attachments in its state file, bridge-state.ts).
//
// What the guest sees: the Attachment disconnects the device from QEMU (usbredir
// device_disconnect: a clean unplug in the guest) and closes its chardev connection, while the
// usb-redir device stays in QEMU. Here we retry, with exponential backoff, until the device can
// be claimed again: close the session a dead bridge held (its claim would block the device for a
// grace period), open a new session, make sure QEMU still has the usb-redir device (QMP qom-list;
// hot-plug it again if it went), connect its chardev, and start a new Attachment: QEMU sends a
// new hello and the guest enumerates the device again (a replug at the same port).
import type net from 'node:net';
import { ExponentialBackoff, handleWhen, retry } from 'cockatiel';
import { Status } from 'nice-grpc';
import type { Logger } from '../../common/log.js';
import type { QmpClient } from '../../qemu/qmp/client.js';
import type { UsbHostClient } from '../sdk/client.js';
import type { ConnectionOptions } from '../sdk/credentials.js';
import type { RemoteDevice, RemoteDeviceOptions } from '../sdk/remote-device.js';
import type { SavedAttachment } from './bridge-state.js';
import { connectChardev, hotplugRedir } from './qemu-attach.js';

export interface ReattachDeps {
  log: Logger;
  clientFor(server: ConnectionOptions): UsbHostClient;
  qmpOf(vm: string): Promise<QmpClient>;
  /** Options of the new session (its resume window). */
  deviceOptions: RemoteDeviceOptions;
  /** Make the new session and chardev connection the attachment `saved.id` (Bridge.register). */
  adopt(saved: SavedAttachment, device: RemoteDevice, socket: net.Socket): void;
  /** The set of pending re-attaches changed (the Bridge rewrites its state file). */
  changed(): void;
}

export interface ReattachOptions {
  /** Give up after this long. */
  windowMs: number;
  /** First and longest pause between attempts. Defaults 250 ms and 5000 ms. */
  initialDelayMs?: number;
  maxDelayMs?: number;
}

/** Codes after which a session is not re-attached: refused, or ended on purpose by someone. */
const NOT_RETRIED = new Set<number>([Status.PERMISSION_DENIED, Status.UNAUTHENTICATED, Status.ABORTED]);

/** Whether a RemoteDevice's 'closed' error means the session was lost (and worth re-attaching). */
export function isLostSession(err: unknown): boolean {
  if (!(err instanceof Error)) return false; // a clean close by the server
  const code = (err as { code?: number }).code;
  return code === undefined || !NOT_RETRIED.has(code);
}

class GiveUp extends Error {}

/** How long a restored attachment is retried when re-attaching is otherwise off. */
const RESTORE_WINDOW_MS = 60_000;

interface Pending {
  saved: SavedAttachment;
  abort: AbortController;
  done: Promise<boolean>;
  /** The old session was closed at the server (or is unknown there). */
  oldSessionGone: boolean;
}

export class Reattacher {
  private readonly pending = new Map<string, Pending>();
  private closed = false;

  constructor(
    private readonly deps: ReattachDeps,
    private readonly opts: ReattachOptions,
  ) {}

  get enabled(): boolean {
    return this.opts.windowMs > 0 && !this.closed;
  }

  /** Attachments being re-attached (they stay in the state file). */
  records(): SavedAttachment[] {
    return [...this.pending.values()].map((p) => p.saved);
  }

  has(id: string): boolean {
    return this.pending.has(id);
  }

  /**
   * Try to attach `saved` again until it works or the window ends. `closeOldSession`: the
   * session in `saved` may still hold the device at the server (a bridge that died); close it.
   * Resolves true once attached, false when given up or cancelled.
   */
  start(saved: SavedAttachment, why: string, opts: { closeOldSession: boolean; windowMs?: number }): Promise<boolean> {
    const existing = this.pending.get(saved.id);
    if (existing) return existing.done;
    const log = this.deps.log.child({ vm: saved.vm, attachment: saved.id, device: saved.deviceId, session: saved.sessionId });
    const abort = new AbortController();
    const p: Pending = { saved, abort, oldSessionGone: !opts.closeOldSession, done: Promise.resolve(false) };
    this.pending.set(saved.id, p);
    this.deps.changed();
    const t0 = Date.now();
    const windowMs = opts.windowMs ?? (this.opts.windowMs || RESTORE_WINDOW_MS);
    const deadline = t0 + windowMs;
    log.warn({ why, windowMs }, 'session lost: the guest sees an unplug; re-attaching the device when the server takes it again');
    const policy = retry(
      handleWhen((err) => !(err instanceof GiveUp) && !abort.signal.aborted),
      { maxAttempts: Number.MAX_SAFE_INTEGER, backoff: new ExponentialBackoff({ initialDelay: this.opts.initialDelayMs ?? 250, maxDelay: this.opts.maxDelayMs ?? 5000 }) },
    );
    policy.onRetry((ev) => {
      const err = 'error' in ev ? ev.error : undefined;
      log.info({ delayMs: Math.round(ev.delay), attempt: ev.attempt, err: err?.message }, 're-attach attempt failed; retrying');
    });
    p.done = policy
      .execute(async ({ attempt }) => {
        if (abort.signal.aborted) throw new GiveUp('cancelled');
        if (Date.now() > deadline) throw new GiveUp(`not re-attached within ${windowMs} ms`);
        await this.attempt(p, log);
        log.info({ afterMs: Date.now() - t0, attempts: attempt }, 'device re-attached: the guest sees a replug');
        return true;
      }, abort.signal)
      .catch((err: Error) => {
        if (!abort.signal.aborted) log.warn({ err: err.message, afterMs: Date.now() - t0 }, 'giving up re-attaching; the device stays unplugged in the guest');
        return false;
      })
      .finally(() => {
        if (this.pending.get(saved.id) === p) this.pending.delete(saved.id);
        this.deps.changed();
      });
    return p.done;
  }

  private async attempt(p: Pending, log: Logger): Promise<void> {
    const s = p.saved;
    const client = this.deps.clientFor(s.server);
    if (!p.oldSessionGone) {
      try {
        await client.closeSession(s.sessionId);
        log.info('closed the session the previous bridge held');
      } catch (err) {
        const code = (err as { code?: number }).code;
        if (code !== Status.NOT_FOUND && code !== Status.PERMISSION_DENIED) throw err; // server unreachable: retry
      }
      p.oldSessionGone = true;
    }
    const device = await client.openDevice({ id: s.deviceId }, this.deps.deviceOptions);
    try {
      if (p.abort.signal.aborted) throw new GiveUp('cancelled');
      const qmp = await this.deps.qmpOf(s.vm);
      const peripherals = (await qmp.execute<Array<{ name: string }>>('qom-list', { path: '/machine/peripheral' })).map((x) => x.name);
      if (!peripherals.includes(s.id)) {
        if (!s.hotPlugged) throw new GiveUp(`the cold-plugged usb-redir device ${s.id} is no longer in VM ${s.vm}`);
        log.info('the usb-redir device is gone from QEMU; plugging it again');
        await hotplugRedir(qmp, { id: s.id, chardevId: s.chardevId, socketPath: s.socketPath, bus: s.bus, filter: s.filter });
      }
      const socket = await connectChardev(s.socketPath, { timeoutMs: 5000 });
      if (p.abort.signal.aborted) {
        socket.destroy();
        throw new GiveUp('cancelled');
      }
      this.pending.delete(s.id);
      this.deps.adopt({ ...s, sessionId: device.sessionId }, device, socket);
    } catch (err) {
      await device.close().catch(() => {});
      throw err;
    }
  }

  /** Stop re-attaching `id` (a detach). */
  cancel(id: string): boolean {
    const p = this.pending.get(id);
    if (!p) return false;
    p.abort.abort();
    this.pending.delete(id);
    this.deps.changed();
    return true;
  }

  /** Stop every re-attach (bridge close); resolves when they have ended. */
  async close(): Promise<void> {
    this.closed = true;
    const all = [...this.pending.values()];
    for (const p of all) p.abort.abort();
    await Promise.allSettled(all.map((p) => p.done));
  }
}
