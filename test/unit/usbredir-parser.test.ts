import { expect } from 'chai';
import {
  ALL_CAPS,
  Cap,
  DEFAULT_MAX_PACKET_SIZE,
  UsbredirParser,
  UsbredirProtocolError,
  makeCaps,
  normalizeCaps,
  capsHas,
  type Packet,
} from '../../src/qemu/usbredir/index.js';
import { concat, connectedPair, hexBytes, pushSplit } from './usbredir-helpers.test.js';

function expectProtoError(fn: () => unknown, code: string): UsbredirProtocolError {
  try {
    fn();
  } catch (e) {
    expect(e).to.be.instanceOf(UsbredirProtocolError);
    expect((e as UsbredirProtocolError).code).to.equal(code);
    return e as UsbredirProtocolError;
  }
  expect.fail(`expected UsbredirProtocolError ${code}`);
}

/** 32-bit id header: u32 type @0, u32 length @4, u32 id @8. */
function hdr32(type: number, length: number, id: number): string {
  const le = (v: number) => [v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, v >>> 24].map((b) => b.toString(16).padStart(2, '0')).join('');
  return le(type) + le(length) + le(id);
}

describe('usbredir parser: golden vectors', () => {
  it('hello: 32-bit header, char version[64], u32 caps[]', () => {
    const dev = new UsbredirParser({ role: 'device', caps: [0xff], version: 'usbroam' });
    const bytes = dev.encode(dev.helloPacket());
    // @0 type=0, @4 length=68 (64 version + 4 caps), @8 id=0 (u32 even though 64bits_ids is ours)
    // @12 "usbroam" NUL-padded to 64 bytes, @76 caps[0]=0x000000ff
    const version = Array.from(new TextEncoder().encode('usbroam'));
    const expected = concat([
      hexBytes('00000000 44000000 00000000'),
      Uint8Array.from([...version, ...new Array(64 - version.length).fill(0)]),
      hexBytes('ff000000'),
    ]);
    expect(Array.from(bytes)).to.deep.equal(Array.from(expected));
    expect(bytes.length).to.equal(80);

    const host = new UsbredirParser({ role: 'host' });
    const got = host.push(bytes);
    expect(got).to.deep.equal([{ type: 'hello', id: 0n, version: 'usbroam', caps: [0xff] }]);
    expect(host.peerCaps).to.deep.equal([0xff]);
  });

  it('device_connect with device_version_bcd (both have connect_device_version), 64-bit id', () => {
    const { dev, host } = connectedPair();
    const p: Packet = {
      type: 'device_connect',
      id: 0x0102030405060708n,
      speed: 2,
      deviceClass: 0xef,
      deviceSubclass: 2,
      deviceProtocol: 1,
      vendorId: 0x1234,
      productId: 0x5678,
      deviceVersionBcd: 0x0200,
    };
    const bytes = dev.encode(p);
    // header: type=1, length=10, u64 id; then u8 speed,class,subclass,protocol; u16 vendor, product, bcd
    expect(Array.from(bytes)).to.deep.equal(
      Array.from(hexBytes('01000000 0a000000 0807060504030201  02 ef 02 01 3412 7856 0002')),
    );
    expect(host.push(bytes)).to.deep.equal([p]);
  });

  it('device_connect without connect_device_version: 8-byte header, no bcd field', () => {
    const caps = makeCaps('64bits_ids');
    const { dev, host } = connectedPair(caps, ALL_CAPS);
    const bytes = dev.encode({
      type: 'device_connect',
      id: 0n,
      speed: 1,
      deviceClass: 0,
      deviceSubclass: 0,
      deviceProtocol: 0,
      vendorId: 0xabcd,
      productId: 0x0001,
      deviceVersionBcd: 0x9999, // ignored: not negotiated
    });
    expect(Array.from(bytes)).to.deep.equal(Array.from(hexBytes('01000000 08000000 0000000000000000 01 00 00 00 cdab 0100')));
    const [got] = host.push(bytes);
    expect(got).to.deep.equal({
      type: 'device_connect',
      id: 0n,
      speed: 1,
      deviceClass: 0,
      deviceSubclass: 0,
      deviceProtocol: 0,
      vendorId: 0xabcd,
      productId: 1,
    });
  });

  it('bulk_packet with 32bits_bulk_length and 64-bit id (IN request, no data)', () => {
    const { dev, host } = connectedPair();
    const p: Packet = { type: 'bulk_packet', id: 0x1122334455667788n, endpoint: 0x81, status: 0, length: 0x12345, streamId: 7, data: new Uint8Array(0) };
    const bytes = host.encode(p);
    // @0 type=101 @4 length=10 @8 u64 id | @16 ep 0x81, status 0, u16 length low 0x2345, u32 stream 7, u16 length_high 1
    expect(Array.from(bytes)).to.deep.equal(
      Array.from(hexBytes('65000000 0a000000 8877665544332211  81 00 4523 07000000 0100')),
    );
    expect(dev.push(bytes)).to.deep.equal([p]);
  });

  it('bulk_packet without 32bits_bulk_length or 64bits_ids (OUT with data)', () => {
    const caps = makeCaps('connect_device_version');
    const { dev, host } = connectedPair(caps, ALL_CAPS);
    expect(dev.headerSize).to.equal(12);
    const p: Packet = { type: 'bulk_packet', id: 0xdeadbeefn, endpoint: 0x02, status: 0, length: 3, streamId: 0, data: hexBytes('aabbcc') };
    const bytes = host.encode(p);
    // 12-byte header; 8-byte bulk header (no length_high); 3 data bytes
    expect(Array.from(bytes)).to.deep.equal(Array.from(hexBytes('65000000 0b000000 efbeadde  02 00 0300 00000000  aabbcc')));
    const [got] = dev.push(bytes);
    expect(got).to.deep.include({ type: 'bulk_packet', id: 0xdeadbeefn, endpoint: 2, length: 3 });
    expect(Array.from((got as { data: Uint8Array }).data)).to.deep.equal([0xaa, 0xbb, 0xcc]);
    // length over 16 bits cannot be sent without 32bits_bulk_length
    expectProtoError(() => host.encode({ ...p, endpoint: 0x81, length: 0x10000, data: new Uint8Array(0) }), 'invalid_field');
  });

  it('control_packet GET_DESCRIPTOR request and its completion', () => {
    const { dev, host } = connectedPair();
    const req: Packet = { type: 'control_packet', id: 0x1000n, endpoint: 0x80, request: 6, requesttype: 0x80, status: 0, value: 0x0100, index: 0, length: 18, data: new Uint8Array(0) };
    const bytes = host.encode(req);
    // u8 endpoint, request, requesttype, status; u16 value, index, length
    expect(Array.from(bytes)).to.deep.equal(Array.from(hexBytes('64000000 0a000000 0010000000000000  80 06 80 00 0001 0000 1200')));
    expect(dev.push(bytes)).to.deep.equal([req]);
    const desc = Uint8Array.from({ length: 18 }, (_, i) => i);
    const resp = dev.encode({ ...req, data: desc });
    expect(resp.length).to.equal(16 + 10 + 18);
    expect(Array.from(resp.subarray(4, 8))).to.deep.equal([28, 0, 0, 0]);
    const [got] = host.push(resp);
    expect(Array.from((got as { data: Uint8Array }).data)).to.deep.equal(Array.from(desc));
  });

  it('interface_info (132 bytes) and ep_info sizes 288 / 160 / 96 by caps', () => {
    const { dev, host } = connectedPair();
    const ii = dev.encode({
      type: 'interface_info',
      id: 0n,
      interfaceCount: 1,
      interface: [0],
      interfaceClass: [8],
      interfaceSubclass: [6],
      interfaceProtocol: [0x50],
    });
    expect(ii.length).to.equal(16 + 132);
    // u32 count @16, interface[32] @20, class[32] @52, subclass[32] @84, protocol[32] @116
    expect(Array.from(ii.subarray(16, 20))).to.deep.equal([1, 0, 0, 0]);
    expect([ii[52], ii[84], ii[116]]).to.deep.equal([8, 6, 0x50]);
    const [gotII] = host.push(ii);
    expect((gotII as { interfaceClass: number[] }).interfaceClass).to.have.length(32);

    const ep = { type: 'ep_info' as const, id: 0n, epType: [0, 2], interval: [0, 0], interface: [0, 0], maxPacketSize: [64, 512], maxStreams: [0, 16] };
    const full = dev.encode(ep);
    expect(full.length).to.equal(16 + 288);
    // type[32] @16, interval[32] @48, interface[32] @80, u16 max_packet_size[32] @112, u32 max_streams[32] @176
    expect(Array.from(full.subarray(112, 116))).to.deep.equal([64, 0, 0, 2]);
    expect(Array.from(full.subarray(180, 184))).to.deep.equal([16, 0, 0, 0]);

    const noStreams = connectedPair(makeCaps('ep_info_max_packet_size'), ALL_CAPS);
    expect(noStreams.dev.encode(ep).length).to.equal(12 + 160);
    const none = connectedPair(makeCaps(), ALL_CAPS);
    const small = none.dev.encode(ep);
    expect(small.length).to.equal(12 + 96);
    const [gotEp] = none.host.push(small);
    expect(gotEp).to.not.have.property('maxPacketSize');
    expect(gotEp).to.not.have.property('maxStreams');
  });

  it('filter_filter carries a NUL-terminated rules string', () => {
    const { dev, host } = connectedPair();
    const bytes = host.encode({ type: 'filter_filter', id: 0n, rules: '-1,-1,-1,-1,1' });
    expect(Array.from(bytes.subarray(4, 8))).to.deep.equal([14, 0, 0, 0]);
    expect(bytes[bytes.length - 1]).to.equal(0);
    expect(new TextDecoder().decode(bytes.subarray(16, 29))).to.equal('-1,-1,-1,-1,1');
    expect(dev.push(bytes)).to.deep.equal([{ type: 'filter_filter', id: 0n, rules: '-1,-1,-1,-1,1' }]);
  });

  it('start_bulk_receiving / buffered_bulk_packet layouts', () => {
    const { dev, host } = connectedPair();
    const sbr = host.encode({ type: 'start_bulk_receiving', id: 0n, streamId: 0, bytesPerTransfer: 16384, endpoint: 0x82, noTransfers: 8 });
    // u32 stream_id, u32 bytes_per_transfer, u8 endpoint, u8 no_transfers
    expect(Array.from(sbr)).to.deep.equal(Array.from(hexBytes('19000000 0a000000 0000000000000000 00000000 00400000 82 08')));
    expect(dev.push(sbr)).to.have.length(1);
    const bb = dev.encode({ type: 'buffered_bulk_packet', id: 3n, streamId: 0, length: 2, endpoint: 0x82, status: 0, data: hexBytes('beef') });
    // u32 stream_id, u32 length, u8 endpoint, u8 status, data
    expect(Array.from(bb)).to.deep.equal(Array.from(hexBytes('68000000 0c000000 0300000000000000 00000000 02000000 82 00 beef')));
    expect(host.push(bb)).to.have.length(1);
  });
});

