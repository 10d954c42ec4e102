// The bridge's state file (bridge-state.ts) and the re-attach loop (reconnect.ts) with fake
// server and QEMU ends: what a restarted bridge reads, and how re-attaching retries and stops.
import { expect } from 'chai';
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Status } from 'nice-grpc';
import { silentLogger } from '../../src/common/log.js';
import { BridgeStateError, BridgeStateFile, type SavedAttachment } from '../../src/client/bridge/bridge-state.js';
import { isLostSession, Reattacher, type ReattachDeps } from '../../src/client/bridge/reconnect.js';
import type { UsbHostClient } from '../../src/client/sdk/client.js';
import type { RemoteDevice } from '../../src/client/sdk/remote-device.js';
import type { QmpClient } from '../../src/qemu/qmp/client.js';

describe('bridge state file and re-attach', () => {
  let dir: string;
  beforeEach(() => (dir = mkdtempSync(path.join(os.tmpdir(), 'bridge-state-'))));
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  const rec = (id: string, socketPath = path.join(dir, `${id}.sock`)): SavedAttachment => ({
    id,
    vm: 'vm1',
    qmpSocket: '/q.sock',
    server: { address: 'localhost:1', ca: '/ca.pem' },
    deviceId: 'emu-1-1',
    bus: 'xhci.0',
    chardevId: `${id}-chr`,
    socketPath,
    hotPlugged: true,
    sessionId: 's-old',
    savedAt: new Date().toISOString(),
  });

  it('saves and loads the records, replacing the file whole with no temporary left behind', () => {
    const f = new BridgeStateFile(dir);
    expect(f.load()).to.deep.equal([]);
    f.save([rec('a'), rec('b')]);
    f.save([rec('b')]);
    expect(f.load().map((r) => r.id)).to.deep.equal(['b']);
    expect(readdirSync(dir)).to.deep.equal(['bridge-state.json']);
  });

  it('refuses a file that is not JSON or of another version, and drops malformed records', () => {
    const f = new BridgeStateFile(dir);
    writeFileSync(f.file, '{"version":1,"attachments":[');
    expect(() => f.load()).to.throw(BridgeStateError, /not JSON/);
    writeFileSync(f.file, JSON.stringify({ version: 99, attachments: [] }));
    expect(() => f.load()).to.throw(BridgeStateError, /version 99 unknown/);
    writeFileSync(f.file, JSON.stringify({ version: 1, attachments: [rec('ok'), { id: 'no-fields' }, null] }));
    expect(f.load().map((r) => r.id)).to.deep.equal(['ok']);
  });

  it('counts a failed channel as a lost session, not a clean close, a refusal or an abort', () => {
    expect(isLostSession(undefined)).to.equal(false);
    expect(isLostSession(Object.assign(new Error('x'), { code: Status.NOT_FOUND }))).to.equal(true);
    expect(isLostSession(new Error('could not resume'))).to.equal(true);
    expect(isLostSession(Object.assign(new Error('x'), { code: Status.PERMISSION_DENIED }))).to.equal(false);
    expect(isLostSession(Object.assign(new Error('x'), { code: Status.ABORTED }))).to.equal(false);
  });

  /** Fakes: a server whose openDevice fails `failures` times, a QEMU whose chardev listens on a unix socket. */
  async function fakes(failures: number, peripherals: string[]) {
    const calls = { closeSession: [] as string[], open: 0, hotplug: 0, adopted: [] as SavedAttachment[], changed: 0 };
    const sock = path.join(dir, 'chr.sock');
    const qemu = net.createServer((s) => s.on('error', () => {}));
    await new Promise<void>((r) => qemu.listen(sock, r));
    const client = {
      closeSession: async (id: string) => {
        calls.closeSession.push(id);
      },
      openDevice: async () => {
        calls.open++;
        if (calls.open <= failures) throw Object.assign(new Error('No connection established'), { code: Status.UNAVAILABLE });
        return { sessionId: `s-${calls.open}`, close: async () => {} } as unknown as RemoteDevice;
      },
    } as unknown as UsbHostClient;
    const qmp = {
      execute: async (cmd: string) => {
        if (cmd === 'qom-list') return peripherals.map((name) => ({ name }));
        calls.hotplug++;
        return {};
      },
    } as unknown as QmpClient;
    const deps: ReattachDeps = {
      log: silentLogger,
      clientFor: () => client,
      qmpOf: async () => qmp,
      deviceOptions: {},
      adopt: (s, _d, socket) => {
        calls.adopted.push(s);
        socket.destroy();
      },
      changed: () => calls.changed++,
    };
    return { calls, sock, deps, close: () => new Promise<void>((r) => qemu.close(() => r())) };
  }

  it('retries with backoff until the server takes the device again, closing the old session first', async () => {
    const f = await fakes(3, ['att']);
    try {
      const r = new Reattacher(f.deps, { windowMs: 10_000, initialDelayMs: 10, maxDelayMs: 40 });
      const p = r.start(rec('att', f.sock), 'test', { closeOldSession: true });
      expect(r.records().map((x) => x.id)).to.deep.equal(['att']);
      expect(await p).to.equal(true);
      expect(f.calls.closeSession).to.deep.equal(['s-old']);
      expect(f.calls.open).to.equal(4);
      expect(f.calls.hotplug, 'the usb-redir device was still there').to.equal(0);
      expect(f.calls.adopted.map((s) => s.sessionId)).to.deep.equal(['s-4']);
      expect(r.records()).to.deep.equal([]);
    } finally {
      await f.close();
    }
  });

  it('plugs the usb-redir device again when QEMU no longer has it', async () => {
    const f = await fakes(0, []);
    try {
      expect(await new Reattacher(f.deps, { windowMs: 5000 }).start(rec('att', f.sock), 'test', { closeOldSession: false })).to.equal(true);
      expect(f.calls.hotplug).to.equal(2); // chardev-add, device_add
      expect(f.calls.closeSession).to.deep.equal([]);
    } finally {
      await f.close();
    }
  });

  it('gives up after its window, and stops at once when cancelled', async () => {
    const f = await fakes(1_000_000, ['att']);
    try {
      const r = new Reattacher(f.deps, { windowMs: 150, initialDelayMs: 10, maxDelayMs: 20 });
      expect(await r.start(rec('att', f.sock), 'test', { closeOldSession: false })).to.equal(false);
      expect(f.calls.adopted).to.deep.equal([]);
      const r2 = new Reattacher(f.deps, { windowMs: 60_000, initialDelayMs: 10, maxDelayMs: 20 });
      const p = r2.start(rec('b', f.sock), 'test', { closeOldSession: false });
      expect(r2.cancel('b')).to.equal(true);
      expect(await p).to.equal(false);
      expect(r2.records()).to.deep.equal([]);
    } finally {
      await f.close();
    }
  });
});
