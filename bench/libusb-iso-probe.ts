// An experiment for isochronous transfers in the libusb backend (usb@2 has no iso binding): boot
// a USB host guest with a QEMU usb-audio (an isochronous OUT endpoint), and in it, beside
// `usbroam serve --libusb` (so usb@2 is loaded and its libusb context is live), run
// bench/libusb-iso-probe-guest.mjs: koffi + libusb-1.0 in a context of its own, one iso OUT
// transfer to the audio streaming interface. Prints what happened (JSON on the last line).
// Seen here (QEMU 7.2 TCG, guest kernel 6.1 xhci-hcd): usb@2's own prebuilt binary loads in koffi,
// 8 iso packets of 192 bytes to endpoint 0x01 completed, each status 0 / actual 192, in 17 ms.
//
//   npx tsx bench/libusb-iso-probe.ts
import { ensureGuestImage } from '../test/e2e/harness/guest.js';
import { REPO_ROOT, startUsbHostGuest } from '../test/e2e/harness/usbhost-guest.js';

async function main(): Promise<void> {
  const image = await ensureGuestImage();
  const host = await startUsbHostGuest({
    image,
    name: 'isoprobe',
    allow: ['46f4:*'],
    extraQemuArgs: ['-audiodev', 'none,id=snd0', '-device', 'usb-audio,id=audio0,audiodev=snd0,bus=xhci.0'],
    log: () => {},
  });
  try {
    const g = host.guest;
    const dev = (await g.sh('for d in /sys/bus/usb/devices/*; do [ -f $d/idVendor ] && echo "$d $(cat $d/idVendor):$(cat $d/idProduct) $(cat $d/product 2>/dev/null)"; done; true')).trim();
    process.stderr.write(`USB devices in the USB host guest:\n${dev}\n`);
    const ifs = (await g.sh('for i in /sys/bus/usb/devices/*:1.*; do echo "$i alts=$(cat $i/bNumEndpoints 2>/dev/null) $(ls $i | grep ep_ | tr "\\n" " ")"; done; true')).trim();
    process.stderr.write(`interfaces:\n${ifs}\n`);
    const line = dev.split('\n').find((l) => / 46f4:0002/.test(l));
    if (!line) throw new Error('no usb-audio (46f4:0002) in the USB host guest');
    const out = await g.sh(`chroot /host ${process.execPath} ${REPO_ROOT}/bench/libusb-iso-probe-guest.mjs 0x46f4 0x0002 1 1 0x01 8 192 2>&1`, { timeoutMs: 300_000 });
    const serverLog = await host.serverLog();
    process.stderr.write(`server still serving: ${/USB host server listening/.test(serverLog)}\n`);
    const json = out.trim().split('\n').filter((l) => l.startsWith('{')).pop();
    console.log(json ?? JSON.stringify({ ok: false, output: out.slice(-2000) }));
  } finally {
    await host.stop();
  }
}

main().then(
  () => process.exit(0),
  (err) => {
    process.stderr.write(`failed: ${(err as Error).stack ?? err}\n`);
    process.exit(1);
  },
);
