// Bulk streams for the libusb backend, outside usb@2 (it has no binding for
// libusb_alloc_streams / libusb_free_streams / libusb_transfer_set_stream_id): a second open of
// the device through koffi (koffi-libusb.ts: why a second open, how its events are handled)
// claims the interfaces with stream-capable bulk endpoints, allocates the streams on that
// handle, and carries every bulk and interrupt transfer of those interfaces, with a stream id
// (LIBUSB_TRANSFER_TYPE_BULK_STREAM, as libusb_fill_bulk_stream_transfer does) or without.
// Tried on QEMU usb-uas under a real kernel (test/e2e/libusb-uas.test.ts).
import { interfaceOps, koffiLibusb, TRANSFER_OFFSETS as OFF, type KoffiHandle, type KoffiInterfaceOps } from './koffi-libusb.js';

/** libusb_transfer_status of the transfer (0 completed, 4 stall, ...) and what it moved. */
export interface StreamTransferDone {
  status: number;
  actualLength: number;
  /** IN: the data received. */
  data?: Uint8Array;
}

export interface StreamTransferRequest {
  endpoint: number;
  /** 2 bulk, 3 interrupt (libusb_transfer_type); a bulk transfer with streamId > 0 goes as BULK_STREAM. */
  type: 2 | 3;
  streamId: number;
  /** OUT: the data; IN: undefined (`length` bytes are asked for). */
  data?: Uint8Array;
  length: number;
  shortNotOk: boolean;
  /** LIBUSB_TRANSFER_ADD_ZERO_PACKET (OUT whose length is a multiple of the max packet size). */
  zeroPacket: boolean;
  timeoutMs: number;
}

/** An open of one device for its stream-capable interfaces. */
export interface StreamsDevice extends KoffiInterfaceOps {
  /** libusb_alloc_streams: the number of streams allocated (ids 1..n). Throws a LibusbError. */
  allocStreams(endpoints: number[], numStreams: number): number;
  /** libusb_free_streams. Throws a LibusbError. */
  freeStreams(endpoints: number[]): void;
  /** Throws an Error with errno on a refused submit; returns the cancel. */
  submit(req: StreamTransferRequest, done: (r: StreamTransferDone) => void): () => void;
}

export interface StreamsEngine {
  /** Open the device at this bus and port path; throws (with errno) when it cannot. */
  open(bus: number, portPath: number[]): StreamsDevice;
}

const TRANSFER_TYPE_BULK_STREAM = 4;
const TRANSFER_SHORT_NOT_OK = 1 << 0;
const TRANSFER_ADD_ZERO_PACKET = 1 << 3;
/** libusb_alloc_streams takes at most this many endpoints at once (usbfs: one per endpoint address). */
const MAX_ENDPOINTS = 30;

let engine: StreamsEngine | undefined;

/** The engine, loaded once; undefined (with the reason) when koffi or libusb cannot be had. */
export function koffiStreamsEngine(): { engine?: StreamsEngine; error?: string } {
  if (engine) return { engine };
  const { libusb: loaded, error } = koffiLibusb();
  if (!loaded) return { error: `bulk streams through koffi: ${error}` };
  const libusb = loaded;
  const { koffi, lib, check } = libusb;
  let f;
  try {
    f = {
      allocStreams: lib.func('int libusb_alloc_streams(void *handle, uint32_t numStreams, uint8_t *endpoints, int numEndpoints)'),
      freeStreams: lib.func('int libusb_free_streams(void *handle, uint8_t *endpoints, int numEndpoints)'),
      setStreamId: lib.func('void libusb_transfer_set_stream_id(void *transfer, uint32_t streamId)'),
    };
  } catch (err) {
    return { error: `bulk streams through koffi: this libusb-1.0 lacks the streams API (1.0.19+): ${(err as Error).message}` };
  }
  const fns = f;
  const endpointList = (endpoints: number[]): Buffer => {
    if (endpoints.length === 0 || endpoints.length > MAX_ENDPOINTS) throw Object.assign(new Error(`bulk streams: ${endpoints.length} endpoints (1-${MAX_ENDPOINTS})`), { errno: -2 });
    return Buffer.from(endpoints);
  };

  function streamsDevice(h: KoffiHandle): StreamsDevice {
    return {
      ...interfaceOps(h),
      allocStreams(endpoints, numStreams) {
        const rc = fns.allocStreams(h.ptr, numStreams >>> 0, endpointList(endpoints), endpoints.length) as number;
        check(`libusb_alloc_streams ${numStreams}`, rc);
        return rc;
      },
      freeStreams(endpoints) {
        check('libusb_free_streams', fns.freeStreams(h.ptr, endpointList(endpoints), endpoints.length) as number);
      },
      submit(req, done) {
        const isIn = (req.endpoint & 0x80) !== 0;
        const len = isIn ? req.length : (req.data?.length ?? 0);
        const { t, buf } = libusb.allocTransfer(0, len, isIn ? undefined : req.data);
        const dv = new DataView(koffi.view(t, OFF.iso));
        dv.setUint8(OFF.flags, (req.shortNotOk && isIn ? TRANSFER_SHORT_NOT_OK : 0) | (req.zeroPacket && !isIn ? TRANSFER_ADD_ZERO_PACKET : 0));
        dv.setUint8(OFF.endpoint, req.endpoint);
        dv.setUint8(OFF.type, req.type === 2 && req.streamId > 0 ? TRANSFER_TYPE_BULK_STREAM : req.type);
        dv.setUint32(OFF.timeout, req.timeoutMs >>> 0, true);
        dv.setInt32(OFF.length, len, true);
        dv.setBigUint64(OFF.buffer, koffi.address(buf), true);
        dv.setInt32(OFF.numIso, 0, true);
        fns.setStreamId(t, req.type === 2 ? req.streamId >>> 0 : 0);
        try {
          return h.submit(t, OFF.iso, (v) => {
            const actualLength = Math.max(0, Math.min(len, v.getInt32(OFF.actualLength, true)));
            // A copy: the libusb buffer is freed right here.
            const data = isIn ? new Uint8Array(koffi.view(buf, Math.max(1, len)), 0, actualLength).slice() : undefined;
            koffi.free(buf);
            done({ status: v.getInt32(OFF.status, true), actualLength, data });
          });
        } catch (err) {
          koffi.free(buf);
          throw err;
        }
      },
    };
  }

  engine = { open: (bus, portPath) => streamsDevice(libusb.open(bus, portPath)) };
  return { engine };
}
