// Isochronous transfers for the libusb backend, outside usb@2 (it has no iso binding): koffi
// calls the libusb-1.0 that usb@2's own prebuilt binary exports (or the system's
// libusb-1.0.so.0), in a libusb context of its own. usb@2 keeps its libusb_device_handle
// private, so the device is opened a second time here; usbfs claims are per open file, so the
// interfaces with isochronous endpoints are claimed (and their alt settings set) through this
// handle, never through usb@2's. Events of this context are handled from the event loop
// (libusb_handle_events_timeout_completed with a zero timeout, every millisecond while
// transfers are pending); completions come back through one koffi-registered callback.
// Tried on QEMU usb-audio under a real kernel (test/e2e/libusb-iso.test.ts).
import { createRequire } from 'node:module';
import path from 'node:path';

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
export interface IsoDevice {
  claim(iface: number): void;
  release(iface: number): void;
  setAlt(iface: number, alt: number): void;
  clearHalt(endpoint: number): void;
  /** `data` for OUT (packets concatenated); IN when endpoint & 0x80. Throws an Error with errno on a refused submit. */
  submitIso(endpoint: number, data: Uint8Array | undefined, packetLengths: number[], timeoutMs: number, done: (r: IsoTransferDone) => void): IsoSubmitted;
  close(): void;
}

export interface IsoEngine {
  /** Open the device at this bus and port path; throws (with errno) when it cannot. */
  open(bus: number, portPath: number[]): IsoDevice;
}

interface LibusbError extends Error {
  errno: number;
}

const TRANSFER_TYPE_ISOCHRONOUS = 1;
// struct libusb_transfer on 64-bit Linux.
const OFF = { handle: 0, flags: 8, endpoint: 9, type: 10, timeout: 12, status: 16, length: 20, callback: 32, userData: 40, buffer: 48, numIso: 56, iso: 60 } as const;
const ISO_DESC = 12;

let engine: IsoEngine | undefined;
let loadError: string | undefined;

/** The engine, loaded once; undefined (with the reason) when koffi or libusb cannot be had. */
export function koffiIsoEngine(): { engine?: IsoEngine; error?: string } {
  if (engine || loadError) return { engine, error: loadError };
  try {
    engine = load();
  } catch (err) {
    loadError = (err as Error).message;
  }
  return { engine, error: loadError };
}

