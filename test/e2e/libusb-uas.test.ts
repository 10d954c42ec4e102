// Bulk streams through the libusb backend's koffi path (opt-in: USBROAM_LIBUSB_STREAMS=koffi;
// usb@2 itself has no streams binding), on a real kernel USB stack: a USB host guest whose
// qemu-xhci holds a QEMU usb-uas (SuperSpeed: status, data-in and data-out pipes with 16
// streams) with a scsi-hd on a raw image runs `usbroam serve --libusb`. From the host, the SDK
// opens the device over mTLS, selects the UAS alt setting (protocol 0x62), allocates streams on
// the stream-capable bulk endpoints and runs UAS commands: the command IU on the command pipe
// (no stream), the data and the sense IU on the data and status pipes with stream id = tag.
// INQUIRY, READ CAPACITY, WRITE(10)/READ(10) of several blocks, four commands in flight on four
// streams at once; what is read back (and what is in the image file) has the sha256 written.
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { UsbHostClient } from '../../src/client/sdk/client.js';
import type { RemoteDevice } from '../../src/client/sdk/remote-device.js';
import { TransferType, UrbStatus } from '../../src/gen/usbroam/v1/usbhost.js';
import { clientTls } from '../../src/devkit/certs.js';
import { e2eImageOrSkip } from '../../src/devkit/bridge-guest.js';
import { startUsbHostGuest, type UsbHostGuest } from '../../src/devkit/guest/usbhost-guest.js';
import {
  PIPE_COMMAND,
  PIPE_DATA_IN,
  PIPE_DATA_OUT,
  PIPE_STATUS,
  SCSI_GOOD,
  decodeInquiry,
  decodeReadCapacity10,
  decodeStatusIu,
  encodeCommandIu,
  inquiryCdb,
  read10Cdb,
  readCapacity10Cdb,
  senseKey,
  testUnitReadyCdb,
  write10Cdb,
} from '../../src/devkit/uas-client.js';

const BLOCK = 512;
const DISK_BLOCKS = 8192; // 4 MiB
const URB_TIMEOUT_MS = 30_000;
const sha256 = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

/** The UAS pipes of the device, by pipe usage: QEMU's usb-uas puts pipe id n on endpoint number n. */
const EP = { command: PIPE_COMMAND, status: 0x80 | PIPE_STATUS, dataIn: 0x80 | PIPE_DATA_IN, dataOut: PIPE_DATA_OUT };

interface Outcome {
  status: number;
  sense: Uint8Array;
  data: Uint8Array;
}

/**
 * One UAS command on stream `tag`: the status IN and the data URB go first (the device parks
 * them until the command with this tag arrives), then the command IU. Each URB must succeed.
 */
async function uasCommand(d: RemoteDevice, tag: number, cdb: Uint8Array, io: { inLength?: number; out?: Uint8Array } = {}): Promise<Outcome> {
  const bulk = { type: TransferType.TRANSFER_BULK, timeoutMs: URB_TIMEOUT_MS };
  const status = d.submit({ ...bulk, endpoint: EP.status, length: 1024, streamId: tag });
  const data =
    io.inLength !== undefined
      ? d.submit({ ...bulk, endpoint: EP.dataIn, length: io.inLength, streamId: tag })
      : io.out
        ? d.submit({ ...bulk, endpoint: EP.dataOut, data: io.out, streamId: tag })
        : undefined;
  const command = d.submit({ ...bulk, endpoint: EP.command, data: encodeCommandIu(tag, cdb) });
  const [c, s, x] = await Promise.all([command, status, data]);
  expect(c.status, `tag ${tag}: command IU`).to.equal(UrbStatus.URB_STATUS_SUCCESS);
  expect(s.status, `tag ${tag}: status IU`).to.equal(UrbStatus.URB_STATUS_SUCCESS);
  if (x) {
    expect(x.status, `tag ${tag}: data`).to.equal(UrbStatus.URB_STATUS_SUCCESS);
    if (io.out) expect(x.actualLength, `tag ${tag}: data OUT length`).to.equal(io.out.length);
  }
  const iu = decodeStatusIu(s.data);
  if (iu.kind !== 'sense') throw new Error(`tag ${tag}: status pipe gave a ${iu.kind} IU, not a sense IU`);
  expect(iu.tag, 'status IU tag').to.equal(tag);
  return { status: iu.status, sense: iu.sense, data: x?.data ?? new Uint8Array(0) };
}

function expectGood(o: Outcome, what: string): void {
  expect(o.status, `${what}: SCSI status (sense ${JSON.stringify(senseKey(o.sense))})`).to.equal(SCSI_GOOD);
}

