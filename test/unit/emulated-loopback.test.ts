import { expect } from 'chai';
import { crc32 } from 'node:zlib';
import { randomBytes } from 'node:crypto';
import { TransferType, UrbStatus, type UrbResult } from '../../src/server/backends/types.js';
import { EmulatedBackend } from '../../src/server/backends/emulated/emulated-backend.js';
import {
  LoopbackDevice,
  LOOP_BULK_IN,
  LOOP_BULK_OUT,
  LOOP_INT_IN,
  LOOP_ISO_IN,
  LOOP_ISO_OUT,
  VREQ_GET_COUNTERS,
  VREQ_SET_MODE,
  loopbackPattern,
} from '../../src/server/backends/emulated/loopback.js';
import { bulkIn, bulkOut, control, makeUrb, submit } from '../../src/server/backends/emulated/urb-helpers.js';

describe('emulated loopback (source/sink)', () => {
  let backend: EmulatedBackend;
  let dev: LoopbackDevice;

  beforeEach(async () => {
    backend = new EmulatedBackend();
    dev = new LoopbackDevice({ portPath: [2], interruptIntervalMs: 5 });
    backend.add(dev);
    await backend.open(dev.id);
    await dev.setConfiguration(1);
  });
  afterEach(async () => {
    await backend.close();
  });

  async function counters() {
    const r = await control(dev, { bmRequestType: 0xc0, bRequest: VREQ_GET_COUNTERS, wValue: 0, wIndex: 0, wLength: 64 });
    expect(r.status).to.equal(UrbStatus.Success);
    const b = Buffer.from(r.data!);
    return { bytesOut: Number(b.readBigUInt64LE(0)), crc: b.readUInt32LE(8), bytesIn: Number(b.readBigUInt64LE(12)) };
  }

  it('bulk OUT sink counts bytes and CRC; bulk IN returns the pattern', async () => {
    const a = randomBytes(65536);
    const b = randomBytes(1000);
    expect((await bulkOut(dev, LOOP_BULK_OUT, a)).actualLength).to.equal(65536);
    await bulkOut(dev, LOOP_BULK_OUT, b);
    const c = await counters();
    expect(c.bytesOut).to.equal(66536);
    expect(c.crc).to.equal(crc32(b, crc32(a)));
    const r = await bulkIn(dev, LOOP_BULK_IN, 3 * 1024 * 1024 + 7);
    expect(r.status).to.equal(UrbStatus.Success);
    expect(r.actualLength).to.equal(3 * 1024 * 1024 + 7);
    expect(Buffer.compare(Buffer.from(r.data!), Buffer.from(loopbackPattern(r.actualLength, 512)))).to.equal(0);
  });

  it('many URBs in flight on one endpoint complete in submission order', async () => {
    const order: number[] = [];
    const ps: Promise<UrbResult>[] = [];
    for (let i = 0; i < 200; i++) {
      ps.push(
        bulkIn(dev, LOOP_BULK_IN, 64 * 1024, 5000 + i).then((r) => {
          order.push(i);
          return r;
        }),
      );
    }
    const rs = await Promise.all(ps);
    expect(order).to.deep.equal([...Array(200).keys()]);
    expect(rs.every((r) => r.status === UrbStatus.Success && r.actualLength === 65536)).to.equal(true);
    expect(dev.stats.byEndpoint.get(LOOP_BULK_IN)).to.equal(200);
  });

  it('loop mode echoes OUT data on IN in order, IN waits for data', async () => {
    await control(dev, { bmRequestType: 0x40, bRequest: VREQ_SET_MODE, wValue: 1, wIndex: 0, wLength: 0 });
    expect(dev.mode).to.equal('loop');
    const pendingIn = bulkIn(dev, LOOP_BULK_IN, 100);
    await new Promise((r) => setImmediate(r));
    await bulkOut(dev, LOOP_BULK_OUT, Uint8Array.from([1, 2, 3, 4]));
    expect([...(await pendingIn).data!]).to.deep.equal([1, 2, 3, 4]);
    const d = randomBytes(10000);
    await bulkOut(dev, LOOP_BULK_OUT, d);
    const r1 = await bulkIn(dev, LOOP_BULK_IN, 6000);
    const r2 = await bulkIn(dev, LOOP_BULK_IN, 6000);
    expect(Buffer.compare(Buffer.concat([r1.data!, r2.data!]), d)).to.equal(0);
  });

  it('cancel: an in-flight interrupt URB completes Cancelled', async () => {
    // The first packet is due at once; the second only after the interval, so it is surely in flight when cancelled
    // (with a 5 ms interval a busy machine could complete it first).
    const slow = new LoopbackDevice({ portPath: [3], interruptIntervalMs: 60_000 });
    backend.add(slow);
    await backend.open(slow.id);
    await slow.setConfiguration(1);
    dev = slow;
    expect((await submit(dev, makeUrb({ endpoint: LOOP_INT_IN, type: TransferType.Interrupt, length: 64 }))).status).to.equal(UrbStatus.Success);
    const urb = makeUrb({ endpoint: LOOP_INT_IN, type: TransferType.Interrupt, length: 64, id: 42 });
    const p = submit(dev, urb);
    await new Promise((r) => setImmediate(r));
    expect(dev.cancel(42)).to.equal(true);
    expect((await p).status).to.equal(UrbStatus.Cancelled);
    expect(dev.cancel(42)).to.equal(false);
  });

  it('interrupt IN delivers counter packets', async () => {
    const a = await submit(dev, makeUrb({ endpoint: LOOP_INT_IN, type: TransferType.Interrupt, length: 64 }));
    const b = await submit(dev, makeUrb({ endpoint: LOOP_INT_IN, type: TransferType.Interrupt, length: 64 }));
    const seqA = Buffer.from(a.data!).readUInt32LE(0);
    const seqB = Buffer.from(b.data!).readUInt32LE(0);
    expect(a.actualLength).to.equal(8);
    expect(seqB).to.equal(seqA + 1);
    expect(Buffer.from(b.data!).readUInt32LE(4)).to.equal(~seqB >>> 0);
  });

  it('halt: SET_FEATURE(HALT) stalls queued and new URBs until clear halt', async () => {
    const r = await control(dev, { bmRequestType: 0x02, bRequest: 0x03, wValue: 0, wIndex: LOOP_BULK_IN, wLength: 0 });
    expect(r.status).to.equal(UrbStatus.Success);
    const st = await control(dev, { bmRequestType: 0x82, bRequest: 0x00, wValue: 0, wIndex: LOOP_BULK_IN, wLength: 2 });
    expect([...st.data!]).to.deep.equal([1, 0]);
    const before = dev.stats.executed;
    const rs = await Promise.all([bulkIn(dev, LOOP_BULK_IN, 512), bulkIn(dev, LOOP_BULK_IN, 512)]);
    expect(rs.map((x) => x.status)).to.deep.equal([UrbStatus.Stall, UrbStatus.Stall]);
    expect(dev.stats.executed).to.equal(before); // stalled by a halted endpoint: not executed
    // Other endpoints are unaffected.
    expect((await bulkOut(dev, LOOP_BULK_OUT, new Uint8Array(8))).status).to.equal(UrbStatus.Success);
    await dev.clearHalt(LOOP_BULK_IN);
    expect(dev.isHalted(LOOP_BULK_IN)).to.equal(false);
    expect((await bulkIn(dev, LOOP_BULK_IN, 512)).status).to.equal(UrbStatus.Success);
  });

  it('isochronous IN/OUT on alternate setting 1 with per-packet results', async () => {
    const noIso = await submit(dev, makeUrb({ endpoint: LOOP_ISO_IN, type: TransferType.Isochronous, length: 3072, isoPackets: [{ length: 1024, status: 0, actualLength: 0 }] }));
    expect(noIso.status).to.equal(UrbStatus.Inval); // not in alt 0
    await dev.setInterface(0, 1);
    const packets = [1024, 1024, 512, 2000].map((length) => ({ length, status: UrbStatus.Success, actualLength: 0 }));
    const r = await submit(dev, makeUrb({ endpoint: LOOP_ISO_IN, type: TransferType.Isochronous, length: 4560, isoPackets: packets }));
    expect(r.status).to.equal(UrbStatus.Success);
    expect(r.isoPackets!.map((p) => p.actualLength)).to.deep.equal([1024, 1024, 512, 1024]);
    expect(r.isoPackets!.every((p) => p.status === UrbStatus.Success)).to.equal(true);
    expect(r.actualLength).to.equal(3584);
    const data = Buffer.from(r.data!);
    expect(data.readUInt32LE(0) + 1).to.equal(data.readUInt32LE(1024));
    expect(data[5]).to.equal(5);
    const out = await submit(
      dev,
      makeUrb({
        endpoint: LOOP_ISO_OUT,
        type: TransferType.Isochronous,
        data: new Uint8Array(300),
        isoPackets: [100, 200].map((length) => ({ length, status: 0, actualLength: 0 })),
      }),
    );
    expect(out.isoPackets!.map((p) => p.actualLength)).to.deep.equal([100, 200]);
    expect(dev.counters.isoOutBytes).to.equal(300);
  });

  it('vendor control write/read buffer round-trips', async () => {
    const d = Uint8Array.from([5, 6, 7, 8, 9]);
    expect((await control(dev, { bmRequestType: 0x40, bRequest: 0x5b, wValue: 0, wIndex: 0, wLength: 5 }, d)).status).to.equal(
      UrbStatus.Success,
    );
    const r = await control(dev, { bmRequestType: 0xc0, bRequest: 0x5c, wValue: 0, wIndex: 0, wLength: 5 });
    expect([...r.data!]).to.deep.equal([5, 6, 7, 8, 9]);
    expect((await control(dev, { bmRequestType: 0xc0, bRequest: 0x77, wValue: 0, wIndex: 0, wLength: 5 })).status).to.equal(
      UrbStatus.Stall,
    );
  });

  it('pushes bulk data fast (64 KiB URBs, 32 in flight)', async function () {
    const buf = randomBytes(65536);
    const total = 256 * 1024 * 1024;
    const t0 = process.hrtime.bigint();
    let sent = 0;
    const inflight = new Set<Promise<unknown>>();
    while (sent < total) {
      while (inflight.size < 32 && sent < total) {
        const p: Promise<unknown> = bulkOut(dev, LOOP_BULK_OUT, buf).then((): boolean => inflight.delete(p));
        inflight.add(p);
        sent += buf.length;
      }
      await Promise.race(inflight);
    }
    await Promise.all(inflight);
    const secs = Number(process.hrtime.bigint() - t0) / 1e9;
    const mbps = total / secs / 1e6;
    expect(dev.counters.bytesOut).to.equal(total);
    expect(mbps).to.be.greaterThan(200);
  });
});
