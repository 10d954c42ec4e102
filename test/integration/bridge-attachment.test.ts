// Attachment (usbredir device side) against a fake QEMU peer on a unix socket pair and a real
// in-process server over mutual TLS. The usbredir host alone is unit-tested in test/unit/redir-host.test.ts.
import { expect } from 'chai';
import { randomBytes } from 'node:crypto';
import { Attachment } from '../../src/client/bridge/attachment.js';
import { UsbHostClient } from '../../src/client/sdk/client.js';
import type { RemoteDevice } from '../../src/client/sdk/remote-device.js';
import { silentLogger, createLogger } from '../../src/common/log.js';
import { Cap, Status, capsHas, type Packet } from '../../src/qemu/usbredir/index.js';
import { socketPair, type FakeQemu } from '../helpers/bridge-fake-qemu.js';
import { clientTls } from '../../src/devkit/certs.js';
import { startInProcessServer, type InProcessServer } from '../helpers/in-process.js';

/** Poll a condition the attachment reaches by itself (bounded; no fixed sleep). */
async function until(what: string, fn: () => boolean, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!fn()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setImmediate(r));
  }
}

const log = process.env.USBROAM_TEST_LOG ? createLogger({ level: process.env.USBROAM_TEST_LOG }) : silentLogger;

interface Rig {
  dev: RemoteDevice;
  att: Attachment;
  qemu: FakeQemu;
  cleanup: () => void;
}

