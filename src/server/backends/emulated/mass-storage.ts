// Emulated USB mass storage: Bulk-Only Transport (class 08/06/50) with a SCSI
// block command set complete enough for Linux usb-storage + sd_mod, backed by
// a sparse image file of 512-byte blocks.
//
// BOT phases are tracked synchronously when each bulk URB starts executing,
// which lets several data URBs of one command run their file I/O concurrently
// (pipelineDepth) while still completing in order; the CSW waits for all the
// command's I/O before reporting its status.
//
// Thirteen cases (BOT 1.0 section 6.7), as implemented:
//  Hn=Dn (1) good. Hn<Di / Hn<Do (2,3): no data, CSW phase error.
//  Hi>Dn / Hi>Di (4,5): the device data, ended by a short/zero-length packet,
//    residue H-D. Hi=Di (6) good. Hi<Di (7): H bytes, CSW phase error.
//  Hi<>Do (8): bulk-IN stalled, CSW phase error.
//  Ho>Dn / Ho>Do (9,11): the excess is accepted and discarded, residue H-D.
//  Ho<>Di (10): bulk-OUT stalled, CSW phase error.
//  Ho=Do (12) good. Ho<Do (13): data discarded (nothing written), phase error.
//  Buffered responses (INQUIRY, MODE SENSE...) whose allocation length exceeds
//  H are truncated to H with good status (what most real devices do).
//  An invalid or not meaningful CBW stalls both bulk endpoints until a
//  Bulk-Only Mass Storage Reset (class request 0xFF) followed by clear halts.
import { open, type FileHandle } from 'node:fs/promises';
import { setTimeout as delay } from 'node:timers/promises';
import { Speed, UrbStatus, type EndpointInfo, type Urb, type UrbResult } from '../types.js';
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
import type { DeviceSpec } from './descriptors.js';
import { bulkEndpoint, bulkMaxPacketSize, configuration, usbDevice, usbInterface } from './descriptor-builder.js';
import {
  ALL_MODE_PAGES,
  BLOCK_SIZE,
  SENSE_NONE,
  fixedSenseData,
  formatCapacitiesData,
  inquiryData,
  modePage,
  modeSenseData,
  readCapacity10Data,
  readCapacity16Data,
  reportLunsData,
  u16be,
  u32be,
  u32le,
  vpdPageData,
  type ScsiIdentity,
  type Sense,
} from './scsi.js';

export { BLOCK_SIZE, SENSE_NONE, type Sense } from './scsi.js';

export const MSC_BULK_IN = 0x81;
export const MSC_BULK_OUT = 0x02;
const CBW_SIGNATURE = 0x43425355;
const CSW_SIGNATURE = 0x53425355;
const EMPTY = new Uint8Array(0);

export interface MassStorageOptions extends EmulatedDeviceOptions {
  /** Backing image file; created sparse with `sizeBytes` if missing. */
  imagePath: string;
  /** Size used when creating the image (default 64 MiB). An existing file keeps its size. */
  sizeBytes?: number;
  readOnly?: boolean;
  /** SCSI INQUIRY vendor (8), product (16), revision (4). */
  vendor?: string;
  productName?: string;
  revision?: string;
  /** USB strings. */
  manufacturer?: string;
  product?: string;
  serial?: string;
  vendorId?: number;
  productId?: number;
  /** INQUIRY RMB bit (default false). */
  removable?: boolean;
  /** Caching mode page WCE bit (default true: the guest sends SYNCHRONIZE CACHE, which fsyncs). */
  writeCache?: boolean;
  /**
   * Milliseconds each READ/WRITE command waits before its first data URB completes (default 0), like a slow
   * medium: tests use it so that a bulk URB is surely in flight when they act (a migration's switchover).
   */
  latencyMs?: number;
}

type Phase = 'cbw' | 'data-in' | 'data-out' | 'csw' | 'need-reset';

