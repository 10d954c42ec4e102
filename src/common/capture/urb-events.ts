// From the Capture RPC's URB events to usbmon records: our transfer types, statuses and flags
// in the numbering Linux's usbmon (and so Wireshark's USB dissector) uses.
import { TransferType, UrbEvent_Kind, UrbStatus, type UrbEvent } from '../../gen/usbroam/v1/usbhost.js';
import { Errno, URB_DIR_IN_LINUX, URB_SHORT_NOT_OK_LINUX, URB_ZERO_PACKET_LINUX, UsbmonXfer, type UsbmonEvent } from './usbmon-pcap.js';

const XFER: Record<number, UsbmonXfer> = {
  [TransferType.TRANSFER_CONTROL]: UsbmonXfer.Control,
  [TransferType.TRANSFER_ISOCHRONOUS]: UsbmonXfer.Iso,
  [TransferType.TRANSFER_BULK]: UsbmonXfer.Bulk,
  [TransferType.TRANSFER_INTERRUPT]: UsbmonXfer.Interrupt,
};

/** What a Linux host controller driver reports for each of our statuses. */
export function linuxUrbStatus(s: UrbStatus): number {
  switch (s) {
    case UrbStatus.URB_STATUS_SUCCESS:
      return 0;
    case UrbStatus.URB_STATUS_CANCELLED:
      return Errno.ENOENT;
    case UrbStatus.URB_STATUS_INVAL:
      return Errno.EINVAL;
    case UrbStatus.URB_STATUS_STALL:
      return Errno.EPIPE;
    case UrbStatus.URB_STATUS_TIMEOUT:
      return Errno.ETIMEDOUT;
    case UrbStatus.URB_STATUS_BABBLE:
      return Errno.EOVERFLOW;
    default:
      return Errno.EPROTO;
  }
}

/** The URB's direction: the endpoint's, or for control the setup packet's bmRequestType. */
export function urbIsIn(endpoint: number, type: TransferType, setup?: Uint8Array): boolean {
  if (type === TransferType.TRANSFER_CONTROL && setup && setup.length === 8) return (setup[0] & 0x80) !== 0;
  return (endpoint & 0x80) !== 0;
}

/** One URB event as usbmon would have shown it, on usbmon bus `busnum`, device `devnum`. */
export function usbmonFromUrbEvent(e: UrbEvent, busnum: number, devnum: number): UsbmonEvent {
  const submit = e.kind === UrbEvent_Kind.KIND_SUBMIT;
  const isControl = e.type === TransferType.TRANSFER_CONTROL;
  // Completions carry no setup packet; their direction is that of their endpoint address
  // (0x80 for a control IN, as the server records it).
  const isIn = submit ? urbIsIn(e.endpoint, e.type, e.setup) : (e.endpoint & 0x80) !== 0;
  const us = Number(e.timestampUs);
  let flags = isIn ? URB_DIR_IN_LINUX : 0;
  if (e.flags & 1) flags |= URB_SHORT_NOT_OK_LINUX;
  if (e.flags & 2) flags |= URB_ZERO_PACKET_LINUX;
  let iso: UsbmonEvent['iso'];
  if (e.type === TransferType.TRANSFER_ISOCHRONOUS) {
    let offset = 0;
    let errorCount = 0;
    const descs = e.isoPackets.map((p) => {
      const length = submit ? p.length : p.actualLength;
      const status = submit ? Errno.EINPROGRESS : linuxUrbStatus(p.status);
      if (!submit && p.status !== UrbStatus.URB_STATUS_SUCCESS) errorCount++;
      const d = { status, offset, length };
      offset += length;
      return d;
    });
    iso = { errorCount, descs };
  }
  return {
    id: BigInt(e.urbTag),
    type: submit ? 'S' : 'C',
    xferType: XFER[e.type] ?? UsbmonXfer.Bulk,
    epnum: (e.endpoint & 0x0f) | (isIn ? 0x80 : 0),
    devnum,
    busnum,
    setup: submit && isControl ? e.setup : undefined,
    data: e.data,
    length: e.length,
    // The data a submit OUT or a completion IN carried before the server cut it at snaplen.
    originalDataLength: submit !== isIn ? Math.max(e.length, e.data.length) : e.data.length,
    status: submit ? Errno.EINPROGRESS : linuxUrbStatus(e.status),
    tsSec: Math.floor(us / 1e6),
    tsUsec: us % 1e6,
    interval: e.interval,
    startFrame: 0,
    xferFlags: flags,
    iso,
  };
}
