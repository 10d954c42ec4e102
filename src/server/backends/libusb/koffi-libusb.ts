// libusb-1.0 reached through koffi, for what usb@2 (node-usb 2.x) has no binding for
// (isochronous transfers: iso-koffi.ts; bulk streams: streams-koffi.ts). It loads the
// libusb-1.0 that usb@2's own prebuilt binary exports (or the system's libusb-1.0.so.0) and
// runs a libusb context of its own. usb@2 keeps its libusb_device_handle private, so a device
// is opened a second time here; usbfs claims are per open file, so the interfaces served here
// are claimed (and their alt settings set) through this handle, never through usb@2's. Events
// of this context are handled from the event loop (libusb_handle_events_timeout_completed with
// a zero timeout, every millisecond while transfers are pending); completions come back through
// one koffi-registered callback.
import { createRequire } from 'node:module';
import path from 'node:path';

export interface LibusbError extends Error {
  errno: number;
}

// struct libusb_transfer on 64-bit Linux.
export const TRANSFER_OFFSETS = {
  handle: 0,
  flags: 8,
  endpoint: 9,
  type: 10,
  timeout: 12,
  status: 16,
  length: 20,
  actualLength: 24,
  callback: 32,
  userData: 40,
  buffer: 48,
  numIso: 56,
  iso: 60,
} as const;

type Koffi = typeof import('koffi');
type KoffiLib = ReturnType<Koffi['load']>;

/** What an open of a device for koffi does for its interfaces (the iso and streams devices have these too). */
export interface KoffiInterfaceOps {
  claim(iface: number): void;
  release(iface: number): void;
  setAlt(iface: number, alt: number): void;
  clearHalt(endpoint: number): void;
  close(): void;
}

/** The interface calls of `h`, bound (for an iso or streams device built on it). */
export function interfaceOps(h: KoffiHandle): KoffiInterfaceOps {
  return { claim: (n) => h.claim(n), release: (n) => h.release(n), setAlt: (n, alt) => h.setAlt(n, alt), clearHalt: (ep) => h.clearHalt(ep), close: () => h.close() };
}

/** An open of one device in the koffi libusb context. */
export interface KoffiHandle extends KoffiInterfaceOps {
  /** The libusb_device_handle (for the calls of iso-koffi / streams-koffi). */
  readonly ptr: unknown;
  /**
   * Submit `t` (a libusb_transfer filled but for dev_handle and callback); `onDone(view)` runs
   * on completion with the transfer's bytes (the first `viewBytes`), after which the transfer is
   * freed. Returns the cancel. Throws a LibusbError when libusb refuses the submit (t is freed).
   */
  submit(t: unknown, viewBytes: number, onDone: (view: DataView) => void): () => void;
}

export interface KoffiLibusb {
  koffi: Koffi;
  lib: KoffiLib;
  /** Throws a LibusbError (message `what: LIBUSB_ERROR_...`) for a negative return code. */
  check(what: string, rc: number | bigint): void;
  /**
   * A libusb_transfer with `isoPackets` packet descriptors and a buffer of `length` bytes (at
   * least 1) holding `out` at its start; throws a LibusbError when out of memory. `buf` is the
   * caller's to koffi.free once the transfer completed or its submit threw.
   */
  allocTransfer(isoPackets: number, length: number, out?: Uint8Array): { t: unknown; buf: unknown };
  /** Open the device at this bus and port path; throws a LibusbError when it cannot. */
  open(bus: number, portPath: number[]): KoffiHandle;
}

let loaded: KoffiLibusb | undefined;
let loadError: string | undefined;

/** libusb through koffi, loaded once; undefined (with the reason) when koffi or libusb cannot be had. */
export function koffiLibusb(): { libusb?: KoffiLibusb; error?: string } {
  if (loaded || loadError) return { libusb: loaded, error: loadError };
  try {
    loaded = load();
  } catch (err) {
    loadError = (err as Error).message;
  }
  return { libusb: loaded, error: loadError };
}

