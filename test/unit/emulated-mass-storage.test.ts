import { expect } from 'chai';
import { mkdtemp, rm, readFile, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createHash, randomBytes } from 'node:crypto';
import { Speed, TransferType, UrbStatus, type UrbResult } from '../../src/server/backends/types.js';
import { MassStorageDevice, MSC_BULK_IN, MSC_BULK_OUT } from '../../src/server/backends/emulated/mass-storage.js';
import { EmulatedBackend } from '../../src/server/backends/emulated/emulated-backend.js';
import { bulkIn, bulkOut, control, makeUrb, submit } from '../../src/server/backends/emulated/urb-helpers.js';

function cbw(tag: number, length: number, dirIn: boolean, cdb: number[], lun = 0): Uint8Array {
  const b = new Uint8Array(31);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, 0x43425355, true);
  dv.setUint32(4, tag, true);
  dv.setUint32(8, length, true);
  b[12] = dirIn ? 0x80 : 0;
  b[13] = lun;
  b[14] = cdb.length;
  b.set(cdb, 15);
  return b;
}

interface Csw {
  signature: number;
  tag: number;
  residue: number;
  status: number;
}
function parseCsw(r: UrbResult): Csw {
  expect(r.status).to.equal(UrbStatus.Success);
  expect(r.actualLength).to.equal(13);
  const d = r.data!;
  const dv = new DataView(d.buffer, d.byteOffset, d.byteLength);
  return { signature: dv.getUint32(0, true), tag: dv.getUint32(4, true), residue: dv.getUint32(8, true), status: d[12]! };
}

const be32 = (v: number) => [(v >>> 24) & 0xff, (v >>> 16) & 0xff, (v >>> 8) & 0xff, v & 0xff];
const be16 = (v: number) => [(v >> 8) & 0xff, v & 0xff];