/** A SCSI command as the transports (BOT here, UAS in uas.ts) carry it. */
export interface ScsiCommand {
  tag: number;
  hostLength: number;
  hostIn: boolean;
  status: 0 | 1 | 2;
  /** Data direction the device wants, with deviceLength > 0. */
  dir: 'in' | 'out' | 'none';
  deviceLength: number;
  /** Bytes the device produced/consumed. */
  deviceDone: number;
  /** Bytes moved on the bus in the data phase. */
  transferred: number;
  inBuf?: Uint8Array;
  /** 'read'/'write': disk at diskOffset; 'discard': accept and drop. */
  disk?: 'read' | 'write' | 'discard';
  diskOffset: number;
  io: Promise<unknown>[];
  /** Resolves when the medium is "ready" for this command's data (after `latencyMs`); unset without latency. */
  ready?: Promise<void>;
  /** OUT data of a failed command: accepted and dropped, residue = H. */
  rejected?: boolean;
  /** The sense of a failed command (UAS returns it in the command's sense IU). */
  sense?: Sense;
}
type Command = ScsiCommand;

/** A command before execute(): no data, good status. */
export function newScsiCommand(tag: number, hostLength: number, hostIn: boolean): ScsiCommand {
  return { tag, hostLength, hostIn, status: 0, dir: 'none', deviceLength: 0, deviceDone: 0, transferred: 0, diskOffset: 0, io: [] };
}


export class MassStorageDevice extends EmulatedDevice {
  readonly imagePath: string;
  readonly readOnly: boolean;
  /** Wait of each READ/WRITE command before its data moves (MassStorageOptions.latencyMs). */
  readonly latencyMs: number;
  private readonly opts: MassStorageOptions;
  protected fh: FileHandle | undefined;
  private blocks = 0;
  private phase: Phase = 'cbw';
  private cmd: Command | undefined;
  private sense: Sense = SENSE_NONE;
  private inWaiters: (() => void)[] = [];
  private outWaiters: (() => void)[] = [];
  private kicking = false;
  private kickAgain = false;
  private readonly bulkMps: number;
  /** Counters for tests/diagnostics. */
  readonly scsiStats = { commands: 0, bytesRead: 0, bytesWritten: 0, syncs: 0, resets: 0 };

  static async create(options: MassStorageOptions): Promise<MassStorageDevice> {
    const d = new MassStorageDevice(options);
    await d.init();
    return d;
  }

  /** @param describe the device's descriptors (a subclass's own; default the BOT disk's). */
  constructor(options: MassStorageOptions, describe: (o: MassStorageOptions, speed: Speed) => DeviceSpec = MassStorageDevice.describe) {
    super((speed) => describe(options, speed), options);
    this.opts = options;
    this.imagePath = options.imagePath;
    this.readOnly = options.readOnly ?? false;
    this.bulkMps = bulkMaxPacketSize(this.speed);
    this.latencyMs = options.latencyMs ?? 0;
    if (!Number.isFinite(this.latencyMs) || this.latencyMs < 0 || this.latencyMs > 60_000) throw new Error(`disk latency must be 0..60000 ms, not ${this.latencyMs}`);
  }

  static describe(o: MassStorageOptions, speed: Speed): DeviceSpec {
    const mps = bulkMaxPacketSize(speed);
    return usbDevice(
      {
        vendorId: o.vendorId ?? 0x1209,
        productId: o.productId ?? 0x7301,
        manufacturer: o.manufacturer ?? 'usbroam',
        product: o.product ?? 'Emulated Mass Storage',
        serial: o.serial ?? 'USBROAM0001',
      },
      [
        configuration({ value: 1, maxPowerMa: 100 }, [
          // Mass storage, SCSI transparent command set, Bulk-Only Transport
          usbInterface({ number: 0, class: 0x08, subclass: 0x06, protocol: 0x50 }, [
            bulkEndpoint(MSC_BULK_IN, mps, { maxBurst: 15 }),
            bulkEndpoint(MSC_BULK_OUT, mps, { maxBurst: 15 }),
          ]),
        ]),
      ],
    );
  }

