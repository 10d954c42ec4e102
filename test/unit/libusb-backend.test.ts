// The libusb backend against a fake `usb` module: enumeration and export
// policy, hotplug by rescan, claim with kernel-driver detach/re-attach, URB
// submission/completion/cancel mapping, standard requests routed to libusb
// calls, device loss, and the clear errors (refusing driver, iso, streams).
import { expect } from 'chai';
import { LibusbBackend } from '../../src/server/backends/libusb/libusb-backend.js';
import { isoDurationMs, type LibusbDeviceHandle } from '../../src/server/backends/libusb/libusb-device.js';
import { ISO_UNIMPLEMENTED, STREAMS_UNIMPLEMENTED } from '../../src/server/backends/libusb/libusb-status.js';
import { Speed, TransferType, URB_SHORT_NOT_OK, URB_ZERO_PACKET, UrbStatus, UsbError, type DeviceHandle, type DeviceInfo, type Urb, type UrbResult } from '../../src/server/backends/types.js';
import { FakeDevice, dd, fakeUsb } from '../helpers/fake-usb.js';
import type { IsoEngine, IsoTransferDone } from '../../src/server/backends/libusb/iso-koffi.js';

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
    mod.submitted.at(-1)!.complete(5, 0); // LIBUSB_TRANSFER_NO_DEVICE
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
    const base = mod.submitted.length;
    const us = [1, 2, 3].map(() => urb({ endpoint: 0x81, length: 16 }));
    const ps = us.map((u) => submit(h, u));
    expect(mod.submitted.length - base).to.equal(3);
    mod.submitted[base]!.complete(undefined, 4, Uint8Array.from([1, 2, 3, 4]));
    expect(h.cancel(us[1]!.id)).to.equal(true);
    mod.submitted[base + 2]!.complete(4, 0); // STALL
    const [r0, r1, r2] = await Promise.all(ps);
    expect(r0).to.deep.include({ status: UrbStatus.Success, actualLength: 4 });
    expect([...r0!.data!]).to.deep.equal([1, 2, 3, 4]);
    expect(r1!.status).to.equal(UrbStatus.Cancelled);
    expect(r2!.status).to.equal(UrbStatus.Stall);
    expect(h.cancel(us[0]!.id)).to.equal(false);
    const out = submit(h, urb({ endpoint: 0x02, data: Uint8Array.from([9, 9]), length: 2 }));
    const t = mod.submitted.at(-1)!;
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
    const t = mod.submitted.at(-1)!;
    expect(t.endpoint).to.equal(0);
    expect(t.buf!.length).to.equal(8 + 18);
    t.complete(undefined, 2, Uint8Array.from([18, 1]));
    const r = await get;
    expect(r).to.deep.include({ status: UrbStatus.Success, actualLength: 2 });
    expect([...r.data!]).to.deep.equal([18, 1]);
    const n = mod.submitted.length;
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
    expect(mod.submitted.length, 'no raw transfers for those').to.equal(n);
    await h.reset();
    expect(widget.calls).to.include('reset');
    await h.close();
  });

  it('isochronous URBs, bulk streams: Inval, errors naming device, endpoint and what usb@2 lacks; iso paced, cancellable', async () => {
    const h = await backend.open('usb-1-2-W0001');
    const n = mod.submitted.length;
    // Paced: the submit arms a timer and the completion waits for it (not the order against a
    // setImmediate: on a busy machine the timer may be due before the next check phase).
    const timers = () => process.getActiveResourcesInfo().filter((x) => x === 'Timeout').length;
    const timersBefore = timers();
    let completed = false;
    const paced = submit(h, urb({ endpoint: 0x81, type: TransferType.Isochronous, length: 64, isoPackets: [{ length: 64, status: 0, actualLength: 0 }] })).then((res) => {
      completed = true;
      return res;
    });
    expect(timers(), 'a timer paces the completion').to.equal(timersBefore + 1);
    await Promise.resolve();
    expect(completed, 'not completed at once').to.equal(false);
    const r = await paced;
    expect(r.status).to.equal(UrbStatus.Inval);
    expect(r.isoPackets![0]!.status).to.equal(UrbStatus.Inval);
    expect(mod.submitted.length, 'no libusb transfer for an iso URB').to.equal(n);
    expect(ISO_UNIMPLEMENTED).to.match(/isochronous transfers are not implemented by the libusb backend: usb@2 .*no binding for libusb_alloc_transfer\(iso_packets\)/);
    // Paced at the URB's bus time: a receiving stream resubmitting on every completion does not spin.
    const info = { ...h.info, speed: Speed.Full, endpoints: [{ ...h.info.endpoints[0]!, interval: 1 }] };
    expect(isoDurationMs(info, urb({ endpoint: 0x81, isoPackets: Array(8).fill({ length: 8, status: 0, actualLength: 0 }) }))).to.equal(8);
    expect(isoDurationMs({ ...info, speed: Speed.High }, urb({ endpoint: 0x81, isoPackets: Array(8).fill({ length: 8, status: 0, actualLength: 0 }) }))).to.equal(1);
    expect(isoDurationMs({ ...info, speed: Speed.High, endpoints: [{ ...info.endpoints[0]!, interval: 4 }] }, urb({ endpoint: 0x81, isoPackets: Array(32).fill({ length: 8, status: 0, actualLength: 0 }) }))).to.equal(32);
    const slow = urb({ endpoint: 0x81, type: TransferType.Isochronous, length: 64, isoPackets: Array(1000).fill({ length: 64, status: 0, actualLength: 0 }) });
    const pending = submit(h, slow);
    expect(h.cancel(slow.id)).to.equal(true);
    expect((await pending).status, 'a cancelled iso URB completes at once as cancelled').to.equal(UrbStatus.Cancelled);
    // Bulk streams: a URB with a stream id is Inval; the ops throw a UsbError naming device and endpoints.
    expect((await submit(h, urb({ endpoint: 0x81, streamId: 3, length: 8 }))).status).to.equal(UrbStatus.Inval);
    expect(mod.submitted.length, 'no libusb transfer for a stream URB').to.equal(n);
    for (const op of [() => h.allocBulkStreams([0x81, 0x02], 4), () => h.freeBulkStreams([0x81, 0x02])]) {
      await op().then(
        () => expect.fail('streams'),
        (err) => {
          expect(err).to.be.instanceOf(UsbError);
          expect((err as UsbError).status).to.equal(UrbStatus.Inval);
          expect((err as UsbError).message).to.equal(`device usb-1-2-W0001 endpoints 0x81, 0x02: ${STREAMS_UNIMPLEMENTED}`);
        },
      );
    }
    // The same reasons, up front, for a session that refuses such URBs before submitting them.
    expect(h.unsupported!({ endpoint: 0x83, type: TransferType.Isochronous, streamId: 0 })).to.equal(`device usb-1-2-W0001 endpoint 0x83: ${ISO_UNIMPLEMENTED}`);
    expect(h.unsupported!({ endpoint: 0x81, type: TransferType.Bulk, streamId: 5 })).to.equal(`device usb-1-2-W0001 endpoint 0x81 stream 5: ${STREAMS_UNIMPLEMENTED}`);
    expect(h.unsupported!({ endpoint: 0x81, type: TransferType.Bulk, streamId: 0 })).to.equal(undefined);
    expect(h.unsupported!({ endpoint: 0x83, type: TransferType.Interrupt, streamId: 0 })).to.equal(undefined);
    expect(STREAMS_UNIMPLEMENTED).to.match(/no binding for libusb_alloc_streams \/ libusb_free_streams \/ libusb_transfer_set_stream_id/);
    await h.close();
  });

  it('URB_ZERO_PACKET on bulk OUT: a zero-length transfer right behind a multiple of wMaxPacketSize, none otherwise', async () => {
    const h = await backend.open('usb-1-2-W0001');
    const base = mod.submitted.length;
    const p = submit(h, urb({ endpoint: 0x02, data: new Uint8Array(1024).fill(7), flags: URB_ZERO_PACKET }));
    // A second URB submitted right after must queue behind the ZLP, not between.
    const p2 = submit(h, urb({ endpoint: 0x02, data: Uint8Array.from([1, 2, 3]) }));
    const subs = mod.submitted.slice(base);
    expect(subs.map((t) => [t.endpoint, t.buf!.length])).to.deep.equal([[0x02, 1024], [0x02, 0], [0x02, 3]]);
    subs[0]!.complete(undefined, 1024);
    let settled = false;
    void p.then(() => (settled = true));
    await tick();
    await tick();
    expect(settled, 'the URB waits for its zero-length packet').to.equal(false);
    subs[1]!.complete(undefined, 0);
    expect(await p).to.deep.equal({ status: UrbStatus.Success, actualLength: 1024 });
    subs[2]!.complete(undefined, 3);
    expect((await p2).status).to.equal(UrbStatus.Success);
    // Not a multiple of 512, or no flag, or empty: no extra transfer.
    for (const [len, flags] of [[1000, URB_ZERO_PACKET], [512, 0], [0, URB_ZERO_PACKET]] as const) {
      const b = mod.submitted.length;
      const q = submit(h, urb({ endpoint: 0x02, data: new Uint8Array(len), flags }));
      expect(mod.submitted.length - b, `len ${len} flags ${flags}`).to.equal(1);
      mod.submitted.at(-1)!.complete(undefined, len);
      expect((await q).status).to.equal(UrbStatus.Success);
    }
    // The data stalls: the zero-length packet is cancelled, the URB is a stall.
    const b = mod.submitted.length;
    const s = submit(h, urb({ endpoint: 0x02, data: new Uint8Array(512), flags: URB_ZERO_PACKET }));
    mod.submitted[b]!.complete(4, 0);
    expect((await s).status).to.equal(UrbStatus.Stall);
    expect(mod.submitted[b + 1]!.cancelled).to.equal(true);
    // Cancel: both transfers cancelled, the URB cancelled.
    const c = urb({ endpoint: 0x02, data: new Uint8Array(512), flags: URB_ZERO_PACKET });
    const cp = submit(h, c);
    expect(h.cancel(c.id)).to.equal(true);
    expect((await cp).status).to.equal(UrbStatus.Cancelled);
    expect(mod.submitted.slice(-2).map((t) => t.cancelled)).to.deep.equal([true, true]);
    // The zero-length submit itself fails: the URB is an error once the data is done.
    mod.submitErrors.push(undefined, -1);
    const e = submit(h, urb({ endpoint: 0x02, data: new Uint8Array(512), flags: URB_ZERO_PACKET }));
    mod.submitted.at(-1)!.complete(undefined, 512);
    expect(await e).to.deep.equal({ status: UrbStatus.IoError, actualLength: 512 });
    await h.close();
  });

  it('libusb transfers are reused per endpoint, type and timeout (never while active); dropped on close', async () => {
    const h = await backend.open('usb-1-2-W0001');
    const made = mod.transfers.length;
    const seq = async (ep: number, timeoutMs = 0) => {
      const p = submit(h, urb({ endpoint: ep, length: 8, data: ep & 0x80 ? undefined : new Uint8Array(8), timeoutMs }));
      mod.submitted.at(-1)!.complete(undefined, 8, ep & 0x80 ? new Uint8Array(8).fill(ep) : undefined);
      const r = await p;
      expect(r.status).to.equal(UrbStatus.Success);
      return r;
    };
    for (let i = 0; i < 5; i++) expect([...(await seq(0x81)).data!]).to.deep.equal(new Array(8).fill(0x81));
    expect(mod.transfers.length - made, 'one transfer for 5 sequential URBs').to.equal(1);
    await seq(0x02);
    await seq(0x81, 500);
    expect(mod.transfers.length - made, 'another endpoint, another timeout: new transfers').to.equal(3);
    // Three in flight at once need three transfers; afterwards they are all reused.
    const ps = [0, 1, 2].map(() => submit(h, urb({ endpoint: 0x81, length: 4 })));
    expect(mod.transfers.length - made).to.equal(5);
    for (const t of mod.submitted.slice(-3)) t.complete(undefined, 4);
    await Promise.all(ps);
    const ps2 = [0, 1, 2].map(() => submit(h, urb({ endpoint: 0x81, length: 4 })));
    expect(mod.transfers.length - made, 'reused').to.equal(5);
    // A cancelled URB's transfer comes back too; a completed URB's id no longer cancels anything.
    const last = mod.submitted.slice(-3);
    last[0]!.complete(undefined, 4);
    await ps2[0];
    expect(h.cancel(nextId - 3)).to.equal(false);
    expect(last[1]!.cancelled || last[2]!.cancelled, 'no other transfer cancelled').to.equal(false);
    for (const t of last.slice(1)) t.complete(undefined, 4);
    await Promise.all(ps2);
    expect(mod.transfers.every((t) => !t.active)).to.equal(true);
    expect(Math.max(...mod.transfers.map((t) => t.submissions))).to.be.greaterThan(1);
    await h.close();
    const h2 = await backend.open('usb-1-2-W0001');
    const before = mod.transfers.length;
    const p = submit(h2, urb({ endpoint: 0x81, length: 4 }));
    mod.submitted.at(-1)!.complete(undefined, 4);
    await p;
    expect(mod.transfers.length - before, 'a new handle makes its own').to.equal(1);
    await h2.close();
  });

  it('URB_SHORT_NOT_OK on IN: a short transfer is an error (data kept), a full one is not', async () => {
    const h = await backend.open('usb-1-2-W0001');
    const short = submit(h, urb({ endpoint: 0x81, length: 64, flags: URB_SHORT_NOT_OK }));
    mod.submitted.at(-1)!.complete(undefined, 2, Uint8Array.from([5, 6]));
    const r = await short;
    expect(r.status).to.equal(UrbStatus.IoError);
    expect([...r.data!]).to.deep.equal([5, 6]);
    const full = submit(h, urb({ endpoint: 0x81, length: 2, flags: URB_SHORT_NOT_OK }));
    mod.submitted.at(-1)!.complete(undefined, 2, Uint8Array.from([5, 6]));
    expect((await full).status).to.equal(UrbStatus.Success);
    const plain = submit(h, urb({ endpoint: 0x81, length: 64 }));
    mod.submitted.at(-1)!.complete(undefined, 2, Uint8Array.from([5, 6]));
    expect((await plain).status).to.equal(UrbStatus.Success);
    await h.close();
  });

  it('descriptor errors: a device whose descriptors cannot be read is not exported (the others are); described again later', async () => {
    const b2 = await LibusbBackend.create({ allow: [{}], usb: mod, pollMs: 0, sysfsRoot: NOSYS, describeRetryMs: 0 });
    const bad = new FakeDevice(1, 7, [3], dd(0x1234, 0x9999), ['', 'ACME', 'Broken', 'B0001']);
    bad.descriptorError = true;
    mod.devices.push(bad);
    const added: string[] = [];
    b2.on('added', (i: DeviceInfo) => added.push(i.id));
    await b2.rescan();
    expect(b2.list().map((d) => d.id)).to.deep.equal(['usb-1-2-W0001']);
    expect(added).to.deep.equal([]);
    await b2.open('usb-1-3-B0001').then(() => expect.fail('opened'), (err) => expect((err as Error).message).to.match(/no such device usb-1-3-B0001/));
    // The backend carries on: the good device opens and transfers.
    const h = await b2.open('usb-1-2-W0001');
    const p = submit(h, urb({ endpoint: 0x81, length: 4 }));
    mod.submitted.at(-1)!.complete(undefined, 4, Uint8Array.from([1, 2, 3, 4]));
    expect((await p).status).to.equal(UrbStatus.Success);
    await b2.rescan();
    expect(added, 'still unreadable: still not exported').to.deep.equal([]);
    bad.descriptorError = false;
    await b2.rescan();
    expect(added, 'readable now: exported').to.deep.equal(['usb-1-3-B0001']);
    expect(b2.list().map((d) => d.id)).to.deep.equal(['usb-1-2-W0001', 'usb-1-3-B0001']);
    await h.close();
    await b2.close();
  });

  it('descriptor errors while open: a clear error for that open or that request; the handle recovers', async () => {
    widget.descriptorError = true;
    await backend.open('usb-1-2-W0001').then(
      () => expect.fail('opened'),
      (err) => {
        expect(err).to.be.instanceOf(UsbError);
        expect((err as Error).message).to.equal('cannot open usb-1-2-W0001: the active configuration descriptor cannot be read (LIBUSB_ERROR_IO)');
      },
    );
    expect(widget.opened, 'closed again').to.equal(false);
    expect(widget.claimed.size, 'nothing left claimed').to.equal(0);
    widget.descriptorError = false;
    const h = await backend.open('usb-1-2-W0001');
    widget.descriptorError = true;
    // SET_INTERFACE and SET_CONFIGURATION re-read the active configuration: that fails, so do they.
    await h.setInterface(0, 1).then(
      () => expect.fail('set interface'),
      (err) => expect((err as Error).message).to.equal('usb-1-2-W0001: set interface 0 alt 1: the active configuration descriptor cannot be read (LIBUSB_ERROR_IO)'),
    );
    const setConfig = () => submit(h, urb({ endpoint: 0x00, type: TransferType.Control, setup: Uint8Array.from([0x00, 0x09, 1, 0, 0, 0, 0, 0]), length: 0 }));
    expect((await setConfig()).status).to.equal(UrbStatus.IoError);
    widget.descriptorError = false;
    expect((await setConfig()).status, 'recovers once the descriptor reads').to.equal(UrbStatus.Success);
    expect(widget.claimed.has(0)).to.equal(true);
    const p = submit(h, urb({ endpoint: 0x81, length: 4 }));
    mod.submitted.at(-1)!.complete(undefined, 4, Uint8Array.from([1, 2, 3, 4]));
    expect((await p).status).to.equal(UrbStatus.Success);
    await h.close();
  });

  it('the device vanishes mid-transfer (no rescan yet): NO_DEVICE completes the URB as IoError, the handle is gone, the backend carries on', async () => {
    const other = new FakeDevice(2, 3, [1, 4], dd(0x0627, 0x0001), ['', 'QEMU', 'Keyboard', 'K1']);
    mod.devices.push(other);
    await backend.rescan();
    const h = (await backend.open('usb-1-2-W0001')) as LibusbDeviceHandle;
    const k = await backend.open('usb-2-1.4-K1');
    let gone = '';
    const order: string[] = [];
    h.on('gone', (r: string) => {
      gone = r;
      order.push('gone');
    });
    // Observed in the completion callback itself (a promise would always resolve after the emit).
    const a = new Promise<UrbResult>((resolve) =>
      h.submit(urb({ endpoint: 0x81, length: 512 }), (r) => {
        order.push(`urb ${UrbStatus[r.status]}`);
        resolve(r);
      }),
    );
    const b = submit(h, urb({ endpoint: 0x81, length: 512 }));
    const [ta, tb] = mod.submitted.slice(-2);
    widget.gone = true;
    ta!.complete(5, 0); // LIBUSB_TRANSFER_NO_DEVICE
    expect((await a).status).to.equal(UrbStatus.IoError);
    await tick();
    expect(gone).to.equal('device vanished during a transfer');
    expect(order, 'the client learns of the unplug before the failed URB').to.deep.equal(['gone', 'urb IoError']);
    expect(h.isGone).to.equal(true);
    tb!.complete(1, 0); // LIBUSB_TRANSFER_ERROR: after gone, every failure is IoError
    expect((await b).status).to.equal(UrbStatus.IoError);
    expect((await submit(h, urb({ endpoint: 0x81, length: 8 }))).status).to.equal(UrbStatus.IoError);
    await h.setInterface(0, 1).then(() => expect.fail('op on a gone device'), (err) => expect((err as Error).message).to.match(/device gone \(device vanished during a transfer\)/));
    // The other device is unaffected.
    const kp = submit(k, urb({ endpoint: 0x81, length: 8 }));
    mod.submitted.at(-1)!.complete(undefined, 8, new Uint8Array(8).fill(1));
    expect((await kp).status).to.equal(UrbStatus.Success);
    // A submit refused with LIBUSB_ERROR_NO_DEVICE marks the device gone too.
    let kGone = '';
    k.on('gone', (r: string) => (kGone = r));
    other.gone = true;
    expect((await submit(k, urb({ endpoint: 0x81, length: 8 }))).status).to.equal(UrbStatus.IoError);
    expect(kGone).to.equal('device vanished');
    await h.close();
    await k.close();
  });

  it('isochronous through a koffi engine (opt-in): iso interfaces claimed and alt-switched there, iso URBs submitted there with their packets', async () => {
    class IsoWidget extends FakeDevice {
      override get configDescriptor() {
        const c = super.configDescriptor;
        for (const alt of c?.interfaces[0] ?? []) for (const e of alt.endpoints) if (e.bEndpointAddress === 0x83) e.bmAttributes = 1;
        return c;
      }
      override get allConfigDescriptors() {
        return [this.configDescriptor!];
      }
    }
    const calls: string[] = [];
    const isoSubs: Array<{ endpoint: number; data?: Uint8Array; lengths: number[]; done: (r: IsoTransferDone) => void; cancelled: boolean }> = [];
    const engine: IsoEngine = {
      open(bus, ports) {
        calls.push(`open ${bus} ${ports.join('.')}`);
        return {
          claim: (n) => calls.push(`claim ${n}`),
          release: (n) => calls.push(`release ${n}`),
          setAlt: (n, alt) => calls.push(`alt ${n} ${alt}`),
          clearHalt: (ep) => calls.push(`clearhalt ${ep.toString(16)}`),
          submitIso(endpoint, data, lengths, _t, done) {
            const sub = { endpoint, data, lengths, done, cancelled: false };
            isoSubs.push(sub);
            return { cancel: () => ((sub.cancelled = true), setImmediate(() => done({ status: 3, packets: lengths.map(() => ({ actualLength: 0, status: 3 })) }))) };
          },
          close: () => calls.push('close'),
        };
      },
    };
    const dev = new IsoWidget(3, 9, [7], dd(0x46f4, 0x0002), ['', 'QEMU', 'Audio', 'A1']);
    const m = fakeUsb([dev]);
    const b = await LibusbBackend.create({ allow: [{}], usb: m, pollMs: 0, sysfsRoot: NOSYS, iso: engine });
    const h = await b.open('usb-3-7-A1');
    expect(calls).to.deep.equal(['open 3 7', 'claim 0']);
    expect(dev.calls, 'usb@2 claims nothing of the iso interface').to.deep.equal([]);
    expect(h.unsupported!({ endpoint: 0x83, type: TransferType.Isochronous, streamId: 0 })).to.equal('device usb-3-7-A1 endpoint 0x83: not an isochronous endpoint of the current alt settings');
    await h.setInterface(0, 1);
    expect(calls.at(-1)).to.equal('alt 0 1');
    expect(h.info.endpoints.map((e) => [e.address, e.type])).to.deep.equal([[0x83, TransferType.Isochronous]]);
    expect(h.unsupported!({ endpoint: 0x83, type: TransferType.Isochronous, streamId: 0 })).to.equal(undefined);
    const inUrb = submit(h, urb({ endpoint: 0x83, type: TransferType.Isochronous, length: 16, isoPackets: [{ length: 8, status: 0, actualLength: 0 }, { length: 8, status: 0, actualLength: 0 }] }));
    expect(isoSubs.map((x) => [x.endpoint, x.lengths])).to.deep.equal([[0x83, [8, 8]]]);
    isoSubs[0]!.done({ status: 0, packets: [{ actualLength: 3, status: 0 }, { actualLength: 8, status: 4 }], data: Uint8Array.from([1, 2, 3]) });
    const r = await inUrb;
    expect(r.status).to.equal(UrbStatus.Success);
    expect(r.isoPackets).to.deep.equal([{ length: 8, status: UrbStatus.Success, actualLength: 3 }, { length: 8, status: UrbStatus.Stall, actualLength: 8 }]);
    expect(r.actualLength).to.equal(3);
    expect([...r.data!]).to.deep.equal([1, 2, 3]);
    const c = urb({ endpoint: 0x83, type: TransferType.Isochronous, length: 8, isoPackets: [{ length: 8, status: 0, actualLength: 0 }] });
    const cp = submit(h, c);
    expect(h.cancel(c.id)).to.equal(true);
    expect((await cp).status).to.equal(UrbStatus.Cancelled);
    expect(isoSubs[1]!.cancelled).to.equal(true);
    await h.clearHalt(0x83);
    expect(calls.at(-1)).to.equal('clearhalt 83');
    expect(m.submitted.length, 'no usb@2 transfer for iso').to.equal(0);
    await h.close();
    expect(calls.slice(-2)).to.deep.equal(['release 0', 'close']);
    await b.close();
  });
});