describe('usbredir parser: stream handling', () => {
  function sampleStream(): { bytes: Uint8Array; expected: Packet[]; sizes: number[] } {
    const { host } = connectedPair();
    const pkts: Packet[] = [
      { type: 'set_configuration', id: 1n, configuration: 1 },
      { type: 'bulk_packet', id: 0xffff_ffff_ffff_fff0n, endpoint: 0x02, status: 0, length: 5000, streamId: 0, data: Uint8Array.from({ length: 5000 }, (_, i) => i & 0xff) },
      { type: 'get_configuration', id: 2n },
      { type: 'control_packet', id: 3n, endpoint: 0, request: 9, requesttype: 0, status: 0, value: 1, index: 0, length: 0, data: new Uint8Array(0) },
      { type: 'cancel_data_packet', id: 0xffff_ffff_ffff_fff0n },
    ];
    const enc = pkts.map((p) => host.encode(p));
    return { bytes: concat(enc), expected: pkts, sizes: enc.map((e) => e.length) };
  }

  it('multiple packets in one chunk; data is a zero-copy view of the chunk', () => {
    const { bytes, expected } = sampleStream();
    const { dev } = connectedPair();
    const before = dev.bytesConsumed;
    const got = dev.push(bytes);
    expect(got).to.deep.equal(expected);
    expect(dev.bytesConsumed - before).to.equal(bytes.length);
    expect(dev.pendingPartial).to.equal(0);
    const bulk = got[1] as { data: Uint8Array };
    expect(bulk.data.buffer).to.equal(bytes.buffer);
  });

  it('one byte at a time yields the same packets, with exact partial accounting', () => {
    const { bytes, expected, sizes } = sampleStream();
    const { dev } = connectedPair();
    const base = dev.bytesConsumed;
    const got: Packet[] = [];
    const boundaries = new Set<number>();
    let acc = 0;
    for (const s of sizes) boundaries.add((acc += s));
    for (let i = 0; i < bytes.length; i++) {
      got.push(...dev.push(bytes.subarray(i, i + 1)));
      const fed = i + 1;
      expect(dev.bytesConsumed - base + dev.pendingPartial).to.equal(fed);
      if (boundaries.has(fed)) expect(dev.pendingPartial).to.equal(0);
      else expect(dev.pendingPartial).to.be.greaterThan(0);
    }
    expect(got).to.deep.equal(expected);
  });

  it('pendingBytes() returns exactly the buffered partial packet (migration hand-off)', () => {
    const { bytes, expected, sizes } = sampleStream();
    const { dev } = connectedPair();
    const cut = sizes[0]! + 20; // inside the bulk packet's data
    const first = dev.push(bytes.subarray(0, cut));
    expect(first).to.deep.equal(expected.slice(0, 1));
    expect(dev.pendingPartial).to.equal(20);
    const partial = dev.pendingBytes();
    expect(Array.from(partial)).to.deep.equal(Array.from(bytes.subarray(sizes[0]!, cut)));
    // A destination parser in no-hello state continues from the partial bytes + the rest.
    const dest = new UsbredirParser({ role: 'device', noHello: { peerCaps: ALL_CAPS } });
    const rest = dest.push(concat([partial, bytes.subarray(cut)]));
    expect(rest).to.deep.equal(expected.slice(1));
  });

  it('encodeParts() gives the same bytes without copying the data', () => {
    const { host } = connectedPair();
    const data = Uint8Array.from({ length: 1000 }, (_, i) => i * 7);
    const p: Packet = { type: 'bulk_packet', id: 77n, endpoint: 0x02, status: 0, length: 1000, streamId: 0, data };
    const before = host.bytesEncoded;
    const parts = host.encodeParts(p);
    expect(parts).to.have.length(2);
    expect(parts[1]).to.equal(data);
    expect(parts[0]!.length).to.equal(16 + 10);
    expect(Array.from(concat(parts))).to.deep.equal(Array.from(host.encode(p)));
    expect(host.bytesEncoded - before).to.equal(2 * (16 + 10 + 1000));
    expect(host.encodeParts({ type: 'reset', id: 1n })).to.have.length(1);
  });

  it('a fresh copy is made when a packet spans chunks (caller may reuse the chunk)', () => {
    const { host, dev } = connectedPair();
    const enc = host.encode({ type: 'bulk_packet', id: 1n, endpoint: 2, status: 0, length: 4, streamId: 0, data: hexBytes('01020304') });
    const chunk1 = enc.slice(0, 20);
    expect(dev.push(chunk1)).to.deep.equal([]);
    chunk1.fill(0xee);
    const [got] = dev.push(enc.slice(20));
    expect(Array.from((got as { data: Uint8Array }).data)).to.deep.equal([1, 2, 3, 4]);
  });
});