  /** Open (creating if missing) the backing image. */
  async init(): Promise<void> {
    if (this.fh) return;
    let fh: FileHandle;
    try {
      fh = await open(this.imagePath, this.readOnly ? 'r' : 'r+');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT' || this.readOnly) throw err;
      fh = await open(this.imagePath, 'w+');
      await fh.truncate(this.opts.sizeBytes ?? 64 * 1024 * 1024);
    }
    const st = await fh.stat();
    this.fh = fh;
    this.blocks = Math.floor(st.size / BLOCK_SIZE);
  }

  get capacityBlocks(): number {
    return this.blocks;
  }

  /** The current sense data (what REQUEST SENSE would return). */
  get currentSense(): Sense {
    return this.sense;
  }

  override async dispose(): Promise<void> {
    const fh = this.fh;
    this.fh = undefined;
    await fh?.close();
  }

  // -------------------------------------------------------------- USB

  protected override pipelineDepth(_ep: EndpointInfo): number {
    return 32;
  }

  protected override onReset(): void {
    this.resetBot();
  }
  protected override onConfigurationChanged(): void {
    this.resetBot();
  }
  protected override onGone(): void {
    this.resetBot();
  }

  private resetBot(): void {
    this.phase = 'cbw';
    this.cmd = undefined;
    this.kick();
  }

  protected override controlRequest(s: SetupPacket, _data: Uint8Array | undefined): TransferReturn {
    const type = (s.bmRequestType >> 5) & 3;
    if (type !== 1 || (s.bmRequestType & 0x1f) !== 1 || (s.wIndex & 0xff) !== 0) return STALL;
    if (s.bRequest === 0xfe && s.bmRequestType === 0xa1) {
      // Get Max LUN
      return result(UrbStatus.Success, Uint8Array.of(0));
    }
    if (s.bRequest === 0xff && s.bmRequestType === 0x21 && s.wLength === 0) {
      // Bulk-Only Mass Storage Reset: ready for the next CBW; halts stay until cleared.
      this.scsiStats.resets++;
      this.resetBot();
      return ACK;
    }
    return STALL;
  }

  protected override transfer(ep: EndpointInfo, urb: Urb, ctx: TransferContext): TransferReturn {
    if (ep.address === MSC_BULK_OUT) return this.bulkOut(urb, ctx);
    return this.bulkIn(urb, ctx);
  }

  private waitIn(list: (() => void)[], urb: Urb, ctx: TransferContext, again: () => TransferReturn): Promise<UrbResult> {
    return new Promise<UrbResult>((resolve) => {
      const w = () => {
        if (ctx.cancelled) return;
        const r = again();
        if (r instanceof Promise) r.then(resolve, () => resolve(result(UrbStatus.IoError)));
        else resolve(r);
      };
      list.push(w);
      ctx.onCancel(() => {
        const i = list.indexOf(w);
        if (i >= 0) list.splice(i, 1);
        resolve(result(UrbStatus.Cancelled));
      });
      void urb;
    });
  }

  /** Re-dispatch waiting URBs after a phase change, preserving their order. */
  private kick(): void {
    if (this.kicking) {
      this.kickAgain = true;
      return;
    }
    this.kicking = true;
    try {
      do {
        this.kickAgain = false;
        for (const list of [this.outWaiters, this.inWaiters]) {
          if (list.length === 0) continue;
          const ws = list.splice(0);
          for (const w of ws) w();
        }
      } while (this.kickAgain);
    } finally {
      this.kicking = false;
    }
  }

  private protocolError(): UrbResult {
    this.phase = 'need-reset';
    this.cmd = undefined;
    this.halt(MSC_BULK_IN);
    this.halt(MSC_BULK_OUT);
    return STALL;
  }

  private bulkOut(urb: Urb, ctx: TransferContext): TransferReturn {
    switch (this.phase) {
      case 'need-reset':
        return this.protocolError();
      case 'cbw':
        return this.handleCbw(urb);
      case 'data-out':
        return this.handleDataOut(urb);
      default:
        // The device is not expecting OUT data: NAK until it is.
        return this.waitIn(this.outWaiters, urb, ctx, () => this.bulkOut(urb, ctx));
    }
  }

