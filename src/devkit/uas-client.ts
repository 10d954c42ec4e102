// The host (initiator) side of USB Attached SCSI information units, as a pure codec: command IUs
// for the command pipe, and the IUs the status pipe returns (sense, response, read/write ready),
// plus the few SCSI CDBs a test needs. No I/O: a caller submits the bytes on the UAS pipes
// (command OUT without a stream; status, data-in and data-out with stream id = tag).
// Layouts: UAS-2 (T10 2095-D) sections 6.2 (command IU), 6.4 (sense IU), 6.5 (response IU).

export const IU_COMMAND = 0x01;
export const IU_SENSE = 0x03;
export const IU_RESPONSE = 0x04;
export const IU_TASK_MANAGEMENT = 0x05;
export const IU_READ_READY = 0x06;
export const IU_WRITE_READY = 0x07;

/** UAS pipe usage ids (the pipe usage descriptor, type 0x24, after each endpoint). */
export const PIPE_COMMAND = 1;
export const PIPE_STATUS = 2;
export const PIPE_DATA_IN = 3;
export const PIPE_DATA_OUT = 4;

export const COMMAND_IU_LENGTH = 32;
const MAX_CDB = 16;

/** A command IU: tag (1-65533 in use; with streams, the stream id), LUN (0-255, flat), a CDB of up to 16 bytes. */
export function encodeCommandIu(tag: number, cdb: Uint8Array, lun = 0): Uint8Array {
  if (!Number.isInteger(tag) || tag < 1 || tag > 0xfffd) throw new RangeError(`UAS command IU: tag ${tag} (1-65533)`);
  if (cdb.length < 6 || cdb.length > MAX_CDB) throw new RangeError(`UAS command IU: CDB of ${cdb.length} bytes (6-16; longer CDBs need additional CDB bytes, not supported here)`);
  if (!Number.isInteger(lun) || lun < 0 || lun > 255) throw new RangeError(`UAS command IU: LUN ${lun} (0-255)`);
  const iu = new Uint8Array(COMMAND_IU_LENGTH);
  const dv = new DataView(iu.buffer);
  iu[0] = IU_COMMAND;
  dv.setUint16(2, tag, false);
  iu[4] = 0; // task attribute SIMPLE, priority 0
  iu[6] = 0; // additional CDB length (dwords)
  iu[9] = lun; // single-level LUN, peripheral addressing: byte 1 of the 8-byte LUN
  iu.set(cdb, 16);
  return iu;
}

export type StatusIu =
  | { kind: 'sense'; tag: number; statusQualifier: number; status: number; sense: Uint8Array }
  | { kind: 'response'; tag: number; responseCode: number; additionalInfo: number }
  | { kind: 'read-ready' | 'write-ready'; tag: number };

/** Decode an IU received on the status pipe; throws a RangeError naming what is wrong. */
export function decodeStatusIu(bytes: Uint8Array): StatusIu {
  if (bytes.length < 4) throw new RangeError(`UAS status IU: ${bytes.length} bytes (at least 4)`);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const tag = dv.getUint16(2, false);
  switch (bytes[0]) {
    case IU_SENSE: {
      if (bytes.length < 16) throw new RangeError(`UAS sense IU: ${bytes.length} bytes (at least 16)`);
      const senseLength = dv.getUint16(14, false);
      if (16 + senseLength > bytes.length) throw new RangeError(`UAS sense IU: sense length ${senseLength} past the IU's ${bytes.length} bytes`);
      return { kind: 'sense', tag, statusQualifier: dv.getUint16(4, false), status: bytes[6]!, sense: bytes.slice(16, 16 + senseLength) };
    }
    case IU_RESPONSE:
      if (bytes.length < 8) throw new RangeError(`UAS response IU: ${bytes.length} bytes (at least 8)`);
      return { kind: 'response', tag, additionalInfo: (bytes[4]! << 16) | (bytes[5]! << 8) | bytes[6]!, responseCode: bytes[7]! };
    case IU_READ_READY:
      return { kind: 'read-ready', tag };
    case IU_WRITE_READY:
      return { kind: 'write-ready', tag };
    default:
      throw new RangeError(`UAS status IU: unknown IU id 0x${bytes[0]!.toString(16)}`);
  }
}

/** SCSI status GOOD / CHECK CONDITION (the sense IU's status byte). */
export const SCSI_GOOD = 0x00;
export const SCSI_CHECK_CONDITION = 0x02;

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
