// What a client sees of the libusb backend's errors, end to end through a real server (mTLS,
// URB channel, sessions) and the SDK, with the fake `usb` module underneath: isochronous URBs
// and bulk streams (usb@2 has no binding for them), a kernel driver that refuses to detach, a
// device whose descriptors cannot be read, and a device that vanishes mid-transfer. Each is a
// clear error for that session only; the server and the other sessions carry on.
import { status as grpcStatus } from '@grpc/grpc-js';
import { expect } from 'chai';
import { UsbHostClient } from '../../src/client/sdk/client.js';
import type { RemoteDevice } from '../../src/client/sdk/remote-device.js';
import { createLogger, silentLogger } from '../../src/common/log.js';
import { UrbStatus } from '../../src/gen/usbroam/v1/usbhost.js';
import { LibusbBackend } from '../../src/server/backends/libusb/libusb-backend.js';
import { STREAMS_UNIMPLEMENTED } from '../../src/server/backends/libusb/libusb-status.js';
import { UsbHostServer } from '../../src/server/server.js';
import { clientTls, testCerts } from '../../src/devkit/certs.js';
import { FakeDevice, dd, fakeUsb } from '../helpers/fake-usb.js';
import { sleep, until as untilWithin } from '../helpers/wait.js';

const until = (what: string, fn: () => boolean) => untilWithin(what, fn, 5000, 10);

/** A device whose alt setting 1 has an isochronous IN endpoint 0x83 (the fake's alt 1 endpoint, made iso). */
class IsoDevice extends FakeDevice {
  override get configDescriptor() {
    const c = super.configDescriptor;
    if (!c) return c;
    for (const alt of c.interfaces[0]!) for (const e of alt.endpoints) if (e.bEndpointAddress === 0x83) e.bmAttributes = 1;
    return c;
  }
  override get allConfigDescriptors() {
    return [this.configDescriptor!];
  }
}