describe('bridge Attachment (usbredir device side)', function () {
  this.timeout(30_000);
  let srv: InProcessServer;
  let client: UsbHostClient;
  const rigs: Rig[] = [];

  before(async () => {
    srv = await startInProcessServer();
    client = new UsbHostClient({ address: srv.address.replace('127.0.0.1', 'localhost'), ...clientTls('bridge') });
  });
  after(async () => {
    client.close();
    await srv.stop();
  });
  afterEach(async () => {
    for (const r of rigs.splice(0)) {
      await r.att.close('test over');
      r.cleanup();
    }
  });

  async function rig(serial: string, opts: { hello?: boolean } = {}): Promise<Rig> {
    const dev = await client.openDevice({ serial }, { maxInFlight: 1 << 30 });
    const { bridge, qemu, cleanup } = await socketPair();
    const att = new Attachment({ device: dev, socket: bridge, log: log.child({ vm: 'test-vm', device: dev.device.id }) }).start();
    const r = { dev, att, qemu, cleanup };
    rigs.push(r);
    if (opts.hello !== false) {
      qemu.hello();
      await qemu.waitFor('device_connect');
    }
    return r;
  }

  let nextId = 0x1000n;
  const id = () => (nextId += 0x40n);

  async function setConfig(q: FakeQemu, value = 1): Promise<void> {
    const i = id();
    q.send({ type: 'set_configuration', id: i, configuration: value });
    const st = await q.waitFor('configuration_status', (p) => p.id === i);
    expect(st).to.include({ status: Status.success, configuration: value });
  }

  async function control(q: FakeQemu, requesttype: number, request: number, value: number, index: number, length: number, data = new Uint8Array(0)) {
    const i = id();
    q.send({ type: 'control_packet', id: i, endpoint: requesttype & 0x80, request, requesttype, status: 0, value, index, length: requesttype & 0x80 ? length : data.length, data });
    return q.waitFor('control_packet', (p) => p.id === i);
  }

  it('exchanges hellos; sends interface_info, ep_info, device_connect built from the device', async () => {
    const { qemu, dev } = await rig('USBROAM-LOOP-0001', { hello: false });
    const hello = await qemu.waitFor('hello');
    expect(capsHas(hello.caps, Cap['64bits_ids'])).to.equal(true);
    expect(hello.caps[0]).to.equal(0xff);
    qemu.hello();
    const conn = await qemu.waitFor('device_connect');
    const types = qemu.packets.map((p) => p.type);
    expect(types.slice(0, 4)).to.deep.equal(['hello', 'interface_info', 'ep_info', 'device_connect']);
    expect(conn).to.include({ vendorId: dev.device.vendorId, productId: dev.device.productId, deviceClass: dev.device.deviceClass, deviceVersionBcd: dev.device.bcdDevice });
    expect(conn.speed).to.equal(2); // high speed
    const ep = qemu.packets.find((p) => p.type === 'ep_info') as Extract<Packet, { type: 'ep_info' }>;
    expect(ep.epType[0]).to.equal(0);
    expect(ep.epType[16]).to.equal(0);
    expect(ep.maxPacketSize).to.be.an('array');

    await setConfig(qemu);
    // After the configuration change: the loopback's interface and endpoints.
    const ep2 = await qemu.waitFor('ep_info', (p) => p.epType[1] === 2);
    expect(ep2.epType[1]).to.equal(2); // bulk OUT 0x01
    expect(ep2.epType[17]).to.equal(2); // bulk IN 0x81
    expect(ep2.epType[18]).to.equal(3); // interrupt IN 0x82
    expect(ep2.maxPacketSize![17]).to.equal(512);
    expect(ep2.interval[18]).to.be.greaterThan(0);
    const ii = qemu.packets.filter((p) => p.type === 'interface_info').pop() as Extract<Packet, { type: 'interface_info' }>;
    expect(ii.interfaceCount).to.equal(1);
    expect(ii.interfaceClass[0]).to.equal(0xff);
  });

  it('GET_DESCRIPTOR through control_packet returns the device descriptor', async () => {
    const { qemu, dev } = await rig('USBROAM-MSC-0001');
    const r = await control(qemu, 0x80, 6, 0x0100, 0, 18);
    expect(r.status).to.equal(Status.success);
    expect(r.length).to.equal(18);
    const d = r.data;
    expect(d[0]).to.equal(18);
    expect(d[1]).to.equal(1);
    expect(d[8]! | (d[9]! << 8)).to.equal(dev.device.vendorId);
    expect(d[10]! | (d[11]! << 8)).to.equal(dev.device.productId);
    // A short read: length = actual
    const r2 = await control(qemu, 0x80, 6, 0x0100, 0, 8);
    expect(r2.length).to.equal(8);
    expect(r2.data.length).to.equal(8);
  });

  it('bulk OUT and IN through the loopback device, many in flight', async () => {
    const { qemu } = await rig('USBROAM-LOOP-0001');
    await setConfig(qemu);
    await control(qemu, 0x40, 0x02, 0, 0, 0); // RESET_COUNTERS
    const N = 64;
    const chunks = Array.from({ length: N }, () => randomBytes(16384));
    const ids: bigint[] = [];
    for (const c of chunks) {
      const i = id();
      ids.push(i);
      qemu.send({ type: 'bulk_packet', id: i, endpoint: 0x01, status: 0, length: c.length, streamId: 0, data: c });
    }
    for (const i of ids) {
      const r = await qemu.waitFor('bulk_packet', (p) => p.id === i);
      expect(r.status).to.equal(Status.success);
      expect(r.length).to.equal(16384);
      expect(r.data.length).to.equal(0);
    }
    // 32-bit length bulk IN (> 64 KiB)
    const inId = id();
    qemu.send({ type: 'bulk_packet', id: inId, endpoint: 0x81, status: 0, length: 100 * 1024, streamId: 0, data: new Uint8Array(0) });
    const r = await qemu.waitFor('bulk_packet', (p) => p.id === inId);
    expect(r.status).to.equal(Status.success);
    expect(r.length).to.equal(100 * 1024);
    expect(r.data.length).to.equal(100 * 1024);
    for (let j = 0; j < 1000; j++) expect(r.data[j]).to.equal((j % 512) % 63);
    // The device counted every OUT byte.
    const cnt = await control(qemu, 0xc0, 0x01, 0, 0, 36);
    const view = Buffer.from(cnt.data);
    expect(Number(view.readBigUInt64LE(0))).to.equal(N * 16384);
  });

  it('freeze (migration pre-switchover): output held after the barrier and the measurement; unfreeze delivers it', async () => {
    const { qemu, att } = await rig('USBROAM-LOOP-0001');
    await setConfig(qemu);
    let barriers = 0;
    const pos = await att.freeze({ barrier: async () => void barriers++ });
    expect(barriers).to.equal(1);
    expect(pos.unread).to.equal(0); // the fake QEMU reads everything
    expect(await att.freeze()).to.equal(pos); // idempotent while frozen
    const i = id();
    const completed = att.stats.urbsCompleted;
    const written = att.socket.bytesWritten;
    const produced = att.bytesToQemu;
    qemu.send({ type: 'bulk_packet', id: i, endpoint: 0x81, status: 0, length: 512, streamId: 0, data: new Uint8Array(0) });
    await until('the URB to complete at the server', () => att.stats.urbsCompleted > completed);
    await new Promise((r) => setImmediate(r));
    expect(qemu.packets.some((p) => p.type === 'bulk_packet' && p.id === i), 'nothing written while frozen').to.equal(false);
    expect(att.bytesToQemu, 'the answer was produced').to.be.greaterThan(produced);
    expect(att.socket.bytesWritten, 'and held, not written').to.equal(written);
    att.unfreeze();
    const r = await qemu.waitFor('bulk_packet', (p) => p.id === i);
    expect(r).to.include({ status: Status.success, length: 512 });
    // Usable again: a new request is answered at once.
    const j = id();
    qemu.send({ type: 'bulk_packet', id: j, endpoint: 0x81, status: 0, length: 64, streamId: 0, data: new Uint8Array(0) });
    expect((await qemu.waitFor('bulk_packet', (p) => p.id === j)).length).to.equal(64);
  });

  it('frozen: qemuBulkInFlight() lists the bulk TDs QEMU still has in flight, oldest first (pending, or answered with bytes QEMU has not read)', async () => {
    const { qemu, att } = await rig('USBROAM-ACM-0001');
    await setConfig(qemu);
    expect(att.qemuBulkInFlight(), 'not frozen').to.deep.equal([]);
    const reads = [id(), id(), id(), id()];
    for (const i of reads) qemu.send({ type: 'bulk_packet', id: i, endpoint: 0x81, status: 0, length: 64, streamId: 0, data: new Uint8Array(0) });
    await until('4 reads in flight', () => att.stats.inFlight === 4);
    // One read answered (the echo of an OUT) and read by the (fake) QEMU.
    const out1 = id();
    qemu.send({ type: 'bulk_packet', id: out1, endpoint: 0x01, status: 0, length: 1, streamId: 0, data: Buffer.from('a') });
    await qemu.waitFor('bulk_packet', (p) => p.id === reads[0]);
    await qemu.waitFor('bulk_packet', (p) => p.id === out1);
    expect(att.hasBulkInFlight()).to.equal(true);
    await att.freeze();
    expect(att.qemuBulkInFlight()).to.deep.equal([{ endpoint: 0x81, ids: reads.slice(1), streamIds: [0, 0, 0], contiguous: true, streams: false }]);
    // While frozen, the next read completes: its answer is held (QEMU has not read it), so it is still in flight for QEMU.
    const out2 = id();
    qemu.send({ type: 'bulk_packet', id: out2, endpoint: 0x01, status: 0, length: 1, streamId: 0, data: Buffer.from('b') });
    await until('the write and the read it feeds to complete at the server', () => att.stats.inFlight === 2 && att.qemuBulkInFlight().some((x) => x.endpoint === 0x01));
    const got = att.qemuBulkInFlight();
    expect(got.find((x) => x.endpoint === 0x81)).to.deep.equal({ endpoint: 0x81, ids: reads.slice(1), streamIds: [0, 0, 0], contiguous: true, streams: false });
    expect(got.find((x) => x.endpoint === 0x01)).to.deep.equal({ endpoint: 0x01, ids: [out2], streamIds: [0], contiguous: true, streams: false });
    expect(att.stats.inFlight, 'the second read completed at the server').to.equal(2);
    att.unfreeze();
    expect(Buffer.from((await qemu.waitFor('bulk_packet', (p) => p.id === reads[1])).data).toString()).to.equal('b');
  });

  it('cancel_data_packet returns the packet with status cancelled (serial bulk IN stays pending)', async () => {
    const { qemu, att } = await rig('USBROAM-ACM-0001');
    await setConfig(qemu);
    const i = id();
    qemu.send({ type: 'bulk_packet', id: i, endpoint: 0x81, status: 0, length: 512, streamId: 0, data: new Uint8Array(0) });
    await until('the read in flight', () => att.stats.inFlight === 1);
    expect(qemu.packets.some((p) => p.type === 'bulk_packet' && p.id === i)).to.equal(false);
    qemu.send({ type: 'cancel_data_packet', id: i });
    const r = await qemu.waitFor('bulk_packet', (p) => p.id === i);
    expect(r.status).to.equal(Status.cancelled);
    expect(r.length).to.equal(0);
    await until('the cancelled URB to end at the server', () => att.stats.inFlight === 0);
    // Exactly one answer, and the URB is gone at the server side too.
    expect(qemu.packets.filter((p) => p.type === 'bulk_packet' && p.id === i)).to.have.length(1);
    expect(att.stats.inFlight).to.equal(0);
    // The id can be reused at once; the echo still works afterwards.
    const out = id();
    qemu.send({ type: 'bulk_packet', id: out, endpoint: 0x01, status: 0, length: 5, streamId: 0, data: Buffer.from('hello') });
    qemu.send({ type: 'bulk_packet', id: i, endpoint: 0x81, status: 0, length: 512, streamId: 0, data: new Uint8Array(0) });
    const echo = await qemu.waitFor('bulk_packet', (p) => p.id === i && p.status === Status.success);
    expect(Buffer.from(echo.data).toString()).to.equal('hello');
  });

  it('interrupt receiving delivers interrupt packets (loopback interrupt IN 0x82)', async () => {
    const { qemu } = await rig('USBROAM-LOOP-0001');
    await setConfig(qemu);
    qemu.send({ type: 'start_interrupt_receiving', id: 0n, endpoint: 0x82 });
    const st = await qemu.waitFor('interrupt_receiving_status');
    expect(st).to.include({ status: Status.success, endpoint: 0x82 });
    const p0 = await qemu.waitFor('interrupt_packet', (p) => p.id === 0n);
    const p2 = await qemu.waitFor('interrupt_packet', (p) => p.id === 2n);
    for (const p of [p0, p2]) {
      expect(p.endpoint).to.equal(0x82);
      expect(p.status).to.equal(Status.success);
      expect(p.data.length).to.equal(8);
      const b = Buffer.from(p.data);
      expect(b.readUInt32LE(4)).to.equal(~b.readUInt32LE(0) >>> 0);
    }
    const before = qemu.packets.length;
    qemu.send({ type: 'stop_interrupt_receiving', id: 0n, endpoint: 0x82 });
    await qemu.waitFor('interrupt_receiving_status', (p) => p.status === Status.success, 5000, before);
  });

  it('alt setting: set/get, ep_info re-sent; iso IN stream delivers iso packets; iso OUT accepted', async () => {
    const { qemu, att } = await rig('USBROAM-LOOP-0001');
    await setConfig(qemu);
    let i = id();
    qemu.send({ type: 'get_configuration', id: i });
    expect(await qemu.waitFor('configuration_status', (p) => p.id === i)).to.include({ status: Status.success, configuration: 1 });
    i = id();
    qemu.send({ type: 'set_alt_setting', id: i, interface: 0, alt: 1 });
    expect(await qemu.waitFor('alt_setting_status', (p) => p.id === i)).to.include({ status: Status.success, interface: 0, alt: 1 });
    const ep = await qemu.waitFor('ep_info', (p) => p.epType[19] === 1);
    expect(ep.epType[3]).to.equal(1); // iso OUT 0x03
    expect(ep.maxPacketSize![19]).to.be.greaterThan(0);
    i = id();
    qemu.send({ type: 'get_alt_setting', id: i, interface: 0 });
    expect(await qemu.waitFor('alt_setting_status', (p) => p.id === i)).to.include({ status: Status.success, alt: 1 });
    qemu.send({ type: 'start_iso_stream', id: 0n, endpoint: 0x83, pktsPerUrb: 4, noUrbs: 2 });
    expect(await qemu.waitFor('iso_stream_status', (p) => p.endpoint === 0x83)).to.include({ status: Status.success });
    const p5 = await qemu.waitFor('iso_packet', (p) => p.id === 5n);
    expect(p5.status).to.equal(Status.success);
    expect(p5.data.length).to.be.greaterThan(4);
    const from = qemu.packets.length;
    qemu.send({ type: 'stop_iso_stream', id: 0n, endpoint: 0x83 });
    await qemu.waitFor('iso_stream_status', (p) => p.endpoint === 0x83, 5000, from);
    // iso OUT
    qemu.send({ type: 'start_iso_stream', id: 0n, endpoint: 0x03, pktsPerUrb: 4, noUrbs: 2 });
    expect(await qemu.waitFor('iso_stream_status', (p) => p.endpoint === 0x03)).to.include({ status: Status.success });
    const isoFrom = att.stats.urbsCompleted;
    for (let k = 0; k < 8; k++) qemu.send({ type: 'iso_packet', id: BigInt(k), endpoint: 0x03, status: 0, length: 16, data: new Uint8Array(16).fill(k) });
    await until('8 iso OUT URBs to complete', () => att.stats.urbsCompleted >= isoFrom + 8);
    const cnt = await control(qemu, 0xc0, 0x01, 0, 0, 36);
    expect(Number(Buffer.from(cnt.data).readBigUInt64LE(28))).to.equal(8 * 16);
    // No per-packet answers for iso OUT, and no error status.
    expect(qemu.packets.filter((p) => p.type === 'iso_stream_status' && p.endpoint === 0x03)).to.have.length(1);
  });

  it('malformed bytes from QEMU close only that attachment; a second attachment keeps working', async () => {
    const a = await rig('USBROAM-LOOP-0001');
    const b = await rig('USBROAM-MSC-0001');
    // A bogus packet type.
    const bad = Buffer.alloc(16 + 4);
    bad.writeUInt32LE(9999, 0);
    bad.writeUInt32LE(4, 4);
    a.qemu.sendRaw(bad);
    const info = await a.att.closed;
    expect(info.reason).to.match(/malformed/);
    await a.qemu.waitClosed();
    expect(a.att.state).to.equal('closed');
    const r = await control(b.qemu, 0x80, 6, 0x0100, 0, 18);
    expect(r.status).to.equal(Status.success);
    expect(b.att.state).to.equal('connected');
  });

  it('counts bytes from QEMU exactly, including a partial packet', async () => {
    const { qemu, att } = await rig('USBROAM-MSC-0001');
    const i = id();
    const full = qemu.parser.encode({ type: 'control_packet', id: i, endpoint: 0x80, request: 6, requesttype: 0x80, status: 0, value: 0x100, index: 0, length: 18, data: new Uint8Array(0) });
    const before = att.bytesFromQemu;
    qemu.sendRaw(full.subarray(0, 10));
    await until('10 bytes read', () => att.bytesFromQemu - before >= 10);
    expect(att.bytesFromQemu - before).to.equal(10);
    expect(att.parser.bytesConsumed + att.parser.pendingPartial).to.equal(att.bytesFromQemu);
    qemu.sendRaw(full.subarray(10));
    await qemu.waitFor('control_packet', (p) => p.id === i);
    expect(att.parser.pendingPartial).to.equal(0);
    expect(att.parser.bytesConsumed).to.equal(att.bytesFromQemu);
    expect(att.bytesToQemu).to.equal(att.parser.bytesEncoded);
  });

  it('a device unplugged on the server becomes device_disconnect; closes after the ack', async () => {
    const { qemu, att, dev } = await rig('USBROAM-ACM-0001');
    const gone = new Promise((r) => att.once('deviceGone', r));
    srv.backend.remove(dev.device.id);
    await qemu.waitFor('device_disconnect');
    await gone;
    expect(att.state).to.equal('disconnecting');
    qemu.send({ type: 'device_disconnect_ack', id: 0n });
    const info = await att.closed;
    expect(info.reason).to.match(/device gone/);
    await qemu.waitClosed();
  });

  it('a VM filter that denies the device: no device_connect, closed', async () => {
    const { qemu, att } = await rig('USBROAM-MSC-0001', { hello: false });
    await qemu.waitFor('hello');
    // QEMU sends its hello and (on our hello) the filter back to back.
    const hello = qemu.parser.encode(qemu.parser.helloPacket());
    const filter = qemu.parser.encode({ type: 'filter_filter', id: 0n, rules: '0x08,-1,-1,-1,0|-1,-1,-1,-1,1' });
    qemu.sendRaw(Buffer.concat([hello, filter]));
    const info = await att.closed;
    expect(info.reason).to.match(/filter/);
    expect(qemu.packets.some((p) => p.type === 'device_connect')).to.equal(false);
  });
});
