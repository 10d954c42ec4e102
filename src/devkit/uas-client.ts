// The host (initiator) side of USB Attached SCSI for tests and tools, pure (no I/O): command IUs
// checked for what a host may send, the status-pipe IUs decoded, and the few SCSI CDBs and data
// decoders a test needs. A caller submits the bytes on the UAS pipes (command OUT without a
// stream; status, data-in and data-out with stream id = tag). The IU layouts themselves are in
// one codec, the emulated UAS device's (src/server/backends/emulated/uas-iu.ts, both directions).
import { commandIu } from '../server/backends/emulated/uas-iu.js';
export {
  IU_COMMAND,
  IU_SENSE,
  IU_RESPONSE,
  IU_TASK_MGMT as IU_TASK_MANAGEMENT,
  IU_READ_READY,
  IU_WRITE_READY,
  PIPE_COMMAND,
  PIPE_STATUS,
  PIPE_DATA_IN,
  PIPE_DATA_OUT,
  SCSI_GOOD,
  SCSI_CHECK_CONDITION,
  decodeStatusIu,
  type StatusIu,
} from '../server/backends/emulated/uas-iu.js';

const MAX_CDB = 16;

/** A command IU: tag (1-65533 in use; with streams, the stream id), LUN (0-255, flat), a CDB of up to 16 bytes. */
export function encodeCommandIu(tag: number, cdb: Uint8Array, lun = 0): Uint8Array {
  if (!Number.isInteger(tag) || tag < 1 || tag > 0xfffd) throw new RangeError(`UAS command IU: tag ${tag} (1-65533)`);
  if (cdb.length < 6 || cdb.length > MAX_CDB) throw new RangeError(`UAS command IU: CDB of ${cdb.length} bytes (6-16; longer CDBs need additional CDB bytes, not supported here)`);
  if (!Number.isInteger(lun) || lun < 0 || lun > 255) throw new RangeError(`UAS command IU: LUN ${lun} (0-255)`);
  // Single-level LUN, peripheral addressing: the LUN is byte 1 of the 8-byte LUN field (IU byte 9).
  return commandIu(tag, cdb, BigInt(lun) << 48n);
}

/** Sense key, ASC, ASCQ of fixed-format (0x70/0x71) or descriptor-format (0x72/0x73) sense data. */
export function senseKey(sense: Uint8Array): { key: number; asc: number; ascq: number } | undefined {
  const code = (sense[0] ?? 0) & 0x7f;
  if ((code === 0x70 || code === 0x71) && sense.length >= 14) return { key: sense[2]! & 0x0f, asc: sense[12]!, ascq: sense[13]! };
  if ((code === 0x72 || code === 0x73) && sense.length >= 4) return { key: sense[1]! & 0x0f, asc: sense[2]!, ascq: sense[3]! };
  return undefined;
}

export function inquiryCdb(allocationLength = 36): Uint8Array {
  return Uint8Array.of(0x12, 0, 0, (allocationLength >> 8) & 0xff, allocationLength & 0xff, 0);
}

export function testUnitReadyCdb(): Uint8Array {
  return new Uint8Array(6);
}

export function readCapacity10Cdb(): Uint8Array {
  return new Uint8Array([0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
}

function rw10(op: number, lba: number, blocks: number): Uint8Array {
  if (!Number.isInteger(lba) || lba < 0 || lba > 0xffffffff) throw new RangeError(`READ/WRITE(10): LBA ${lba}`);
  if (!Number.isInteger(blocks) || blocks < 1 || blocks > 0xffff) throw new RangeError(`READ/WRITE(10): ${blocks} blocks (1-65535)`);
  const cdb = new Uint8Array(10);
  const dv = new DataView(cdb.buffer);
  cdb[0] = op;
  dv.setUint32(2, lba, false);
  dv.setUint16(7, blocks, false);
  return cdb;
}

export const read10Cdb = (lba: number, blocks: number): Uint8Array => rw10(0x28, lba, blocks);
export const write10Cdb = (lba: number, blocks: number): Uint8Array => rw10(0x2a, lba, blocks);

/** The INQUIRY data's identification: peripheral device type, vendor, product, revision. */
export function decodeInquiry(data: Uint8Array): { deviceType: number; vendor: string; product: string; revision: string } {
  if (data.length < 36) throw new RangeError(`INQUIRY data: ${data.length} bytes (at least 36)`);
  const text = (a: number, b: number) => Buffer.from(data.subarray(a, b)).toString('latin1').trimEnd();
  return { deviceType: data[0]! & 0x1f, vendor: text(8, 16), product: text(16, 32), revision: text(32, 36) };
}

/** READ CAPACITY(10) data: the last LBA and the block length. */
export function decodeReadCapacity10(data: Uint8Array): { lastLba: number; blockLength: number } {
  if (data.length < 8) throw new RangeError(`READ CAPACITY(10) data: ${data.length} bytes (8)`);
  const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
  return { lastLba: dv.getUint32(0, false), blockLength: dv.getUint32(4, false) };
}
