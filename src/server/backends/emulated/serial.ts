// Emulated CDC-ACM serial port that echoes: bytes written to bulk OUT become
// readable on bulk IN. A bounded buffer (64 KiB default) sits in between:
// when it is full, OUT URBs wait (NAK) until IN URBs drain it; IN URBs wait
// until data arrives. The notification endpoint never sends (its URBs stay
// pending until cancelled), like a port whose modem lines never change.
import { Speed, UrbStatus, type EndpointInfo, type Urb } from '../types.js';
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
import { bulkEndpoint, bulkMaxPacketSize, cdcFunctional, configuration, interruptEndpoint, usbDevice, usbInterface } from './descriptor-builder.js';

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
    const mps = bulkMaxPacketSize(speed);
    const notifyInterval = speed === Speed.Full ? 32 : 9; // 32 ms
    return usbDevice(
      {
        class: 0x02, // communications
        vendorId: o.vendorId ?? 0x1209,
        productId: o.productId ?? 0x7303,
        manufacturer: o.manufacturer ?? 'usbroam',
        product: o.product ?? 'Emulated CDC-ACM Echo',
        serial: o.serial ?? 'USBROAM-ACM',
      },
      [
        configuration({ value: 1, maxPowerMa: 100 }, [
          // Communications: abstract control model, AT commands (V.250)
          usbInterface(
            {
              number: 0,
              class: 0x02,
              subclass: 0x02,
              protocol: 0x01,
              classDescriptors: [
                cdcFunctional.header(0x0110),
                cdcFunctional.callManagement(0x00, 1), // no call management; data on interface 1
                cdcFunctional.acm(0x06), // line coding + serial state, send break
                cdcFunctional.union(0, 1),
              ],
            },
            [interruptEndpoint(ACM_NOTIFY_IN, 16, notifyInterval)],
          ),
          usbInterface({ number: 1, class: 0x0a }, [bulkEndpoint(ACM_BULK_OUT, mps), bulkEndpoint(ACM_BULK_IN, mps)]),
        ]),
      ],
    );
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
