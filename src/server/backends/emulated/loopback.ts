// Source/sink test device in the spirit of Linux's gadget zero (vendor class).
//
// Interface 0, alt 0: bulk OUT 0x01 (sink), bulk IN 0x81 (source),
//   interrupt IN 0x82 (counter packet every `interruptIntervalMs`).
// Interface 0, alt 1: the same plus isochronous IN 0x83 and OUT 0x03.
//
// Bulk OUT: counts bytes and keeps a running CRC-32 (zlib.crc32) of them.
// Bulk IN, mode 'pattern' (default): byte j of every transfer is
//   (j % wMaxPacketSize) % 63 (gadget zero / usbtest "pattern=1").
// Bulk IN, mode 'loop': returns what was written to bulk OUT, through a
//   bounded FIFO (OUT waits when it is full, IN waits while it is empty).
// Interrupt IN: 8 bytes: u32 LE sequence number, u32 LE its bitwise NOT.
// Isochronous IN: each packet min(requested, wMaxPacketSize) bytes: u32 LE
//   global packet sequence, then the pattern; status Success. The result's
//   data is the concatenation of the packets' actual bytes. URBs complete at
//   once (no (micro)frame pacing). Isochronous OUT: accepts and counts.
//
// Vendor requests (recipient device):
//   IN  0x01 GET_COUNTERS (36 bytes LE): bytesOut u64, crc32Out u32, bytesIn u64,
//            interruptPackets u32, isoInPackets u32, isoOutBytes u64.
//   OUT 0x02 RESET_COUNTERS.  OUT 0x03 SET_MODE wValue 0 = pattern, 1 = loop.
//   OUT 0x5b / IN 0x5c: write / read back a control buffer (up to 4 KiB, usbtest style).
//   IN  0x5d SLOW_READ: after `controlLatencyMs`, wLength bytes (up to 4 KiB), byte j =
//            (wValue + 7 * wIndex + j) & 0xff (keeps control transfers in flight, checkable).
import { crc32 } from 'node:zlib';
import { Speed, UrbStatus, type EndpointInfo, type IsoPacket, type Urb, type UrbResult } from '../types.js';
import {
  ACK,
  EmulatedDevice,
  STALL,
  result,
  type EmulatedDeviceOptions,
  type SetupPacket,
  type TransferContext,
  type TransferReturn,
} from './emulated-device.js';
import { ByteFifo } from './byte-fifo.js';
import type { DeviceSpec } from './descriptors.js';
import { bulkEndpoint, bulkMaxPacketSize, configuration, interruptEndpoint, isochronousEndpoint, usbDevice, usbInterface } from './descriptor-builder.js';

export const LOOP_BULK_OUT = 0x01;
export const LOOP_BULK_IN = 0x81;
export const LOOP_INT_IN = 0x82;
export const LOOP_ISO_IN = 0x83;
export const LOOP_ISO_OUT = 0x03;

export const VREQ_GET_COUNTERS = 0x01;
export const VREQ_RESET_COUNTERS = 0x02;
export const VREQ_SET_MODE = 0x03;
export const VREQ_CONTROL_WRITE = 0x5b;
export const VREQ_CONTROL_READ = 0x5c;
export const VREQ_SLOW_READ = 0x5d;

/** What SLOW_READ answers for wValue, wIndex, wLength. */
export function slowReadPattern(wValue: number, wIndex: number, length: number): Uint8Array {
  const b = new Uint8Array(length);
  for (let j = 0; j < length; j++) b[j] = (wValue + 7 * wIndex + j) & 0xff;
  return b;
}

export type LoopbackMode = 'pattern' | 'loop';

export interface LoopbackOptions extends EmulatedDeviceOptions {
  mode?: LoopbackMode;
  interruptIntervalMs?: number;
  /** FIFO size for loop mode (default 1 MiB). */
  loopBufferBytes?: number;
  serial?: string;
  vendorId?: number;
  productId?: number;
  /** ms SLOW_READ (IN 0x5d) takes to answer (default 0). */
  controlLatencyMs?: number;
}

export interface LoopbackCounters {
  bytesOut: number;
  crc32Out: number;
  bytesIn: number;
  interruptPackets: number;
  isoInPackets: number;
  isoOutBytes: number;
}

const PATTERN_BYTES = 1024 * 1024;

/** The bulk IN pattern for a transfer of `length` bytes with packet size `mps`. */
export function loopbackPattern(length: number, mps: number): Uint8Array {
  const b = new Uint8Array(length);
  for (let j = 0; j < length; j++) b[j] = (j % mps) % 63;
  return b;
}

function zeroCounters(): LoopbackCounters {
  return { bytesOut: 0, crc32Out: 0, bytesIn: 0, interruptPackets: 0, isoInPackets: 0, isoOutBytes: 0 };
}

