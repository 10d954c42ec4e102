// The libusb backend's bulk streams path against a fake `usb` module and a fake koffi streams
// engine: the stream-capable interface is claimed (and alt-switched) through the engine, never
// through usb@2; alloc/free streams reach libusb_alloc_streams/free_streams there; bulk URBs of
// that interface go there with their stream id, flags and data, and come back mapped (status,
// data, cancel); endpoints that are not stream-capable are refused with a clear error.
import { expect } from 'chai';
import { LibusbBackend } from '../../src/server/backends/libusb/libusb-backend.js';
import { STREAMS_UNIMPLEMENTED } from '../../src/server/backends/libusb/libusb-status.js';
import type { StreamTransferDone, StreamTransferRequest, StreamsEngine } from '../../src/server/backends/libusb/streams-koffi.js';
import { TransferType, URB_SHORT_NOT_OK, URB_ZERO_PACKET, UrbStatus, UsbError, type DeviceHandle, type Urb, type UrbResult } from '../../src/server/backends/types.js';
import { FakeDevice, dd, fakeUsb } from '../helpers/fake-usb.js';

const NOSYS = '/nonexistent-sysfs';
let nextId = 1;
const urb = (p: Partial<Urb>): Urb => ({ id: nextId++, endpoint: 0x81, type: TransferType.Bulk, length: 0, streamId: 0, flags: 0, timeoutMs: 0, ...p });
const submit = (h: DeviceHandle, u: Urb) => new Promise<UrbResult>((resolve) => h.submit(u, resolve));

/** Alt 0's bulk endpoints 0x81 / 0x02 get a SuperSpeed companion with MaxStreams 2^4. */
class StreamWidget extends FakeDevice {
  override get configDescriptor() {
    const c = super.configDescriptor;
    for (const alt of c?.interfaces[0] ?? []) for (const e of alt.endpoints) if ((e.bmAttributes & 3) === 2) e.extra = Buffer.from([6, 0x30, 15, 4, 0, 0]);
    return c;
  }
  override get allConfigDescriptors() {
    return [this.configDescriptor!];
  }
}

