// QmpClient: a QMP client over a unix socket.
//
// - connect(): waits for the socket to exist (QEMU may still be starting),
//   reads the greeting, negotiates capabilities (qmp_capabilities).
// - execute(): commands carry a unique id, so several can be outstanding and
//   replies may come back in any order.
// - events: EventEmitter ('event', and one per event name), events() async
//   iterator, waitForEvent().
// - reconnect (opt-in): when the socket drops, outstanding commands fail with
//   QmpDisconnectedError and the client reconnects with exponential backoff.
//
// A QMP socket serves ONE client at a time: a second client's connect()
// succeeds at the socket level but gets no greeting until the first leaves.
import { EventEmitter } from 'node:events';
import net from 'node:net';
import { setTimeout as delay } from 'node:timers/promises';
import { silentLogger, type Logger } from '../../common/log.js';
import {
  QmpDecoder,
  encodeCommand,
  type QmpEvent,
  type QmpGreeting,
  type QmpMessage,
} from './codec.js';

export type { QmpEvent, QmpGreeting } from './codec.js';

/** Base class of every error this client raises. */
export class QmpClientError extends Error {
  override name = 'QmpClientError';
}

/** QEMU answered the command with an error. */
export class QmpError extends QmpClientError {
  override name = 'QmpError';
  constructor(
    /** QEMU's error class, e.g. "GenericError", "CommandNotFound", "DeviceNotFound". */
    readonly errorClass: string,
    /** QEMU's human-readable description. */
    readonly desc: string,
    /** The command that failed. */
    readonly command: string,
  ) {
    super(`QMP ${command}: ${errorClass}: ${desc}`);
  }
}

/** No reply (or greeting, or event) within the allotted time. */
export class QmpTimeoutError extends QmpClientError {
  override name = 'QmpTimeoutError';
}

/** The connection is gone: closed by us, dropped by QEMU, or never established. */
export class QmpDisconnectedError extends QmpClientError {
  override name = 'QmpDisconnectedError';
}

/** Could not connect / handshake (socket missing, refused, no greeting, capabilities refused). */
export class QmpConnectError extends QmpClientError {
  override name = 'QmpConnectError';
}

export interface QmpReconnectOptions {
  /** First delay after a drop. Default 100 ms. */
  initialDelayMs?: number;
  /** Cap on the delay. Default 5000 ms. */
  maxDelayMs?: number;
  /** Multiplier per failed attempt. Default 2. */
  factor?: number;
  /** Give up after this many failed attempts (then the client closes). Default: unlimited. */
  maxAttempts?: number;
}

export interface QmpClientOptions {
  /** Path of QEMU's QMP unix socket. */
  path: string;
  /** Budget for connect(): waiting for the socket to appear + greeting + capabilities. Default 10 s. */
  connectTimeoutMs?: number;
  /** Default timeout of execute(). Default 30 s. 0 = none. */
  commandTimeoutMs?: number;
  /** Capabilities to enable in qmp_capabilities (only those the server offers are requested). Default none. */
  capabilities?: string[];
  /** Reconnect with backoff when the socket drops. Default false. */
  reconnect?: boolean | QmpReconnectOptions;
  /** Max events buffered per events() iterator before the oldest are dropped. Default 10000. */
  maxBufferedEvents?: number;
  logger?: Logger;
}

export interface ExecuteOptions {
  /** Overrides the client's commandTimeoutMs. 0 = no timeout. */
  timeoutMs?: number;
  /** Stop waiting when aborted (QEMU may still run the command). */
  signal?: AbortSignal;
  /** Send with exec-oob (requires the 'oob' capability). */
  oob?: boolean;
}

export interface WaitForEventOptions {
  /** Default 30 s. 0 = none. */
  timeoutMs?: number;
  signal?: AbortSignal;
}

export type QmpClientState = 'idle' | 'connecting' | 'ready' | 'reconnecting' | 'closed';

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  cleanup: () => void;
}

interface EventSink {
  push(ev: QmpEvent): void;
  end(err?: Error): void;
}

