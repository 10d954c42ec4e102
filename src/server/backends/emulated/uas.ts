// Emulated USB Attached SCSI disk: interface 0 alt 0 is the Bulk-Only Transport disk of
// mass-storage.ts (class 08/06/50), alt 1 (SuperSpeed only) is UAS (08/06/62) with four bulk
// pipes, each named by a pipe usage descriptor: command OUT (no streams), status IN, data IN
// and data OUT with bulk streams. The SCSI commands are the BOT disk's (execute()).
//
// UAS with streams (what Linux's uas driver does at SuperSpeed): the host sends a command IU
// on the command pipe whose tag is a stream id, and for that command submits a status URB and
// its data URB on the same stream id of the status and data pipes, in any order. Each stream is
// its own URB queue (emulated-device.ts), so a URB waits here for its tag's command without
// holding up other tags:
//   data IN  URB on stream T: the command's data (short when the device has less); 0 bytes when
//                             the command moves no IN data or has failed.
//   data OUT URB on stream T: written; accepted and dropped past what the command takes.
//   status   URB on stream T: once the data phase has ended and its file I/O settled, a SENSE IU
//                             (GOOD, or CHECK CONDITION with fixed sense data); RESPONSE IUs for
//                             task management and refused IUs.
// A command IU whose tag is outside the allocated streams cannot be answered on any stream: it
// stalls the command pipe (the host resets). No READ READY / WRITE READY: those are for UAS
// without streams (USB 2), which this device does not offer.
import { setTimeout as delay } from 'node:timers/promises';
import { Speed, UrbStatus, type EndpointInfo, type Urb, type UrbResult } from '../types.js';
import { STALL, result, type TransferContext, type TransferReturn } from './emulated-device.js';
import type { DeviceSpec } from './descriptors.js';
import { bulkEndpoint, bulkMaxPacketSize, configuration, usbDevice, usbInterface } from './descriptor-builder.js';
import {
  MSC_BULK_IN,
  MSC_BULK_OUT,
  MassStorageDevice,
  newScsiCommand,
  readFully,
  writeFully,
  type MassStorageOptions,
  type ScsiCommand,
} from './mass-storage.js';
import {
  IU_TASK_MGMT,
  PIPE_COMMAND,
  PIPE_DATA_IN,
  PIPE_DATA_OUT,
  PIPE_STATUS,
  RC_INCORRECT_LUN,
  RC_INVALID_INFO_UNIT,
  RC_OVERLAPPED_TAG,
  RC_TMF_COMPLETE,
  RC_TMF_NOT_SUPPORTED,
  RC_TMF_SUCCEEDED,
  TMF_ABORT_TASK,
  TMF_ABORT_TASK_SET,
  TMF_CLEAR_TASK_SET,
  TMF_I_T_NEXUS_RESET,
  TMF_LOGICAL_UNIT_RESET,
  TMF_QUERY_TASK,
  parseIu,
  pipeUsageDescriptor,
  responseIu,
  senseIu,
} from './uas-iu.js';

export const UAS_COMMAND_OUT = 0x01;
export const UAS_STATUS_IN = 0x82;
export const UAS_DATA_IN = 0x83;
export const UAS_DATA_OUT = 0x04;
/** The UAS alternate setting of interface 0. */
export const UAS_ALT = 1;
/** log2 of the streams each stream pipe offers (32: 31 commands in flight for Linux). */
export const UAS_MAX_STREAMS_EXP = 5;
/** Status IUs waiting for their status URB, per tag (a refused IU and the command's sense). */
const MAX_STATUS_PER_TAG = 4;
const EMPTY = new Uint8Array(0);

interface Task {
  tag: number;
  cmd: ScsiCommand;
  /** The data phase has ended (or the command has none). */
  dataDone: boolean;
}

export class UasDevice extends MassStorageDevice {
  private readonly tasks = new Map<number, Task>();
  /** IUs for the status pipe by tag, oldest first. */
  private readonly statusIus = new Map<number, Uint8Array[]>();
  /** A URB waiting for its tag, by pipe id << 16 | tag (one per stream: stream queues run one URB). */
  private readonly waiters = new Map<number, () => void>();
  readonly uasStats = { commands: 0, taskManagement: 0, refused: 0 };

