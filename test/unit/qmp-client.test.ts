import { expect } from 'chai';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  QmpClient,
  QmpConnectError,
  QmpDisconnectedError,
  QmpError,
  QmpTimeoutError,
  type QmpEvent,
} from '../../src/qemu/qmp/client.js';
import { FakeQmp } from '../helpers/fake-qmp.js';
import { capturingLogger } from '../../src/devkit/migration-faults.js';
import { nextEvent, until } from '../helpers/wait.js';

describe('QmpClient', function () {
  this.timeout(10_000);
  let dir: string;
  let fake: FakeQmp;
  const clients: QmpClient[] = [];
  const track = (c: QmpClient) => (clients.push(c), c);

  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qmp-test-'));
    fake = new FakeQmp(dir);
    await fake.start();
  });

  afterEach(async () => {
    for (const c of clients.splice(0)) await c.close();
    await fake.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('connects: greeting, then qmp_capabilities, then commands', async () => {
    const c = track(await QmpClient.connect({ path: fake.path }));
    expect(c.connected).to.equal(true);
    expect(c.greeting?.version.qemu.major).to.equal(7);
    expect(c.greeting?.capabilities).to.deep.equal(['oob']);
    expect(fake.received[0]!.execute).to.equal('qmp_capabilities');
    expect(fake.received[0]!.arguments).to.equal(undefined);
    const r = await c.execute('query-status');
    expect(r).to.deep.equal({ echo: 'query-status' });
    expect(fake.received[1]).to.include({ execute: 'query-status' });
    expect(fake.received[1]!.id).to.be.a('string');
  });

  it('enables only offered capabilities', async () => {
    const c = track(new QmpClient({ path: fake.path, capabilities: ['oob', 'nonexistent'] }));
    await c.connect();
    expect(fake.received[0]!.arguments).to.deep.equal({ enable: ['oob'] });
  });

  it('waits for the socket to appear', async () => {
    await fake.stop();
    const late = new FakeQmp(dir);
    setTimeout(() => void late.start(), 300);
    const t0 = Date.now();
    const c = track(await QmpClient.connect({ path: late.path, connectTimeoutMs: 5000 }));
    expect(Date.now() - t0).to.be.greaterThanOrEqual(250);
    expect(c.connected).to.equal(true);
    await c.close();
    await late.stop();
  });

  it('fails to connect when nothing listens', async () => {
    const t0 = Date.now();
    const err = await QmpClient.connect({ path: path.join(dir, 'nope.sock'), connectTimeoutMs: 300 }).catch((e: unknown) => e);
    expect(err).to.be.instanceOf(QmpConnectError);
    expect((err as Error).message).to.match(/nope\.sock/);
    expect(Date.now() - t0).to.be.lessThan(2000);
  });

  it('reports a missing greeting (socket busy with another client)', async () => {
    const first = track(await QmpClient.connect({ path: fake.path }));
    const err = await QmpClient.connect({ path: fake.path, connectTimeoutMs: 300 }).catch((e: unknown) => e);
    expect(err).to.be.instanceOf(QmpConnectError);
    expect((err as Error).message).to.match(/no greeting.*one client at a time/);
    expect(first.connected).to.equal(true);
  });

  it('correlates out-of-order replies by id', async () => {
    fake.handler = () => null;
    const c = track(await QmpClient.connect({ path: fake.path }));
    const p1 = c.execute('one');
    const p2 = c.execute('two', { x: 2 });
    const p3 = c.execute('three');
    expect(c.outstanding).to.equal(3);
    await fake.waitHeld(3);
    const [h1, h2, h3] = fake.held;
    fake.reply(h3!, { return: 3 });
    fake.reply(h1!, { return: 1 });
    fake.reply(h2!, { return: { two: true } });
    expect(await Promise.all([p1, p2, p3])).to.deep.equal([1, { two: true }, 3]);
    expect(h2!.arguments).to.deep.equal({ x: 2 });
    expect(new Set([h1!.id, h2!.id, h3!.id]).size).to.equal(3);
    expect(c.outstanding).to.equal(0);
  });

  it('turns QEMU errors into QmpError with class and desc', async () => {
    fake.handler = (cmd) =>
      cmd.execute === 'device_del' ? { error: { class: 'DeviceNotFound', desc: "Device 'x' not found" } } : { return: {} };
    const c = track(await QmpClient.connect({ path: fake.path }));
    const err = await c.execute('device_del', { id: 'x' }).catch((e: unknown) => e);
    expect(err).to.be.instanceOf(QmpError);
    const qe = err as QmpError;
    expect(qe.errorClass).to.equal('DeviceNotFound');
    expect(qe.desc).to.equal("Device 'x' not found");
    expect(qe.command).to.equal('device_del');
    expect(qe.message).to.match(/device_del.*DeviceNotFound/);
    expect(await c.execute('query-status')).to.deep.equal({});
  });

  it('delivers events: emitter, events() iterator, waitForEvent()', async () => {
    const c = track(await QmpClient.connect({ path: fake.path }));
    const seen: string[] = [];
    c.on('event', (ev: QmpEvent) => seen.push(ev.event));
    const it = c.events();
    const waiting = c.waitForEvent('DEVICE_DELETED', (ev) => ev.data.device === 'b', 2000);
    fake.event('STOP');
    fake.event('DEVICE_DELETED', { device: 'a' });
    fake.event('DEVICE_DELETED', { device: 'b' });
    fake.event('RESUME');
    const ev = await waiting;
    expect(ev.data).to.deep.equal({ device: 'b' });
    expect(ev.timestamp).to.deep.equal({ seconds: 1, microseconds: 2 });
    const names: string[] = [];
    for await (const e of it) {
      names.push(e.event);
      if (names.length === 4) break;
    }
    expect(names).to.deep.equal(['STOP', 'DEVICE_DELETED', 'DEVICE_DELETED', 'RESUME']);
    expect(seen).to.deep.equal(names);
  });

  it('events() with a filter, ended by an AbortSignal', async () => {
    const c = track(await QmpClient.connect({ path: fake.path }));
    const ac = new AbortController();
    const it = c.events({ signal: ac.signal, filter: (e) => e.event.startsWith('MIGRATION') });
    fake.event('STOP');
    fake.event('MIGRATION', { status: 'active' });
    fake.event('MIGRATION_PASS', { pass: 1 });
    const got: unknown[] = [];
    for await (const e of it) {
      got.push(e.data);
      if (got.length === 2) ac.abort();
    }
    expect(got).to.deep.equal([{ status: 'active' }, { pass: 1 }]);
  });

  it('waitForEvent times out', async () => {
    const c = track(await QmpClient.connect({ path: fake.path }));
    const err = await c.waitForEvent('NEVER', undefined, { timeoutMs: 100 }).catch((e: unknown) => e);
    expect(err).to.be.instanceOf(QmpTimeoutError);
    expect(c.listenerCount('event:NEVER')).to.equal(0);
  });

  it('times out a command; the late reply is ignored and the client stays usable', async () => {
    fake.handler = (cmd) => (cmd.execute === 'slow' ? null : { return: 'ok' });
    const c = track(await QmpClient.connect({ path: fake.path }));
    const t0 = Date.now();
    const err = await c.execute('slow', undefined, { timeoutMs: 150 }).catch((e: unknown) => e);
    expect(err).to.be.instanceOf(QmpTimeoutError);
    expect(Date.now() - t0).to.be.within(100, 1000);
    fake.reply(fake.held[0]!, { return: 'late' });
    expect(await c.execute('fast')).to.equal('ok');
    expect(c.outstanding).to.equal(0);
  });

  it('default command timeout comes from the options', async () => {
    fake.handler = () => null;
    const c = track(await QmpClient.connect({ path: fake.path, commandTimeoutMs: 100 }));
    const err = await c.execute('slow').catch((e: unknown) => e);
    expect(err).to.be.instanceOf(QmpTimeoutError);
  });

  it('aborts a command with an AbortSignal', async () => {
    fake.handler = () => null;
    const c = track(await QmpClient.connect({ path: fake.path }));
    const ac = new AbortController();
    const p = c.execute('slow', undefined, { signal: ac.signal });
    setTimeout(() => ac.abort(new Error('enough')), 50);
    const err = await p.catch((e: unknown) => e);
    expect((err as Error).message).to.equal('enough');
    expect(c.outstanding).to.equal(0);
  });

  it('socket drop without reconnect: outstanding commands fail, iterators throw, client closes', async () => {
    fake.handler = () => null;
    const c = track(await QmpClient.connect({ path: fake.path }));
    const it = c.events();
    const nextP = it.next();
    const closed = new Promise<void>((r) => c.once('close', () => r()));
    const disc = new Promise<Error>((r) => c.once('disconnect', (e: Error) => r(e)));
    const p1 = c.execute('a');
    const p2 = c.execute('b');
    await fake.waitHeld(2);
    fake.drop();
    const errs = await Promise.all([p1.catch((e: unknown) => e), p2.catch((e: unknown) => e)]);
    for (const e of errs) {
      expect(e).to.be.instanceOf(QmpDisconnectedError);
      expect((e as Error).message).to.match(/lost before the reply arrived/);
    }
    expect(await disc).to.be.instanceOf(QmpDisconnectedError);
    await closed;
    expect(c.state).to.equal('closed');
    expect(await nextP.catch((e: unknown) => e)).to.be.instanceOf(QmpDisconnectedError);
    expect(await c.execute('c').catch((e: unknown) => e)).to.be.instanceOf(QmpDisconnectedError);
  });

  it('reconnects with backoff after a drop; commands issued meanwhile wait for the new connection', async () => {
    fake.handler = (cmd) => (cmd.execute === 'hang' ? null : { return: cmd.execute });
    const cap = capturingLogger('debug');
    const c = track(await QmpClient.connect({ path: fake.path, reconnect: { initialDelayMs: 20, maxDelayMs: 100 }, logger: cap.log }));
    const it = c.events();
    const hanging = c.execute('hang');
    await fake.waitHeld(1);
    const reconnected = nextEvent(c, 'reconnect', 10_000);
    // Drop and keep the server away for a while: several attempts fail.
    await fake.stop();
    expect(await hanging.catch((e: unknown) => e)).to.be.instanceOf(QmpDisconnectedError);
    expect(c.state).to.equal('reconnecting');
    const during = c.execute('during', undefined, { timeoutMs: 5000 });
    await until('3 failed reconnect attempts', () => cap.records.filter((r) => r.msg === 'QMP reconnect attempt failed').length >= 3, 10_000, 10);
    fake = new FakeQmp(dir);
    fake.handler = (cmd) => ({ return: cmd.execute });
    await fake.start();
    await reconnected;
    expect(await during).to.equal('during');
    expect(fake.received.map((r) => r.execute)).to.deep.equal(['qmp_capabilities', 'during']);
    fake.event('RESUME');
    const n = await it.next();
    expect(n.value?.event).to.equal('RESUME');
    expect(c.connected).to.equal(true);
  });

  it('gives up after maxAttempts', async () => {
    const c = track(await QmpClient.connect({ path: fake.path, connectTimeoutMs: 200, reconnect: { initialDelayMs: 10, maxAttempts: 3 } }));
    const closed = new Promise<void>((r) => c.once('close', () => r()));
    await fake.stop();
    await closed;
    expect(c.state).to.equal('closed');
  });

  it('close() fails outstanding commands and ends iterators', async () => {
    fake.handler = () => null;
    const c = track(await QmpClient.connect({ path: fake.path }));
    const it = c.events();
    const p = c.execute('x').catch((e: unknown) => e);
    const w = c.waitForEvent('X').catch((e: unknown) => e);
    await fake.waitHeld(1);
    await c.close();
    expect(await p).to.be.instanceOf(QmpDisconnectedError);
    expect(await w).to.be.instanceOf(QmpDisconnectedError);
    expect(await it.next()).to.deep.equal({ value: undefined, done: true });
    await c.close(); // idempotent
    // The socket is free again for another client.
    const c2 = track(await QmpClient.connect({ path: fake.path }));
    expect(c2.connected).to.equal(true);
  });
});
