// bench:e2e's usb-redir floor: the bridge's Attachment (the same usbredir codec and device side
// as usbroam) fed by an emulated device in this process, with no URB channel: no gRPC, no TLS,
// no server process. What QEMU's usb-redir itself costs against QEMU-local usb-storage, measured
// in the same run, so the note can say how much of the gap is the channel's.
//
// It implements the part of RemoteDevice an Attachment uses (submit, cancel, rawOp for the
// standard ops and bulk streams, URB ids, close); no receiving streams, no hand-off.
import { EventEmitter } from 'node:events';
import type { RemoteDevice, UrbRequest } from '../../src/client/sdk/remote-device.js';
import type { Device, DeviceOp, OpResult, UrbComplete } from '../../src/gen/usbroam/v1/usbhost.js';
import { UrbStatus as PbUrbStatus } from '../../src/gen/usbroam/v1/usbhost.js';
import { deviceToProto, endpointToProto, interfaceToProto, pbIsoPackets, pbStatus } from '../../src/server/convert.js';
import { UsbError, UrbStatus, type DeviceHandle } from '../../src/server/backends/types.js';

const EMPTY = new Uint8Array(0);

export class InProcessDevice extends EventEmitter {
  readonly sessionId = 'in-process';
  private nextUrbId = 1;
  private closed = false;
  private proto: Device;

  constructor(private readonly handle: DeviceHandle) {
    super();
    this.proto = deviceToProto(handle.info);
  }

  /** As RemoteDevice: the device as the server would describe it. */
  get device(): Device {
    return this.proto;
  }

  /** Typed as the RemoteDevice an Attachment takes (it uses only what is implemented here). */
  asRemoteDevice(): RemoteDevice {
    return this as unknown as RemoteDevice;
  }

  submit(req: UrbRequest): Promise<UrbComplete> {
    const urbId = this.nextUrbId++;
    if (this.closed) return Promise.resolve({ urbId, status: PbUrbStatus.URB_STATUS_IOERROR, data: EMPTY, actualLength: 0, isoPackets: [] });
    const isIn = (req.endpoint & 0x80) !== 0;
    return new Promise((resolve) => {
      this.handle.submit(
        {
          id: urbId,
          endpoint: req.endpoint,
          type: req.type as number,
          setup: req.setup,
          data: isIn && (req.endpoint & 0x0f) !== 0 ? undefined : req.data,
          length: req.length ?? req.data?.length ?? 0,
          streamId: req.streamId ?? 0,
          flags: req.flags ?? 0,
          isoPackets: req.isoPackets?.map((p) => ({ length: p.length, status: UrbStatus.Success, actualLength: 0 })),
          timeoutMs: req.timeoutMs ?? 0,
        },
        (r) => resolve({ urbId, status: pbStatus(r.status), data: r.data ?? EMPTY, actualLength: r.actualLength, isoPackets: pbIsoPackets(r.isoPackets) }),
      );
    });
  }

  cancel(urbId: number): void {
    this.handle.cancel(urbId);
  }

  peekNextUrbId(): number {
    return this.nextUrbId;
  }

  continueUrbIdsAfter(urbId: number): void {
    if (urbId >= this.nextUrbId) this.nextUrbId = urbId + 1;
  }

  async rawOp(op: DeviceOp['op']): Promise<OpResult> {
    const result: OpResult = { opId: 0, status: PbUrbStatus.URB_STATUS_SUCCESS, value: 0, message: '', interfaces: [], endpoints: [] };
    const layout = () => {
      result.interfaces = this.handle.info.interfaces.map(interfaceToProto);
      result.endpoints = this.handle.info.endpoints.map(endpointToProto);
      this.proto = deviceToProto(this.handle.info);
    };
    try {
      switch (op?.$case) {
        case 'setConfiguration':
          await this.handle.setConfiguration(op.value.value);
          layout();
          break;
        case 'getConfiguration':
          result.value = await this.handle.getConfiguration();
          break;
        case 'setInterface':
          await this.handle.setInterface(op.value.interfaceNumber, op.value.alternateSetting);
          layout();
          break;
        case 'getInterface':
          result.value = await this.handle.getInterface(op.value.interfaceNumber);
          break;
        case 'clearHalt':
          await this.handle.clearHalt(op.value.endpoint);
          break;
        case 'reset':
          await this.handle.reset();
          layout();
          break;
        case 'allocBulkStreams':
          result.value = await this.handle.allocBulkStreams(op.value.endpoints, op.value.numStreams);
          break;
        case 'freeBulkStreams':
          await this.handle.freeBulkStreams(op.value.endpoints);
          break;
        default:
          result.status = PbUrbStatus.URB_STATUS_INVAL;
          result.message = `${op?.$case ?? 'an empty op'} is not supported by the in-process bench device`;
      }
    } catch (err) {
      result.status = pbStatus(err instanceof UsbError ? err.status : UrbStatus.IoError);
      result.message = (err as Error).message;
    }
    return result;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.handle.close();
    this.emit('closed');
  }
}