  static override async create(options: MassStorageOptions): Promise<UasDevice> {
    const d = new UasDevice(options);
    await d.init();
    return d;
  }

  constructor(options: MassStorageOptions) {
    super({ productId: 0x7302, product: 'Emulated UAS Disk', serial: 'USBROAM-UAS-0001', ...options }, UasDevice.describe);
  }

  static override describe(o: MassStorageOptions, speed: Speed): DeviceSpec {
    const mps = bulkMaxPacketSize(speed);
    const bot = usbInterface({ number: 0, class: 0x08, subclass: 0x06, protocol: 0x50 }, [
      bulkEndpoint(MSC_BULK_IN, mps, { maxBurst: 15 }),
      bulkEndpoint(MSC_BULK_OUT, mps, { maxBurst: 15 }),
    ]);
    const interfaces = [bot];
    if (speed >= Speed.Super) {
      const stream = { maxBurst: 15, maxStreamsExp: UAS_MAX_STREAMS_EXP };
      interfaces.push(
        usbInterface({ number: 0, alternateSetting: UAS_ALT, class: 0x08, subclass: 0x06, protocol: 0x62 }, [
          bulkEndpoint(UAS_COMMAND_OUT, mps, { maxBurst: 15, extra: pipeUsageDescriptor(PIPE_COMMAND) }),
          bulkEndpoint(UAS_STATUS_IN, mps, { ...stream, extra: pipeUsageDescriptor(PIPE_STATUS) }),
          bulkEndpoint(UAS_DATA_IN, mps, { ...stream, extra: pipeUsageDescriptor(PIPE_DATA_IN) }),
          bulkEndpoint(UAS_DATA_OUT, mps, { ...stream, extra: pipeUsageDescriptor(PIPE_DATA_OUT) }),
        ]),
      );
    }
    return usbDevice(
      {
        vendorId: o.vendorId ?? 0x1209,
        productId: o.productId ?? 0x7302,
        manufacturer: o.manufacturer ?? 'usbroam',
        product: o.product ?? 'Emulated UAS Disk',
        serial: o.serial ?? 'USBROAM-UAS-0001',
      },
      [configuration({ value: 1, maxPowerMa: 100 }, interfaces)],
    );
  }

  /** Commands executing (their status not yet queued). */
  get tasksInFlight(): number {
    return this.tasks.size;
  }

  // -------------------------------------------------------------- USB

  private get uasActive(): boolean {
    return this.activeAltSetting(0) === UAS_ALT;
  }

  protected override pipelineDepth(ep: EndpointInfo): number {
    if (!this.uasActive || ep.address === UAS_COMMAND_OUT) return super.pipelineDepth(ep);
    return 1;
  }

  protected override onReset(): void {
    this.dropTasks();
    super.onReset();
  }
  protected override onConfigurationChanged(): void {
    this.dropTasks();
    super.onConfigurationChanged();
  }
  protected override onInterfaceChanged(): void {
    this.dropTasks();
    super.onReset();
  }
  protected override onStreamsChanged(): void {
    this.dropTasks();
  }
  protected override onGone(): void {
    this.dropTasks();
    super.onGone();
  }

  /** Forget every command (their URBs were cancelled by whoever changed the device's state). */
  private dropTasks(): void {
    this.tasks.clear();
    this.statusIus.clear();
    this.waiters.clear();
  }

  protected override transfer(ep: EndpointInfo, urb: Urb, ctx: TransferContext): TransferReturn {
    if (!this.uasActive) return super.transfer(ep, urb, ctx);
    switch (ep.address) {
      case UAS_COMMAND_OUT:
        return this.commandPipe(urb);
      case UAS_STATUS_IN:
        return this.statusPipe(urb, ctx);
      case UAS_DATA_IN:
        return this.dataIn(urb, ctx);
      default:
        return this.dataOut(urb, ctx);
    }
  }

  private wait(pipe: number, tag: number, ctx: TransferContext, again: () => TransferReturn): Promise<UrbResult> {
    const key = pipe * 0x10000 + tag;
    return new Promise<UrbResult>((resolve) => {
      const w = () => {
        if (ctx.cancelled) return;
        const r = again();
        if (r instanceof Promise) r.then(resolve, () => resolve(result(UrbStatus.IoError)));
        else resolve(r);
      };
      this.waiters.set(key, w);
      ctx.onCancel(() => {
        if (this.waiters.get(key) === w) this.waiters.delete(key);
        resolve(result(UrbStatus.Cancelled));
      });
    });
  }

