// The usbmon pcap codec on bytes: the file header, the 64-byte usbmon header field by field,
// setup packets, iso descriptors, snaplen cuts, and our URB events mapped to usbmon's numbering.
import { expect } from 'chai';
import fc from 'fast-check';
import { usbmonFromUrbEvent } from '../../src/common/capture/urb-events.js';
import {
  decodeUsbmonPcap,
  encodeUsbmonRecord,
  Errno,
  pcapFileHeader,
  PcapFormatError,
  URB_DIR_IN_LINUX,
  UsbmonXfer,
  type UsbmonEvent,
} from '../../src/common/capture/usbmon-pcap.js';
import { TransferType, UrbEvent_Kind, UrbStatus, type UrbEvent } from '../../src/gen/usbroam/v1/usbhost.js';

const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');

const base: UsbmonEvent = {
  id: 0x1122334455667788n,
  type: 'S',
  xferType: UsbmonXfer.Control,
  epnum: 0x80,
  devnum: 2,
  busnum: 1,
  setup: Uint8Array.of(0x80, 0x06, 0x00, 0x01, 0x00, 0x00, 0x12, 0x00),
  data: new Uint8Array(0),
  length: 18,
  status: Errno.EINPROGRESS,
  tsSec: 1700000000,
  tsUsec: 123456,
  interval: 0,
  startFrame: 0,
  xferFlags: URB_DIR_IN_LINUX,
};