describe('usbredir parser: negotiation', () => {
  it('32-bit ids until the peer hello; 64-bit only when both advertise 64bits_ids', () => {
    const dev = new UsbredirParser({ role: 'device' });
    expect(dev.headerSize).to.equal(12);
    expect(dev.hasCap('64bits_ids')).to.equal(false);
    expect(dev.weHaveCap('64bits_ids')).to.equal(true);
    dev.encode(dev.helloPacket());
    const host = new UsbredirParser({ role: 'host' });
    dev.push(host.encode(host.helloPacket()));
    expect(dev.hasCap('64bits_ids')).to.equal(true);
    expect(dev.headerSize).to.equal(16);

    const { dev: d2 } = connectedPair(ALL_CAPS, makeCaps('filter', 'bulk_receiving'));
    expect(d2.headerSize).to.equal(12);
    expect(d2.peerHasCap('filter')).to.equal(true);
    expect(d2.hasCap('32bits_bulk_length')).to.equal(false);
    // ids above 32 bits are refused in 32-bit mode rather than truncated
    expectProtoError(() => d2.encode({ type: 'device_disconnect', id: 1n << 32n }), 'invalid_field');
  });

  it('bulk_streams without ep_info_max_packet_size is dropped (usbredirparser_verify_caps)', () => {
    expect(normalizeCaps([0x01])).to.deep.equal([0]);
    expect(normalizeCaps([0x11])).to.deep.equal([0x11]);
    const dev = new UsbredirParser({ role: 'device', caps: makeCaps('bulk_streams', '64bits_ids') });
    expect(dev.weHaveCap('bulk_streams')).to.equal(false);
    expect(capsHas(makeCaps(Cap.bulk_receiving), 'bulk_receiving')).to.equal(true);
  });

  it('hello must come first, in both directions, and only once', () => {
    const dev = new UsbredirParser({ role: 'device' });
    expectProtoError(() => dev.encode({ type: 'device_disconnect', id: 0n }), 'hello_not_first');
    const host = new UsbredirParser({ role: 'host' });
    host.encode(host.helloPacket());
    // a host->device packet arriving before the host's hello:
    expectProtoError(() => dev.push(hexBytes(hdr32(3, 0, 0))), 'hello_not_first');
    const d2 = new UsbredirParser({ role: 'device' });
    d2.encode(d2.helloPacket());
    expectProtoError(() => d2.encode(d2.helloPacket()), 'duplicate_hello');
    const h2 = new UsbredirParser({ role: 'host' });
    const hb = h2.encode(h2.helloPacket());
    d2.push(hb);
    expectProtoError(() => d2.push(hb), 'duplicate_hello');
  });

  it('hello caps must match the configured caps', () => {
    const dev = new UsbredirParser({ role: 'device', caps: [0xff] });
    expectProtoError(() => dev.encode({ type: 'hello', id: 0n, version: 'x', caps: [0x0f] }), 'invalid_field');
    expect(dev.encode({ type: 'hello', id: 0n, version: 'x', caps: [0xff, 0] }).length).to.equal(12 + 64 + 8);
  });

  it('no-hello parser (migration destination) starts from the given caps', () => {
    const dev = new UsbredirParser({ role: 'device', noHello: { peerCaps: makeCaps('64bits_ids', '32bits_bulk_length') } });
    expect(dev.helloReceived).to.equal(true);
    expect(dev.helloSent).to.equal(true);
    expect(dev.headerSize).to.equal(16);
    expect(dev.hasCap('connect_device_version')).to.equal(false);
    expectProtoError(() => dev.encode(dev.helloPacket()), 'duplicate_hello');
    const src = connectedPair(ALL_CAPS, makeCaps('64bits_ids', '32bits_bulk_length'));
    const bytes = src.host.encode({ type: 'reset', id: 9n });
    expect(dev.push(bytes)).to.deep.equal([{ type: 'reset', id: 9n }]);
    const otherHost = new UsbredirParser({ role: 'host' });
    expectProtoError(() => dev.push(otherHost.encode(otherHost.helloPacket())), 'duplicate_hello');
  });

  it('cap-gated packets are refused without the cap', () => {
    const { dev } = connectedPair(ALL_CAPS, makeCaps('64bits_ids'));
    // sending: the peer (host) lacks filter / bulk_receiving
    expectProtoError(() => dev.encode({ type: 'filter_filter', id: 0n, rules: '-1,-1,-1,-1,1' }), 'missing_cap');
    expectProtoError(
      () => dev.encode({ type: 'buffered_bulk_packet', id: 0n, streamId: 0, length: 0, endpoint: 0x81, status: 0, data: new Uint8Array(0) }),
      'missing_cap',
    );
    // receiving: we lack device_disconnect_ack -> an ack from the host side is refused
    const raw = hexBytes(hdr32(24, 0, 0));
    const h = new UsbredirParser({ role: 'device', caps: makeCaps(), noHello: { peerCaps: ALL_CAPS } });
    expectProtoError(() => h.push(raw), 'missing_cap');
  });

  it('direction rules: each side only sends / receives its packet types', () => {
    const { dev, host } = connectedPair();
    expectProtoError(() => dev.encode({ type: 'reset', id: 0n }), 'wrong_direction');
    expectProtoError(() => host.encode({ type: 'device_disconnect', id: 0n }), 'wrong_direction');
    // device receiving a device_connect (type 1) is a wrong-direction packet
    expectProtoError(() => dev.push(hexBytes('01000000 0a000000 0000000000000000 00000000000000000000')), 'wrong_direction');
    // iso IN packet without data towards the device is invalid; interrupt IN request likewise
    expectProtoError(() => host.encode({ type: 'iso_packet', id: 0n, endpoint: 0x81, status: 0, length: 8, data: new Uint8Array(0) }), 'wrong_direction');
    expectProtoError(() => host.encode({ type: 'interrupt_packet', id: 0n, endpoint: 0x81, status: 0, length: 8, data: new Uint8Array(0) }), 'wrong_direction');
    // OUT data must match the length field
    expectProtoError(() => host.encode({ type: 'bulk_packet', id: 0n, endpoint: 0x02, status: 0, length: 3, streamId: 0, data: new Uint8Array(2) }), 'data_length_mismatch');
    // IN request must not carry data
    expectProtoError(() => host.encode({ type: 'bulk_packet', id: 0n, endpoint: 0x81, status: 0, length: 2, streamId: 0, data: new Uint8Array(2) }), 'unexpected_data');
    expectProtoError(() => host.encode({ type: 'start_interrupt_receiving', id: 0n, endpoint: 0x01 }), 'invalid_field');
  });
});

