// The SCSI side of the emulated disk: the data its commands answer (sense, capacities, INQUIRY
// and its VPD pages, MODE SENSE) as pure functions of the disk's identity and size. The
// Bulk-Only Transport and the command dispatch are in mass-storage.ts.

export const BLOCK_SIZE = 512;

export interface Sense {
  key: number;
  asc: number;
  ascq: number;
}

export const SENSE_NONE: Sense = { key: 0, asc: 0, ascq: 0 };

/** What INQUIRY reports: T10 vendor (8), product (16), revision (4), serial number, RMB. */
export interface ScsiIdentity {
  vendor: string;
  product: string;
  revision: string;
  serial: string;
  removable: boolean;
}

export function u32le(b: Uint8Array, o: number): number {
  return (b[o]! | (b[o + 1]! << 8) | (b[o + 2]! << 16) | (b[o + 3]! << 24)) >>> 0;
}
export function u16be(b: Uint8Array, o: number): number {
  return (b[o]! << 8) | b[o + 1]!;
}
export function u32be(b: Uint8Array, o: number): number {
  return ((b[o]! << 24) | (b[o + 1]! << 16) | (b[o + 2]! << 8) | b[o + 3]!) >>> 0;
}
function put32be(b: Uint8Array, o: number, v: number): void {
  b[o] = (v >>> 24) & 0xff;
  b[o + 1] = (v >>> 16) & 0xff;
  b[o + 2] = (v >>> 8) & 0xff;
  b[o + 3] = v & 0xff;
}
function put64be(b: Uint8Array, o: number, v: number): void {
  put32be(b, o, Math.floor(v / 0x100000000));
  put32be(b, o + 4, v >>> 0);
}
/** `s` as `len` printable ASCII bytes, space-padded. */
function ascii(s: string, len: number): number[] {
  const out: number[] = [];
  for (let i = 0; i < len; i++) {
    const c = i < s.length ? s.charCodeAt(i) : 0x20;
    out.push(c >= 0x20 && c < 0x7f ? c : 0x20);
  }
  return out;
}

/** REQUEST SENSE data, fixed format. */
export function fixedSenseData(s: Sense): Uint8Array {
  const b = new Uint8Array(18);
  b[0] = 0x70;
  b[2] = s.key;
  b[7] = 10;
  b[12] = s.asc;
  b[13] = s.ascq;
  return b;
}

/** READ CAPACITY(10): the last LBA (capped at 32 bits) and the block size. */
export function readCapacity10Data(blocks: number): Uint8Array {
  const b = new Uint8Array(8);
  put32be(b, 0, blocks === 0 ? 0 : Math.min(0xffffffff, blocks - 1));
  put32be(b, 4, BLOCK_SIZE);
  return b;
}

/** READ CAPACITY(16) (SERVICE ACTION IN(16)). */
export function readCapacity16Data(blocks: number): Uint8Array {
  const b = new Uint8Array(32);
  put64be(b, 0, Math.max(0, blocks - 1));
  put32be(b, 8, BLOCK_SIZE);
  return b;
}

/** READ FORMAT CAPACITIES: one descriptor, formatted media. */
export function formatCapacitiesData(blocks: number): Uint8Array {
  const b = new Uint8Array(12);
  b[3] = 8;
  put32be(b, 4, Math.min(0xffffffff, blocks));
  b[8] = 0x02; // formatted media
  b[10] = BLOCK_SIZE >> 8;
  b[11] = BLOCK_SIZE & 0xff;
  return b;
}

/** REPORT LUNS: LUN 0 only. */
export function reportLunsData(): Uint8Array {
  const b = new Uint8Array(16);
  b[3] = 8;
  return b;
}

/** Standard INQUIRY data. */
export function inquiryData(id: ScsiIdentity): Uint8Array {
  return Uint8Array.from([
    0x00,
    id.removable ? 0x80 : 0x00,
    0x06, // SPC-4
    0x02, // response data format 2
    31,
    0,
    0,
    0,
    ...ascii(id.vendor, 8),
    ...ascii(id.product, 16),
    ...ascii(id.revision, 4),
  ]);
}