export class LoopbackDevice extends EmulatedDevice {
  mode: LoopbackMode;
  counters: LoopbackCounters = zeroCounters();
  private readonly fifo: ByteFifo;
  private readonly interruptIntervalMs: number;
  private readonly bulkMps: number;
  private readonly isoMps: number;
  /** Pattern prefix, a whole number of packets long; bulk IN results are views of it, never written. */
  private readonly pattern: Buffer;
  private controlBuffer: Uint8Array = new Uint8Array(0);
  private lastInterrupt = 0;
  private readonly controlLatencyMs: number;

  constructor(options: LoopbackOptions = {}) {
    super((speed) => LoopbackDevice.describe(options, speed), options);
    this.mode = options.mode ?? 'pattern';
    this.interruptIntervalMs = options.interruptIntervalMs ?? 8;
    this.controlLatencyMs = options.controlLatencyMs ?? 0;
    this.fifo = new ByteFifo(options.loopBufferBytes ?? 1024 * 1024);
    this.bulkMps = bulkMaxPacketSize(this.speed);
    this.isoMps = this.speed === Speed.Full ? 1023 : 1024;
    const len = Math.ceil(PATTERN_BYTES / this.bulkMps) * this.bulkMps;
    this.pattern = Buffer.from(loopbackPattern(len, this.bulkMps));
  }

  static describe(o: LoopbackOptions, speed: Speed): DeviceSpec {
    const full = speed === Speed.Full;
    const bulk = bulkMaxPacketSize(speed);
    const iso = full ? 1023 : 1024;
    const periodicInterval = full ? 1 : 4; // 1 ms
    const base = [
      bulkEndpoint(LOOP_BULK_OUT, bulk, { maxBurst: 15 }),
      bulkEndpoint(LOOP_BULK_IN, bulk, { maxBurst: 15 }),
      interruptEndpoint(LOOP_INT_IN, 64, periodicInterval),
    ];
    const isoEps = [isochronousEndpoint(LOOP_ISO_IN, iso, periodicInterval), isochronousEndpoint(LOOP_ISO_OUT, iso, periodicInterval)];
    return usbDevice(
      {
        class: 0xff, // vendor specific
        vendorId: o.vendorId ?? 0x1209,
        productId: o.productId ?? 0x7302,
        manufacturer: 'usbroam',
        product: 'Emulated Loopback',
        serial: o.serial ?? 'USBROAM-LOOP',
      },
      [
        configuration({ value: 1, name: 'source/sink', maxPowerMa: 100, selfPowered: true }, [
          // Alternate setting 1 adds the isochronous pair.
          usbInterface({ number: 0, alternateSetting: 0, class: 0xff }, base),
          usbInterface({ number: 0, alternateSetting: 1, class: 0xff }, [...base, ...isoEps]),
        ]),
      ],
    );
  }

  get loopBuffered(): number {
    return this.fifo.length;
  }

  protected override onReset(): void {
    this.fifo.clear();
  }

  protected override controlRequest(s: SetupPacket, data: Uint8Array | undefined, ctx: TransferContext): TransferReturn {
    if (((s.bmRequestType >> 5) & 3) !== 2) return STALL;
    const isIn = (s.bmRequestType & 0x80) !== 0;
    switch (s.bRequest) {
      case VREQ_GET_COUNTERS: {
        if (!isIn) return STALL;
        const b = Buffer.alloc(36);
        const c = this.counters;
        b.writeBigUInt64LE(BigInt(c.bytesOut), 0);
        b.writeUInt32LE(c.crc32Out >>> 0, 8);
        b.writeBigUInt64LE(BigInt(c.bytesIn), 12);
        b.writeUInt32LE(c.interruptPackets >>> 0, 20);
        b.writeUInt32LE(c.isoInPackets >>> 0, 24);
        b.writeBigUInt64LE(BigInt(c.isoOutBytes), 28);
        return result(UrbStatus.Success, b);
      }
      case VREQ_RESET_COUNTERS:
        if (isIn) return STALL;
        this.counters = zeroCounters();
        return ACK;
      case VREQ_SET_MODE:
        if (isIn || s.wValue > 1) return STALL;
        this.mode = s.wValue === 1 ? 'loop' : 'pattern';
        if (this.mode === 'pattern') this.fifo.clear();
        return ACK;
      case VREQ_CONTROL_WRITE:
        if (isIn || s.wLength > 4096) return STALL;
        this.controlBuffer = Uint8Array.from(data ?? []);
        return ACK;
      case VREQ_CONTROL_READ:
        if (!isIn) return STALL;
        return result(UrbStatus.Success, this.controlBuffer.slice(0, s.wLength));
      case VREQ_SLOW_READ:
        if (!isIn || s.wLength > 4096) return STALL;
        return this.slowRead(s, ctx);
      default:
        return STALL;
    }
  }