describe('usbredir parser: invalid input and bounds', () => {
  function ready(max?: number): UsbredirParser {
    return new UsbredirParser({ role: 'device', noHello: { peerCaps: [0] }, maxPacketSize: max }); // 32-bit ids
  }

  it('unknown type', () => {
    const e = expectProtoError(() => ready().push(hexBytes(hdr32(50, 0, 0))), 'unknown_type');
    expect(e.message).to.match(/50/);
  });

  it('wrong header length for a type, and data on a type that carries none', () => {
    expectProtoError(() => ready().push(hexBytes(hdr32(6, 0, 0))), 'bad_length'); // set_configuration needs 1
    expectProtoError(() => ready().push(hexBytes(hdr32(6, 2, 0) + '0100')), 'unexpected_data');
    expectProtoError(() => ready().push(hexBytes(hdr32(3, 1, 0) + '00')), 'unexpected_data'); // reset
  });

  it('length over the bound is rejected as soon as the header arrives, before any allocation', () => {
    const p = ready();
    expect(p.maxPacketSize).to.equal(128 * 1024 * 1024 + 1024);
    expect(DEFAULT_MAX_PACKET_SIZE).to.equal(128 * 1024 * 1024 + 1024);
    expectProtoError(() => p.push(hexBytes(hdr32(101, DEFAULT_MAX_PACKET_SIZE + 1, 0))), 'too_large');
    const q = ready(100);
    expectProtoError(() => q.push(hexBytes(hdr32(101, 0xffffffff, 0)).subarray(0, 12)), 'too_large');
  });

  it('a type header that contradicts the length is rejected before the data buffer is allocated', () => {
    const p = ready();
    // bulk OUT (16-bit length mode: 8-byte header) claiming 100 MiB of data but length field 4
    const header = hexBytes(hdr32(101, 8 + 100 * 1024 * 1024, 0) + '02000400 00000000');
    const e = expectProtoError(() => p.push(header), 'data_length_mismatch');
    expect(e.streamOffset).to.equal(0);
  });

  it('bulk length over 128 MiB and interface_count > 32 are invalid', () => {
    const { host } = connectedPair();
    expectProtoError(
      () => host.encode({ type: 'bulk_packet', id: 0n, endpoint: 0x81, status: 0, length: 128 * 1024 * 1024 + 1, streamId: 0, data: new Uint8Array(0) }),
      'too_large',
    );
    const h = new UsbredirParser({ role: 'host', noHello: { peerCaps: [0] } });
    const ii = hexBytes(hdr32(4, 132, 0) + '21000000' + '00'.repeat(128));
    expectProtoError(() => h.push(ii), 'invalid_field');
  });

  it('filter_filter data must be NUL terminated', () => {
    const p = new UsbredirParser({ role: 'device', noHello: { peerCaps: [0] } });
    expectProtoError(() => p.push(hexBytes(hdr32(23, 2, 0) + '3131')), 'invalid_field');
  });

  it('errors carry the packets completed earlier in the same push, and poison the parser', () => {
    const p = ready();
    const good = hexBytes(hdr32(3, 0, 7));
    const e = expectProtoError(() => p.push(concat([good, hexBytes(hdr32(99, 0, 0))])), 'unknown_type');
    expect(e.packets).to.deep.equal([{ type: 'reset', id: 7n }]);
    expect(e.streamOffset).to.equal(12);
    expect(p.error).to.equal(e);
    expectProtoError(() => p.push(good), 'parser_failed');
  });

  it('partial buffering stays within the max packet size', () => {
    const max = 4096;
    const p = ready(max);
    const pkt = hexBytes(hdr32(101, 8 + 4088, 1) + '02 00 f80f 00000000');
    const full = concat([pkt, new Uint8Array(4088)]);
    const got = pushSplit(p, full, Array.from({ length: 60 }, (_, i) => i * 70));
    expect(got).to.have.length(1);
    expect(p.pendingPartial).to.equal(0);
    expect(() => pushSplit(ready(max), concat([hexBytes(hdr32(101, max + 1, 1))]), [5])).to.throw(UsbredirProtocolError);
  });
});