function load(): IsoEngine {
  if (process.arch !== 'x64' && process.arch !== 'arm64') throw new Error(`isochronous transfers through koffi: struct layout known for 64-bit only, not ${process.arch}`);
  const require = createRequire(import.meta.url);
  const koffi = require('koffi') as typeof import('koffi');
  require('usb');
  const usbPkg = require.resolve('usb/package.json');
  let lib: ReturnType<typeof koffi.load> | undefined;
  const tried: string[] = [];
  const candidates: string[] = [];
  try {
    const gyp = createRequire(usbPkg)('node-gyp-build') as { path(dir: string): string };
    candidates.push(process.env.NODE_USB_PATH ?? gyp.path(path.dirname(usbPkg)));
  } catch (err) {
    tried.push(`usb@2's binary: ${(err as Error).message}`);
  }
  candidates.push('libusb-1.0.so.0');
  for (const c of candidates) {
    try {
      const l = koffi.load(c);
      l.func('const char *libusb_error_name(int code)');
      lib = l;
      break;
    } catch (err) {
      tried.push(`${c}: ${(err as Error).message}`);
    }
  }
  if (!lib) throw new Error(`no libusb-1.0 for isochronous transfers (${tried.join('; ')})`);
  const L = lib;
  const TimeVal = koffi.struct('usbroam_iso_timeval', { tv_sec: 'long', tv_usec: 'long' });
  void TimeVal;
  const f = {
    errorName: L.func('const char *libusb_error_name(int code)'),
    init: L.func('int libusb_init(_Out_ void **ctx)'),
    getDeviceList: L.func('int64_t libusb_get_device_list(void *ctx, _Out_ void **list)'),
    freeDeviceList: L.func('void libusb_free_device_list(void *list, int unref)'),
    busNumber: L.func('uint8_t libusb_get_bus_number(void *dev)'),
    portNumbers: L.func('int libusb_get_port_numbers(void *dev, _Out_ uint8_t *ports, int len)'),
    open: L.func('int libusb_open(void *dev, _Out_ void **handle)'),
    close: L.func('void libusb_close(void *handle)'),
    autoDetach: L.func('int libusb_set_auto_detach_kernel_driver(void *handle, int enable)'),
    claim: L.func('int libusb_claim_interface(void *handle, int n)'),
    release: L.func('int libusb_release_interface(void *handle, int n)'),
    setAlt: L.func('int libusb_set_interface_alt_setting(void *handle, int n, int alt)'),
    clearHalt: L.func('int libusb_clear_halt(void *handle, uint8_t endpoint)'),
    allocTransfer: L.func('void *libusb_alloc_transfer(int isoPackets)'),
    freeTransfer: L.func('void libusb_free_transfer(void *transfer)'),
    submit: L.func('int libusb_submit_transfer(void *transfer)'),
    cancel: L.func('int libusb_cancel_transfer(void *transfer)'),
    handleEvents: L.func('int libusb_handle_events_timeout_completed(void *ctx, usbroam_iso_timeval *tv, int *completed)'),
  };
  const check = (what: string, rc: number | bigint): void => {
    if (Number(rc) < 0) throw Object.assign(new Error(`${what}: ${f.errorName(Number(rc))}`), { errno: Number(rc) }) as LibusbError;
  };
  const ctxOut: unknown[] = [null];
  check('libusb_init', f.init(ctxOut));
  const ctx = ctxOut[0];

  interface Pending {
    transfer: unknown;
    buf: unknown;
    len: number;
    lengths: number[];
    isIn: boolean;
    done: (r: IsoTransferDone) => void;
  }
  const pending = new Map<bigint, Pending>();
  const Cb = koffi.proto('void usbroam_iso_cb(void *transfer)');
  const onDone = (tp: unknown) => {
    const key = typeof tp === 'bigint' ? tp : koffi.address(tp);
    const p = pending.get(key);
    if (!p) return;
    pending.delete(key);
    const dv = new DataView(koffi.view(p.transfer, OFF.iso + ISO_DESC * p.lengths.length));
    const packets = p.lengths.map((_, i) => ({ actualLength: dv.getUint32(OFF.iso + ISO_DESC * i + 4, true), status: dv.getInt32(OFF.iso + ISO_DESC * i + 8, true) }));
    let data: Uint8Array | undefined;
    if (p.isIn) {
      const src = new Uint8Array(koffi.view(p.buf, Math.max(1, p.len)));
      const total = packets.reduce((a, x) => a + (x.status === 0 ? x.actualLength : 0), 0);
      data = new Uint8Array(total);
      let off = 0;
      let at = 0;
      for (let i = 0; i < packets.length; i++) {
        const n = packets[i]!.status === 0 ? packets[i]!.actualLength : 0;
        data.set(src.subarray(off, off + n), at);
        at += n;
        off += p.lengths[i]!;
      }
    }
    const status = dv.getInt32(OFF.status, true);
    f.freeTransfer(p.transfer);
    koffi.free(p.buf);
    try {
      p.done({ status, packets, data });
    } catch {
      /* the caller's problem */
    }
  };
  const cbPtr = koffi.register(onDone, koffi.pointer(Cb));
  const cbAddr = typeof cbPtr === 'bigint' ? cbPtr : koffi.address(cbPtr);
  let pump: NodeJS.Timeout | undefined;
  const zero = { tv_sec: 0, tv_usec: 0 };
  const schedule = () => {
    if (pump || pending.size === 0) return;
    pump = setTimeout(() => {
      pump = undefined;
      f.handleEvents(ctx, zero, null);
      schedule();
    }, 1);
  };

  return {
    open(bus, portPath) {
      const listOut: unknown[] = [null];
      const n = Number(f.getDeviceList(ctx, listOut));
      check('libusb_get_device_list', n);
      const list = listOut[0];
      try {
        const devs = koffi.decode(list, 'void *', n) as unknown[];
        const ports = Buffer.alloc(8);
        for (const dev of devs) {
          if (f.busNumber(dev) !== bus) continue;
          const k = f.portNumbers(dev, ports, ports.length) as number;
          if (k !== portPath.length || portPath.some((x, i) => ports[i] !== x)) continue;
          const hOut: unknown[] = [null];
          check('libusb_open', f.open(dev, hOut));
          return device(hOut[0]);
        }
      } finally {
        f.freeDeviceList(list, 1);
      }
      throw Object.assign(new Error(`no device at bus ${bus} port ${portPath.join('.')} in libusb's list`), { errno: -4 });
    },
  };

  function device(h: unknown): IsoDevice {
    const ad = f.autoDetach(h, 1) as number;
    if (ad < 0 && ad !== -12) check('libusb_set_auto_detach_kernel_driver', ad);
    const handleAddr = koffi.address(h);
    const mine = new Set<bigint>();
    return {
      claim: (n) => check(`libusb_claim_interface ${n}`, f.claim(h, n)),
      release: (n) => check(`libusb_release_interface ${n}`, f.release(h, n)),
      setAlt: (n, alt) => check(`libusb_set_interface_alt_setting ${n} ${alt}`, f.setAlt(h, n, alt)),
      clearHalt: (ep) => check(`libusb_clear_halt 0x${ep.toString(16)}`, f.clearHalt(h, ep)),
      submitIso(endpoint, data, lengths, timeoutMs, done) {
        const isIn = (endpoint & 0x80) !== 0;
        const len = lengths.reduce((a, b) => a + b, 0);
        const buf = koffi.alloc('uint8_t', Math.max(1, len));
        if (!isIn && data) new Uint8Array(koffi.view(buf, Math.max(1, len))).set(data.subarray(0, len));
        const t = f.allocTransfer(lengths.length);
        if (!t) {
          koffi.free(buf);
          throw Object.assign(new Error('libusb_alloc_transfer: out of memory'), { errno: -11 });
        }
        const dv = new DataView(koffi.view(t, OFF.iso + ISO_DESC * lengths.length));
        dv.setBigUint64(OFF.handle, handleAddr, true);
        dv.setUint8(OFF.flags, 0);
        dv.setUint8(OFF.endpoint, endpoint);
        dv.setUint8(OFF.type, TRANSFER_TYPE_ISOCHRONOUS);
        dv.setUint32(OFF.timeout, timeoutMs >>> 0, true);
        dv.setInt32(OFF.length, len, true);
        dv.setBigUint64(OFF.callback, cbAddr, true);
        dv.setBigUint64(OFF.userData, 0n, true);
        dv.setBigUint64(OFF.buffer, koffi.address(buf), true);
        dv.setInt32(OFF.numIso, lengths.length, true);
        for (let i = 0; i < lengths.length; i++) dv.setUint32(OFF.iso + ISO_DESC * i, lengths[i]!, true);
        const key = koffi.address(t);
        const rc = f.submit(t) as number;
        if (rc < 0) {
          f.freeTransfer(t);
          koffi.free(buf);
          check('libusb_submit_transfer', rc);
        }
        pending.set(key, { transfer: t, buf, len, lengths, isIn, done: (r) => (mine.delete(key), done(r)) });
        mine.add(key);
        schedule();
        return {
          cancel: () => {
            if (pending.has(key)) f.cancel(t);
          },
        };
      },
      close() {
        for (const key of mine) {
          const p = pending.get(key);
          if (p) f.cancel(p.transfer);
        }
        // Let the cancellations complete before the handle goes.
        for (let i = 0; i < 100 && [...mine].some((k) => pending.has(k)); i++) f.handleEvents(ctx, { tv_sec: 0, tv_usec: 10_000 }, null);
        f.close(h);
      },
    };
  }
}