describe('libusb backend: bulk streams through a koffi engine (fake usb module, fake engine)', () => {
  const calls: string[] = [];
  const subs: Array<{ req: StreamTransferRequest; done: (r: StreamTransferDone) => void; cancelled: boolean }> = [];
  let allocRc = 8;
  const engine: StreamsEngine = {
    open(bus, ports) {
      calls.push(`open ${bus} ${ports.join('.')}`);
      return {
        claim: (n) => calls.push(`claim ${n}`),
        release: (n) => calls.push(`release ${n}`),
        setAlt: (n, alt) => calls.push(`alt ${n} ${alt}`),
        clearHalt: (ep) => calls.push(`clearhalt ${ep.toString(16)}`),
        allocStreams(eps, n) {
          calls.push(`alloc ${eps.map((e) => e.toString(16)).join(',')} ${n}`);
          if (allocRc < 0) throw Object.assign(new Error('libusb_alloc_streams 8: LIBUSB_ERROR_INVALID_PARAM'), { errno: allocRc });
          return allocRc;
        },
        freeStreams: (eps) => calls.push(`free ${eps.map((e) => e.toString(16)).join(',')}`),
        submit(req, done) {
          const sub = { req, done, cancelled: false };
          subs.push(sub);
          return () => {
            sub.cancelled = true;
            setImmediate(() => done({ status: 3, actualLength: 0 }));
          };
        },
        close: () => calls.push('close'),
      };
    },
  };

  it('claims the stream interface through the engine; alloc/free and stream URBs go there, mapped back', async () => {
    const dev = new StreamWidget(2, 4, [1], dd(0x46f4, 0x0003), ['', 'QEMU', 'UAS', 'U1']);
    const m = fakeUsb([dev]);
    const b = await LibusbBackend.create({ allow: [{}], usb: m, pollMs: 0, sysfsRoot: NOSYS, streams: engine });
    try {
      const h = await b.open('usb-2-1-U1');
      expect(calls).to.deep.equal(['open 2 1', 'claim 0']);
      expect(dev.calls, 'usb@2 claims nothing of the stream interface').to.deep.equal([]);
      expect(h.info.endpoints.map((e) => [e.address, e.maxStreams])).to.deep.equal([[0x81, 16], [0x02, 16]]);
      expect(h.unsupported!({ endpoint: 0x81, type: TransferType.Bulk, streamId: 3 })).to.equal(undefined);

      expect(await h.allocBulkStreams([0x81, 0x02], 8)).to.equal(8);
      expect(calls.at(-1)).to.equal('alloc 81,2 8');
      await h.allocBulkStreams([0x81, 0x83], 4).then(
        () => expect.fail('allocated on an endpoint of another alt setting'),
        (err) => expect((err as UsbError).message).to.equal('usb-2-1-U1: bulk streams: endpoint 0x83 is not a stream-capable bulk endpoint of the current alt settings'),
      );
      allocRc = -2;
      await h.allocBulkStreams([0x81], 4).then(
        () => expect.fail('libusb refused, yet allocated'),
        (err) => {
          expect((err as UsbError).status).to.equal(UrbStatus.Inval);
          expect((err as UsbError).message).to.match(/^usb-2-1-U1: alloc 4 bulk streams on endpoints 0x81: libusb_alloc_streams 8: LIBUSB_ERROR_INVALID_PARAM/);
        },
      );
      allocRc = 8;

      // IN on stream 5 with SHORT_NOT_OK: the request as libusb gets it, the data back.
      const pIn = submit(h, urb({ endpoint: 0x81, length: 1024, streamId: 5, flags: URB_SHORT_NOT_OK, timeoutMs: 700 }));
      expect(subs[0]!.req).to.deep.equal({ endpoint: 0x81, type: 2, streamId: 5, data: undefined, length: 1024, shortNotOk: true, zeroPacket: false, timeoutMs: 700 });
      subs[0]!.done({ status: 0, actualLength: 3, data: Uint8Array.of(7, 8, 9) });
      const rIn = await pIn;
      expect([rIn.status, rIn.actualLength, [...rIn.data!]]).to.deep.equal([UrbStatus.Success, 3, [7, 8, 9]]);

      // OUT without a stream on the same interface (a UAS command pipe): through the engine too; ZERO_PACKET at a multiple of 512.
      const out = new Uint8Array(1024).fill(1);
      const pOut = submit(h, urb({ endpoint: 0x02, data: out, flags: URB_ZERO_PACKET }));
      expect(subs[1]!.req).to.include({ endpoint: 0x02, type: 2, streamId: 0, length: 1024, zeroPacket: true });
      subs[1]!.done({ status: 4, actualLength: 512 });
      expect(await pOut).to.deep.equal({ status: UrbStatus.Stall, actualLength: 512 });

      // Cancel; a stream id past the endpoint's MaxStreams is Inval without a transfer.
      const c = urb({ endpoint: 0x81, length: 64, streamId: 2 });
      const pc = submit(h, c);
      expect(h.cancel(c.id)).to.equal(true);
      expect((await pc).status).to.equal(UrbStatus.Cancelled);
      expect(subs[2]!.cancelled).to.equal(true);
      expect((await submit(h, urb({ endpoint: 0x81, length: 64, streamId: 17 }))).status).to.equal(UrbStatus.Inval);
      expect(subs.length).to.equal(3);
      expect(m.submitted.length, 'no usb@2 transfer for the stream interface').to.equal(0);

      await h.clearHalt(0x81);
      expect(calls.at(-1)).to.equal('clearhalt 81');
      await h.freeBulkStreams([0x81, 0x02]);
      expect(calls.at(-1)).to.equal('free 81,2');
      await h.setInterface(0, 1);
      expect(calls.at(-1)).to.equal('alt 0 1');
      await h.close();
      expect(calls.slice(-2)).to.deep.equal(['release 0', 'close']);
    } finally {
      b.close();
    }
  });

  it('without the engine (the default), streams stay refused with the reason', async () => {
    const dev = new StreamWidget(2, 4, [1], dd(0x46f4, 0x0003), ['', 'QEMU', 'UAS', 'U2']);
    const b = await LibusbBackend.create({ allow: [{}], usb: fakeUsb([dev]), pollMs: 0, sysfsRoot: NOSYS });
    try {
      const h = await b.open('usb-2-1-U2');
      expect(h.unsupported!({ endpoint: 0x81, type: TransferType.Bulk, streamId: 3 })).to.equal(`device usb-2-1-U2 endpoint 0x81 stream 3: ${STREAMS_UNIMPLEMENTED}`);
      await h.allocBulkStreams([0x81], 4).then(
        () => expect.fail('allocated'),
        (err) => expect((err as UsbError).message).to.equal(`device usb-2-1-U2 endpoint 0x81: ${STREAMS_UNIMPLEMENTED}`),
      );
      await h.close();
    } finally {
      b.close();
    }
  });
});