describe('usbmon pcap codec', () => {
  it('writes the pcap file header: little-endian magic, version 2.4, snaplen, LINKTYPE_USB_LINUX_MMAPPED', () => {
    expect(hex(pcapFileHeader(0x40000))).to.equal('d4c3b2a1' + '0200' + '0400' + '00000000' + '00000000' + '00000400' + 'dc000000');
  });

  it('lays out a control submit with its setup packet exactly as struct usbmon_packet', () => {
    const r = encodeUsbmonRecord(base);
    expect(r.length).to.equal(16 + 64);
    const want =
      // pcap record: ts_sec, ts_usec, incl_len 64, orig_len 64
      '00f15365' + '40e20100' + '40000000' + '40000000' +
      // id, type 'S', xfer 2 (control), epnum 0x80, devnum 2, busnum 1, flag_setup 0, flag_data '<'
      '8877665544332211' + '53' + '02' + '80' + '02' + '0100' + '00' + '3c' +
      // ts_sec (s64), ts_usec (s32), status -EINPROGRESS, length 18, len_cap 0
      '00f1536500000000' + '40e20100' + '8dffffff' + '12000000' + '00000000' +
      // setup, interval, start_frame, xfer_flags URB_DIR_IN, ndesc
      '8006000100001200' + '00000000' + '00000000' + '00020000' + '00000000';
    expect(hex(r)).to.equal(want);
  });

  it("marks a completion without setup '-' and an OUT completion's missing data '>'", () => {
    const r = encodeUsbmonRecord({ ...base, type: 'C', epnum: 0x02, xferType: UsbmonXfer.Bulk, setup: undefined, status: 0, length: 512, xferFlags: 0 });
    expect(r[16 + 14]).to.equal(0x2d);
    expect(r[16 + 15]).to.equal(0x3e);
  });

  it('writes iso descriptors between the header and the data, with error count and numdesc in the setup field', () => {
    const data = Uint8Array.of(1, 2, 3, 4, 5);
    const r = encodeUsbmonRecord({
      ...base,
      type: 'C',
      xferType: UsbmonXfer.Iso,
      epnum: 0x83,
      setup: undefined,
      data,
      length: 5,
      status: 0,
      iso: { errorCount: 1, descs: [{ status: 0, offset: 0, length: 3 }, { status: Errno.EPROTO, offset: 3, length: 2 }] },
    });
    const v = new DataView(r.buffer, 16);
    expect(r.length).to.equal(16 + 64 + 32 + 5);
    expect([v.getInt32(40, true), v.getInt32(44, true), v.getUint32(60, true)]).to.deep.equal([1, 2, 2]);
    expect([v.getInt32(64 + 16, true), v.getUint32(64 + 20, true), v.getUint32(64 + 24, true)]).to.deep.equal([Errno.EPROTO, 3, 2]);
    expect(hex(r.subarray(16 + 96))).to.equal('0102030405');
  });

  it('says in orig_len how much data a snaplen cut off', () => {
    const r = encodeUsbmonRecord({ ...base, type: 'C', setup: undefined, data: new Uint8Array(10), originalDataLength: 100, status: 0 });
    const v = new DataView(r.buffer);
    expect([v.getUint32(8, true), v.getUint32(12, true)]).to.deep.equal([64 + 10, 64 + 100]);
  });

  it('decodes what it encodes (any event)', () => {
    const ev = fc.record({
      id: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
      type: fc.constantFrom<'S' | 'C' | 'E'>('S', 'C', 'E'),
      xferType: fc.constantFrom(UsbmonXfer.Bulk, UsbmonXfer.Interrupt, UsbmonXfer.Iso),
      epnum: fc.integer({ min: 0, max: 255 }),
      devnum: fc.integer({ min: 0, max: 127 }),
      busnum: fc.integer({ min: 0, max: 65535 }),
      data: fc.uint8Array({ maxLength: 300 }),
      length: fc.nat(),
      status: fc.integer({ min: -200, max: 0 }),
      tsSec: fc.integer({ min: 0, max: 2 ** 32 - 1 }),
      tsUsec: fc.integer({ min: 0, max: 999_999 }),
      interval: fc.nat(255),
      startFrame: fc.nat(),
      xferFlags: fc.nat(),
      descs: fc.array(fc.record({ status: fc.integer({ min: -200, max: 0 }), offset: fc.nat(), length: fc.nat() }), { maxLength: 8 }),
    });
    fc.assert(
      fc.property(fc.array(ev, { maxLength: 5 }), (evs) => {
        const events: UsbmonEvent[] = evs.map(({ descs, ...e }) => ({ ...e, iso: e.xferType === UsbmonXfer.Iso ? { errorCount: descs.length, descs } : undefined }));
        const file = Buffer.concat([pcapFileHeader(65536), ...events.map(encodeUsbmonRecord)]);
        const back = decodeUsbmonPcap(file).records.map((r) => r.event);
        expect(back).to.deep.equal(events.map((e) => ({ ...e, setup: undefined })));
      }),
    );
  });

  it('refuses a file that is not usbmon pcap, or is cut short, with a message that says so', () => {
    expect(() => decodeUsbmonPcap(new Uint8Array(10))).to.throw(PcapFormatError, /shorter than its 24-byte header/);
    const other = pcapFileHeader(100);
    other[20] = 1;
    expect(() => decodeUsbmonPcap(other)).to.throw(PcapFormatError, /link type 1/);
    const cut = Buffer.concat([pcapFileHeader(100), encodeUsbmonRecord(base)]).subarray(0, 24 + 50);
    expect(() => decodeUsbmonPcap(cut)).to.throw(PcapFormatError, /the file ends first/);
  });

  it('maps URB events: types, IN control direction from the setup packet, statuses as negative errno, flags', () => {
    const ev: UrbEvent = {
      kind: UrbEvent_Kind.KIND_SUBMIT,
      sessionId: 's',
      urbTag: 7,
      endpoint: 0x80,
      type: TransferType.TRANSFER_CONTROL,
      setup: base.setup!,
      data: new Uint8Array(0),
      length: 18,
      status: UrbStatus.URB_STATUS_SUCCESS,
      isoPackets: [],
      flags: 1,
      interval: 0,
      timestampUs: 1_700_000_000_123_456,
    };
    const s = usbmonFromUrbEvent(ev, 3, 5);
    expect([s.type, s.xferType, s.epnum, s.busnum, s.devnum, s.status, s.tsSec, s.tsUsec, s.xferFlags]).to.deep.equal(['S', UsbmonXfer.Control, 0x80, 3, 5, Errno.EINPROGRESS, 1_700_000_000, 123_456, URB_DIR_IN_LINUX | 1]);
    const c = usbmonFromUrbEvent({ ...ev, kind: UrbEvent_Kind.KIND_COMPLETE, setup: new Uint8Array(0), status: UrbStatus.URB_STATUS_STALL, length: 0 }, 3, 5);
    expect([c.type, c.status, c.setup]).to.deep.equal(['C', Errno.EPIPE, undefined]);
    const bulkOut = usbmonFromUrbEvent({ ...ev, endpoint: 0x02, type: TransferType.TRANSFER_BULK, setup: new Uint8Array(0), flags: 2 }, 1, 2);
    expect([bulkOut.xferType, bulkOut.epnum, bulkOut.xferFlags]).to.deep.equal([UsbmonXfer.Bulk, 0x02, 0x40]);
    const iso = usbmonFromUrbEvent(
      {
        ...ev,
        kind: UrbEvent_Kind.KIND_COMPLETE,
        endpoint: 0x83,
        type: TransferType.TRANSFER_ISOCHRONOUS,
        data: new Uint8Array(5),
        length: 5,
        isoPackets: [
          { length: 4, actualLength: 3, status: UrbStatus.URB_STATUS_SUCCESS },
          { length: 4, actualLength: 2, status: UrbStatus.URB_STATUS_IOERROR },
        ],
      },
      1,
      2,
    );
    expect(iso.iso).to.deep.equal({ errorCount: 1, descs: [{ status: 0, offset: 0, length: 3 }, { status: Errno.EPROTO, offset: 3, length: 2 }] });
  });
});
