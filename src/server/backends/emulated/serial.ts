// Emulated CDC-ACM serial port that echoes: bytes written to bulk OUT become
// readable on bulk IN. A bounded buffer (64 KiB default) sits in between:
// when it is full, OUT URBs wait (NAK) until IN URBs drain it; IN URBs wait
// until data arrives. The notification endpoint never sends (its URBs stay
// pending until cancelled), like a port whose modem lines never change.
import { Speed, TransferType, UrbStatus, type EndpointInfo, type Urb } from '../types.js';
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
import { bytes, type DeviceSpec } from './descriptors.js';

export const ACM_NOTIFY_IN = 0x82;
export const ACM_BULK_IN = 0x81;
export const ACM_BULK_OUT = 0x01;

export interface LineCoding {
  baud: number;
  stopBits: number;
  parity: number;
  dataBits: number;
}

export interface SerialOptions extends EmulatedDeviceOptions {
  serial?: string;
  manufacturer?: string;
  product?: string;
  vendorId?: number;
  productId?: number;
  /** Echo buffer size (default 64 KiB). */
  bufferBytes?: number;
}

export class SerialDevice extends EmulatedDevice {
  readonly fifo: ByteFifo;
  lineCoding: LineCoding = { baud: 115200, stopBits: 0, parity: 0, dataBits: 8 };
  /** Last SET_CONTROL_LINE_STATE wValue (bit 0 DTR, bit 1 RTS). */
  controlLineState = 0;
  readonly counters = { bytesOut: 0, bytesIn: 0, breaks: 0 };

  constructor(options: SerialOptions = {}) {
    super((speed) => SerialDevice.describe(options, speed), options);
    this.fifo = new ByteFifo(options.bufferBytes ?? 64 * 1024);
  }

  static describe(o: SerialOptions, speed: Speed): DeviceSpec {
    const mps = speed === Speed.Full ? 64 : speed === Speed.High ? 512 : 1024;
    const notifyInterval = speed === Speed.Full ? 32 : 9; // 32 ms
    return {
      bcdUsb: 0x0200,
      deviceClass: 0x02,
      deviceSubclass: 0,
      deviceProtocol: 0,
      maxPacketSize0: 64,
      vendorId: o.vendorId ?? 0x1209,
      productId: o.productId ?? 0x7303,
      bcdDevice: 0x0100,
      manufacturer: o.manufacturer ?? 'usbroam',
      product: o.product ?? 'Emulated CDC-ACM Echo',
      serial: o.serial ?? 'USBROAM-ACM',
      configurations: [
        {
          value: 1,
          maxPowerMa: 100,
          selfPowered: false,
          remoteWakeup: false,
          interfaces: [
            {
              number: 0,
              alternateSetting: 0,
              interfaceClass: 0x02,
              interfaceSubclass: 0x02,
              interfaceProtocol: 0x01,
              extra: bytes(
                // Header functional descriptor, CDC 1.10
                5, 0x24, 0x00, 0x10, 0x01,
                // Call management: no call management, data interface 1
                5, 0x24, 0x01, 0x00, 0x01,
                // ACM: line coding + serial state, send break
                4, 0x24, 0x02, 0x06,
                // Union: master 0, slave 1
                5, 0x24, 0x06, 0x00, 0x01,
              ),
              endpoints: [{ address: ACM_NOTIFY_IN, type: TransferType.Interrupt, maxPacketSize: 16, interval: notifyInterval }],
            },
            {
              number: 1,
              alternateSetting: 0,
              interfaceClass: 0x0a,
              interfaceSubclass: 0,
              interfaceProtocol: 0,
              endpoints: [
                { address: ACM_BULK_OUT, type: TransferType.Bulk, maxPacketSize: mps, interval: 0 },
                { address: ACM_BULK_IN, type: TransferType.Bulk, maxPacketSize: mps, interval: 0 },
              ],
            },
          ],
        },
      ],
    };
  }

  protected override onReset(): void {
    this.fifo.clear();
    this.controlLineState = 0;
  }
  protected override onConfigurationChanged(): void {
    this.fifo.clear();
  }
  protected override onGone(): void {
    this.fifo.clear();
  }

  protected override controlRequest(s: SetupPacket, data: Uint8Array | undefined): TransferReturn {
    if (((s.bmRequestType >> 5) & 3) !== 1 || (s.bmRequestType & 0x1f) !== 1 || (s.wIndex & 0xff) !== 0) return STALL;
    switch (s.bRequest) {
      case 0x20: {
        // SET_LINE_CODING
        if (!data || data.length < 7) return STALL;
        const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
        this.lineCoding = { baud: dv.getUint32(0, true), stopBits: data[4]!, parity: data[5]!, dataBits: data[6]! };
        return ACK;
      }
      case 0x21: {
        // GET_LINE_CODING
        const b = new Uint8Array(7);
        const dv = new DataView(b.buffer);
        dv.setUint32(0, this.lineCoding.baud, true);
        b[4] = this.lineCoding.stopBits;
        b[5] = this.lineCoding.parity;
        b[6] = this.lineCoding.dataBits;
        return result(UrbStatus.Success, b);
      }
      case 0x22: // SET_CONTROL_LINE_STATE
        this.controlLineState = s.wValue & 3;
        return ACK;
      case 0x23: // SEND_BREAK
        this.counters.breaks++;
        return ACK;
      default:
        return STALL;
    }
  }

  protected override transfer(ep: EndpointInfo, urb: Urb, ctx: TransferContext): TransferReturn {
    switch (ep.address) {
      case ACM_BULK_OUT: {
        const d = urb.data ?? new Uint8Array(0);
        const r = this.fifo.write(d, ctx);
        const ok = (n: number) => {
          this.counters.bytesOut += n;
          return result(UrbStatus.Success, undefined, n);
        };
        return typeof r === 'number' ? ok(r) : r.then(ok);
      }
      case ACM_BULK_IN: {
        const r = this.fifo.read(urb.length, ctx);
        const ok = (b: Uint8Array) => {
          this.counters.bytesIn += b.length;
          return result(UrbStatus.Success, b);
        };
        return r instanceof Promise ? r.then(ok) : ok(r);
      }
      default:
        // Notification endpoint: nothing to report; pending until cancelled.
        return new Promise(() => {});
    }
  }
}