/**
 * Events emitted (EventEmitter):
 *  - 'event' (ev: QmpEvent)            every QMP event
 *  - `event:${NAME}` (ev: QmpEvent)    events of one name, e.g. 'event:DEVICE_DELETED'
 *  - 'disconnect' (err: Error)         the socket dropped (before any reconnect)
 *  - 'reconnect' (greeting)            reconnected and capabilities negotiated again
 *  - 'close' ()                        the client is closed for good
 *  - 'error' is never emitted (so no listener is required).
 */
export class QmpClient extends EventEmitter {
  readonly path: string;
  private readonly opts: Required<Omit<QmpClientOptions, 'reconnect' | 'logger'>> & {
    reconnect: Required<QmpReconnectOptions> | null;
  };
  private readonly log: Logger;
  private socket: net.Socket | null = null;
  private decoder = new QmpDecoder();
  private pending = new Map<string, Pending>();
  private nextId = 1;
  private readonly idPrefix = `usbroam-${process.pid}-${Math.random().toString(36).slice(2, 8)}-`;
  private _state: QmpClientState = 'idle';
  private _greeting: QmpGreeting | null = null;
  private sinks = new Set<EventSink>();
  /** Resolves when ready (used by execute() while (re)connecting). */
  private readyWaiters: Array<{ resolve: () => void; reject: (e: Error) => void }> = [];
  private closeController = new AbortController();
  /** Set while the handshake reads the greeting / capabilities reply. */
  private handshakeSink: ((m: QmpMessage) => void) | null = null;
  private onSocketGone: ((err: Error) => void) | null = null;

  constructor(options: QmpClientOptions) {
    super();
    this.path = options.path;
    const rc = options.reconnect;
    this.opts = {
      path: options.path,
      connectTimeoutMs: options.connectTimeoutMs ?? 10_000,
      commandTimeoutMs: options.commandTimeoutMs ?? 30_000,
      capabilities: options.capabilities ?? [],
      maxBufferedEvents: options.maxBufferedEvents ?? 10_000,
      reconnect: rc
        ? {
            initialDelayMs: (typeof rc === 'object' && rc.initialDelayMs) || 100,
            maxDelayMs: (typeof rc === 'object' && rc.maxDelayMs) || 5000,
            factor: (typeof rc === 'object' && rc.factor) || 2,
            maxAttempts: (typeof rc === 'object' && rc.maxAttempts) || Number.POSITIVE_INFINITY,
          }
        : null,
    };
    this.log = (options.logger ?? silentLogger).child({ qmp: options.path });
  }

  /** Create a client and connect it. */
  static async connect(options: QmpClientOptions | string): Promise<QmpClient> {
    const c = new QmpClient(typeof options === 'string' ? { path: options } : options);
    try {
      await c.connect();
    } catch (err) {
      await c.close();
      throw err;
    }
    return c;
  }

  get state(): QmpClientState {
    return this._state;
  }

  get connected(): boolean {
    return this._state === 'ready';
  }

  /** The greeting of the current (last) connection. */
  get greeting(): QmpGreeting | null {
    return this._greeting;
  }

  /** Number of commands awaiting a reply. */
  get outstanding(): number {
    return this.pending.size;
  }