  private bulkIn(urb: Urb, ctx: TransferContext): TransferReturn {
    switch (this.phase) {
      case 'need-reset':
        return this.protocolError();
      case 'data-in':
        return this.handleDataIn(urb);
      case 'csw':
        return this.handleCsw(urb);
      default:
        return this.waitIn(this.inWaiters, urb, ctx, () => this.bulkIn(urb, ctx));
    }
  }

  private handleCbw(urb: Urb): TransferReturn {
    const d = urb.data ?? EMPTY;
    if (d.length !== 31 || u32le(d, 0) !== CBW_SIGNATURE) return this.protocolError();
    const flags = d[12]!;
    const lun = d[13]! & 0x0f;
    const cbLen = d[14]! & 0x1f;
    if (cbLen < 1 || cbLen > 16 || (d[13]! & 0xf0) !== 0 || (flags & 0x3f) !== 0) return this.protocolError();
    const cmd = newScsiCommand(u32le(d, 4), u32le(d, 8), (flags & 0x80) !== 0);
    const cdb = d.slice(15, 15 + cbLen);
    this.scsiStats.commands++;
    if (lun !== 0) {
      this.fail(cmd, 0x05, 0x25, 0x00); // LOGICAL UNIT NOT SUPPORTED
    } else {
      this.execute(cmd, cdb);
    }
    this.cmd = cmd;
    this.enterDataPhase(cmd);
    if (this.latencyMs > 0 && (cmd.disk === 'read' || cmd.disk === 'write') && cmd.deviceLength > 0) cmd.ready = delay(this.latencyMs, undefined, { ref: false });
    this.kick();
    return result(UrbStatus.Success, undefined, 31);
  }

  private enterDataPhase(cmd: Command): void {
    const H = cmd.hostLength;
    if (cmd.deviceLength === 0) cmd.dir = 'none';
    if (H === 0) {
      if (cmd.dir !== 'none') cmd.status = 2; // cases 2, 3
      this.phase = 'csw';
      return;
    }
    if (cmd.hostIn) {
      if (cmd.dir === 'out') {
        cmd.status = 2; // case 8
        this.halt(MSC_BULK_IN);
        this.phase = 'csw';
        return;
      }
      if (cmd.deviceLength > H) {
        if (cmd.disk === 'read') cmd.status = 2; // case 7
        cmd.deviceLength = H;
      }
      this.phase = 'data-in';
      return;
    }
    if (cmd.dir === 'in') {
      cmd.status = 2; // case 10
      this.halt(MSC_BULK_OUT);
      this.phase = 'csw';
      return;
    }
    if (cmd.deviceLength > H) {
      cmd.status = 2; // case 13: nothing is written
      cmd.disk = 'discard';
      cmd.deviceLength = 0;
    }
    this.phase = 'data-out';
  }

  private handleDataIn(urb: Urb): TransferReturn {
    const cmd = this.cmd!;
    const want = Math.min(urb.length, cmd.hostLength - cmd.transferred);
    const n = Math.max(0, Math.min(want, cmd.deviceLength - cmd.deviceDone));
    const start = cmd.deviceDone;
    cmd.deviceDone += n;
    cmd.transferred += n;
    if (n < urb.length || cmd.transferred >= cmd.hostLength) {
      this.phase = 'csw';
      this.kick();
    }
    if (n === 0) return result(UrbStatus.Success, EMPTY, 0);
    if (cmd.disk === 'read') {
      const fh = this.fh;
      const buf = Buffer.allocUnsafeSlow(n);
      if (!fh) {
        this.fail(cmd, 0x02, 0x3a, 0x00);
        buf.fill(0);
        return result(UrbStatus.Success, buf, n);
      }
      const pos = cmd.diskOffset + start;
      const io = cmd.ready ? cmd.ready.then(() => readFully(fh, buf, pos)) : readFully(fh, buf, pos);
      const p = io.then(
        () => {
          this.scsiStats.bytesRead += n;
          return result(UrbStatus.Success, buf, n);
        },
        (err) => {
          this.log.warn({ err, pos, n }, 'image read failed');
          this.fail(cmd, 0x03, 0x11, 0x00); // UNRECOVERED READ ERROR
          buf.fill(0);
          return result(UrbStatus.Success, buf, n);
        },
      );
      cmd.io.push(p);
      return p;
    }
    const data = cmd.inBuf!.subarray(start, start + n);
    return result(UrbStatus.Success, data, n);
  }