  private wake(pipe: number, tag: number): void {
    const key = pipe * 0x10000 + tag;
    const w = this.waiters.get(key);
    if (!w) return;
    this.waiters.delete(key);
    w();
  }

  private queueStatus(tag: number, iu: Uint8Array): void {
    let list = this.statusIus.get(tag);
    if (!list) this.statusIus.set(tag, (list = []));
    // The host sends a tag again only after its status: more than a few IUs is a host out of step.
    if (list.length >= MAX_STATUS_PER_TAG) list.shift();
    list.push(iu);
    this.wake(PIPE_STATUS, tag);
  }

  private refuse(tag: number, code: number, why: string): void {
    this.uasStats.refused++;
    this.log.warn({ tag, code }, `UAS IU refused: ${why}`);
    this.queueStatus(tag, responseIu(tag, code));
  }

  private commandPipe(urb: Urb): TransferReturn {
    const d = urb.data ?? EMPTY;
    const accepted = result(UrbStatus.Success, undefined, d.length);
    const iu = parseIu(d);
    const streams = this.streamsOf(UAS_STATUS_IN);
    if (!iu || iu.tag < 1 || iu.tag > streams) {
      this.uasStats.refused++;
      this.log.warn({ length: d.length, tag: iu?.tag, streams }, 'UAS IU without a tag that names an allocated stream: command pipe stalled');
      return STALL;
    }
    const tag = iu.tag;
    if (iu.id === 'invalid') {
      this.refuse(tag, RC_INVALID_INFO_UNIT, iu.why);
      return accepted;
    }
    if (this.tasks.has(tag)) {
      this.tasks.delete(tag);
      this.refuse(tag, RC_OVERLAPPED_TAG, `tag ${tag} is already in use`);
      return accepted;
    }
    if (iu.id === IU_TASK_MGMT) {
      this.uasStats.taskManagement++;
      if (iu.lun !== 0n) this.refuse(tag, RC_INCORRECT_LUN, `task management for LUN ${iu.lun}`);
      else this.queueStatus(tag, responseIu(tag, this.taskManagement(iu.fn, iu.taskTag)));
      return accepted;
    }
    this.uasStats.commands++;
    this.scsiStats.commands++;
    const cmd = newScsiCommand(tag, 0, false);
    if (iu.lun !== 0n) this.fail(cmd, 0x05, 0x25, 0x00); // LOGICAL UNIT NOT SUPPORTED
    else this.execute(cmd, iu.cdb);
    // --disk-latency-ms: the data of a READ/WRITE moves only after this long (a stream surely in flight).
    if (this.latencyMs > 0 && (cmd.disk === 'read' || cmd.disk === 'write') && cmd.deviceLength > 0) cmd.ready = delay(this.latencyMs, undefined, { ref: false });
    const task: Task = { tag, cmd, dataDone: cmd.status !== 0 || cmd.dir === 'none' || cmd.deviceLength === 0 };
    this.tasks.set(tag, task);
    if (task.dataDone) this.endData(task);
    else {
      this.wake(PIPE_DATA_IN, tag);
      this.wake(PIPE_DATA_OUT, tag);
    }
    return accepted;
  }

  /** Run a task management function; its RESPONSE IU code. */
  private taskManagement(fn: number, taskTag: number): number {
    switch (fn) {
      case TMF_ABORT_TASK:
        this.tasks.delete(taskTag);
        return RC_TMF_COMPLETE;
      case TMF_ABORT_TASK_SET:
      case TMF_CLEAR_TASK_SET:
      case TMF_LOGICAL_UNIT_RESET:
      case TMF_I_T_NEXUS_RESET:
        this.tasks.clear();
        return RC_TMF_COMPLETE;
      case TMF_QUERY_TASK:
        return this.tasks.has(taskTag) ? RC_TMF_SUCCEEDED : RC_TMF_COMPLETE;
      default:
        return RC_TMF_NOT_SUPPORTED;
    }
  }

