import { expect } from 'chai';
import { mkdtemp, rm, open } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { Speed, TransferType, UrbStatus, type UrbResult } from '../../src/server/backends/types.js';
import { EmulatedBackend } from '../../src/server/backends/emulated/emulated-backend.js';
import { UasDevice, UAS_COMMAND_OUT, UAS_DATA_IN, UAS_DATA_OUT, UAS_STATUS_IN } from '../../src/server/backends/emulated/uas.js';
import { MSC_BULK_IN, MSC_BULK_OUT } from '../../src/server/backends/emulated/mass-storage.js';
import { commandIu, taskManagementIu, TMF_ABORT_TASK } from '../../src/server/backends/emulated/uas-iu.js';
import { bulkIn, getDescriptor, makeUrb, submit } from '../../src/server/backends/emulated/urb-helpers.js';

const be32 = (v: number) => [(v >>> 24) & 0xff, (v >>> 16) & 0xff, (v >>> 8) & 0xff, v & 0xff];
const be16 = (v: number) => [(v >> 8) & 0xff, v & 0xff];
const read10 = (lba: number, blocks: number) => Uint8Array.from([0x28, 0, ...be32(lba), 0, ...be16(blocks), 0]);
const write10 = (lba: number, blocks: number) => Uint8Array.from([0x2a, 0, ...be32(lba), 0, ...be16(blocks), 0]);
const STREAM_EPS = [UAS_STATUS_IN, UAS_DATA_IN, UAS_DATA_OUT];
const SIZE = 4 * 1024 * 1024;

function onStream(dev: UasDevice, endpoint: number, streamId: number, o: { length?: number; data?: Uint8Array }): Promise<UrbResult> {
  return submit(dev, makeUrb({ endpoint, type: TransferType.Bulk, streamId, length: o.length, data: o.data }));
}
const sendIu = (dev: UasDevice, iu: Uint8Array) => submit(dev, makeUrb({ endpoint: UAS_COMMAND_OUT, type: TransferType.Bulk, data: iu }));
const hex = (b: Uint8Array | undefined) => Buffer.from(b ?? []).toString('hex');

