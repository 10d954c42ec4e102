// pcap files of USB traffic in Linux usbmon's binary format: LINKTYPE_USB_LINUX_MMAPPED (220),
// what `tcpdump -i usbmonN` and Wireshark write for a local bus. Each record is the 64-byte
// usbmon header (struct usbmon_packet of Documentation/usb/usbmon.rst, in the writer's byte
// order: little-endian here, as the file header's magic says), then one 16-byte descriptor per
// isochronous packet, then the captured data. A pure codec: bytes in, bytes out, no I/O.

export const LINKTYPE_USB_LINUX_MMAPPED = 220;
export const USBMON_HEADER_BYTES = 64;
export const USBMON_ISO_DESC_BYTES = 16;
export const PCAP_FILE_HEADER_BYTES = 24;
export const PCAP_RECORD_HEADER_BYTES = 16;
const PCAP_MAGIC_US = 0xa1b2c3d4;

/** usbmon's transfer types (not the USB descriptor's order). */
export const enum UsbmonXfer {
  Iso = 0,
  Interrupt = 1,
  Control = 2,
  Bulk = 3,
}

/** Linux URB transfer_flags that usbmon copies. */
export const URB_SHORT_NOT_OK_LINUX = 0x0001;
export const URB_ZERO_PACKET_LINUX = 0x0040;
export const URB_DIR_IN_LINUX = 0x0200;

/** Linux URB status values (negative errno). */
export const Errno = {
  ENOENT: -2,
  EINVAL: -22,
  EPIPE: -32,
  EPROTO: -71,
  EOVERFLOW: -75,
  ETIMEDOUT: -110,
  EINPROGRESS: -115,
} as const;

export interface UsbmonIsoDesc {
  status: number;
  offset: number;
  length: number;
}

/** One usbmon event: a submit ('S'), a completion ('C') or a submission error ('E'). */
export interface UsbmonEvent {
  /** The URB's tag: pairs a submit with its completion. */
  id: bigint;
  type: 'S' | 'C' | 'E';
  xferType: UsbmonXfer;
  /** Endpoint number | 0x80 for IN (for control: the direction of the data stage). */
  epnum: number;
  devnum: number;
  busnum: number;
  /** Control submits: the 8-byte setup packet. */
  setup?: Uint8Array;
  /** The captured data (OUT data on submit, IN data on completion). */
  data: Uint8Array;
  /** Submits: transfer_buffer_length; completions: actual_length. */
  length: number;
  /** Bytes of data before it was cut to the capture's snaplen (default data.length). */
  originalDataLength?: number;
  /** 0, a negative errno, or -EINPROGRESS on submits. */
  status: number;
  tsSec: number;
  tsUsec: number;
  interval: number;
  startFrame: number;
  xferFlags: number;
  /** Isochronous: error count and one descriptor per packet. */
  iso?: { errorCount: number; descs: UsbmonIsoDesc[] };
}

/** The pcap file header for usbmon records of at most `snaplen` bytes each. */
export function pcapFileHeader(snaplen: number): Uint8Array {
  const b = new Uint8Array(PCAP_FILE_HEADER_BYTES);
  const v = new DataView(b.buffer);
  v.setUint32(0, PCAP_MAGIC_US, true);
  v.setUint16(4, 2, true);
  v.setUint16(6, 4, true);
  v.setInt32(8, 0, true); // thiszone
  v.setUint32(12, 0, true); // sigfigs
  v.setUint32(16, snaplen >>> 0, true);
  v.setUint32(20, LINKTYPE_USB_LINUX_MMAPPED, true);
  return b;
}

/** One pcap record (record header, usbmon header, iso descriptors, data). */
export function encodeUsbmonRecord(ev: UsbmonEvent): Uint8Array {
  const descs = ev.iso?.descs ?? [];
  const body = USBMON_HEADER_BYTES + descs.length * USBMON_ISO_DESC_BYTES + ev.data.length;
  const b = new Uint8Array(PCAP_RECORD_HEADER_BYTES + body);
  const v = new DataView(b.buffer);
  v.setUint32(0, ev.tsSec >>> 0, true);
  v.setUint32(4, ev.tsUsec >>> 0, true);
  v.setUint32(8, body, true);
  v.setUint32(12, body + Math.max(0, (ev.originalDataLength ?? ev.data.length) - ev.data.length), true);
  const h = PCAP_RECORD_HEADER_BYTES;
  v.setBigUint64(h + 0, BigInt.asUintN(64, ev.id), true);
  b[h + 8] = ev.type.charCodeAt(0);
  b[h + 9] = ev.xferType;
  b[h + 10] = ev.epnum & 0xff;
  b[h + 11] = ev.devnum & 0xff;
  v.setUint16(h + 12, ev.busnum & 0xffff, true);
  // flag_setup: 0 when a setup packet follows; flag_data: 0 when data follows, else why not
  // ('<' an IN submit, '>' an OUT completion, '=' nothing to show).
  const hasSetup = ev.type === 'S' && ev.xferType === UsbmonXfer.Control && ev.setup?.length === 8;
  b[h + 14] = hasSetup ? 0 : 0x2d; // '-'
  const isIn = (ev.epnum & 0x80) !== 0;
  b[h + 15] = ev.data.length ? 0 : ev.type === 'S' && isIn ? 0x3c : ev.type === 'C' && !isIn ? 0x3e : 0x3d;
  v.setBigInt64(h + 16, BigInt(Math.floor(ev.tsSec)), true);
  v.setInt32(h + 24, ev.tsUsec | 0, true);
  v.setInt32(h + 28, ev.status | 0, true);
  v.setUint32(h + 32, ev.length >>> 0, true);
  v.setUint32(h + 36, ev.data.length, true);
  if (hasSetup) b.set(ev.setup!, h + 40);
  else if (ev.iso) {
    v.setInt32(h + 40, ev.iso.errorCount | 0, true);
    v.setInt32(h + 44, descs.length, true);
  }
  v.setInt32(h + 48, ev.interval | 0, true);
  v.setInt32(h + 52, ev.startFrame | 0, true);
  v.setUint32(h + 56, ev.xferFlags >>> 0, true);
  v.setUint32(h + 60, descs.length, true);
  let o = h + USBMON_HEADER_BYTES;
  for (const d of descs) {
    v.setInt32(o, d.status | 0, true);
    v.setUint32(o + 4, d.offset >>> 0, true);
    v.setUint32(o + 8, d.length >>> 0, true);
    v.setUint32(o + 12, 0, true);
    o += USBMON_ISO_DESC_BYTES;
  }
  b.set(ev.data, o);
  return b;
}