  /**
   * Connect: wait (up to connectTimeoutMs) for the socket to accept, read the
   * greeting, send qmp_capabilities. Resolves with the greeting.
   */
  async connect(options: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<QmpGreeting> {
    if (this._state === 'closed') throw new QmpDisconnectedError('QMP client is closed');
    if (this._state === 'ready') return this._greeting!;
    if (this._state === 'connecting' || this._state === 'reconnecting') {
      await this.whenReady(options.timeoutMs ?? this.opts.connectTimeoutMs);
      return this._greeting!;
    }
    this._state = 'connecting';
    try {
      const g = await this.establish(options.timeoutMs ?? this.opts.connectTimeoutMs, options.signal, true);
      this.markReady();
      return g;
    } catch (err) {
      if ((this._state as QmpClientState) !== 'closed') this._state = 'idle';
      this.failReadyWaiters(err as Error);
      throw err;
    }
  }

  /**
   * Run a QMP command; resolves with its "return" value, rejects with
   * QmpError (QEMU error), QmpTimeoutError, QmpDisconnectedError, or the
   * signal's reason. While (re)connecting, waits for the connection first.
   */
  async execute<R = unknown>(command: string, args?: Record<string, unknown>, options: ExecuteOptions = {}): Promise<R> {
    const timeoutMs = options.timeoutMs ?? this.opts.commandTimeoutMs;
    const started = Date.now();
    options.signal?.throwIfAborted();
    if (this._state !== 'ready') {
      if (this._state === 'connecting' || this._state === 'reconnecting') {
        await this.whenReady(timeoutMs, options.signal);
      } else {
        throw new QmpDisconnectedError(`QMP ${command}: not connected (state ${this._state})`);
      }
    }
    const remaining = timeoutMs > 0 ? Math.max(1, timeoutMs - (Date.now() - started)) : 0;
    return this.send<R>(command, args, remaining, options.signal, options.oob);
  }

  /** Async iterator over events from now on. Ends when the client closes (throws if it was lost). */
  events(options: { signal?: AbortSignal; filter?: (ev: QmpEvent) => boolean } = {}): AsyncIterableIterator<QmpEvent> {
    const queue: QmpEvent[] = [];
    let waiting: { resolve: (r: IteratorResult<QmpEvent>) => void; reject: (e: Error) => void } | null = null;
    let done = false;
    let endError: Error | undefined;
    const max = this.opts.maxBufferedEvents;
    const log = this.log;
    const finish = (err?: Error) => {
      if (done) return;
      done = true;
      endError = err;
      this.sinks.delete(sink);
      options.signal?.removeEventListener('abort', onAbort);
      if (waiting) {
        const w = waiting;
        waiting = null;
        if (err) w.reject(err);
        else w.resolve({ value: undefined, done: true });
        endError = undefined;
      }
    };
    const sink: EventSink = {
      push(ev) {
        if (options.filter && !options.filter(ev)) return;
        if (waiting) {
          const w = waiting;
          waiting = null;
          w.resolve({ value: ev, done: false });
          return;
        }
        queue.push(ev);
        if (queue.length > max) {
          queue.shift();
          log.warn({ max }, 'QMP events() consumer too slow; dropped the oldest event');
        }
      },
      end: finish,
    };
    const onAbort = () => finish();
    if (this._state === 'closed') done = true;
    else this.sinks.add(sink);
    options.signal?.addEventListener('abort', onAbort, { once: true });
    const it: AsyncIterableIterator<QmpEvent> = {
      next(): Promise<IteratorResult<QmpEvent>> {
        if (queue.length > 0) return Promise.resolve({ value: queue.shift()!, done: false });
        if (done) {
          if (endError) {
            const e = endError;
            endError = undefined;
            return Promise.reject(e);
          }
          return Promise.resolve({ value: undefined, done: true });
        }
        return new Promise((resolve, reject) => {
          waiting = { resolve, reject };
        });
      },
      return(): Promise<IteratorResult<QmpEvent>> {
        queue.length = 0;
        finish();
        return Promise.resolve({ value: undefined, done: true });
      },
      [Symbol.asyncIterator]() {
        return it;
      },
    };
    return it;
  }

  /**
   * Wait for the next event named `name` (optionally matching `predicate`).
   * Only events arriving after the call count: call it BEFORE the command
   * that triggers the event, then await it.
   */
  waitForEvent<D extends Record<string, unknown> = Record<string, unknown>>(
    name: string,
    predicate?: (ev: QmpEvent<D>) => boolean,
    options: WaitForEventOptions | number = {},
  ): Promise<QmpEvent<D>> {
    const o = typeof options === 'number' ? { timeoutMs: options } : options;
    const timeoutMs = o.timeoutMs ?? 30_000;
    return new Promise<QmpEvent<D>>((resolve, reject) => {
      if (this._state === 'closed') {
        reject(new QmpDisconnectedError(`waiting for QMP event ${name}: client is closed`));
        return;
      }
      let timer: NodeJS.Timeout | undefined;
      const cleanup = () => {
        if (timer) clearTimeout(timer);
        this.off(`event:${name}`, onEvent);
        this.off('close', onClose);
        o.signal?.removeEventListener('abort', onAbort);
      };
      const onEvent = (ev: QmpEvent) => {
        let ok = true;
        try {
          ok = predicate ? predicate(ev as QmpEvent<D>) : true;
        } catch (err) {
          cleanup();
          reject(err as Error);
          return;
        }
        if (ok) {
          cleanup();
          resolve(ev as QmpEvent<D>);
        }
      };
      const onClose = () => {
        cleanup();
        reject(new QmpDisconnectedError(`waiting for QMP event ${name}: client closed`));
      };
      const onAbort = () => {
        cleanup();
        reject(o.signal!.reason ?? new Error('aborted'));
      };
      if (o.signal?.aborted) {
        onAbort();
        return;
      }
      this.on(`event:${name}`, onEvent);
      this.once('close', onClose);
      o.signal?.addEventListener('abort', onAbort, { once: true });
      if (timeoutMs > 0) {
        timer = setTimeout(() => {
          cleanup();
          reject(new QmpTimeoutError(`no QMP event ${name} within ${timeoutMs} ms`));
        }, timeoutMs);
      }
    });
  }

  /** Close for good: fails outstanding commands, ends event iterators, stops reconnecting. */
  async close(): Promise<void> {
    if (this._state === 'closed') return;
    this._state = 'closed';
    this.closeController.abort();
    const err = new QmpDisconnectedError('QMP client closed');
    this.failPending(err);
    this.failReadyWaiters(err);
    const s = this.socket;
    this.socket = null;
    if (s && !s.destroyed) {
      await new Promise<void>((resolve) => {
        s.once('close', () => resolve());
        s.end();
        setTimeout(() => {
          s.destroy();
          resolve();
        }, 200).unref();
      });
    }
    for (const sink of [...this.sinks]) sink.end();
    this.sinks.clear();
    this.emit('close');
  }

  // ---- internals ---------------------------------------------------------

  private send<R>(command: string, args: Record<string, unknown> | undefined, timeoutMs: number, signal?: AbortSignal, oob?: boolean): Promise<R> {
    const socket = this.socket;
    if (!socket || this._state !== 'ready') {
      return Promise.reject(new QmpDisconnectedError(`QMP ${command}: not connected`));
    }
    const id = this.idPrefix + String(this.nextId++);
    return new Promise<R>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const onAbort = () => {
        this.pending.delete(id);
        cleanup();
        reject(signal!.reason ?? new Error('aborted'));
      };
      const cleanup = () => {
        if (timer) clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
      };
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, cleanup });
      if (timeoutMs > 0) {
        timer = setTimeout(() => {
          this.pending.delete(id);
          cleanup();
          reject(new QmpTimeoutError(`QMP ${command}: no reply within ${timeoutMs} ms`));
        }, timeoutMs);
      }
      signal?.addEventListener('abort', onAbort, { once: true });
      this.log.debug({ command, id }, 'QMP execute');
      socket.write(encodeCommand({ execute: command, arguments: args, id, oob }));
    });
  }

  private handleMessage(msg: QmpMessage): void {
    if (this.handshakeSink) {
      this.handshakeSink(msg);
      if (msg.kind !== 'event') return;
    }
    switch (msg.kind) {
      case 'return':
      case 'error': {
        const id = typeof msg.id === 'string' ? msg.id : undefined;
        const p = id !== undefined ? this.pending.get(id) : undefined;
        if (!p || id === undefined) {
          this.log.debug({ id: msg.id }, 'QMP reply with no pending command (timed out?)');
          return;
        }
        this.pending.delete(id);
        p.cleanup();
        if (msg.kind === 'return') p.resolve(msg.value);
        else p.reject(new QmpError(msg.errorClass, msg.desc, p.command));
        return;
      }
      case 'event':
        this.log.debug({ event: msg.event }, 'QMP event');
        for (const sink of this.sinks) sink.push(msg);
        this.emit('event', msg);
        this.emit(`event:${msg.event}`, msg);
        return;
      case 'greeting':
        this.log.warn('unexpected QMP greeting mid-session');
        return;
    }
  }

  /** Open the socket, retrying ENOENT/ECONNREFUSED until the deadline, then handshake. */
  private async establish(timeoutMs: number, signal: AbortSignal | undefined, retryMissing: boolean): Promise<QmpGreeting> {
    const deadline = Date.now() + timeoutMs;
    const signals = [this.closeController.signal, ...(signal ? [signal] : [])];
    const combined = AbortSignal.any(signals);
    let lastErr: Error | undefined;
    let socket: net.Socket | null = null;
    while (!socket) {
      if (combined.aborted) throw new QmpDisconnectedError('QMP connect aborted');
      try {
        socket = await this.openSocket(Math.max(1, deadline - Date.now()));
      } catch (err) {
        lastErr = err as Error;
        const code = (err as NodeJS.ErrnoException).code;
        const retriable = code === 'ENOENT' || code === 'ECONNREFUSED' || code === 'EAGAIN';
        if (!retryMissing || !retriable || Date.now() + 50 >= deadline) {
          throw new QmpConnectError(`cannot connect to QMP socket ${this.path}: ${lastErr.message}`);
        }
        try {
          await delay(50, undefined, { signal: combined });
        } catch {
          throw new QmpDisconnectedError('QMP connect aborted');
        }
      }
    }
    this.attach(socket);
    try {
      return await this.handshake(Math.max(1, deadline - Date.now()), combined);
    } catch (err) {
      this.detach();
      socket.destroy();
      throw err;
    }
  }

  private openSocket(timeoutMs: number): Promise<net.Socket> {
    return new Promise((resolve, reject) => {
      const s = net.createConnection({ path: this.path });
      const t = setTimeout(() => {
        s.destroy();
        reject(Object.assign(new Error(`connect timed out after ${timeoutMs} ms`), { code: 'ETIMEDOUT' }));
      }, timeoutMs);
      s.once('connect', () => {
        clearTimeout(t);
        s.removeAllListeners('error');
        resolve(s);
      });
      s.once('error', (err) => {
        clearTimeout(t);
        s.destroy();
        reject(err);
      });
    });
  }

  private attach(socket: net.Socket): void {
    this.socket = socket;
    this.decoder = new QmpDecoder();
    socket.setNoDelay?.(true);
    socket.on('data', (chunk: Buffer) => {
      for (const m of this.decoder.push(chunk)) {
        if (m.kind === 'invalid') {
          this.log.warn({ line: m.line.slice(0, 200), reason: m.reason }, 'invalid QMP line ignored');
          continue;
        }
        this.handleMessage(m);
      }
    });
    socket.on('error', (err) => {
      this.log.debug({ err: err.message }, 'QMP socket error');
    });
    socket.on('close', () => {
      if (this.socket !== socket) return; // detached already
      this.socket = null;
      const err = new QmpDisconnectedError(`QMP connection to ${this.path} lost`);
      const gone = this.onSocketGone;
      if (gone) {
        gone(err);
        return;
      }
      this.onDrop(err);
    });
  }

  private detach(): void {
    const s = this.socket;
    this.socket = null;
    if (s) s.removeAllListeners('data');
  }

  private handshake(timeoutMs: number, signal: AbortSignal): Promise<QmpGreeting> {
    return new Promise<QmpGreeting>((resolve, reject) => {
      let greeting: QmpGreeting | null = null;
      let capsId: string | null = null;
      const timer = setTimeout(() => {
        finish(
          new QmpConnectError(
            greeting
              ? `QMP ${this.path}: no reply to qmp_capabilities within ${timeoutMs} ms`
              : `QMP ${this.path}: no greeting within ${timeoutMs} ms (another client connected? a QMP socket serves one client at a time)`,
          ),
        );
      }, timeoutMs);
      const onAbort = () => finish(new QmpDisconnectedError('QMP connect aborted'));
      signal.addEventListener('abort', onAbort, { once: true });
      const finish = (err: Error | null, g?: QmpGreeting) => {
        clearTimeout(timer);
        signal.removeEventListener('abort', onAbort);
        this.handshakeSink = null;
        this.onSocketGone = null;
        if (err) reject(err);
        else resolve(g!);
      };
      this.onSocketGone = (err) => finish(new QmpConnectError(`QMP ${this.path}: connection closed during handshake (${err.message})`));
      this.handshakeSink = (m) => {
        if (!greeting) {
          if (m.kind !== 'greeting') {
            finish(new QmpConnectError(`QMP ${this.path}: expected a greeting, got ${m.kind}`));
            return;
          }
          greeting = m;
          this._greeting = m;
          const wanted = this.opts.capabilities.filter((c) => m.capabilities.includes(c));
          capsId = `${this.idPrefix}caps-${this.nextId++}`;
          const args = wanted.length ? { enable: wanted } : undefined;
          this.socket?.write(encodeCommand({ execute: 'qmp_capabilities', arguments: args, id: capsId }));
          return;
        }
        if (m.kind === 'return' && m.id === capsId) finish(null, greeting);
        else if (m.kind === 'error' && m.id === capsId) finish(new QmpConnectError(`QMP ${this.path}: qmp_capabilities failed: ${m.errorClass}: ${m.desc}`));
      };
    });
  }

  private markReady(): void {
    this._state = 'ready';
    const ws = this.readyWaiters;
    this.readyWaiters = [];
    for (const w of ws) w.resolve();
  }

  private failReadyWaiters(err: Error): void {
    const ws = this.readyWaiters;
    this.readyWaiters = [];
    for (const w of ws) w.reject(err);
  }

  private failPending(err: Error): void {
    const ps = [...this.pending.values()];
    this.pending.clear();
    for (const p of ps) {
      p.cleanup();
      const e = new QmpDisconnectedError(`QMP ${p.command}: ${err.message} before the reply arrived`);
      p.reject(e);
    }
  }

  private whenReady(timeoutMs: number, signal?: AbortSignal): Promise<void> {
    if (this._state === 'ready') return Promise.resolve();
    return new Promise<void>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const entry = {
        resolve: () => {
          done();
          resolve();
        },
        reject: (e: Error) => {
          done();
          reject(e);
        },
      };
      const onAbort = () => {
        this.readyWaiters = this.readyWaiters.filter((w) => w !== entry);
        done();
        reject(signal!.reason ?? new Error('aborted'));
      };
      const done = () => {
        if (timer) clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
      };
      this.readyWaiters.push(entry);
      signal?.addEventListener('abort', onAbort, { once: true });
      if (timeoutMs > 0) {
        timer = setTimeout(() => {
          this.readyWaiters = this.readyWaiters.filter((w) => w !== entry);
          done();
          reject(new QmpTimeoutError(`QMP ${this.path}: not connected within ${timeoutMs} ms`));
        }, timeoutMs);
      }
    });
  }

  /** The socket dropped while ready. */
  private onDrop(err: QmpDisconnectedError): void {
    if (this._state === 'closed') return;
    this.log.warn('QMP connection lost');
    this.failPending(err);
    this.emit('disconnect', err);
    if (!this.opts.reconnect) {
      this._state = 'closed';
      this.failReadyWaiters(err);
      for (const sink of [...this.sinks]) sink.end(err);
      this.sinks.clear();
      this.emit('close');
      return;
    }
    this._state = 'reconnecting';
    void this.reconnectLoop(this.opts.reconnect);
  }

  private async reconnectLoop(rc: Required<QmpReconnectOptions>): Promise<void> {
    let wait = rc.initialDelayMs;
    for (let attempt = 1; attempt <= rc.maxAttempts; attempt++) {
      try {
        await delay(wait, undefined, { signal: this.closeController.signal });
      } catch {
        return; // closed
      }
      if (this._state === 'closed') return;
      try {
        const g = await this.establish(this.opts.connectTimeoutMs, undefined, false);
        if ((this._state as QmpClientState) === 'closed') return;
        this.log.info({ attempt }, 'QMP reconnected');
        this.markReady();
        this.emit('reconnect', g);
        return;
      } catch (e) {
        if ((this._state as QmpClientState) === 'closed') return;
        this.log.debug({ attempt, err: (e as Error).message }, 'QMP reconnect attempt failed');
      }
      wait = Math.min(rc.maxDelayMs, wait * rc.factor);
    }
    const err = new QmpDisconnectedError(`QMP ${this.path}: gave up reconnecting after ${rc.maxAttempts} attempts`);
    this._state = 'closed';
    this.failReadyWaiters(err);
    for (const sink of [...this.sinks]) sink.end(err);
    this.sinks.clear();
    this.emit('close');
  }
}
