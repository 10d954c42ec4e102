// Run inside the USB host guest (chroot into the host root): can koffi drive an isochronous OUT
// transfer through libusb-1.0 while usb@2 is loaded? usb@2 keeps its libusb_device_handle and
// libusb_context private, so this opens the device a second time, in a context of its own, from
// the libusb that usb@2's prebuilt binary exports (204 libusb_* symbols) or, failing that, the
// system's libusb-1.0.so.0. Events for that context are handled from JS
// (libusb_handle_events_timeout_completed), callbacks through koffi.register.
//
//   node bench/libusb-iso-probe-guest.mjs VID PID INTERFACE ALT ENDPOINT [PACKETS] [PACKET_BYTES]
// Prints one JSON line.
import { createRequire } from 'node:module';

const require = createRequire(new URL('../package.json', import.meta.url));
const koffi = require('koffi');
const [vid, pid, iface, alt, ep] = process.argv.slice(2, 7).map((x) => Number(x));
const packets = Number(process.argv[7] ?? 8);
const packetBytes = Number(process.argv[8] ?? 192);
const out = { ok: false, lib: '', steps: [] };
const step = (what, rc) => {
  out.steps.push(`${what}: ${rc}`);
  if (typeof rc === 'number' && rc < 0) throw new Error(`${what} failed: ${rc}`);
};

function load() {
  // usb@2 first (loaded by node as an addon too: dlopen returns the same image).
  const usb = require('usb');
  void usb;
  const candidates = [require.resolve('usb/prebuilds/linux-x64/node.napi.glibc.node'), 'libusb-1.0.so.0'];
  for (const c of candidates) {
    try {
      const lib = koffi.load(c);
      lib.func('const void *libusb_get_version()');
      return { lib, name: c };
    } catch (err) {
      out.steps.push(`load ${c}: ${err.message}`);
    }
  }
  throw new Error('no libusb');
}

try {
  const { lib, name } = load();
  out.lib = name;
  const init = lib.func('int libusb_init(_Out_ void **ctx)');
  const openVidPid = lib.func('void *libusb_open_device_with_vid_pid(void *ctx, uint16_t vid, uint16_t pid)');
  const autoDetach = lib.func('int libusb_set_auto_detach_kernel_driver(void *h, int enable)');
  const claim = lib.func('int libusb_claim_interface(void *h, int n)');
  const setAlt = lib.func('int libusb_set_interface_alt_setting(void *h, int n, int alt)');
  const allocTransfer = lib.func('void *libusb_alloc_transfer(int iso_packets)');
  const submit = lib.func('int libusb_submit_transfer(void *t)');
  const TimeVal = koffi.struct('probe_timeval', { tv_sec: 'long', tv_usec: 'long' });
  const handleEvents = lib.func('int libusb_handle_events_timeout_completed(void *ctx, probe_timeval *tv, int *completed)');
  const release = lib.func('int libusb_release_interface(void *h, int n)');
  const close = lib.func('void libusb_close(void *h)');
  const ctxOut = [null];
  step('libusb_init', init(ctxOut));
  const ctx = ctxOut[0];
  const h = openVidPid(ctx, vid, pid);
  if (!h) throw new Error(`libusb_open_device_with_vid_pid ${vid.toString(16)}:${pid.toString(16)}: NULL`);
  step('open', 0);
  step('auto detach', autoDetach(h, 1));
  step(`claim interface ${iface}`, claim(h, iface));
  step(`set alt ${iface}/${alt}`, setAlt(h, iface, alt));

  const len = packets * packetBytes;
  const buf = koffi.alloc('uint8_t', len);
  const bytes = new Uint8Array(koffi.view(buf, len));
  for (let i = 0; i < len; i++) bytes[i] = i & 0xff;
  const t = allocTransfer(packets);
  // struct libusb_transfer (x86-64): dev_handle@0, flags@8, endpoint@9, type@10, timeout@12, status@16,
  // length@20, actual_length@24, callback@32, user_data@40, buffer@48, num_iso_packets@56,
  // iso_packet_desc[]@60 {length, actual_length, status} x 12 bytes.
  const size = 60 + 12 * packets;
  const dv = new DataView(koffi.view(t, size));
  let done = false;
  const Cb = koffi.proto('void probe_transfer_cb(void *transfer)');
  const cb = koffi.register(() => {
    done = true;
  }, koffi.pointer(Cb));
  dv.setBigUint64(0, koffi.address(h), true);
  dv.setUint8(8, 0);
  dv.setUint8(9, ep);
  dv.setUint8(10, 1); // LIBUSB_TRANSFER_TYPE_ISOCHRONOUS
  dv.setUint32(12, 1000, true);
  dv.setInt32(20, len, true);
  dv.setBigUint64(32, typeof cb === 'bigint' ? cb : koffi.address(cb), true);
  dv.setBigUint64(40, 0n, true);
  dv.setBigUint64(48, koffi.address(buf), true);
  dv.setInt32(56, packets, true);
  for (let i = 0; i < packets; i++) dv.setUint32(60 + 12 * i, packetBytes, true);
  const t0 = performance.now();
  step('libusb_submit_transfer (iso OUT)', submit(t));
  const tv = { tv_sec: 0, tv_usec: 100_000 };
  while (!done && performance.now() - t0 < 5000) handleEvents(ctx, tv, null);
  out.ms = Math.round(performance.now() - t0);
  out.status = dv.getInt32(16, true);
  out.actual = dv.getInt32(24, true);
  out.packets = Array.from({ length: packets }, (_, i) => ({ len: dv.getUint32(60 + 12 * i, true), actual: dv.getUint32(64 + 12 * i, true), status: dv.getInt32(68 + 12 * i, true) }));
  out.ok = done && out.status === 0 && out.packets.every((p) => p.status === 0 && p.actual === packetBytes);
  release(h, iface);
  close(h);
} catch (err) {
  out.error = err.message;
}
console.log(JSON.stringify(out));
process.exit(0);