describe('libusb backend errors as a client sees them (server + SDK, fake usb module)', function () {
  this.timeout(30_000);
  let widget: IsoDevice;
  let kbd: FakeDevice;
  let stubborn: FakeDevice;
  let broken: FakeDevice;
  let mod: ReturnType<typeof fakeUsb>;
  let backend: LibusbBackend;
  let server: UsbHostServer;
  let client: UsbHostClient;
  const open: RemoteDevice[] = [];

  beforeEach(async () => {
    widget = new IsoDevice(1, 5, [2], dd(0x1234, 0x5678));
    kbd = new FakeDevice(1, 6, [3], dd(0x0627, 0x0001), ['', 'QEMU', 'Keyboard', 'K0001']);
    stubborn = new FakeDevice(1, 7, [4], dd(0x1234, 0x0007), ['', 'ACME', 'Stubborn', 'S0001']);
    stubborn.refuseDetach = true;
    broken = new FakeDevice(1, 8, [5], dd(0x1234, 0x0008), ['', 'ACME', 'Broken', 'B0001']);
    broken.descriptorError = true;
    mod = fakeUsb([widget, kbd, stubborn, broken]);
    backend = await LibusbBackend.create({ allow: [{}], usb: mod, pollMs: 0, sysfsRoot: '/nonexistent-sysfs' });
    const c = testCerts();
    server = new UsbHostServer({
      listen: '127.0.0.1:0',
      tls: { ca: c.file('ca.pem'), cert: c.file('server.pem'), key: c.file('server.key') },
      backends: [backend],
      acl: { bridge: '*' },
      admins: ['bridge'],
      log: process.env.USBROAM_TEST_LOG ? createLogger({ level: process.env.USBROAM_TEST_LOG }) : silentLogger,
    });
    const address = await server.start();
    client = new UsbHostClient({ address: address.replace('127.0.0.1', 'localhost'), ...clientTls('bridge') });
  });

  afterEach(async () => {
    await Promise.allSettled(open.splice(0).map((d) => d.close()));
    client.close();
    await server.stop('test over');
  });

  async function openDevice(serial: string): Promise<RemoteDevice> {
    const d = await client.openDevice({ serial });
    open.push(d);
    return d;
  }

  it('bulk streams: the op fails with INVAL and a message naming the device, the endpoints and what usb@2 lacks; a stream URB: INVAL + UNIMPLEMENTED once', async () => {
    const d = await openDevice('W0001');
    for (const [what, call] of [
      ['alloc bulk streams', () => d.allocBulkStreams([0x81, 0x02], 4)],
      ['free bulk streams', () => d.freeBulkStreams([0x81])],
    ] as const) {
      const eps = what.startsWith('alloc') ? 'endpoints 0x81, 0x02' : 'endpoint 0x81';
      await (call as () => Promise<unknown>)().then(
        () => expect.fail(`${what} succeeded`),
        (err) => expect((err as Error).message).to.equal(`${what} on device usb-1-2-W0001 failed: URB_STATUS_INVAL device usb-1-2-W0001 ${eps}: ${STREAMS_UNIMPLEMENTED}`),
      );
    }
    // A bulk URB with a stream id: INVAL, no libusb transfer was made for it, and the client hears
    // why as an UNIMPLEMENTED channel error (once per endpoint).
    const errors: { code: number; message: string }[] = [];
    d.on('channelError', (e: { code: number; message: string }) => errors.push(e));
    const n = mod.submitted.length;
    const submit = (d as unknown as { submit(r: object): Promise<{ status: UrbStatus }> }).submit.bind(d);
    const raw = await submit({ endpoint: 0x81, type: 2, length: 8, streamId: 2 });
    expect(raw.status).to.equal(UrbStatus.URB_STATUS_INVAL);
    expect((await submit({ endpoint: 0x81, type: 2, length: 8, streamId: 3 })).status).to.equal(UrbStatus.URB_STATUS_INVAL);
    expect(mod.submitted.length).to.equal(n);
    await until('the UNIMPLEMENTED channel error', () => errors.length > 0);
    expect(errors).to.have.length(1);
    expect(errors[0]!.code).to.equal(grpcStatus.UNIMPLEMENTED);
    expect(errors[0]!.message).to.include('device usb-1-2-W0001').and.include('0x81').and.include(STREAMS_UNIMPLEMENTED);
    // The session carries on: a plain bulk IN works.
    const p = d.transferIn(1, 4);
    await until('the bulk IN transfer', () => mod.submitted.length > n);
    mod.submitted.at(-1)!.complete(undefined, 4, Uint8Array.from([1, 2, 3, 4]));
    const r = await p;
    expect(r.status).to.equal(UrbStatus.URB_STATUS_SUCCESS);
    expect([...r.data]).to.deep.equal([1, 2, 3, 4]);
  });

  it('isochronous: an iso URB completes INVAL (packets too), no libusb transfer is made, the client hears UNIMPLEMENTED with the reason; an iso receiving stream is refused with it', async () => {
    const d = await openDevice('W0001');
    await d.selectAlternateInterface(0, 1);
    const errors: { code: number; message: string }[] = [];
    d.on('channelError', (e: { code: number; message: string }) => errors.push(e));
    const n = mod.submitted.length;
    const r = await d.isochronousTransferIn(3, [64, 64]);
    expect(r.status).to.equal(UrbStatus.URB_STATUS_INVAL);
    expect(r.isoPackets.map((p) => p.status)).to.deep.equal([UrbStatus.URB_STATUS_INVAL, UrbStatus.URB_STATUS_INVAL]);
    await until('the UNIMPLEMENTED channel error', () => errors.length > 0);
    expect(errors[0]!.code).to.equal(grpcStatus.UNIMPLEMENTED);
    expect(errors[0]!.message).to.include('device usb-1-2-W0001').and.include('0x83').and.include('isochronous');
    // A receiving stream on the iso endpoint is refused up front with the same reason.
    let received = 0;
    d.on('received', () => received++);
    await d.startReceiving({ endpoint: 0x83, transferLength: 64, transfers: 3, isoPacketsPerTransfer: 32 }).then(
      () => expect.fail('an iso receiving stream started on a backend without iso'),
      (err: Error) => expect(err.message).to.include('URB_STATUS_INVAL').and.include('device usb-1-2-W0001').and.include('0x83').and.include('isochronous'),
    );
    await sleep(100); // proves no stream's completion arrives within 100 ms (none announces that it did not start)
    expect(received, 'no stream ran').to.equal(0);
    expect(mod.submitted.length, 'no libusb transfer for iso').to.equal(n);
  });

  it('a kernel driver that refuses to detach: that open fails naming the device and interface; the server carries on', async () => {
    await client.openDevice({ serial: 'S0001' }).then(
      (d) => {
        open.push(d);
        expect.fail('opened');
      },
      (err) => expect((err as Error).message).to.match(/device usb-1-4-S0001 could not be opened: usb-1-4-S0001: the kernel driver of interface 0 refuses to detach: LIBUSB_ERROR_ACCESS/),
    );
    expect(stubborn.opened, 'closed again').to.equal(false);
    const list = await client.listDevices();
    expect(list.find((x) => x.id === 'usb-1-4-S0001')?.claim?.claimed ?? false, 'not left claimed').to.equal(false);
    const k = await openDevice('K0001');
    const p = k.transferIn(1, 8);
    await until('the keyboard transfer', () => mod.submitted.some((t) => t.buf?.length === 8 && !t.done));
    mod.submitted.at(-1)!.complete(undefined, 8, new Uint8Array(8).fill(1));
    expect((await p).status).to.equal(UrbStatus.URB_STATUS_SUCCESS);
  });

  it('a device whose descriptors cannot be read is not listed (nor claimable); the others are', async () => {
    const ids = (await client.listDevices()).map((x) => x.id).sort();
    expect(ids).to.deep.equal(['usb-1-2-W0001', 'usb-1-3-K0001', 'usb-1-4-S0001']);
    await client.openDevice({ serial: 'B0001' }).then(
      (d) => {
        open.push(d);
        expect.fail('opened');
      },
      (err) => expect((err as Error).message).to.match(/no device matches/),
    );
  });

  it('a device that vanishes mid-transfer: that session gets IOERROR and DeviceGone with the reason; the other session and the server carry on', async () => {
    const w = await openDevice('W0001');
    const k = await openDevice('K0001');
    let gone = '';
    w.on('deviceGone', (r: string) => (gone = r));
    let kGone = false;
    k.on('deviceGone', () => (kGone = true));
    const n = mod.submitted.length;
    const p = w.transferIn(1, 512);
    await until('the bulk IN transfer', () => mod.submitted.length > n);
    widget.gone = true;
    mod.submitted.at(-1)!.complete(5, 0); // LIBUSB_TRANSFER_NO_DEVICE
    expect((await p).status).to.equal(UrbStatus.URB_STATUS_IOERROR);
    await until('DeviceGone', () => gone !== '');
    expect(gone).to.match(/device vanished during a transfer/);
    // The keyboard's session is untouched and works.
    const m = mod.submitted.length;
    const kp = k.transferIn(1, 8);
    await until('the keyboard transfer', () => mod.submitted.length > m);
    mod.submitted.at(-1)!.complete(undefined, 8, new Uint8Array(8).fill(2));
    expect((await kp).status).to.equal(UrbStatus.URB_STATUS_SUCCESS);
    expect(kGone).to.equal(false);
    // The server answers; once the widget is unplugged for good, it is no longer listed.
    mod.devices = mod.devices.filter((x) => x !== widget);
    await backend.rescan();
    const ids = (await client.listDevices()).map((x) => x.id);
    expect(ids).to.not.include('usb-1-2-W0001');
    expect(ids).to.include('usb-1-3-K0001');
  });
});
