// The libusb backend against a fake `usb` module: enumeration and export
// policy, hotplug by rescan, claim with kernel-driver detach/re-attach, URB
// submission/completion/cancel mapping, standard requests routed to libusb
// calls, device loss, and the clear errors (refusing driver, iso, streams).
import { expect } from 'chai';
import { LibusbBackend, type UsbEnumDeviceLike, type UsbModuleLike } from '../../src/server/backends/libusb/libusb-backend.js';
import { ISO_UNIMPLEMENTED, STREAMS_UNIMPLEMENTED, type LibusbDeviceHandle } from '../../src/server/backends/libusb/libusb-device.js';
import { TransferType, UrbStatus, UsbError, type DeviceHandle, type DeviceInfo, type Urb, type UrbResult } from '../../src/server/backends/types.js';

type Cb = (err?: Error & { errno?: number }) => void;

function libusbErr(errno: number, msg = `LIBUSB_ERR_${errno}`) {
  return Object.assign(new Error(msg), { errno });
}

interface FakeTransfer {
  endpoint: number;
  type: number;
  timeoutMs: number;
  buf?: Buffer;
  cancelled: boolean;
  complete(errno: number | undefined, actual: number, fill?: Uint8Array): void;
}

class FakeDevice implements UsbEnumDeviceLike {
  opened = false;
  claimed = new Set<number>();
  driverBound = new Set<number>([0]);
  refuseDetach = false;
  calls: string[] = [];
  gone = false;
  config = 1;
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
    return this.config ? this.cfg(this.config) : undefined;
  }
  get allConfigDescriptors() {
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

function dd(vid: number, pid: number, cls = 0) {
  return { bLength: 18, bDescriptorType: 1, bcdUSB: 0x0200, bDeviceClass: cls, bDeviceSubClass: 0, bDeviceProtocol: 0, bMaxPacketSize0: 64, idVendor: vid, idProduct: pid, bcdDevice: 0x0102, iManufacturer: 1, iProduct: 2, iSerialNumber: 3, bNumConfigurations: 1 };
}

function fakeUsb(devices: FakeDevice[]) {
  const transfers: FakeTransfer[] = [];
  const mod: UsbModuleLike & { devices: FakeDevice[]; transfers: FakeTransfer[]; failSubmit?: number } = {
    devices,
    transfers,
    getDeviceList: () => [...mod.devices],
    newTransfer: (device, endpoint, type, timeoutMs, cb) => {
      const t: FakeTransfer = {
        endpoint, type, timeoutMs, cancelled: false,
        complete(errno, actual, fill) {
          if (fill && t.buf) t.buf.set(fill, type === TransferType.Control ? 8 : 0);
          setImmediate(() => cb(errno === undefined ? undefined : libusbErr(errno), t.buf!, actual));
        },
      };
      transfers.push(t);
      return {
        submit(buf: Buffer) {
          if (mod.failSubmit !== undefined) throw libusbErr(mod.failSubmit);
          if ((device as FakeDevice).gone) throw libusbErr(-4);
          t.buf = buf;
        },
        cancel() {
          t.cancelled = true;
          t.complete(3, 0);
          return true;
        },
      };
    },
  };
  return mod;
}

const NOSYS = '/nonexistent-sysfs';
let nextId = 1;
function urb(p: Partial<Urb>): Urb {
  return { id: nextId++, endpoint: 0x81, type: TransferType.Bulk, length: 0, streamId: 0, flags: 0, timeoutMs: 0, ...p };
}
function submit(h: DeviceHandle, u: Urb): Promise<UrbResult> {
  return new Promise((resolve) => {
    let sync = true;
    h.submit(u, (r) => {
      expect(sync, 'done is never called from inside submit').to.equal(false);
      resolve(r);
    });
    sync = false;
  });
}
const tick = () => new Promise((r) => setImmediate(r));

describe('libusb backend (fake usb module)', () => {
  let widget: FakeDevice;
  let hub: FakeDevice;
  let mod: ReturnType<typeof fakeUsb>;
  let backend: LibusbBackend;

  beforeEach(async () => {
    widget = new FakeDevice(1, 5, [2], dd(0x1234, 0x5678));
    hub = new FakeDevice(1, 1, [], dd(0x1d6b, 0x0002, 9), ['', 'Linux', 'xHCI', '']);
    mod = fakeUsb([hub, widget]);
    backend = await LibusbBackend.create({ allow: [{}], usb: mod, pollMs: 0, sysfsRoot: NOSYS });
  });
  afterEach(() => backend.close());

  it('enumerates with descriptors and strings; hubs are never listed', () => {
    const list = backend.list();
    expect(list.map((d) => d.id)).to.deep.equal(['usb-1-2-W0001']);
    const d = list[0]!;
    expect(d).to.include({ vendorId: 0x1234, productId: 0x5678, manufacturer: 'ACME', product: 'Widget', serial: 'W0001', bus: 1, bcdDevice: 0x0102, activeConfiguration: 1, backend: 'libusb' });
    expect(d.portPath).to.deep.equal([2]);
    expect(d.configurations[0]!.interfaces).to.have.length(2);
    expect(d.configurations[0]!.maxPowerMa).to.equal(100);
    expect(d.endpoints.map((e) => e.address)).to.deep.equal([0x81, 0x02]);
  });

  it('only devices matching the allow rules are listed or claimable', async () => {
    const b2 = await LibusbBackend.create({ allow: [{ vendorId: 0xffff }], usb: mod, pollMs: 0, sysfsRoot: NOSYS });
    expect(b2.list()).to.deep.equal([]);
    await b2.open('usb-1-2-W0001').then(
      () => expect.fail('opened'),
      (err) => expect((err as UsbError).message).to.match(/not exported by the libusb allow rules/),
    );
    await b2.close();
  });

  it('hotplug: a rescan emits added and removed; an open handle gets gone and IoError completions', async () => {
    const added: DeviceInfo[] = [];
    const removed: string[] = [];
    backend.on('added', (i) => added.push(i));
    backend.on('removed', (id) => removed.push(id));
    const other = new FakeDevice(2, 3, [1, 4], dd(0x0627, 0x0001), ['', 'QEMU', 'Keyboard', '']);
    mod.devices.push(other);
    await backend.rescan();
    expect(added.map((i) => i.id)).to.deep.equal(['usb-2-1.4']);
    const h = (await backend.open('usb-1-2-W0001')) as LibusbDeviceHandle;
    let goneReason = '';
    h.on('gone', (r: string) => (goneReason = r));
    const inflight = submit(h, urb({ endpoint: 0x81, length: 512 }));
    mod.devices = mod.devices.filter((d) => d !== widget);
    widget.gone = true;
    await backend.rescan();
    expect(removed).to.deep.equal(['usb-1-2-W0001']);
    await tick();
    expect(goneReason).to.equal('device unplugged');
    mod.transfers.at(-1)!.complete(5, 0); // LIBUSB_TRANSFER_NO_DEVICE
    expect((await inflight).status).to.equal(UrbStatus.IoError);
    expect((await submit(h, urb({ endpoint: 0x81, length: 8 }))).status).to.equal(UrbStatus.IoError);
    await h.close();
  });

  it('open detaches kernel drivers and claims; close releases and re-attaches', async () => {
    const h = await backend.open('usb-1-2-W0001');
    expect(widget.calls).to.deep.equal(['detach 0', 'claim 0']);
    await backend.open('usb-1-2-W0001').then(() => expect.fail('opened twice'), (err) => expect(String(err)).to.match(/already open/));
    await h.close();
    expect(widget.calls.slice(2)).to.deep.equal(['release 0', 'attach 0']);
    expect(widget.opened).to.equal(false);
    (await backend.open('usb-1-2-W0001')).close();
  });

  it('a kernel driver that refuses to detach is a clear error for that open only', async () => {
    widget.refuseDetach = true;
    await backend.open('usb-1-2-W0001').then(
      () => expect.fail('opened'),
      (err) => expect((err as Error).message).to.match(/kernel driver of interface 0 refuses to detach/),
    );
    expect(widget.opened).to.equal(false);
    widget.refuseDetach = false;
    const h = await backend.open('usb-1-2-W0001');
    await h.close();
  });

  it('many bulk URBs in flight on one endpoint; each completes once with its data; cancel', async () => {
    const h = await backend.open('usb-1-2-W0001');
    const base = mod.transfers.length;
    const us = [1, 2, 3].map(() => urb({ endpoint: 0x81, length: 16 }));
    const ps = us.map((u) => submit(h, u));
    expect(mod.transfers.length - base).to.equal(3);
    mod.transfers[base]!.complete(undefined, 4, Uint8Array.from([1, 2, 3, 4]));
    expect(h.cancel(us[1]!.id)).to.equal(true);
    mod.transfers[base + 2]!.complete(4, 0); // STALL
    const [r0, r1, r2] = await Promise.all(ps);
    expect(r0).to.deep.include({ status: UrbStatus.Success, actualLength: 4 });
    expect([...r0!.data!]).to.deep.equal([1, 2, 3, 4]);
    expect(r1!.status).to.equal(UrbStatus.Cancelled);
    expect(r2!.status).to.equal(UrbStatus.Stall);
    expect(h.cancel(us[0]!.id)).to.equal(false);
    const out = submit(h, urb({ endpoint: 0x02, data: Uint8Array.from([9, 9]), length: 2 }));
    const t = mod.transfers.at(-1)!;
    expect([...t.buf!]).to.deep.equal([9, 9]);
    t.complete(2, 2);
    expect((await out).status).to.equal(UrbStatus.Timeout);
    // Unknown endpoint / wrong type / sync submit failure.
    expect((await submit(h, urb({ endpoint: 0x85, length: 8 }))).status).to.equal(UrbStatus.Stall);
    expect((await submit(h, urb({ endpoint: 0x81, type: TransferType.Interrupt, length: 8 }))).status).to.equal(UrbStatus.Inval);
    mod.failSubmit = -1;
    expect((await submit(h, urb({ endpoint: 0x81, length: 8 }))).status).to.equal(UrbStatus.IoError);
    mod.failSubmit = undefined;
    await h.close();
  });

  it('control: raw setup packets; SET_CONFIGURATION / SET_INTERFACE / CLEAR_FEATURE(HALT) go through libusb calls', async () => {
    const h = await backend.open('usb-1-2-W0001');
    const get = submit(h, urb({ endpoint: 0x80, type: TransferType.Control, setup: Uint8Array.from([0x80, 6, 0, 1, 0, 0, 18, 0]), length: 18 }));
    const t = mod.transfers.at(-1)!;
    expect(t.endpoint).to.equal(0);
    expect(t.buf!.length).to.equal(8 + 18);
    t.complete(undefined, 2, Uint8Array.from([18, 1]));
    const r = await get;
    expect(r).to.deep.include({ status: UrbStatus.Success, actualLength: 2 });
    expect([...r.data!]).to.deep.equal([18, 1]);
    const n = mod.transfers.length;
    const setIf = await submit(h, urb({ endpoint: 0x00, type: TransferType.Control, setup: Uint8Array.from([0x01, 0x0b, 1, 0, 0, 0, 0, 0]), length: 0 }));
    expect(setIf.status).to.equal(UrbStatus.Success);
    expect(widget.calls).to.include('setinterface 0 1');
    expect(h.info.endpoints.map((e) => e.address)).to.deep.equal([0x83]);
    expect(await h.getInterface(0)).to.equal(1);
    expect((await submit(h, urb({ endpoint: 0x00, type: TransferType.Control, setup: Uint8Array.from([0x02, 0x01, 0, 0, 0x83, 0, 0, 0]), length: 0 }))).status).to.equal(UrbStatus.Success);
    expect(widget.calls).to.include('clearhalt 83');
    widget.calls.length = 0;
    expect((await submit(h, urb({ endpoint: 0x00, type: TransferType.Control, setup: Uint8Array.from([0x00, 0x09, 1, 0, 0, 0, 0, 0]), length: 0 }))).status).to.equal(UrbStatus.Success);
    expect(widget.calls).to.deep.equal(['release 0', 'setconfig 1', 'claim 0']);
    expect(h.info.endpoints.map((e) => e.address), 'alt settings back to 0').to.deep.equal([0x81, 0x02]);
    expect(mod.transfers.length, 'no raw transfers for those').to.equal(n);
    await h.reset();
    expect(widget.calls).to.include('reset');
    await h.close();
  });

  it('isochronous URBs and bulk streams: clear Inval errors saying what is missing', async () => {
    const h = await backend.open('usb-1-2-W0001');
    const r = await submit(h, urb({ endpoint: 0x81, type: TransferType.Isochronous, length: 64, isoPackets: [{ length: 64, status: 0, actualLength: 0 }] }));
    expect(r.status).to.equal(UrbStatus.Inval);
    expect(r.isoPackets![0]!.status).to.equal(UrbStatus.Inval);
    expect(ISO_UNIMPLEMENTED).to.match(/isochronous transfers are not implemented/);
    await h.allocBulkStreams([0x81], 4).then(
      () => expect.fail('streams'),
      (err) => {
        expect(err).to.be.instanceOf(UsbError);
        expect((err as UsbError).status).to.equal(UrbStatus.Inval);
        expect((err as UsbError).message).to.equal(STREAMS_UNIMPLEMENTED);
      },
    );
    await h.close();
  });
});