export class PcapFormatError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'PcapFormatError';
  }
}

export interface PcapRecord {
  tsSec: number;
  tsUsec: number;
  originalLength: number;
  event: UsbmonEvent;
}

/** Decode a whole pcap file of usbmon records (little-endian, microsecond timestamps). */
export function decodeUsbmonPcap(bytes: Uint8Array): { snaplen: number; records: PcapRecord[] } {
  if (bytes.length < PCAP_FILE_HEADER_BYTES) throw new PcapFormatError(`pcap file of ${bytes.length} bytes is shorter than its 24-byte header`);
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (v.getUint32(0, true) !== PCAP_MAGIC_US) throw new PcapFormatError(`not a little-endian microsecond pcap file (magic 0x${v.getUint32(0, true).toString(16)})`);
  const linktype = v.getUint32(20, true);
  if (linktype !== LINKTYPE_USB_LINUX_MMAPPED) throw new PcapFormatError(`link type ${linktype}, not LINKTYPE_USB_LINUX_MMAPPED (220)`);
  const snaplen = v.getUint32(16, true);
  const records: PcapRecord[] = [];
  let o = PCAP_FILE_HEADER_BYTES;
  while (o < bytes.length) {
    if (o + PCAP_RECORD_HEADER_BYTES > bytes.length) throw new PcapFormatError(`record header at ${o} cut short`);
    const incl = v.getUint32(o + 8, true);
    if (o + PCAP_RECORD_HEADER_BYTES + incl > bytes.length) throw new PcapFormatError(`record at ${o} claims ${incl} bytes; the file ends first`);
    records.push({
      tsSec: v.getUint32(o, true),
      tsUsec: v.getUint32(o + 4, true),
      originalLength: v.getUint32(o + 12, true),
      event: decodeUsbmonPacket(bytes.subarray(o + PCAP_RECORD_HEADER_BYTES, o + PCAP_RECORD_HEADER_BYTES + incl)),
    });
    o += PCAP_RECORD_HEADER_BYTES + incl;
  }
  return { snaplen, records };
}

/** Decode one usbmon packet (header, iso descriptors, data). */
export function decodeUsbmonPacket(b: Uint8Array): UsbmonEvent {
  if (b.length < USBMON_HEADER_BYTES) throw new PcapFormatError(`usbmon packet of ${b.length} bytes is shorter than its 64-byte header`);
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const type = String.fromCharCode(b[8]);
  if (type !== 'S' && type !== 'C' && type !== 'E') throw new PcapFormatError(`usbmon event type 0x${b[8].toString(16)} is none of S, C, E`);
  const ndesc = v.getUint32(60, true);
  const lenCap = v.getUint32(36, true);
  const dataAt = USBMON_HEADER_BYTES + ndesc * USBMON_ISO_DESC_BYTES;
  if (dataAt + lenCap > b.length) throw new PcapFormatError(`usbmon packet with ${ndesc} iso descriptors and ${lenCap} data bytes needs ${dataAt + lenCap} bytes, has ${b.length}`);
  const xferType = b[9] as UsbmonXfer;
  const descs: UsbmonIsoDesc[] = [];
  for (let i = 0; i < ndesc; i++) {
    const d = USBMON_HEADER_BYTES + i * USBMON_ISO_DESC_BYTES;
    descs.push({ status: v.getInt32(d, true), offset: v.getUint32(d + 4, true), length: v.getUint32(d + 8, true) });
  }
  return {
    id: v.getBigUint64(0, true),
    type,
    xferType,
    epnum: b[10],
    devnum: b[11],
    busnum: v.getUint16(12, true),
    setup: b[14] === 0 ? copy(b, 40, 48) : undefined,
    data: copy(b, dataAt, dataAt + lenCap),
    length: v.getUint32(32, true),
    status: v.getInt32(28, true),
    tsSec: Number(v.getBigInt64(16, true)),
    tsUsec: v.getInt32(24, true),
    interval: v.getInt32(48, true),
    startFrame: v.getInt32(52, true),
    xferFlags: v.getUint32(56, true),
    iso: xferType === UsbmonXfer.Iso ? { errorCount: v.getInt32(40, true), descs } : undefined,
  };
}

/** A plain Uint8Array copy (Buffer's slice would share memory). */
function copy(b: Uint8Array, start: number, end: number): Uint8Array {
  return new Uint8Array(b.subarray(start, end));
}