function load(): KoffiLibusb {
  if (process.arch !== 'x64' && process.arch !== 'arm64') throw new Error(`libusb through koffi: struct layout known for 64-bit only, not ${process.arch}`);
  const require = createRequire(import.meta.url);
  const koffi = require('koffi') as Koffi;
  require('usb');
  const usbPkg = require.resolve('usb/package.json');
  let lib: KoffiLib | undefined;
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
  if (!lib) throw new Error(`no libusb-1.0 to call through koffi (${tried.join('; ')})`);
  const L = lib;
  koffi.struct('usbroam_libusb_timeval', { tv_sec: 'long', tv_usec: 'long' });
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
    handleEvents: L.func('int libusb_handle_events_timeout_completed(void *ctx, usbroam_libusb_timeval *tv, int *completed)'),
  };
  const check = (what: string, rc: number | bigint): void => {
    if (Number(rc) < 0) throw Object.assign(new Error(`${what}: ${f.errorName(Number(rc))}`), { errno: Number(rc) }) as LibusbError;
  };
  const ctxOut: unknown[] = [null];
  check('libusb_init', f.init(ctxOut));
  const ctx = ctxOut[0];

  interface Pending {
    transfer: unknown;
    viewBytes: number;
    onDone: (view: DataView) => void;
  }
  const pending = new Map<bigint, Pending>();
  const Cb = koffi.proto('void usbroam_libusb_transfer_cb(void *transfer)');
  const onComplete = (tp: unknown) => {
    const key = typeof tp === 'bigint' ? tp : koffi.address(tp);
    const p = pending.get(key);
    if (!p) return;
    pending.delete(key);
    try {
      p.onDone(new DataView(koffi.view(p.transfer, p.viewBytes)));
    } catch {
      /* the caller's problem */
    }
    f.freeTransfer(p.transfer);
  };
  const cbPtr = koffi.register(onComplete, koffi.pointer(Cb));
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

  function handle(h: unknown): KoffiHandle {
    const ad = f.autoDetach(h, 1) as number;
    if (ad < 0 && ad !== -12) check('libusb_set_auto_detach_kernel_driver', ad);
    const handleAddr = koffi.address(h);
    const mine = new Set<bigint>();
    return {
      ptr: h,
      claim: (n) => check(`libusb_claim_interface ${n}`, f.claim(h, n)),
      release: (n) => check(`libusb_release_interface ${n}`, f.release(h, n)),
      setAlt: (n, alt) => check(`libusb_set_interface_alt_setting ${n} ${alt}`, f.setAlt(h, n, alt)),
      clearHalt: (ep) => check(`libusb_clear_halt 0x${ep.toString(16)}`, f.clearHalt(h, ep)),
      submit(t, viewBytes, onDone) {
        const dv = new DataView(koffi.view(t, TRANSFER_OFFSETS.iso));
        dv.setBigUint64(TRANSFER_OFFSETS.handle, handleAddr, true);
        dv.setBigUint64(TRANSFER_OFFSETS.callback, cbAddr, true);
        dv.setBigUint64(TRANSFER_OFFSETS.userData, 0n, true);
        const key = koffi.address(t);
        const rc = f.submit(t) as number;
        if (rc < 0) {
          f.freeTransfer(t);
          check('libusb_submit_transfer', rc);
        }
        pending.set(key, { transfer: t, viewBytes, onDone: (v) => (mine.delete(key), onDone(v)) });
        mine.add(key);
        schedule();
        return () => {
          if (pending.has(key)) f.cancel(t);
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

  return {
    koffi,
    lib: L,
    check,
    allocTransfer(isoPackets, length, out) {
      const buf = koffi.alloc('uint8_t', Math.max(1, length));
      if (out?.length) new Uint8Array(koffi.view(buf, Math.max(1, length))).set(out.subarray(0, length));
      const t = f.allocTransfer(isoPackets);
      if (!t) {
        koffi.free(buf);
        throw Object.assign(new Error('libusb_alloc_transfer: out of memory'), { errno: -11 });
      }
      return { t, buf };
    },
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
          return handle(hOut[0]);
        }
      } finally {
        f.freeDeviceList(list, 1);
      }
      throw Object.assign(new Error(`no device at bus ${bus} port ${portPath.join('.')} in libusb's list`), { errno: -4 });
    },
  };
}
