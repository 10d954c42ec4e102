// Isochronous transfers for the libusb backend, outside usb@2 (it has no iso binding): a
// libusb_transfer with iso packet descriptors, submitted through koffi on a second open of the
// device (koffi-libusb.ts: why a second open, how its events are handled). The interfaces with
// isochronous endpoints are claimed through that open.
// Tried on QEMU usb-audio under a real kernel (test/e2e/libusb-iso.test.ts).
import { interfaceOps, koffiLibusb, TRANSFER_OFFSETS as OFF, type KoffiHandle, type KoffiInterfaceOps } from './koffi-libusb.js';

/** libusb_transfer_status of the transfer and of each packet (0 completed, 4 stall, ...). */
export interface IsoTransferDone {
  status: number;
  packets: Array<{ actualLength: number; status: number }>;
  /** IN: the packets' data, packed (actual lengths, in order). */
  data?: Uint8Array;
}

export interface IsoSubmitted {
  cancel(): void;
}

/** An open of one device for its isochronous interfaces. */
export interface IsoDevice extends KoffiInterfaceOps {
  /** `data` for OUT (packets concatenated); IN when endpoint & 0x80. Throws an Error with errno on a refused submit. */
  submitIso(endpoint: number, data: Uint8Array | undefined, packetLengths: number[], timeoutMs: number, done: (r: IsoTransferDone) => void): IsoSubmitted;
}

export interface IsoEngine {
  /** Open the device at this bus and port path; throws (with errno) when it cannot. */
  open(bus: number, portPath: number[]): IsoDevice;
}

const TRANSFER_TYPE_ISOCHRONOUS = 1;
const ISO_DESC = 12;

let engine: IsoEngine | undefined;

/** The engine, loaded once; undefined (with the reason) when koffi or libusb cannot be had. */
export function koffiIsoEngine(): { engine?: IsoEngine; error?: string } {
  if (engine) return { engine };
  const { libusb: loaded, error } = koffiLibusb();
  if (!loaded) return { error: `isochronous transfers through koffi: ${error}` };
  const libusb = loaded;
  const { koffi } = libusb;

  function isoDevice(h: KoffiHandle): IsoDevice {
    return {
      ...interfaceOps(h),
      submitIso(endpoint, data, lengths, timeoutMs, done) {
        const isIn = (endpoint & 0x80) !== 0;
        const len = lengths.reduce((a, b) => a + b, 0);
        const { t, buf } = libusb.allocTransfer(lengths.length, len, isIn ? undefined : data);
        const bytes = OFF.iso + ISO_DESC * lengths.length;
        const dv = new DataView(koffi.view(t, bytes));
        dv.setUint8(OFF.flags, 0);
        dv.setUint8(OFF.endpoint, endpoint);
        dv.setUint8(OFF.type, TRANSFER_TYPE_ISOCHRONOUS);
        dv.setUint32(OFF.timeout, timeoutMs >>> 0, true);
        dv.setInt32(OFF.length, len, true);
        dv.setBigUint64(OFF.buffer, koffi.address(buf), true);
        dv.setInt32(OFF.numIso, lengths.length, true);
        for (let i = 0; i < lengths.length; i++) dv.setUint32(OFF.iso + ISO_DESC * i, lengths[i]!, true);
        let cancel: () => void;
        try {
          cancel = h.submit(t, bytes, (v) => {
            const packets = lengths.map((_, i) => ({ actualLength: v.getUint32(OFF.iso + ISO_DESC * i + 4, true), status: v.getInt32(OFF.iso + ISO_DESC * i + 8, true) }));
            const data = isIn ? packIn(new Uint8Array(koffi.view(buf, Math.max(1, len))), lengths, packets) : undefined;
            koffi.free(buf);
            done({ status: v.getInt32(OFF.status, true), packets, data });
          });
        } catch (err) {
          koffi.free(buf);
          throw err;
        }
        return { cancel };
      },
    };
  }

  engine = { open: (bus, portPath) => isoDevice(libusb.open(bus, portPath)) };
  return { engine };
}

/** The completed packets' bytes, packed (each packet's buffer space holds its actual length at its start). */
function packIn(src: Uint8Array, lengths: number[], packets: Array<{ actualLength: number; status: number }>): Uint8Array {
  const total = packets.reduce((a, x) => a + (x.status === 0 ? x.actualLength : 0), 0);
  const data = new Uint8Array(total);
  let off = 0;
  let at = 0;
  for (let i = 0; i < packets.length; i++) {
    const n = packets[i]!.status === 0 ? packets[i]!.actualLength : 0;
    data.set(src.subarray(off, off + n), at);
    at += n;
    off += lengths[i]!;
  }
  return data;
}