/** An INQUIRY vital product data page, or undefined for a page the disk does not have. */
export function vpdPageData(page: number, id: ScsiIdentity): Uint8Array | undefined {
  const vpd = (p: number, body: number[]): Uint8Array => Uint8Array.from([0x00, p, (body.length >> 8) & 0xff, body.length & 0xff, ...body]);
  switch (page) {
    case 0x00:
      return vpd(0x00, [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
    case 0x80:
      return vpd(0x80, ascii(id.serial, id.serial.length));
    case 0x83: {
      // T10 vendor ID based designator: vendor + product + serial
      const d = [...ascii(id.vendor, 8), ...ascii(id.product, 16), ...ascii(id.serial, id.serial.length)];
      return vpd(0x83, [0x02, 0x01, 0x00, d.length, ...d]);
    }
    case 0xb0:
      // Block limits: no transfer limits reported, no UNMAP
      return vpd(0xb0, new Array<number>(0x3c).fill(0));
    case 0xb1: {
      // Block device characteristics: non-rotating medium
      const body = new Array<number>(0x3c).fill(0);
      body[1] = 0x01;
      return vpd(0xb1, body);
    }
    case 0xb2:
      // Logical block provisioning: no UNMAP / WRITE SAME, not thin provisioned
      return vpd(0xb2, [0, 0, 0, 0]);
    default:
      return undefined;
  }
}

/** The mode pages MODE SENSE returns for page 0x3f (all), in order. */
export const ALL_MODE_PAGES = [0x08, 0x0a, 0x1c] as const;

/**
 * A mode page: caching (0x08, WCE from `writeCache`), control (0x0a), informational exceptions
 * (0x1c); `changeable` gives the changeable-values mask (nothing is). Undefined for other pages.
 */
export function modePage(code: number, changeable: boolean, writeCache: boolean): number[] | undefined {
  switch (code) {
    case 0x08: {
      const p = new Array<number>(20).fill(0);
      p[0] = 0x08;
      p[1] = 0x12;
      if (!changeable) {
        p[2] = writeCache ? 0x04 : 0x00; // WCE
        p[4] = p[5] = 0xff; // disable prefetch transfer length
        p[8] = p[9] = 0xff; // maximum prefetch
        p[10] = p[11] = 0xff; // maximum prefetch ceiling
      }
      return p;
    }
    case 0x0a: {
      const p = new Array<number>(12).fill(0);
      p[0] = 0x0a;
      p[1] = 0x0a;
      return p;
    }
    case 0x1c: {
      const p = new Array<number>(12).fill(0);
      p[0] = 0x1c;
      p[1] = 0x0a;
      return p;
    }
    default:
      return undefined;
  }
}

/** MODE SENSE(6) or (10) parameter data: header, block descriptor unless `dbd`, the pages. */
export function modeSenseData(o: { ten: boolean; dbd: boolean; llbaa: boolean; readOnly: boolean; blocks: number; pages: number[] }): Uint8Array {
  const devSpecific = o.readOnly ? 0x80 : 0x00;
  let blockDesc: number[] = [];
  if (!o.dbd) {
    const bd = new Uint8Array(o.llbaa ? 16 : 8);
    if (o.llbaa) {
      put64be(bd, 0, o.blocks);
      put32be(bd, 12, BLOCK_SIZE);
    } else {
      put32be(bd, 0, Math.min(0xffffffff, o.blocks));
      bd[5] = 0;
      bd[6] = BLOCK_SIZE >> 8;
      bd[7] = BLOCK_SIZE & 0xff;
    }
    blockDesc = [...bd];
  }
  if (o.ten) {
    const total = 8 + blockDesc.length + o.pages.length;
    return Uint8Array.from([
      ((total - 2) >> 8) & 0xff,
      (total - 2) & 0xff,
      0,
      devSpecific,
      o.llbaa ? 1 : 0,
      0,
      (blockDesc.length >> 8) & 0xff,
      blockDesc.length & 0xff,
      ...blockDesc,
      ...o.pages,
    ]);
  }
  const total = 4 + blockDesc.length + o.pages.length;
  return Uint8Array.from([Math.min(255, total - 1), 0, devSpecific, blockDesc.length, ...blockDesc, ...o.pages]);
}
