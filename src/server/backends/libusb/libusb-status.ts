// libusb's status and error codes as URB statuses, and the errors for what the libusb backend
// cannot do (isochronous transfers, bulk streams) without its koffi paths.
import { UrbStatus } from '../types.js';

/** libusb_transfer_status values (node-usb puts them in LibUSBException.errno for completions). */
export const TRANSFER_COMPLETED = 0;
export const TRANSFER_ERROR = 1;
export const TRANSFER_TIMED_OUT = 2;
export const TRANSFER_CANCELLED = 3;
export const TRANSFER_STALL = 4;
export const TRANSFER_NO_DEVICE = 5;
export const TRANSFER_OVERFLOW = 6;

/** libusb_error values (thrown synchronously by submit/claim/...). */
export const ERROR_IO = -1;
export const ERROR_INVALID_PARAM = -2;
export const ERROR_ACCESS = -3;
export const ERROR_NO_DEVICE = -4;
export const ERROR_NOT_FOUND = -5;
export const ERROR_BUSY = -6;
export const ERROR_TIMEOUT = -7;
export const ERROR_OVERFLOW = -8;
export const ERROR_PIPE = -9;
export const ERROR_NOT_SUPPORTED = -12;

/**
 * What is missing for isochronous transfers and bulk streams (the reason part of the errors below).
 * usb@2 (node-usb 2.x) allocates every libusb_transfer with 0 iso packets and never sets a stream id;
 * its Device keeps the libusb_device_handle (and its libusb_context) to itself, so koffi calling
 * libusb-1.0 directly would need a second, separate open of the device.
 */
export const ISO_UNIMPLEMENTED =
  'isochronous transfers are not implemented by the libusb backend: usb@2 (node-usb 2.x) has no binding for ' +
  'libusb_alloc_transfer(iso_packets) / libusb_fill_iso_transfer / iso_packet_desc, and the libusb_device_handle it holds ' +
  'is not reachable from koffi (the experimental koffi path opens the device a second time in its own libusb context: ' +
  'USBROAM_LIBUSB_ISO=koffi)';
export const STREAMS_UNIMPLEMENTED =
  'bulk streams are not implemented by the libusb backend: usb@2 (node-usb 2.x) has no binding for ' +
  'libusb_alloc_streams / libusb_free_streams / libusb_transfer_set_stream_id, and the libusb_device_handle it holds ' +
  'is not reachable from koffi (the koffi path opens the device a second time in its own libusb context: ' +
  'USBROAM_LIBUSB_STREAMS=koffi)';

/** An endpoint address as errors print it. */
export const hexEp = (ep: number) => `0x${ep.toString(16).padStart(2, '0')}`;

/** The error for an isochronous request: device, endpoint, and what is missing. */
export function isoUnimplemented(deviceId: string, endpoint: number): string {
  return `device ${deviceId} endpoint ${hexEp(endpoint)}: ${ISO_UNIMPLEMENTED}`;
}

/** The error for a bulk streams request: device, endpoint(s), and what is missing. */
export function streamsUnimplemented(deviceId: string, endpoints: number[], streamId?: number): string {
  const eps = endpoints.length ? endpoints.map(hexEp).join(', ') : '(none given)';
  return `device ${deviceId} endpoint${endpoints.length === 1 ? '' : 's'} ${eps}${streamId ? ` stream ${streamId}` : ''}: ${STREAMS_UNIMPLEMENTED}`;
}

/** Map a completion's transfer status to a URB status. */
export function transferStatusToUrb(errno: number | undefined): UrbStatus {
  switch (errno) {
    case undefined:
    case TRANSFER_COMPLETED:
      return UrbStatus.Success;
    case TRANSFER_TIMED_OUT:
      return UrbStatus.Timeout;
    case TRANSFER_CANCELLED:
      return UrbStatus.Cancelled;
    case TRANSFER_STALL:
      return UrbStatus.Stall;
    case TRANSFER_OVERFLOW:
      return UrbStatus.Babble;
    default:
      return UrbStatus.IoError;
  }
}

/** Map a libusb_error (synchronous failure) to a URB status. */
export function libusbErrorToUrb(errno: number | undefined): UrbStatus {
  switch (errno) {
    case ERROR_INVALID_PARAM:
    case ERROR_NOT_FOUND:
    case ERROR_NOT_SUPPORTED:
      return UrbStatus.Inval;
    case ERROR_PIPE:
      return UrbStatus.Stall;
    case ERROR_TIMEOUT:
      return UrbStatus.Timeout;
    case ERROR_OVERFLOW:
      return UrbStatus.Babble;
    default:
      return UrbStatus.IoError;
  }
}