  private handleDataOut(urb: Urb): TransferReturn {
    const cmd = this.cmd!;
    const d = urb.data ?? EMPTY;
    const take = Math.min(d.length, cmd.hostLength - cmd.transferred);
    const start = cmd.transferred;
    cmd.transferred += take;
    const devN = Math.max(0, Math.min(take, cmd.deviceLength - start));
    cmd.deviceDone += devN;
    if (cmd.transferred >= cmd.hostLength || d.length % this.bulkMps !== 0) {
      this.phase = 'csw';
      this.kick();
    }
    if (devN > 0 && cmd.disk === 'write' && this.fh) {
      const pos = cmd.diskOffset + start;
      const fh = this.fh;
      const chunk = d.subarray(0, devN);
      const io = cmd.ready ? cmd.ready.then(() => writeFully(fh, chunk, pos)) : writeFully(fh, chunk, pos);
      const p = io.then(
        () => {
          this.scsiStats.bytesWritten += devN;
          return result(UrbStatus.Success, undefined, d.length);
        },
        (err) => {
          this.log.warn({ err, pos, devN }, 'image write failed');
          this.fail(cmd, 0x03, 0x0c, 0x00); // WRITE ERROR
          return result(UrbStatus.Success, undefined, d.length);
        },
      );
      cmd.io.push(p);
      return p;
    }
    return result(UrbStatus.Success, undefined, d.length);
  }

  private handleCsw(urb: Urb): TransferReturn {
    const cmd = this.cmd!;
    this.cmd = undefined;
    this.phase = 'cbw';
    this.kick();
    const build = (): UrbResult => {
      const csw = new Uint8Array(13);
      const dv = new DataView(csw.buffer);
      dv.setUint32(0, CSW_SIGNATURE, true);
      dv.setUint32(4, cmd.tag, true);
      const residue = cmd.hostIn
        ? cmd.hostLength - cmd.transferred
        : cmd.rejected
          ? cmd.hostLength
          : cmd.hostLength - cmd.deviceDone;
      dv.setUint32(8, Math.max(0, residue), true);
      csw[12] = cmd.status;
      const out = csw.subarray(0, Math.min(13, urb.length));
      return result(UrbStatus.Success, out, out.length);
    };
    if (cmd.io.length === 0) return build();
    return Promise.allSettled(cmd.io).then(build);
  }

  // ------------------------------------------------------------- SCSI

  protected fail(cmd: Command, key: number, asc: number, ascq: number): void {
    if (cmd.status === 0) cmd.status = 1;
    this.sense = { key, asc, ascq };
    cmd.sense = this.sense;
    cmd.inBuf = undefined;
    if (cmd.disk === 'write' || cmd.disk === 'discard') {
      cmd.disk = 'discard';
      cmd.rejected = true;
    } else {
      cmd.dir = 'none';
      cmd.deviceLength = 0;
      cmd.disk = undefined;
    }
  }

  private reply(cmd: Command, data: Uint8Array, allocLength: number): void {
    const n = Math.min(data.length, allocLength);
    cmd.inBuf = data.subarray(0, n);
    cmd.dir = 'in';
    cmd.deviceLength = n;
  }

