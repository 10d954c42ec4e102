// A USB mass-storage Bulk-Only Transport initiator over the SDK: the client
// side of what Linux's usb-storage does, for tests and benchmarks.
import type { RemoteDevice } from '../../src/client/sdk/remote-device.js';
import { UrbStatus } from '../../src/gen/usbroam/v1/usbhost.js';

let tag = 1;

export interface BotResult {
  status: number;
  residue: number;
  data: Uint8Array;
}

/** One SCSI command: CBW, data phase (in or out, split into URBs of `urbSize`), CSW. */
export async function scsi(dev: RemoteDevice, cdb: Uint8Array, dir: 'in' | 'out' | 'none', lengthOrData: number | Uint8Array, urbSize = 128 * 1024): Promise<BotResult> {
  const length = typeof lengthOrData === 'number' ? lengthOrData : lengthOrData.length;
  const cbw = new Uint8Array(31);
  const v = new DataView(cbw.buffer);
  v.setUint32(0, 0x43425355, true);
  v.setUint32(4, tag++, true);
  v.setUint32(8, length, true);
  cbw[12] = dir === 'in' ? 0x80 : 0;
  cbw[14] = cdb.length;
  cbw.set(cdb, 15);
  const sent = await dev.transferOut(2, cbw);
  if (sent.status !== UrbStatus.URB_STATUS_SUCCESS) throw new Error(`CBW failed: ${UrbStatus[sent.status]}`);
  const chunks: Uint8Array[] = [];
  if (dir === 'in' && length) {
    const urbs = [];
    for (let off = 0; off < length; off += urbSize) urbs.push(dev.transferIn(1, Math.min(urbSize, length - off)));
    for (const r of await Promise.all(urbs)) {
      if (r.status !== UrbStatus.URB_STATUS_SUCCESS) throw new Error(`data-in failed: ${UrbStatus[r.status]}`);
      chunks.push(r.data);
    }
  } else if (dir === 'out' && length) {
    const data = lengthOrData as Uint8Array;
    const urbs = [];
    for (let off = 0; off < length; off += urbSize) urbs.push(dev.transferOut(2, data.subarray(off, Math.min(length, off + urbSize))));
    for (const r of await Promise.all(urbs)) if (r.status !== UrbStatus.URB_STATUS_SUCCESS) throw new Error(`data-out failed: ${UrbStatus[r.status]}`);
  }
  const csw = await dev.transferIn(1, 13);
  if (csw.status !== UrbStatus.URB_STATUS_SUCCESS || csw.data.length !== 13) throw new Error(`CSW failed: ${UrbStatus[csw.status]} (${csw.data.length} bytes)`);
  const cv = new DataView(csw.data.buffer, csw.data.byteOffset, 13);
  if (cv.getUint32(0, true) !== 0x53425355) throw new Error('bad CSW signature');
  return { status: csw.data[12], residue: cv.getUint32(8, true), data: Buffer.concat(chunks) };
}

export function cdb10(op: number, lba: number, blocks: number): Uint8Array {
  const c = new Uint8Array(10);
  c[0] = op;
  new DataView(c.buffer).setUint32(2, lba);
  new DataView(c.buffer).setUint16(7, blocks);
  return c;
}

export const READ10 = 0x28;
export const WRITE10 = 0x2a;