describe('emulated mass storage (BOT/SCSI)', () => {
  let dir: string;
  let dev: MassStorageDevice;
  let backend: EmulatedBackend;
  let tag = 1;
  const SIZE = 8 * 1024 * 1024;

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'usbroam-msc-'));
    dev = await MassStorageDevice.create({
      imagePath: join(dir, 'disk.img'),
      sizeBytes: SIZE,
      vendor: 'ACME',
      productName: 'Test Disk',
      revision: '1.23',
      serial: 'SER123',
    });
    backend = new EmulatedBackend();
    backend.add(dev);
    await backend.open(dev.id);
    await dev.setConfiguration(1);
  });

  afterEach(async () => {
    await backend.close();
    await rm(dir, { recursive: true, force: true });
  });

  /** Run one command; data-in phase split into URBs of `chunk` bytes. */
  async function command(
    cdb: number[],
    opts: { inLength?: number; out?: Uint8Array; chunk?: number } = {},
  ): Promise<{ csw: Csw; data: Buffer; myTag: number }> {
    const myTag = tag++;
    const inLength = opts.inLength ?? 0;
    const len = opts.out ? opts.out.length : inLength;
    const r = await bulkOut(dev, MSC_BULK_OUT, cbw(myTag, len, !opts.out, cdb));
    expect(r.status).to.equal(UrbStatus.Success);
    const chunk = opts.chunk ?? 65536;
    const parts: Buffer[] = [];
    if (opts.out) {
      const ps: Promise<UrbResult>[] = [];
      for (let off = 0; off < opts.out.length; off += chunk) {
        ps.push(bulkOut(dev, MSC_BULK_OUT, opts.out.subarray(off, off + chunk)));
      }
      for (const x of await Promise.all(ps)) expect(x.status).to.equal(UrbStatus.Success);
    } else if (inLength > 0) {
      // Pipelined: all data URBs in flight at once.
      const ps: Promise<UrbResult>[] = [];
      for (let off = 0; off < inLength; off += chunk) ps.push(bulkIn(dev, MSC_BULK_IN, Math.min(chunk, inLength - off)));
      for (const x of await Promise.all(ps)) {
        expect(x.status).to.equal(UrbStatus.Success);
        parts.push(Buffer.from(x.data!));
        if (x.actualLength < chunk) break;
      }
    }
    const csw = parseCsw(await bulkIn(dev, MSC_BULK_IN, 13));
    expect(csw.signature).to.equal(0x53425355);
    expect(csw.tag).to.equal(myTag);
    return { csw, data: Buffer.concat(parts), myTag };
  }

  async function requestSense(): Promise<[number, number, number]> {
    const { csw, data } = await command([0x03, 0, 0, 0, 18, 0], { inLength: 18 });
    expect(csw.status).to.equal(0);
    expect(data[0]).to.equal(0x70);
    return [data[2]! & 0x0f, data[12]!, data[13]!];
  }

  it('describes itself as a bulk-only SCSI mass storage device', () => {
    const info = dev.info;
    expect(info.configurations[0]!.interfaces[0]).to.include({ interfaceClass: 8, interfaceSubclass: 6, interfaceProtocol: 0x50 });
    expect(info.endpoints.map((e) => [e.address, e.type, e.maxPacketSize])).to.deep.equal([
      [MSC_BULK_IN, TransferType.Bulk, 512],
      [MSC_BULK_OUT, TransferType.Bulk, 512],
    ]);
    expect(info.serial).to.equal('SER123');
  });

  it('answers Get Max LUN with 0', async () => {
    const r = await control(dev, { bmRequestType: 0xa1, bRequest: 0xfe, wValue: 0, wIndex: 0, wLength: 1 });
    expect(r.status).to.equal(UrbStatus.Success);
    expect([...r.data!]).to.deep.equal([0]);
  });

  it('INQUIRY returns standard data with the configured strings', async () => {
    const { csw, data } = await command([0x12, 0, 0, 0, 36, 0], { inLength: 36 });
    expect(csw.status).to.equal(0);
    expect(csw.residue).to.equal(0);
    expect(data.length).to.equal(36);
    expect(data[0]).to.equal(0); // direct access block device
    expect(data[4]).to.equal(31);
    expect(data.subarray(8, 16).toString('latin1')).to.equal('ACME    ');
    expect(data.subarray(16, 32).toString('latin1')).to.equal('Test Disk       ');
    expect(data.subarray(32, 36).toString('latin1')).to.equal('1.23');
  });

  it('INQUIRY with allocation length larger than available gives a short transfer and residue', async () => {
    const { csw, data } = await command([0x12, 0, 0, 0, 96, 0], { inLength: 96 });
    expect(data.length).to.equal(36);
    expect(csw.status).to.equal(0);
    expect(csw.residue).to.equal(60);
  });

  it('INQUIRY EVPD pages: supported list, serial, and unsupported page is rejected', async () => {
    const sup = await command([0x12, 1, 0x00, 0, 255, 0], { inLength: 255 });
    expect(sup.csw.status).to.equal(0);
    expect([...sup.data.subarray(4, 4 + sup.data[3]!)]).to.deep.equal([0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
    const ser = await command([0x12, 1, 0x80, 0, 255, 0], { inLength: 255 });
    expect(ser.data.subarray(4, 4 + ser.data[3]!).toString('latin1')).to.equal('SER123');
    const b1 = await command([0x12, 1, 0xb1, 0, 64, 0], { inLength: 64 });
    expect(b1.data[1]).to.equal(0xb1);
    expect((b1.data[4]! << 8) | b1.data[5]!).to.equal(1); // non-rotating
    const bad = await command([0x12, 1, 0x99, 0, 255, 0], { inLength: 255 });
    expect(bad.csw.status).to.equal(1);
    expect(bad.data.length).to.equal(0);
    expect(await requestSense()).to.deep.equal([0x05, 0x24, 0x00]);
  });

  it('READ CAPACITY(10) and (16) report the image size', async () => {
    const blocks = SIZE / 512;
    const rc10 = await command([0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], { inLength: 8 });
    expect(rc10.csw.status).to.equal(0);
    expect(rc10.data.readUInt32BE(0)).to.equal(blocks - 1);
    expect(rc10.data.readUInt32BE(4)).to.equal(512);
    const rc16 = await command([0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, ...be32(32), 0, 0], { inLength: 32 });
    expect(rc16.csw.status).to.equal(0);
    expect(Number(rc16.data.readBigUInt64BE(0))).to.equal(blocks - 1);
    expect(rc16.data.readUInt32BE(8)).to.equal(512);
  });

  it('TEST UNIT READY, PREVENT ALLOW, START STOP succeed', async () => {
    for (const cdb of [[0, 0, 0, 0, 0, 0], [0x1e, 0, 0, 0, 1, 0], [0x1b, 0, 0, 0, 1, 0]]) {
      const { csw } = await command(cdb);
      expect(csw.status).to.equal(0);
    }
  });

  it('WRITE(10) then READ(10) of multi-URB data round-trips and lands in the image file', async () => {
    const lba = 1000;
    const blocks = 1024; // 512 KiB
    const payload = randomBytes(blocks * 512);
    const w = await command([0x2a, 0, ...be32(lba), 0, ...be16(blocks), 0], { out: payload, chunk: 120 * 1024 });
    expect(w.csw.status).to.equal(0);
    expect(w.csw.residue).to.equal(0);
    const r = await command([0x28, 0, ...be32(lba), 0, ...be16(blocks), 0], { inLength: payload.length, chunk: 240 * 1024 });
    expect(r.csw.status).to.equal(0);
    expect(r.csw.residue).to.equal(0);
    const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');
    expect(sha(r.data)).to.equal(sha(payload));
    const file = await readFile(join(dir, 'disk.img'));
    expect(file.length).to.equal(SIZE);
    expect(sha(file.subarray(lba * 512, (lba + blocks) * 512))).to.equal(sha(payload));
    expect(file.subarray(lba * 512 - 512, lba * 512).every((x) => x === 0)).to.equal(true);
    expect(dev.scsiStats.bytesWritten).to.equal(payload.length);
  });

  it('READ(16)/WRITE(16) and READ(6)/WRITE(6) address the same blocks', async () => {
    const payload = randomBytes(4 * 512);
    const w = await command([0x8a, 0, 0, 0, 0, 0, ...be32(77), ...be32(4), 0, 0], { out: payload });
    expect(w.csw.status).to.equal(0);
    const r6 = await command([0x08, 0, 0, 77, 4, 0], { inLength: 2048 });
    expect(r6.csw.status).to.equal(0);
    expect(Buffer.compare(r6.data, payload)).to.equal(0);
    const p2 = randomBytes(512);
    expect((await command([0x0a, 0, 0, 78, 1, 0], { out: p2 })).csw.status).to.equal(0);
    const r16 = await command([0x88, 0, 0, 0, 0, 0, ...be32(78), ...be32(1), 0, 0], { inLength: 512 });
    expect(Buffer.compare(r16.data, p2)).to.equal(0);
  });

  it('invalid opcode -> CHECK CONDITION, REQUEST SENSE gives 05/20/00 and then clears', async () => {
    const { csw } = await command([0xe7, 0, 0, 0, 0, 0]);
    expect(csw.status).to.equal(1);
    expect(await requestSense()).to.deep.equal([0x05, 0x20, 0x00]);
    expect(await requestSense()).to.deep.equal([0, 0, 0]);
  });

  it('LBA out of range -> ILLEGAL REQUEST / 21/00, no data, residue = H', async () => {
    const blocks = SIZE / 512;
    const r = await command([0x28, 0, ...be32(blocks - 1), 0, ...be16(2), 0], { inLength: 1024 });
    expect(r.csw.status).to.equal(1);
    expect(r.data.length).to.equal(0);
    expect(r.csw.residue).to.equal(1024);
    expect(await requestSense()).to.deep.equal([0x05, 0x21, 0x00]);
    const w = await command([0x2a, 0, ...be32(blocks), 0, ...be16(1), 0], { out: new Uint8Array(512) });
    expect(w.csw.status).to.equal(1);
    expect(await requestSense()).to.deep.equal([0x05, 0x21, 0x00]);
  });

  it('MODE SENSE(6)/(10): all pages, caching page, DBD and allocation truncation', async () => {
    const all = await command([0x1a, 0, 0x3f, 0, 192, 0], { inLength: 192 });
    expect(all.csw.status).to.equal(0);
    expect(all.data[0]).to.equal(all.data.length - 1);
    expect(all.data[2]! & 0x80).to.equal(0); // not write-protected
    expect(all.data[3]).to.equal(8);
    expect(all.data[4 + 8]).to.equal(0x08); // caching page first
    const cache = await command([0x1a, 0x08, 0x08, 0, 255, 0], { inLength: 255 });
    expect(cache.data[3]).to.equal(0); // DBD
    expect(cache.data.length).to.equal(4 + 20);
    expect(cache.data[4]).to.equal(0x08);
    expect(cache.data[6]! & 0x04).to.equal(0x04); // WCE
    const trunc = await command([0x1a, 0, 0x3f, 0, 4, 0], { inLength: 4 });
    expect(trunc.data.length).to.equal(4);
    expect(trunc.data[0]).to.equal(all.data[0]);
    const ten = await command([0x5a, 0x08, 0x1c, 0, 0, 0, 0, ...be16(255), 0], { inLength: 255 });
    expect(ten.csw.status).to.equal(0);
    expect(ten.data.readUInt16BE(0)).to.equal(ten.data.length - 2);
    expect(ten.data[8]).to.equal(0x1c);
    const bad = await command([0x1a, 0, 0x05, 0, 255, 0], { inLength: 255 });
    expect(bad.csw.status).to.equal(1);
    expect(await requestSense()).to.deep.equal([0x05, 0x24, 0x00]);
  });

  it('read-only image: WP bit set and WRITE fails with DATA PROTECT', async () => {
    await backend.close();
    const ro = await MassStorageDevice.create({ imagePath: join(dir, 'disk.img'), readOnly: true, portPath: [9] });
    backend = new EmulatedBackend();
    backend.add(ro);
    await backend.open(ro.id);
    await ro.setConfiguration(1);
    dev = ro;
    const ms = await command([0x1a, 0, 0x3f, 0, 192, 0], { inLength: 192 });
    expect(ms.data[2]! & 0x80).to.equal(0x80);
    const w = await command([0x2a, 0, ...be32(0), 0, ...be16(1), 0], { out: new Uint8Array(512).fill(1) });
    expect(w.csw.status).to.equal(1);
    expect(await requestSense()).to.deep.equal([0x07, 0x27, 0x00]);
  });

  it('SYNCHRONIZE CACHE(10) and (16) succeed and fsync the image', async () => {
    const before = dev.scsiStats.syncs;
    expect((await command([0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0])).csw.status).to.equal(0);
    expect((await command([0x91, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])).csw.status).to.equal(0);
    expect(dev.scsiStats.syncs).to.equal(before + 2);
  });

  it('invalid CBW stalls both bulk endpoints until reset recovery', async () => {
    const bad = cbw(99, 0, false, [0]);
    bad[0] = 0x00; // wrong signature
    expect((await bulkOut(dev, MSC_BULK_OUT, bad)).status).to.equal(UrbStatus.Stall);
    expect(dev.isHalted(MSC_BULK_IN)).to.equal(true);
    expect(dev.isHalted(MSC_BULK_OUT)).to.equal(true);
    expect((await bulkIn(dev, MSC_BULK_IN, 13)).status).to.equal(UrbStatus.Stall);
    // A 30-byte CBW is also invalid (stays stalled).
    expect((await bulkOut(dev, MSC_BULK_OUT, cbw(1, 0, false, [0]).subarray(0, 30))).status).to.equal(UrbStatus.Stall);
    // Reset recovery: BOMS reset, clear halt IN, clear halt OUT (via CLEAR_FEATURE).
    const rr = await control(dev, { bmRequestType: 0x21, bRequest: 0xff, wValue: 0, wIndex: 0, wLength: 0 });
    expect(rr.status).to.equal(UrbStatus.Success);
    for (const ep of [MSC_BULK_IN, MSC_BULK_OUT]) {
      const cf = await control(dev, { bmRequestType: 0x02, bRequest: 0x01, wValue: 0, wIndex: ep, wLength: 0 });
      expect(cf.status).to.equal(UrbStatus.Success);
    }
    expect(dev.isHalted(MSC_BULK_IN)).to.equal(false);
    const { csw } = await command([0, 0, 0, 0, 0, 0]);
    expect(csw.status).to.equal(0);
  });

  it('phase error: host expects IN but the command writes (case 8) stalls bulk-IN, CSW status 2', async () => {
    const myTag = tag++;
    expect((await bulkOut(dev, MSC_BULK_OUT, cbw(myTag, 512, true, [0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0]))).status).to.equal(
      UrbStatus.Success,
    );
    expect((await bulkIn(dev, MSC_BULK_IN, 512)).status).to.equal(UrbStatus.Stall);
    await dev.clearHalt(MSC_BULK_IN);
    const csw = parseCsw(await bulkIn(dev, MSC_BULK_IN, 13));
    expect(csw.tag).to.equal(myTag);
    expect(csw.status).to.equal(2);
  });

  it('host expects no data but the device has data (case 2) -> phase error', async () => {
    const myTag = tag++;
    await bulkOut(dev, MSC_BULK_OUT, cbw(myTag, 0, true, [0x12, 0, 0, 0, 36, 0]));
    const csw = parseCsw(await bulkIn(dev, MSC_BULK_IN, 13));
    expect(csw.status).to.equal(2);
  });

  it('a CSW read submitted before the CBW waits for the command (NAK), then completes', async () => {
    const myTag = tag++;
    const early = bulkIn(dev, MSC_BULK_IN, 13);
    let settled = false;
    void early.then(() => (settled = true));
    await new Promise((r) => setImmediate(r));
    expect(settled).to.equal(false);
    await bulkOut(dev, MSC_BULK_OUT, cbw(myTag, 0, false, [0, 0, 0, 0, 0, 0]));
    const csw = parseCsw(await early);
    expect(csw.tag).to.equal(myTag);
    expect(csw.status).to.equal(0);
  });

  it('port reset returns to unconfigured and cancels a waiting URB', async () => {
    const waiting = bulkIn(dev, MSC_BULK_IN, 13);
    await new Promise((r) => setImmediate(r));
    await dev.reset();
    expect((await waiting).status).to.equal(UrbStatus.Cancelled);
    expect(await dev.getConfiguration()).to.equal(0);
    expect((await bulkIn(dev, MSC_BULK_IN, 13)).status).to.equal(UrbStatus.Inval);
  });

  it('latencyMs holds each READ/WRITE data URB in flight until the delay ends; commands without disk data do not wait', async () => {
    const slow = await MassStorageDevice.create({ imagePath: join(dir, 'slow.img'), sizeBytes: SIZE, latencyMs: 60_000 });
    const b = new EmulatedBackend();
    b.add(slow);
    await b.open(slow.id);
    await slow.setConfiguration(1);
    try {
      // INQUIRY moves no disk data: its data and CSW complete although the latency is a minute.
      expect((await bulkOut(slow, MSC_BULK_OUT, cbw(1, 36, true, [0x12, 0, 0, 0, 36, 0]))).status).to.equal(UrbStatus.Success);
      expect((await bulkIn(slow, MSC_BULK_IN, 36)).actualLength).to.equal(36);
      expect(parseCsw(await bulkIn(slow, MSC_BULK_IN, 13)).status).to.equal(0);
      // READ(10) of block 0: the CBW completes, the data URB stays in flight (an image read completes meanwhile).
      expect((await bulkOut(slow, MSC_BULK_OUT, cbw(2, 512, true, [0x28, 0, ...be32(0), 0, ...be16(1), 0]))).status).to.equal(UrbStatus.Success);
      const id = 777;
      let settled = false;
      const data = bulkIn(slow, MSC_BULK_IN, 512, id).finally(() => (settled = true));
      await readFile(join(dir, 'slow.img'));
      await new Promise((r) => setImmediate(r));
      expect(settled).to.equal(false);
      expect(slow.cancel(id)).to.equal(true);
      expect((await data).status).to.equal(UrbStatus.Cancelled);
    } finally {
      await b.close();
    }
    // A short latency: the data arrives after it, intact.
    const d2 = await MassStorageDevice.create({ imagePath: join(dir, 'slow.img'), latencyMs: 5 });
    const b2 = new EmulatedBackend();
    b2.add(d2);
    await b2.open(d2.id);
    await d2.setConfiguration(1);
    try {
      const payload = randomBytes(1024);
      expect((await bulkOut(d2, MSC_BULK_OUT, cbw(3, 1024, false, [0x2a, 0, ...be32(4), 0, ...be16(2), 0]))).status).to.equal(UrbStatus.Success);
      expect((await bulkOut(d2, MSC_BULK_OUT, payload)).status).to.equal(UrbStatus.Success);
      expect(parseCsw(await bulkIn(d2, MSC_BULK_IN, 13)).status).to.equal(0);
      expect((await bulkOut(d2, MSC_BULK_OUT, cbw(4, 1024, true, [0x28, 0, ...be32(4), 0, ...be16(2), 0]))).status).to.equal(UrbStatus.Success);
      const back = await bulkIn(d2, MSC_BULK_IN, 1024);
      expect(Buffer.from(back.data!).equals(payload)).to.equal(true);
      expect(parseCsw(await bulkIn(d2, MSC_BULK_IN, 13)).status).to.equal(0);
    } finally {
      await b2.close();
    }
    expect(() => new MassStorageDevice({ imagePath: join(dir, 'x.img'), latencyMs: -1 })).to.throw(/disk latency/);
  });

  it('creates a sparse image of the requested size', async () => {
    const st = await stat(join(dir, 'disk.img'));
    expect(st.size).to.equal(SIZE);
    expect(dev.capacityBlocks).to.equal(SIZE / 512);
  });

  it('full-speed variant uses 64-byte bulk packets; SuperSpeed has companions and BOS', async () => {
    const fs = new MassStorageDevice({ imagePath: join(dir, 'disk.img'), speed: Speed.Full, portPath: [5] });
    expect(fs.info.configurations[0]!.endpoints.every((e) => e.maxPacketSize === 64)).to.equal(true);
    const ss = new MassStorageDevice({ imagePath: join(dir, 'disk.img'), speed: Speed.Super, portPath: [6] });
    expect(ss.info.bcdUsb).to.equal(0x0320);
    expect(ss.info.configurations[0]!.endpoints.every((e) => e.maxPacketSize === 1024)).to.equal(true);
    expect(ss.descriptors.bos).to.not.equal(undefined);
    expect(ss.descriptors.configs[0]!.includes(0x30)).to.equal(true);
  });

  it('submits with wrong transfer type or unknown endpoint complete Inval', async () => {
    const r1 = await submit(dev, makeUrb({ endpoint: MSC_BULK_IN, type: TransferType.Interrupt, length: 13 }));
    expect(r1.status).to.equal(UrbStatus.Inval);
    const r2 = await submit(dev, makeUrb({ endpoint: 0x85, type: TransferType.Bulk, length: 13 }));
    expect(r2.status).to.equal(UrbStatus.Inval);
  });

  it('Ho > Do (case 11): excess OUT data is discarded, residue reported; Ho < Do (case 13) writes nothing, phase error', async () => {
    const p = Buffer.alloc(1024, 0xab);
    const myTag = tag++;
    await bulkOut(dev, MSC_BULK_OUT, cbw(myTag, 1024, false, [0x2a, 0, ...be32(10), 0, ...be16(1), 0]));
    expect((await bulkOut(dev, MSC_BULK_OUT, p)).status).to.equal(UrbStatus.Success);
    const c11 = parseCsw(await bulkIn(dev, MSC_BULK_IN, 13));
    expect(c11.status).to.equal(0);
    expect(c11.residue).to.equal(512);
    const t13 = tag++;
    await bulkOut(dev, MSC_BULK_OUT, cbw(t13, 512, false, [0x2a, 0, ...be32(20), 0, ...be16(2), 0]));
    await bulkOut(dev, MSC_BULK_OUT, Buffer.alloc(512, 0xcd));
    const c13 = parseCsw(await bulkIn(dev, MSC_BULK_IN, 13));
    expect(c13.status).to.equal(2);
    const file = await readFile(join(dir, 'disk.img'));
    expect(file[10 * 512]).to.equal(0xab);
    expect(file[10 * 512 + 512]).to.equal(0); // only D bytes written in case 11
    expect(file[20 * 512]).to.equal(0); // nothing written in case 13
  });

  it('Ho <> Di (case 10): bulk-OUT stalls, CSW phase error', async () => {
    const myTag = tag++;
    await bulkOut(dev, MSC_BULK_OUT, cbw(myTag, 36, false, [0x12, 0, 0, 0, 36, 0]));
    expect((await bulkOut(dev, MSC_BULK_OUT, new Uint8Array(36))).status).to.equal(UrbStatus.Stall);
    await dev.clearHalt(MSC_BULK_OUT);
    const csw = parseCsw(await bulkIn(dev, MSC_BULK_IN, 13));
    expect(csw.tag).to.equal(myTag);
    expect(csw.status).to.equal(2);
  });

  it('counts each bulk URB of a command exactly once', async () => {
    const before = dev.stats.executed;
    const payload = randomBytes(64 * 1024);
    await command([0x2a, 0, ...be32(0), 0, ...be16(128), 0], { out: payload, chunk: 16 * 1024 });
    // CBW + 4 data URBs + CSW
    expect(dev.stats.executed - before).to.equal(6);
    expect(dev.stats.byEndpoint.get(MSC_BULK_OUT)).to.be.at.least(5);
  });
});