  private slowRead(s: SetupPacket, ctx: TransferContext): TransferReturn {
    const answer = () => result(UrbStatus.Success, slowReadPattern(s.wValue, s.wIndex, s.wLength));
    if (this.controlLatencyMs <= 0) return answer();
    return new Promise<UrbResult>((resolve) => {
      const t = setTimeout(() => resolve(answer()), this.controlLatencyMs);
      ctx.onCancel(() => {
        clearTimeout(t);
        resolve(result(UrbStatus.Cancelled));
      });
    });
  }

  protected override transfer(ep: EndpointInfo, urb: Urb, ctx: TransferContext): TransferReturn {
    switch (ep.address) {
      case LOOP_BULK_OUT:
        return this.bulkOut(urb, ctx);
      case LOOP_BULK_IN:
        return this.bulkIn(urb, ctx);
      case LOOP_INT_IN:
        return this.interruptIn(ctx);
      case LOOP_ISO_IN:
        return this.isoIn(urb);
      case LOOP_ISO_OUT:
        return this.isoOut(urb);
      default:
        return result(UrbStatus.Inval);
    }
  }

  private bulkOut(urb: Urb, ctx: TransferContext): TransferReturn {
    const d = urb.data ?? new Uint8Array(0);
    const c = this.counters;
    c.bytesOut += d.length;
    c.crc32Out = crc32(d, c.crc32Out);
    if (this.mode === 'loop') {
      const r = this.fifo.write(d, ctx);
      if (typeof r !== 'number') return r.then((n) => result(UrbStatus.Success, undefined, n));
    }
    return result(UrbStatus.Success, undefined, d.length);
  }

  private bulkIn(urb: Urb, ctx: TransferContext): TransferReturn {
    if (this.mode === 'loop') {
      const r = this.fifo.read(urb.length, ctx);
      const ok = (b: Uint8Array): UrbResult => {
        this.counters.bytesIn += b.length;
        return result(UrbStatus.Success, b);
      };
      return r instanceof Promise ? r.then(ok) : ok(r);
    }
    const n = urb.length;
    const p = this.pattern;
    this.counters.bytesIn += n;
    // Up to the pattern's length the data is a view of it, as a real device's DMA costs the host
    // nothing: no allocation and no copy per URB (the session only reads a result's data; it is
    // copied once, into the outgoing message).
    if (n <= p.length) return result(UrbStatus.Success, p.subarray(0, n), n);
    const out = Buffer.allocUnsafeSlow(n);
    for (let off = 0; off < n; off += p.length) p.copy(out, off, 0, Math.min(p.length, n - off));
    return result(UrbStatus.Success, out, n);
  }

  private interruptIn(ctx: TransferContext): TransferReturn {
    const now = Date.now();
    const wait = Math.max(0, this.lastInterrupt + this.interruptIntervalMs - now);
    return new Promise<UrbResult>((resolve) => {
      const t = setTimeout(() => {
        this.lastInterrupt = Date.now();
        const seq = ++this.counters.interruptPackets;
        const b = Buffer.alloc(8);
        b.writeUInt32LE(seq >>> 0, 0);
        b.writeUInt32LE(~seq >>> 0, 4);
        resolve(result(UrbStatus.Success, b));
      }, wait);
      ctx.onCancel(() => {
        clearTimeout(t);
        resolve(result(UrbStatus.Cancelled));
      });
    });
  }

  private isoIn(urb: Urb): UrbResult {
    const packets: IsoPacket[] = [];
    let total = 0;
    for (const p of urb.isoPackets!) total += Math.min(p.length, this.isoMps);
    const out = Buffer.allocUnsafe(total);
    let off = 0;
    for (const p of urb.isoPackets!) {
      const n = Math.min(p.length, this.isoMps);
      this.pattern.copy(out, off, 0, n);
      const seq = this.counters.isoInPackets++;
      if (n >= 4) out.writeUInt32LE(seq >>> 0, off);
      packets.push({ length: p.length, status: UrbStatus.Success, actualLength: n });
      off += n;
    }
    this.counters.bytesIn += total;
    return { status: UrbStatus.Success, data: out, actualLength: total, isoPackets: packets };
  }

  private isoOut(urb: Urb): UrbResult {
    const packets: IsoPacket[] = urb.isoPackets!.map((p) => ({
      length: p.length,
      status: UrbStatus.Success,
      actualLength: p.length,
    }));
    const total = packets.reduce((a, p) => a + p.length, 0);
    this.counters.isoOutBytes += total;
    return { status: UrbStatus.Success, actualLength: total, isoPackets: packets };
  }
}