  /** Run a CDB: sets what data the command moves (dir, deviceLength, disk/inBuf) or fails it. */
  protected execute(cmd: Command, cdb: Uint8Array): void {
    const op = cdb[0]!;
    if (op !== 0x03) this.sense = SENSE_NONE;
    const need = (n: number) => {
      if (cdb.length < n) {
        this.fail(cmd, 0x05, 0x24, 0x00);
        return false;
      }
      return true;
    };
    switch (op) {
      case 0x00: // TEST UNIT READY
        if (!this.fh) this.fail(cmd, 0x02, 0x3a, 0x00);
        return;
      case 0x03: {
        // REQUEST SENSE (fixed format); returns and clears the sense
        const s = this.sense;
        this.sense = SENSE_NONE;
        this.reply(cmd, fixedSenseData(s), cdb[4]!);
        return;
      }
      case 0x12:
        if (need(6)) this.inquiry(cmd, cdb);
        return;
      case 0x1a: // MODE SENSE(6)
      case 0x5a: // MODE SENSE(10)
        if (need(op === 0x1a ? 6 : 10)) this.modeSense(cmd, cdb, op === 0x5a);
        return;
      case 0x15: // MODE SELECT(6)
      case 0x55: {
        // MODE SELECT(10): parameters accepted and ignored (nothing is changeable)
        const len = op === 0x15 ? cdb[4]! : u16be(cdb, 7);
        cmd.dir = 'out';
        cmd.disk = 'discard';
        cmd.deviceLength = len;
        return;
      }
      case 0x1e: // PREVENT ALLOW MEDIUM REMOVAL
      case 0x1b: // START STOP UNIT
        return;
      case 0x25: {
        // READ CAPACITY(10)
        this.reply(cmd, readCapacity10Data(this.blocks), 8);
        return;
      }
      case 0x9e: {
        // SERVICE ACTION IN(16)
        if (!need(16)) return;
        if ((cdb[1]! & 0x1f) !== 0x10) return this.fail(cmd, 0x05, 0x24, 0x00);
        this.reply(cmd, readCapacity16Data(this.blocks), u32be(cdb, 10));
        return;
      }
      case 0x23: {
        // READ FORMAT CAPACITIES
        this.reply(cmd, formatCapacitiesData(this.blocks), u16be(cdb, 7));
        return;
      }
      case 0xa0: {
        // REPORT LUNS: LUN 0 only
        if (!need(12)) return;
        this.reply(cmd, reportLunsData(), u32be(cdb, 6));
        return;
      }
      case 0x08: // READ(6)
      case 0x28: // READ(10)
      case 0xa8: // READ(12)
      case 0x88: // READ(16)
      case 0x0a: // WRITE(6)
      case 0x2a: // WRITE(10)
      case 0xaa: // WRITE(12)
      case 0x8a: // WRITE(16)
      case 0x2f: {
        // VERIFY(10)
        const len = op < 0x20 ? 6 : op < 0x40 ? 10 : op >= 0xa0 ? 12 : 16;
        if (!need(len)) return;
        let lba: number;
        let count: number;
        if (len === 6) {
          lba = ((cdb[1]! & 0x1f) << 16) | (cdb[2]! << 8) | cdb[3]!;
          count = cdb[4]! || 256;
        } else if (len === 10) {
          lba = u32be(cdb, 2);
          count = u16be(cdb, 7);
        } else if (len === 12) {
          lba = u32be(cdb, 2);
          count = u32be(cdb, 6);
        } else {
          lba = u32be(cdb, 2) * 0x100000000 + u32be(cdb, 6);
          count = u32be(cdb, 10);
        }
        const isWrite = op === 0x0a || op === 0x2a || op === 0xaa || op === 0x8a;
        const isVerify = op === 0x2f;
        const bytchk = isVerify && (cdb[1]! & 0x02) !== 0;
        // The device's data expectation comes from the CDB even if the command fails,
        // so the host's data phase can still be matched (cases 9/11).
        if (isWrite || bytchk) {
          cmd.dir = 'out';
          cmd.disk = 'discard';
          cmd.deviceLength = count * BLOCK_SIZE;
        }
        if (lba + count > this.blocks) return this.fail(cmd, 0x05, 0x21, 0x00);
        if (isWrite && this.readOnly) return this.fail(cmd, 0x07, 0x27, 0x00); // WRITE PROTECTED
        if (!this.fh) return this.fail(cmd, 0x02, 0x3a, 0x00);
        if (count === 0 || (isVerify && !bytchk)) return;
        cmd.diskOffset = lba * BLOCK_SIZE;
        cmd.deviceLength = count * BLOCK_SIZE;
        if (isWrite) {
          cmd.dir = 'out';
          cmd.disk = 'write';
        } else if (!isVerify) {
          cmd.dir = 'in';
          cmd.disk = 'read';
        }
        return;
      }
      case 0x35: // SYNCHRONIZE CACHE(10)
      case 0x91: {
        // SYNCHRONIZE CACHE(16)
        const fh = this.fh;
        if (!fh) return this.fail(cmd, 0x02, 0x3a, 0x00);
        if (this.readOnly) return;
        this.scsiStats.syncs++;
        cmd.io.push(
          fh.datasync().catch((err) => {
            this.log.warn({ err }, 'image fsync failed');
            this.fail(cmd, 0x03, 0x0c, 0x00);
          }),
        );
        return;
      }
      default:
        this.fail(cmd, 0x05, 0x20, 0x00); // INVALID COMMAND OPERATION CODE
    }
  }

