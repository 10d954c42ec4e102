// Isochronous transfers through the libusb backend's koffi path (opt-in: USBROAM_LIBUSB_ISO=koffi;
// usb@2 itself has no iso binding), on a real kernel USB stack: a USB host guest with a QEMU
// usb-audio (streaming interface 1, alt 1: isochronous OUT endpoint 0x01, 192-byte packets)
// runs `usbroam serve --libusb`; from the host, the SDK claims the device over mTLS, selects the
// streaming alt setting and submits iso OUT URBs, several in flight: each packet completes with
// its full length. Alt 0 again, then close; the server carries on.
import { expect } from 'chai';
import { UsbHostClient } from '../../src/client/sdk/client.js';
import { UrbStatus } from '../../src/gen/usbroam/v1/usbhost.js';
import { clientTls } from '../../src/devkit/certs.js';
import { e2eImageOrSkip } from '../../src/devkit/bridge-guest.js';
import { startUsbHostGuest, type UsbHostGuest } from '../../src/devkit/guest/usbhost-guest.js';

describe('e2e libusb backend: isochronous OUT to a QEMU usb-audio through koffi + libusb', function () {
  this.timeout(900_000);
  let host: UsbHostGuest | undefined;
  let client: UsbHostClient | undefined;

  before(async function () {
    this.timeout(900_000);
    const image = await e2eImageOrSkip(this);
    host = await startUsbHostGuest({
      image,
      name: 'usbhost-iso',
      allow: ['46f4:0002'],
      serveEnv: { USBROAM_LIBUSB_ISO: 'koffi' },
      extraQemuArgs: ['-audiodev', 'none,id=snd0', '-device', 'usb-audio,id=audio0,audiodev=snd0,bus=xhci.0'],
    });
    client = new UsbHostClient({ address: host.address, ...clientTls('bridge') });
  });

  after(async () => {
    client?.close();
    if (host && process.env.USBROAM_E2E_KEEP) console.log(await host.serverLog().catch(() => ''));
    await host?.stop();
  });

  it('iso OUT URBs on the audio streaming endpoint complete, every packet with its full length', async () => {
    const d = await client!.openDevice({ vidPid: '46f4:0002' });
    try {
      await d.selectAlternateInterface(1, 1);
      const packets = 8;
      const mps = 192;
      const data = Buffer.alloc(packets * mps);
      for (let i = 0; i < data.length; i++) data[i] = i & 0xff;
      const t0 = performance.now();
      const rs = await Promise.all(Array.from({ length: 4 }, () => d.isochronousTransferOut(1, data, new Array(packets).fill(mps))));
      const ms = performance.now() - t0;
      for (const r of rs) {
        expect(r.status).to.equal(UrbStatus.URB_STATUS_SUCCESS);
        expect(r.isoPackets.map((p) => [p.status, p.actualLength])).to.deep.equal(new Array(packets).fill([UrbStatus.URB_STATUS_SUCCESS, mps]));
      }
      console.log(`      4 iso OUT URBs of ${packets} x ${mps} B in ${ms.toFixed(0)} ms`);
      await d.selectAlternateInterface(1, 0);
    } finally {
      await d.close();
    }
    const log = await host!.serverLog();
    expect(log).to.match(/isochronous interfaces opened through koffi/);
    const again = await client!.listDevices();
    expect(again.some((x) => x.vendorId === 0x46f4 && x.productId === 0x0002), 'still exported').to.equal(true);
  });
});