describe('emulated UAS disk', () => {
  let dir: string;
  let dev: UasDevice;
  let backend: EmulatedBackend;

  async function make(speed: Speed): Promise<void> {
    dev = await UasDevice.create({ imagePath: join(dir, 'uas.img'), sizeBytes: SIZE, speed });
    backend = new EmulatedBackend();
    backend.add(dev);
    await backend.open(dev.id);
    await dev.setConfiguration(1);
  }

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'usbroam-uas-'));
  });
  afterEach(async () => {
    await backend?.close();
    await rm(dir, { recursive: true, force: true });
  });

  async function uasWithStreams(): Promise<void> {
    await make(Speed.Super);
    await dev.setInterface(0, 1);
    expect(await dev.allocBulkStreams(STREAM_EPS, 32)).to.equal(32);
  }

  it('SuperSpeed descriptors: alt 0 BOT, alt 1 UAS with four pipes, pipe usage after each companion, 32 streams on status/data', async () => {
    await make(Speed.Super);
    const head = (await getDescriptor(dev, 2, 0, 9)).data!;
    const cfg = (await getDescriptor(dev, 2, 0, head[2]! | (head[3]! << 8))).data!;
    const descs: string[] = [];
    for (let o = 0; o < cfg.length; o += cfg[o]!) descs.push(hex(cfg.subarray(o, o + cfg[o]!)));
    expect(descs.slice(1)).to.deep.equal([
      '090400000208065000', // alt 0: BOT
      '07058102000400', '06300f000000',
      '07050202000400', '06300f000000',
      '090400010408066200', // alt 1: UAS
      '07050102000400', '06300f000000', '04240100', // command: no streams
      '07058202000400', '06300f050000', '04240200', // status: 2^5 streams
      '07058302000400', '06300f050000', '04240300', // data in
      '07050402000400', '06300f050000', '04240400', // data out
    ]);
    await dev.setInterface(0, 1);
    expect(dev.info.interfaces[0]!.interfaceProtocol).to.equal(0x62);
    expect(dev.info.endpoints.map((e) => [e.address, e.maxStreams])).to.deep.equal([[0x01, 0], [0x82, 32], [0x83, 32], [0x04, 32]]);
  });

  it('high speed: only the BOT alternate setting (UAS here is streams only)', async () => {
    await make(Speed.High);
    expect(dev.info.configurations[0]!.interfaces.map((i) => [i.alternateSetting, i.interfaceProtocol])).to.deep.equal([[0, 0x50]]);
    await dev.setConfiguration(1);
    await expectReject(dev.setInterface(0, 1));
  });

  it('streams: alloc checks the endpoints and the count; stream ids outside 1..n and stream 0 on a stream endpoint are INVAL', async () => {
    await make(Speed.Super);
    await dev.setInterface(0, 1);
    await expectReject(dev.allocBulkStreams(STREAM_EPS, 64), /supports 32 streams, 64 asked/);
    await expectReject(dev.allocBulkStreams([UAS_COMMAND_OUT], 2), /supports 0 streams/);
    await expectReject(dev.allocBulkStreams([0x81], 2), /not an active bulk endpoint/);
    expect((await onStream(dev, UAS_DATA_IN, 1, { length: 512 })).status).to.equal(UrbStatus.Inval);
    expect(await dev.allocBulkStreams(STREAM_EPS, 16)).to.equal(16);
    expect((await onStream(dev, UAS_DATA_IN, 0, { length: 512 })).status).to.equal(UrbStatus.Inval);
    expect((await onStream(dev, UAS_DATA_IN, 17, { length: 512 })).status).to.equal(UrbStatus.Inval);
    await expectReject(dev.allocBulkStreams(STREAM_EPS, 16), /already has streams/);
    const waiting = onStream(dev, UAS_STATUS_IN, 3, { length: 64 });
    await dev.freeBulkStreams(STREAM_EPS);
    expect((await waiting).status).to.equal(UrbStatus.Cancelled);
    expect(dev.streamsOf(UAS_DATA_IN)).to.equal(0);
    await expectReject(dev.freeBulkStreams(STREAM_EPS), /has no streams/);
  });

  it('READ(10): status and data URBs submitted before the command IU; data on the tag\'s stream, then a GOOD sense IU', async () => {
    await uasWithStreams();
    const pattern = randomBytes(8 * 512);
    const fh = await open(join(dir, 'uas.img'), 'r+');
    await fh.write(pattern, 0, pattern.length, 2 * 512);
    await fh.close();
    const status = onStream(dev, UAS_STATUS_IN, 5, { length: 112 });
    const data = onStream(dev, UAS_DATA_IN, 5, { length: pattern.length });
    expect((await sendIu(dev, commandIu(5, read10(2, 8)))).status).to.equal(UrbStatus.Success);
    const d = await data;
    expect(d.status).to.equal(UrbStatus.Success);
    expect(Buffer.from(d.data!.subarray(0, d.actualLength)).equals(pattern)).to.equal(true);
    const s = await status;
    expect(hex(s.data)).to.equal('03000005' + '00'.repeat(12)); // SENSE IU, tag 5, GOOD, no sense data
    expect(dev.tasksInFlight).to.equal(0);
  });

  it('WRITE(10) on a stream lands in the image; READ(10) on another stream reads it back', async () => {
    await uasWithStreams();
    const payload = randomBytes(16 * 512);
    const status = onStream(dev, UAS_STATUS_IN, 9, { length: 112 });
    expect((await sendIu(dev, commandIu(9, write10(100, 16)))).status).to.equal(UrbStatus.Success);
    const w = await onStream(dev, UAS_DATA_OUT, 9, { data: payload });
    expect([w.status, w.actualLength]).to.deep.equal([UrbStatus.Success, payload.length]);
    expect((await status).data![6]).to.equal(0);
    const fh = await open(join(dir, 'uas.img'), 'r');
    const back = Buffer.alloc(payload.length);
    await fh.read(back, 0, back.length, 100 * 512);
    await fh.close();
    expect(back.equals(payload)).to.equal(true);
    const status2 = onStream(dev, UAS_STATUS_IN, 31, { length: 112 });
    await sendIu(dev, commandIu(31, read10(100, 16)));
    const r = await onStream(dev, UAS_DATA_IN, 31, { length: payload.length });
    expect(Buffer.from(r.data!).equals(payload)).to.equal(true);
    expect(hex((await status2).data)).to.equal('0300001f' + '00'.repeat(12));
  });

  it('a URB waiting on one stream does not hold up another stream of the same endpoint', async () => {
    await uasWithStreams();
    const stuckData = onStream(dev, UAS_DATA_IN, 7, { length: 512 });
    const stuckStatus = onStream(dev, UAS_STATUS_IN, 7, { length: 112 });
    const status = onStream(dev, UAS_STATUS_IN, 2, { length: 112 });
    const data = onStream(dev, UAS_DATA_IN, 2, { length: 512 });
    await sendIu(dev, commandIu(2, read10(0, 1)));
    expect((await data).actualLength).to.equal(512);
    expect((await status).data![3]).to.equal(2);
    expect(dev.inFlight(UAS_DATA_IN)).to.equal(1);
    await dev.setInterface(0, 0); // drops the streams: the waiting URBs are cancelled
    expect((await stuckData).status).to.equal(UrbStatus.Cancelled);
    expect((await stuckStatus).status).to.equal(UrbStatus.Cancelled);
  });

  it('a failing command: CHECK CONDITION sense IU with fixed sense data; its data URB moves nothing', async () => {
    await uasWithStreams();
    const status = onStream(dev, UAS_STATUS_IN, 4, { length: 112 });
    await sendIu(dev, commandIu(4, read10(SIZE / 512, 1))); // past the end
    const s = (await status).data!;
    expect(hex(s.subarray(0, 16))).to.equal('03000004' + '0000' + '02' + '00'.repeat(7) + '0012');
    expect([s[16], s[18], s[28], s[29]]).to.deep.equal([0x70, 0x05, 0x21, 0x00]); // ILLEGAL REQUEST, LBA OUT OF RANGE
    const status2 = onStream(dev, UAS_STATUS_IN, 4, { length: 112 });
    await sendIu(dev, commandIu(4, Uint8Array.of(0x12, 0, 0, 0, 36, 0), 1n)); // LUN 1
    expect([...(await status2).data!.subarray(16 + 12, 16 + 14)]).to.deep.equal([0x25, 0x00]); // LOGICAL UNIT NOT SUPPORTED
  });

  it('refused IUs: overlapped tag, unknown IU id, task management; a tag outside the streams stalls the command pipe', async () => {
    await uasWithStreams();
    const st = onStream(dev, UAS_STATUS_IN, 6, { length: 112 });
    await sendIu(dev, commandIu(6, read10(0, 1))); // data never fetched: task stays
    await sendIu(dev, commandIu(6, read10(0, 1)));
    expect(hex((await st).data)).to.equal('040000060000000a');
    const bad = onStream(dev, UAS_STATUS_IN, 8, { length: 112 });
    await sendIu(dev, Uint8Array.of(0x09, 0, 0, 8, 0, 0, 0, 0));
    expect(hex((await bad).data)).to.equal('0400000800000002');
    const tmfStatus = onStream(dev, UAS_STATUS_IN, 10, { length: 112 });
    await sendIu(dev, commandIu(11, read10(0, 1)));
    expect(dev.tasksInFlight).to.equal(1);
    await sendIu(dev, taskManagementIu(10, TMF_ABORT_TASK, 11));
    expect(hex((await tmfStatus).data)).to.equal('0400000a00000000');
    expect(dev.tasksInFlight).to.equal(0);
    expect((await sendIu(dev, commandIu(40, read10(0, 1)))).status).to.equal(UrbStatus.Stall);
    expect(dev.isHalted(UAS_COMMAND_OUT)).to.equal(true);
  });

  it('alt 0 is a working BOT disk (INQUIRY)', async () => {
    await make(Speed.Super);
    const cbw = new Uint8Array(31);
    const dv = new DataView(cbw.buffer);
    dv.setUint32(0, 0x43425355, true);
    dv.setUint32(4, 1, true);
    dv.setUint32(8, 36, true);
    cbw[12] = 0x80;
    cbw[14] = 6;
    cbw.set([0x12, 0, 0, 0, 36, 0], 15);
    expect((await submit(dev, makeUrb({ endpoint: MSC_BULK_OUT, type: TransferType.Bulk, data: cbw }))).status).to.equal(UrbStatus.Success);
    expect((await bulkIn(dev, MSC_BULK_IN, 36)).actualLength).to.equal(36);
    expect((await bulkIn(dev, MSC_BULK_IN, 13)).data![12]).to.equal(0);
  });
});

async function expectReject(p: Promise<unknown>, re?: RegExp): Promise<void> {
  let err: unknown;
  try {
    await p;
  } catch (e) {
    err = e;
  }
  expect(err, 'expected a rejection').to.be.instanceOf(Error);
  if (re) expect((err as Error).message).to.match(re);
}
