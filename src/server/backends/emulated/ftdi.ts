// Emulated FTDI FT232R-like serial port that echoes (0403:6001, full speed, bcdDevice 0x0600):
// what bulk OUT writes comes back on bulk IN, FTDI-framed: every packet of a bulk IN transfer
// starts with the two modem/line status bytes (0x01 0x60: CTS|DSR... as an idle FT232R sends),
// followed by up to wMaxPacketSize - 2 data bytes. Linux binds ftdi_sio; QEMU's usb-redir
// serves this device's bulk IN with usbredir bulk receiving (its quirk list buffers FTDI bulk IN
// and strips the status bytes itself), which is what this device is here to exercise.
// Unlike a real chip, a bulk IN transfer with no data waits for data (instead of returning the
// two status bytes every latency-timer period): the stream stays quiet while idle.
// Vendor requests: every OUT request (reset, modem control, flow control, baud rate, data
// characteristics, event/error chars, latency timer, bitmode) is accepted; IN 0x05 (modem
// status) answers the two status bytes, IN 0x0a (latency timer) 16, IN 0x90 (EEPROM word) 0.
import { Speed, UrbStatus, type EndpointInfo, type Urb } from '../types.js';
import { ACK, EmulatedDevice, STALL, result, type EmulatedDeviceOptions, type SetupPacket, type TransferContext, type TransferReturn } from './emulated-device.js';
import { ByteFifo } from './byte-fifo.js';
import type { DeviceSpec } from './descriptors.js';
import { bulkEndpoint, configuration, usbDevice, usbInterface } from './descriptor-builder.js';

export const FTDI_BULK_IN = 0x81;
export const FTDI_BULK_OUT = 0x02;
export const FTDI_MPS = 64;
/** The status bytes an idle FT232R puts at the start of every bulk IN packet. */
export const FTDI_STATUS = [0x01, 0x60] as const;

export interface FtdiOptions extends EmulatedDeviceOptions {
  serial?: string;
  /** Echo buffer size (default 64 KiB). */
  bufferBytes?: number;
}

/** `data` FTDI-framed into packets of `mps` bytes (2 status bytes + up to mps - 2 data bytes each). */
export function ftdiFrame(data: Uint8Array, mps = FTDI_MPS): Uint8Array {
  const per = mps - 2;
  const packets = Math.max(1, Math.ceil(data.length / per));
  const out = new Uint8Array(data.length + 2 * packets);
  let o = 0;
  for (let i = 0; i < packets; i++) {
    out[o++] = FTDI_STATUS[0];
    out[o++] = FTDI_STATUS[1];
    const chunk = data.subarray(i * per, (i + 1) * per);
    out.set(chunk, o);
    o += chunk.length;
  }
  return out;
}

export class FtdiDevice extends EmulatedDevice {
  readonly fifo: ByteFifo;
  readonly counters = { bytesOut: 0, bytesIn: 0 };

  constructor(options: FtdiOptions = {}) {
    super(() => FtdiDevice.describe(options), { ...options, speed: Speed.Full });
    this.fifo = new ByteFifo(options.bufferBytes ?? 64 * 1024);
  }

  static describe(o: FtdiOptions): DeviceSpec {
    return usbDevice(
      { vendorId: 0x0403, productId: 0x6001, bcdDevice: 0x0600, manufacturer: 'usbroam', product: 'Emulated FT232R Echo', serial: o.serial ?? 'USBROAM-FTDI' },
      [
        configuration({ value: 1, maxPowerMa: 90 }, [
          usbInterface({ number: 0, class: 0xff, subclass: 0xff, protocol: 0xff }, [bulkEndpoint(FTDI_BULK_IN, FTDI_MPS), bulkEndpoint(FTDI_BULK_OUT, FTDI_MPS)]),
        ]),
      ],
    );
  }

  protected override onReset(): void {
    this.fifo.clear();
  }
  protected override onConfigurationChanged(): void {
    this.fifo.clear();
  }
  protected override onGone(): void {
    this.fifo.clear();
  }

  protected override controlRequest(s: SetupPacket): TransferReturn {
    if (((s.bmRequestType >> 5) & 3) !== 2) return STALL;
    if (!(s.bmRequestType & 0x80)) return ACK;
    switch (s.bRequest) {
      case 0x05:
        return result(UrbStatus.Success, Uint8Array.from(FTDI_STATUS).subarray(0, s.wLength));
      case 0x0a:
        return result(UrbStatus.Success, Uint8Array.of(16).subarray(0, s.wLength));
      case 0x90:
        return result(UrbStatus.Success, new Uint8Array(Math.min(2, s.wLength)));
      default:
        return STALL;
    }
  }

  protected override transfer(ep: EndpointInfo, urb: Urb, ctx: TransferContext): TransferReturn {
    switch (ep.address) {
      case FTDI_BULK_OUT: {
        const d = urb.data ?? new Uint8Array(0);
        const r = this.fifo.write(d, ctx);
        const ok = (n: number) => {
          this.counters.bytesOut += n;
          return result(UrbStatus.Success, undefined, n);
        };
        return typeof r === 'number' ? ok(r) : r.then(ok);
      }
      case FTDI_BULK_IN: {
        // Room for whole packets only: a transfer shorter than one packet carries the status alone.
        const room = Math.floor(urb.length / FTDI_MPS) * (FTDI_MPS - 2);
        if (room <= 0) return result(UrbStatus.Success, Uint8Array.from(FTDI_STATUS).subarray(0, urb.length));
        const r = this.fifo.read(room, ctx);
        const ok = (b: Uint8Array) => {
          this.counters.bytesIn += b.length;
          return result(UrbStatus.Success, ftdiFrame(b));
        };
        return r instanceof Promise ? r.then(ok) : ok(r);
      }
      default:
        return result(UrbStatus.Inval);
    }
  }
}
