// The emulated disk through the whole URB channel: a client process writes
// and reads back through BOT/SCSI, against a server in its own process.
import { expect } from 'chai';
import { createHash, randomBytes } from 'node:crypto';
import { openSync, readSync, closeSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { UsbHostClient } from '../../src/client/sdk/client.js';
import { cdb10, READ10, scsi, WRITE10 } from '../helpers/bot.js';
import { clientTls } from '../../src/devkit/certs.js';
import { startServerProcess, type ServerProcess } from '../../src/devkit/server-process.js';

const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

describe('mass storage over the URB channel (server in its own process)', function () {
  this.timeout(60_000);
  let srv: ServerProcess;
  let dir: string;
  let image: string;

  before(async () => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'usbroam-msc-'));
    image = path.join(dir, 'disk.img');
    srv = await startServerProcess(['--allow', 'bridge=*', '--disk-image', image, '--disk-size-mib', '32']);
  });
  after(async () => {
    expect(await srv.stop()).to.equal(0);
    rmSync(dir, { recursive: true, force: true });
  });

  it('writes 8 MiB through BOT/SCSI and reads the same bytes back, which the image holds at the same offset', async () => {
    const client = new UsbHostClient({ address: srv.address, ...clientTls('bridge') });
    const dev = await client.openDevice({ serial: 'USBROAM-MSC-0001' });
    await dev.selectConfiguration(1);
    try {
      const inquiry = await scsi(dev, Uint8Array.of(0x12, 0, 0, 0, 36, 0), 'in', 36);
      expect(inquiry.status).to.equal(0);
      expect(inquiry.data[0] & 0x1f).to.equal(0); // direct-access block device
      const cap = await scsi(dev, Uint8Array.of(0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0), 'in', 8);
      const lastLba = new DataView(cap.data.buffer, cap.data.byteOffset).getUint32(0);
      const blockLen = new DataView(cap.data.buffer, cap.data.byteOffset).getUint32(4);
      expect(blockLen).to.equal(512);
      expect((lastLba + 1) * blockLen).to.equal(32 * 1024 * 1024);

      const payload = randomBytes(8 * 1024 * 1024);
      const lba = 2048;
      const chunk = 240 * 1024; // what Linux's usb-storage sends per command at most by default
      for (let off = 0; off < payload.length; off += chunk) {
        const part = payload.subarray(off, Math.min(payload.length, off + chunk));
        const w = await scsi(dev, cdb10(WRITE10, lba + off / 512, part.length / 512), 'out', part);
        expect(w.status, `write at ${off}`).to.equal(0);
      }
      expect((await scsi(dev, Uint8Array.of(0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0), 'none', 0)).status).to.equal(0); // SYNCHRONIZE CACHE
      const back: Uint8Array[] = [];
      for (let off = 0; off < payload.length; off += chunk) {
        const n = Math.min(chunk, payload.length - off);
        const r = await scsi(dev, cdb10(READ10, lba + off / 512, n / 512), 'in', n);
        expect(r.status).to.equal(0);
        back.push(r.data);
      }
      expect(sha(Buffer.concat(back))).to.equal(sha(payload));

      const fd = openSync(image, 'r');
      const onDisk = Buffer.alloc(payload.length);
      readSync(fd, onDisk, 0, onDisk.length, lba * 512);
      closeSync(fd);
      expect(sha(onDisk)).to.equal(sha(payload));

      // An unknown opcode: CHECK CONDITION, and REQUEST SENSE says ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE.
      expect((await scsi(dev, Uint8Array.of(0xd9, 0, 0, 0, 0, 0), 'none', 0)).status).to.equal(1);
      const sense = await scsi(dev, Uint8Array.of(0x03, 0, 0, 0, 18, 0), 'in', 18);
      expect([sense.data[2] & 0x0f, sense.data[12], sense.data[13]]).to.deep.equal([0x05, 0x20, 0x00]);
    } finally {
      await dev.close();
      client.close();
    }
  });
});