  private get scsiIdentity(): ScsiIdentity {
    const o = this.opts;
    return {
      vendor: o.vendor ?? 'usbroam',
      product: o.productName ?? 'Emulated Disk',
      revision: o.revision ?? '0100',
      serial: o.serial ?? 'USBROAM0001',
      removable: o.removable ?? false,
    };
  }

  private inquiry(cmd: Command, cdb: Uint8Array): void {
    const evpd = (cdb[1]! & 1) !== 0;
    const page = cdb[2]!;
    const alloc = u16be(cdb, 3);
    if (!evpd) {
      if (page !== 0) return this.fail(cmd, 0x05, 0x24, 0x00);
      return this.reply(cmd, inquiryData(this.scsiIdentity), alloc);
    }
    const b = vpdPageData(page, this.scsiIdentity);
    if (!b) return this.fail(cmd, 0x05, 0x24, 0x00);
    this.reply(cmd, b, alloc);
  }

  private modeSense(cmd: Command, cdb: Uint8Array, ten: boolean): void {
    const dbd = (cdb[1]! & 0x08) !== 0;
    const llbaa = ten && (cdb[1]! & 0x10) !== 0;
    const pc = cdb[2]! >> 6;
    const page = cdb[2]! & 0x3f;
    const subpage = cdb[3]!;
    const alloc = ten ? u16be(cdb, 7) : cdb[4]!;
    if (pc === 3) return this.fail(cmd, 0x05, 0x39, 0x00); // SAVING PARAMETERS NOT SUPPORTED
    if (subpage !== 0 && !(page === 0x3f && subpage === 0xff)) return this.fail(cmd, 0x05, 0x24, 0x00);
    const changeable = pc === 1;
    const writeCache = this.opts.writeCache ?? true;
    let pages: number[] = [];
    if (page === 0x3f) {
      for (const c of ALL_MODE_PAGES) pages = pages.concat(modePage(c, changeable, writeCache)!);
    } else {
      const p = modePage(page, changeable, writeCache);
      if (!p) return this.fail(cmd, 0x05, 0x24, 0x00);
      pages = p;
    }
    this.reply(cmd, modeSenseData({ ten, dbd, llbaa, readOnly: this.readOnly, blocks: this.blocks, pages }), alloc);
  }
}

export async function readFully(fh: FileHandle, buf: Uint8Array, pos: number): Promise<void> {
  let off = 0;
  while (off < buf.length) {
    const { bytesRead } = await fh.read(buf, off, buf.length - off, pos + off);
    if (bytesRead === 0) {
      buf.fill(0, off);
      return;
    }
    off += bytesRead;
  }
}

export async function writeFully(fh: FileHandle, data: Uint8Array, pos: number): Promise<void> {
  let off = 0;
  while (off < data.length) {
    const { bytesWritten } = await fh.write(data, off, data.length - off, pos + off);
    if (bytesWritten === 0) throw new Error('short write');
    off += bytesWritten;
  }
}
