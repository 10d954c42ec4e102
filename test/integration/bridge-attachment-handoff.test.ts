// An attachment handed off to a destination attachment through a real in-process server, with a
// fake QEMU whose usbredir parser moves from the source's socket to the destination's (what a
// live migration does to QEMU's usb-redir): the packet QEMU had started sending and the answers
// held at the freeze continue there, byte-exact, each answered once.
import { expect } from 'chai';
import { Attachment } from '../../src/client/bridge/attachment.js';
import { UsbHostClient } from '../../src/client/sdk/client.js';
import { silentLogger } from '../../src/common/log.js';
import { Status, type Packet } from '../../src/qemu/usbredir/index.js';
import { FakeQemu, socketPair } from '../helpers/bridge-fake-qemu.js';
import { clientTls } from '../../src/devkit/certs.js';
import { startInProcessServer, type InProcessServer } from '../helpers/in-process.js';

describe('bridge Attachment hand-off (source -> destination, fake QEMU)', function () {
  this.timeout(30_000);
  let srv: InProcessServer;
  let client: UsbHostClient;
  const cleanups: (() => unknown)[] = [];
  before(async () => {
    srv = await startInProcessServer();
    client = new UsbHostClient({ address: srv.address.replace('127.0.0.1', 'localhost'), ...clientTls('bridge') });
  });
  after(async () => {
    client.close();
    await srv.stop();
  });
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c();
  });

  it('continues the partial guest->host packet and the held answers on the destination; every request answered once', async () => {
    const dev = await client.openDevice({ serial: 'USBROAM-LOOP-0001' }, { maxInFlight: 1 << 30 });
    const p1 = await socketPair();
    cleanups.push(p1.cleanup);
    const src = new Attachment({ device: dev, socket: p1.bridge, log: silentLogger, id: 'usbroam-test' }).start();
    cleanups.push(() => src.close('test over'));
    const q1 = p1.qemu;
    q1.hello();
    await q1.waitFor('device_connect');
    q1.send({ type: 'set_configuration', id: 1n, configuration: 1 });
    await q1.waitFor('configuration_status', (p) => p.id === 1n);

    const standby = await client.standbySession(dev.sessionId, { maxInFlight: 1 << 30 });
    await src.freeze({ barrier: async () => {} });
    // Requests QEMU sent before it stopped: answered into the held output.
    const ids = [0x10n, 0x11n, 0x12n];
    for (const id of ids) q1.send({ type: 'bulk_packet', id, endpoint: 0x81, status: 0, length: 64, streamId: 0, data: new Uint8Array(0) });
    // And the start of one more packet.
    const desc = q1.parser.encode({ type: 'control_packet', id: 0x20n, endpoint: 0x80, request: 6, requesttype: 0x80, status: 0, value: 0x100, index: 0, length: 18, data: new Uint8Array(0) });
    q1.sendRaw(desc.subarray(0, 11));
    const deadline = Date.now() + 10_000;
    while ((src.parser.pendingPartial < 11 || src.stats.urbsCompleted < ids.length) && Date.now() < deadline) await new Promise((r) => setImmediate(r));
    expect(src.parser.pendingPartial).to.equal(11);

    const info = await src.handOff();
    expect(info).to.include({ frozenBeforeSave: true, fromQemuPartial: 11, unreadInSocket: 0 });
    expect(info.toQemuBytes, 'the three held answers').to.be.greaterThan(3 * 64);
    expect(src.state).to.equal('closed');

    // The VM moves: QEMU's usbredir parser continues on the destination's chardev.
    const took = await standby.takeOver!;
    const p2 = await socketPair();
    cleanups.push(p2.cleanup);
    p2.qemu.socket.removeAllListeners('data');
    const q2 = new FakeQemu(p2.qemu.socket);
    (q2 as unknown as { parser: FakeQemu['parser'] }).parser = q1.parser;
    const dst = Attachment.fromHandOff({ device: standby, socket: p2.bridge, log: silentLogger, state: took.state });
    cleanups.push(() => dst.close('test over'));
    const connected = new Promise((r) => dst.once('connected', r));
    dst.start();
    await connected;
    expect(dst.id).to.equal('usbroam-test');
    for (const id of ids) expect((await q2.waitFor('bulk_packet', (p) => p.id === id)).status).to.equal(Status.success);
    q2.sendRaw(desc.subarray(11));
    const d = await q2.waitFor('control_packet', (p) => p.id === 0x20n);
    expect(d).to.include({ status: Status.success, length: 18 });
    expect(d.data[0]).to.equal(18);
    const answers = (ps: Packet[]) => ps.filter((p) => p.type === 'bulk_packet' || p.type === 'control_packet').map((p) => (p as { id: bigint }).id);
    const all = [...answers(q1.packets), ...answers(q2.packets)];
    for (const id of [...ids, 0x20n]) expect(all.filter((x) => x === id), `answers to ${id}`).to.have.length(1);
    expect(q2.error).to.equal(undefined);
    // The destination carries on.
    q2.send({ type: 'bulk_packet', id: 0x30n, endpoint: 0x81, status: 0, length: 64, streamId: 0, data: new Uint8Array(0) });
    expect((await q2.waitFor('bulk_packet', (p) => p.id === 0x30n)).length).to.equal(64);
    expect(dst.state).to.equal('connected');
  });
});
