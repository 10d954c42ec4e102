// USB Attached SCSI information units (UAS 1.0 / T10 UAS-2 section 6.2), the wire side of
// uas.ts: a pure codec, no device state. Every IU starts with id (u8), reserved (u8) and the tag
// (u16 big-endian); with bulk streams the tag is also the stream id of the command's status and
// data pipes.
import { fixedSenseData, type Sense } from './scsi.js';

export const IU_COMMAND = 0x01;
export const IU_SENSE = 0x03;
export const IU_RESPONSE = 0x04;
export const IU_TASK_MGMT = 0x05;
export const IU_READ_READY = 0x06;
export const IU_WRITE_READY = 0x07;

/** RESPONSE IU response codes. */
export const RC_TMF_COMPLETE = 0x00;
export const RC_INVALID_INFO_UNIT = 0x02;
export const RC_TMF_NOT_SUPPORTED = 0x04;
export const RC_TMF_SUCCEEDED = 0x08;
export const RC_INCORRECT_LUN = 0x09;
export const RC_OVERLAPPED_TAG = 0x0a;

/** Task management functions. */
export const TMF_ABORT_TASK = 0x01;
export const TMF_ABORT_TASK_SET = 0x02;
export const TMF_CLEAR_TASK_SET = 0x04;
export const TMF_LOGICAL_UNIT_RESET = 0x08;
export const TMF_I_T_NEXUS_RESET = 0x10;
export const TMF_QUERY_TASK = 0x80;

/** Pipe usage descriptor pipe ids (UAS 1.0 table 12). */
export const PIPE_COMMAND = 1;
export const PIPE_STATUS = 2;
export const PIPE_DATA_IN = 3;
export const PIPE_DATA_OUT = 4;

/** SCSI status in the sense IU. */
export const SCSI_GOOD = 0x00;
export const SCSI_CHECK_CONDITION = 0x02;

const COMMAND_IU_LENGTH = 32;
const TASK_MGMT_IU_LENGTH = 16;
const SENSE_IU_HEADER = 16;

/** The class-specific descriptor that says which UAS pipe an endpoint is. */
export function pipeUsageDescriptor(pipeId: number): Uint8Array {
  return Uint8Array.of(4, 0x24, pipeId, 0);
}

export type Iu =
  | { id: typeof IU_COMMAND; tag: number; lun: bigint; cdb: Uint8Array }
  | { id: typeof IU_TASK_MGMT; tag: number; lun: bigint; fn: number; taskTag: number }
  /** An IU the device does not take from the host, or one too short for its kind. */
  | { id: 'invalid'; tag: number; why: string };

/** Parse what the host sent on the command pipe; undefined when it is too short to carry a tag. */
export function parseIu(b: Uint8Array): Iu | undefined {
  if (b.length < 4) return undefined;
  const tag = (b[2]! << 8) | b[3]!;
  const lun = () => new DataView(b.buffer, b.byteOffset + 8, 8).getBigUint64(0);
  switch (b[0]) {
    case IU_COMMAND: {
      if (b.length < COMMAND_IU_LENGTH) return { id: 'invalid', tag, why: `command IU of ${b.length} bytes (at least ${COMMAND_IU_LENGTH})` };
      const extra = b[6]! & 0xfc;
      if (b.length < COMMAND_IU_LENGTH + extra) return { id: 'invalid', tag, why: `command IU of ${b.length} bytes with ${extra} additional CDB bytes` };
      return { id: IU_COMMAND, tag, lun: lun(), cdb: b.slice(16, 32 + extra) };
    }
    case IU_TASK_MGMT:
      if (b.length < TASK_MGMT_IU_LENGTH) return { id: 'invalid', tag, why: `task management IU of ${b.length} bytes (${TASK_MGMT_IU_LENGTH})` };
      return { id: IU_TASK_MGMT, tag, lun: lun(), fn: b[4]!, taskTag: (b[6]! << 8) | b[7]! };
    default:
      return { id: 'invalid', tag, why: `IU id 0x${b[0]!.toString(16)} on the command pipe` };
  }
}

function header(id: number, tag: number, length: number): Uint8Array {
  const b = new Uint8Array(length);
  b[0] = id;
  b[2] = tag >> 8;
  b[3] = tag & 0xff;
  return b;
}

/** SENSE IU: the command's status; with CHECK CONDITION, fixed-format sense data. */
export function senseIu(tag: number, sense: Sense | undefined): Uint8Array {
  if (!sense) return header(IU_SENSE, tag, SENSE_IU_HEADER);
  const data = fixedSenseData(sense);
  const b = header(IU_SENSE, tag, SENSE_IU_HEADER + data.length);
  b[6] = SCSI_CHECK_CONDITION;
  b[14] = data.length >> 8;
  b[15] = data.length & 0xff;
  b.set(data, SENSE_IU_HEADER);
  return b;
}

/** RESPONSE IU: the outcome of a task management function, or why an IU was refused. */
export function responseIu(tag: number, code: number): Uint8Array {
  const b = header(IU_RESPONSE, tag, 8);
  b[7] = code;
  return b;
}

/** READ READY / WRITE READY IU (UAS without streams: the host then moves the tag's data). */
export function readyIu(id: typeof IU_READ_READY | typeof IU_WRITE_READY, tag: number): Uint8Array {
  return header(id, tag, 4);
}

/** Build a command IU (what the host sends; tests and tools). */
export function commandIu(tag: number, cdb: Uint8Array, lun = 0n): Uint8Array {
  const extra = Math.max(0, Math.ceil((cdb.length - 16) / 4) * 4);
  const b = header(IU_COMMAND, tag, COMMAND_IU_LENGTH + extra);
  b[6] = extra;
  new DataView(b.buffer).setBigUint64(8, lun);
  b.set(cdb, 16);
  return b;
}

/** Build a task management IU (what the host sends; tests and tools). */
export function taskManagementIu(tag: number, fn: number, taskTag: number, lun = 0n): Uint8Array {
  const b = header(IU_TASK_MGMT, tag, TASK_MGMT_IU_LENGTH);
  b[4] = fn;
  b[6] = taskTag >> 8;
  b[7] = taskTag & 0xff;
  new DataView(b.buffer).setBigUint64(8, lun);
  return b;
}

export type StatusIu =
  | { kind: 'sense'; tag: number; statusQualifier: number; status: number; sense: Uint8Array }
  | { kind: 'response'; tag: number; responseCode: number; additionalInfo: number }
  | { kind: 'read-ready' | 'write-ready'; tag: number };

/** Decode an IU received on the status pipe (the host side); throws a RangeError naming what is wrong. */
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