describe('e2e libusb backend: UAS bulk streams to a QEMU usb-uas through koffi + libusb', function () {
  this.timeout(900_000);
  let host: UsbHostGuest | undefined;
  let client: UsbHostClient | undefined;
  let dir: string;
  let disk: string;
  // What the image holds before the test: block i filled with (i & 0xff).
  const initialBlock = (lba: number) => Buffer.alloc(BLOCK, lba & 0xff);

  before(async function () {
    this.timeout(900_000);
    const image = await e2eImageOrSkip(this);
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'usbroam-uas-'));
    disk = path.join(dir, 'uas.img');
    fs.writeFileSync(disk, Buffer.concat(Array.from({ length: DISK_BLOCKS }, (_, i) => initialBlock(i))));
    host = await startUsbHostGuest({
      image,
      name: 'usbhost-uas',
      allow: ['46f4:0003'],
      serveEnv: { USBROAM_LIBUSB_STREAMS: 'koffi' },
      extraQemuArgs: [
        '-drive', `if=none,id=uasdisk,file=${disk},format=raw,cache=writeback`,
        '-device', 'usb-uas,id=uas0,bus=xhci.0',
        '-device', 'scsi-hd,bus=uas0.0,scsi-id=0,lun=0,drive=uasdisk,serial=UAS0001',
      ],
    });
    client = new UsbHostClient({ address: host.address, ...clientTls('bridge') });
  });

  after(async () => {
    client?.close();
    if (host && process.env.USBROAM_E2E_KEEP) console.log(await host.serverLog().catch(() => ''));
    await host?.stop();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('streams allocated on the status and data pipes; INQUIRY, READ CAPACITY, WRITE(10)/READ(10) on streams = tags, bytes as written', async () => {
    const d = await client!.openDevice({ vidPid: '46f4:0003' });
    try {
      const uasAlt = d.device.configurations[0]!.interfaces.find((i) => i.interfaceClass === 0x08 && i.interfaceSubclass === 0x06 && i.interfaceProtocol === 0x62);
      expect(uasAlt, 'a UAS alt setting (mass storage, SCSI, protocol 0x62)').to.not.equal(undefined);
      // QEMU's usb-uas has its UAS setting as alt 0 (no bulk-only alt); selecting it is still the step a UAS host takes.
      await d.selectAlternateInterface(uasAlt!.number, uasAlt!.alternateSetting);
      const streamEps = d.device.endpoints.filter((e) => e.interfaceNumber === uasAlt!.number && e.maxStreams > 0).map((e) => e.address);
      // max_streams from the SuperSpeed endpoint companion: status, data-in, data-out have 16; the command pipe none.
      expect(d.device.endpoints.filter((e) => e.interfaceNumber === uasAlt!.number).map((e) => [e.address, e.maxStreams])).to.have.deep.members([
        [EP.command, 0],
        [EP.status, 16],
        [EP.dataIn, 16],
        [EP.dataOut, 16],
      ]);
      const streams = await d.allocBulkStreams(streamEps, 16);
      expect(streams, 'streams allocated').to.be.within(8, 16);

      const inq = await uasCommand(d, 1, inquiryCdb(36), { inLength: 36 });
      expectGood(inq, 'INQUIRY');
      const id = decodeInquiry(inq.data);
      expect(id.deviceType, 'direct-access block device').to.equal(0);
      expect(id.vendor).to.equal('QEMU');

      // The first command after power-on reports UNIT ATTENTION (sense key 6, ASC 0x29): TEST UNIT READY clears it.
      const tur = await uasCommand(d, 2, testUnitReadyCdb());
      if (tur.status !== SCSI_GOOD) {
        expect(senseKey(tur.sense)?.key, 'TEST UNIT READY: only a unit attention').to.equal(6);
        expectGood(await uasCommand(d, 2, testUnitReadyCdb()), 'TEST UNIT READY again');
      }
      const cap = await uasCommand(d, 2, readCapacity10Cdb(), { inLength: 8 });
      expectGood(cap, 'READ CAPACITY(10)');
      expect(decodeReadCapacity10(cap.data)).to.deep.equal({ lastLba: DISK_BLOCKS - 1, blockLength: BLOCK });

      // Four WRITE(10)s in flight at once, one per stream, then four READ(10)s.
      const regions = [
        { lba: 16, blocks: 8 },
        { lba: 100, blocks: 16 },
        { lba: 1000, blocks: 4 },
        { lba: 4096, blocks: 32 },
      ].map((r) => ({ ...r, bytes: randomBytes(r.blocks * BLOCK) }));
      const writes = await Promise.all(regions.map((r, i) => uasCommand(d, 3 + i, write10Cdb(r.lba, r.blocks), { out: r.bytes })));
      writes.forEach((w, i) => expectGood(w, `WRITE(10) ${i}`));
      const reads = await Promise.all(regions.map((r, i) => uasCommand(d, 3 + i, read10Cdb(r.lba, r.blocks), { inLength: r.bytes.length })));
      reads.forEach((rd, i) => {
        expectGood(rd, `READ(10) ${i}`);
        expect(sha256(rd.data), `region ${i} (LBA ${regions[i]!.lba}) read back`).to.equal(sha256(regions[i]!.bytes));
      });
      // A region nobody wrote reads as the image was made.
      const untouched = await uasCommand(d, 7, read10Cdb(2000, 2), { inLength: 2 * BLOCK });
      expectGood(untouched, 'READ(10) untouched');
      expect(sha256(untouched.data)).to.equal(sha256(Buffer.concat([initialBlock(2000), initialBlock(2001)])));
      // The writes reached the image file QEMU serves.
      const img = fs.readFileSync(disk);
      for (const r of regions) expect(sha256(img.subarray(r.lba * BLOCK, (r.lba + r.blocks) * BLOCK)), `image at LBA ${r.lba}`).to.equal(sha256(r.bytes));

      await d.freeBulkStreams(streamEps);
    } finally {
      await d.close();
    }
    const log = await host!.serverLog();
    expect(log).to.match(/stream-capable interfaces opened through koffi/);
    expect(log).to.match(/bulk streams allocated/);
    const again = await client!.listDevices();
    expect(again.some((x) => x.vendorId === 0x46f4 && x.productId === 0x0003), 'still exported').to.equal(true);
  });
});
