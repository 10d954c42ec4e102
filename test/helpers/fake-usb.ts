// A fake `usb` 2.x module for the libusb backend's tests: devices with descriptors, strings,
// kernel drivers that can refuse to detach, descriptors that fail to read, and transfers the test
// completes by hand (status, length, data).
import type { UsbEnumDeviceLike, UsbModuleLike } from '../../src/server/backends/libusb/libusb-backend.js';
import { TransferType } from '../../src/server/backends/types.js';

export type Cb = (err?: Error & { errno?: number }) => void;

export function libusbErr(errno: number, msg = `LIBUSB_ERR_${errno}`) {
  return Object.assign(new Error(msg), { errno });
}

export interface FakeTransfer {
  endpoint: number;
  type: number;
  timeoutMs: number;
  buf?: Buffer;
  cancelled: boolean;
  /** Completed (by the test or by a cancel): a second completion is ignored, as in libusb. */
  done: boolean;
  complete(errno: number | undefined, actual: number, fill?: Uint8Array): void;
}

export class FakeDevice implements UsbEnumDeviceLike {
  opened = false;
  claimed = new Set<number>();
  driverBound = new Set<number>([0]);
  refuseDetach = false;
  calls: string[] = [];
  gone = false;
  config = 1;
  /** Reading the configuration descriptors fails (node-usb's getters throw a LIBUSB_ERROR). */
  descriptorError = false;
  constructor(
    public busNumber: number,
    public deviceAddress: number,
    public portNumbers: number[],
    public deviceDescriptor: UsbEnumDeviceLike['deviceDescriptor'],
    private readonly strings: string[] = ['', 'ACME', 'Widget', 'W0001'],
    private readonly ifClass = 0xff,
  ) {}
  private cfg(value: number) {
    return {
      bLength: 9, bDescriptorType: 2, wTotalLength: 32, bNumInterfaces: 1, bConfigurationValue: value, iConfiguration: 0, bmAttributes: 0x80, bMaxPower: 50, extra: Buffer.alloc(0),
      interfaces: [[0, 1].map((alt) => ({
        bLength: 9, bDescriptorType: 4, bInterfaceNumber: 0, bAlternateSetting: alt, bNumEndpoints: alt ? 1 : 2, bInterfaceClass: this.ifClass, bInterfaceSubClass: 0, bInterfaceProtocol: 0, iInterface: 0, extra: Buffer.alloc(0),
        endpoints: (alt ? [0x83] : [0x81, 0x02]).map((a) => ({ bLength: 7, bDescriptorType: 5, bEndpointAddress: a, bmAttributes: a === 0x83 ? 3 : 2, wMaxPacketSize: 512, bInterval: 0, bRefresh: 0, bSynchAddress: 0, extra: Buffer.alloc(0) })),
      }))],
    };
  }
  get configDescriptor() {
    if (this.descriptorError) throw libusbErr(-1, 'LIBUSB_ERROR_IO');
    return this.config ? this.cfg(this.config) : undefined;
  }
  get allConfigDescriptors() {
    if (this.descriptorError) throw libusbErr(-1, 'LIBUSB_ERROR_IO');
    return [this.cfg(1)];
  }
  __open() {
    if (this.gone) throw libusbErr(-4);
    this.opened = true;
  }
  __close() {
    this.opened = false;
  }
  __claimInterface(n: number) {
    this.calls.push(`claim ${n}`);
    this.claimed.add(n);
  }
  __releaseInterface(n: number, cb: Cb) {
    this.calls.push(`release ${n}`);
    this.claimed.delete(n);
    setImmediate(() => cb());
  }
  __detachKernelDriver(n: number) {
    if (this.refuseDetach) throw libusbErr(-3, 'LIBUSB_ERROR_ACCESS');
    this.calls.push(`detach ${n}`);
    this.driverBound.delete(n);
  }
  __attachKernelDriver(n: number) {
    this.calls.push(`attach ${n}`);
    this.driverBound.add(n);
  }
  __isKernelDriverActive(n: number) {
    return this.driverBound.has(n);
  }
  __setConfiguration(v: number, cb: Cb) {
    this.calls.push(`setconfig ${v}`);
    setImmediate(() => cb(this.claimed.size ? libusbErr(-6) : undefined));
  }
  __setInterface(n: number, alt: number, cb: Cb) {
    this.calls.push(`setinterface ${n} ${alt}`);
    setImmediate(() => cb());
  }
  __clearHalt(ep: number, cb: Cb) {
    this.calls.push(`clearhalt ${ep.toString(16)}`);
    setImmediate(() => cb());
  }
  reset(cb: Cb) {
    this.calls.push('reset');
    setImmediate(() => cb());
  }
  getStringDescriptor(i: number, cb: (err?: Error, v?: string) => void) {
    setImmediate(() => cb(undefined, this.strings[i]));
  }
}

export function dd(vid: number, pid: number, cls = 0) {
  return { bLength: 18, bDescriptorType: 1, bcdUSB: 0x0200, bDeviceClass: cls, bDeviceSubClass: 0, bDeviceProtocol: 0, bMaxPacketSize0: 64, idVendor: vid, idProduct: pid, bcdDevice: 0x0102, iManufacturer: 1, iProduct: 2, iSerialNumber: 3, bNumConfigurations: 1 };
}

/** A node-usb Transfer the backend created (one per pooled transfer: reused for many submissions). */
export interface FakeTransferObject {
  endpoint: number;
  type: number;
  timeoutMs: number;
  /** Submitted and its callback not yet delivered (node-usb: "Transfer is already active"). */
  active: boolean;
  submissions: number;
}

export function fakeUsb(devices: FakeDevice[]) {
  const transfers: FakeTransferObject[] = [];
  const submitted: FakeTransfer[] = [];
  const mod: UsbModuleLike & {
    devices: FakeDevice[];
    /** Transfers created (new Transfer). */
    transfers: FakeTransferObject[];
    /** Every submission, in order; complete() them by hand. */
    submitted: FakeTransfer[];
    failSubmit?: number;
    /** errnos for the next submits (undefined: that one succeeds). */
    submitErrors: Array<number | undefined>;
  } = {
    devices,
    transfers,
    submitted,
    submitErrors: [],
    getDeviceList: () => [...mod.devices],
    newTransfer: (device, endpoint, type, timeoutMs, cb) => {
      const obj: FakeTransferObject = { endpoint, type, timeoutMs, active: false, submissions: 0 };
      transfers.push(obj);
      let current: FakeTransfer | undefined;
      return {
        submit(buf: Buffer) {
          if (obj.active) throw new Error('Transfer is already active');
          if (mod.failSubmit !== undefined) throw libusbErr(mod.failSubmit);
          const e = mod.submitErrors.shift();
          if (e !== undefined) throw libusbErr(e);
          if ((device as FakeDevice).gone) throw libusbErr(-4);
          const t: FakeTransfer = {
            endpoint, type, timeoutMs, buf, cancelled: false, done: false,
            complete(errno, actual, fill) {
              if (t.done) return;
              t.done = true;
              if (fill) buf.set(fill, type === TransferType.Control ? 8 : 0);
              setImmediate(() => {
                obj.active = false;
                cb(errno === undefined ? undefined : libusbErr(errno), buf, actual);
              });
            },
          };
          obj.active = true;
          obj.submissions++;
          current = t;
          submitted.push(t);
        },
        cancel() {
          const t = current;
          if (!t || t.done) return false;
          t.cancelled = true;
          t.complete(3, 0);
          return true;
        },
      };
    },
  };
  return mod;
}