  /** The data phase is over: the sense IU follows once the command's file I/O has settled. */
  private endData(task: Task): void {
    task.dataDone = true;
    const cmd = task.cmd;
    const queue = () => {
      if (this.tasks.get(task.tag) !== task) return; // aborted meanwhile
      this.tasks.delete(task.tag);
      this.queueStatus(task.tag, senseIu(task.tag, cmd.status !== 0 ? (cmd.sense ?? { key: 0x04, asc: 0x44, ascq: 0x00 }) : undefined));
    };
    if (cmd.io.length === 0) queue();
    else void Promise.allSettled(cmd.io).then(queue);
  }

  private statusPipe(urb: Urb, ctx: TransferContext): TransferReturn {
    const tag = urb.streamId;
    if (tag === 0) return STALL;
    const list = this.statusIus.get(tag);
    const iu = list?.shift();
    if (!iu) return this.wait(PIPE_STATUS, tag, ctx, () => this.statusPipe(urb, ctx));
    if (list!.length === 0) this.statusIus.delete(tag);
    const out = iu.subarray(0, urb.length);
    return result(UrbStatus.Success, out, out.length);
  }

  private dataIn(urb: Urb, ctx: TransferContext): TransferReturn {
    const tag = urb.streamId;
    if (tag === 0) return STALL;
    const task = this.tasks.get(tag);
    if (!task) return this.wait(PIPE_DATA_IN, tag, ctx, () => this.dataIn(urb, ctx));
    const cmd = task.cmd;
    if (task.dataDone || cmd.dir !== 'in') return result(UrbStatus.Success, EMPTY, 0);
    const n = Math.max(0, Math.min(urb.length, cmd.deviceLength - cmd.deviceDone));
    const start = cmd.deviceDone;
    cmd.deviceDone += n;
    let ret: TransferReturn;
    if (cmd.disk === 'read') {
      const buf = Buffer.allocUnsafeSlow(n);
      const fh = this.fh;
      const pos = cmd.diskOffset + start;
      const p = fh
        ? (cmd.ready ? cmd.ready.then(() => readFully(fh, buf, pos)) : readFully(fh, buf, pos)).then(
            () => {
              this.scsiStats.bytesRead += n;
              return result(UrbStatus.Success, buf, n);
            },
            (err) => {
              this.log.warn({ err, pos, n, tag }, 'image read failed');
              this.fail(cmd, 0x03, 0x11, 0x00); // UNRECOVERED READ ERROR
              return result(UrbStatus.Success, buf.fill(0), n);
            },
          )
        : Promise.resolve(result(UrbStatus.Success, buf.fill(0), n));
      cmd.io.push(p);
      ret = p;
    } else {
      ret = result(UrbStatus.Success, cmd.inBuf!.subarray(start, start + n), n);
    }
    if (n < urb.length || cmd.deviceDone >= cmd.deviceLength) this.endData(task);
    return ret;
  }

  private dataOut(urb: Urb, ctx: TransferContext): TransferReturn {
    const tag = urb.streamId;
    if (tag === 0) return STALL;
    const task = this.tasks.get(tag);
    if (!task) return this.wait(PIPE_DATA_OUT, tag, ctx, () => this.dataOut(urb, ctx));
    const cmd = task.cmd;
    const d = urb.data ?? EMPTY;
    const accepted = result(UrbStatus.Success, undefined, d.length);
    if (task.dataDone || cmd.dir !== 'out') return accepted;
    const take = Math.min(d.length, cmd.deviceLength - cmd.deviceDone);
    const start = cmd.deviceDone;
    cmd.deviceDone += take;
    let ret: TransferReturn = accepted;
    if (take > 0 && cmd.disk === 'write' && this.fh) {
      const pos = cmd.diskOffset + start;
      const fh = this.fh;
      const p = (cmd.ready ? cmd.ready.then(() => writeFully(fh, d.subarray(0, take), pos)) : writeFully(fh, d.subarray(0, take), pos)).then(
        () => {
          this.scsiStats.bytesWritten += take;
          return accepted;
        },
        (err) => {
          this.log.warn({ err, pos, take, tag }, 'image write failed');
          this.fail(cmd, 0x03, 0x0c, 0x00); // WRITE ERROR
          return accepted;
        },
      );
      cmd.io.push(p);
      ret = p;
    }
    if (cmd.deviceDone >= cmd.deviceLength || d.length % bulkMaxPacketSize(this.speed) !== 0) this.endData(task);
    return ret;
  }
}
