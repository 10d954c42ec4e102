import { expect } from 'chai';
import fc from 'fast-check';
import {
  UsbredirParser,
  UsbredirProtocolError,
  PacketType,
  type Packet,
  type Role,
} from '../../src/qemu/usbredir/index.js';
import { concat, connectedPair, plain } from './usbredir-helpers.test.js';

interface Neg {
  ids64: boolean;
  bulk32: boolean;
  connectVersion: boolean;
  epMaxPacketSize: boolean;
  epMaxStreams: boolean;
}

const u8 = fc.integer({ min: 0, max: 0xff });
const u16 = fc.integer({ min: 0, max: 0xffff });
const u32 = fc.integer({ min: 0, max: 0xffffffff });
const arr32 = <T>(a: fc.Arbitrary<T>) => fc.array(a, { minLength: 32, maxLength: 32 });
const smallData = fc.uint8Array({ maxLength: 300 });
const MAX_BULK = 128 * 1024 * 1024;

/** Arbitrary valid packet (other than hello) sent to `receiver` under negotiation `neg`. */
function arbPacket(receiver: Role, neg: Neg): fc.Arbitrary<Packet> {
  const id = neg.ids64 ? fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }) : fc.bigInt({ min: 0n, max: 0xffffffffn });
  const inEp = u8.map((e) => e | 0x80);
  const outEp = u8.map((e) => e & 0x7f);
  /** Data direction: OUT eps carry data to the device, IN eps carry data to the host. */
  const dataEp = receiver === 'device' ? outEp : inEp;
  const reqEp = receiver === 'device' ? inEp : outEp;
  const withData = <T extends object>(ep: fc.Arbitrary<number>, rest: fc.Arbitrary<T>) =>
    fc.record({ endpoint: ep, rest, data: smallData }).map(({ endpoint, rest, data }) => ({ ...rest, endpoint, length: data.length, data }));
  const noData = <T extends object>(ep: fc.Arbitrary<number>, len: fc.Arbitrary<number>, rest: fc.Arbitrary<T>) =>
    fc.record({ endpoint: ep, length: len, rest }).map(({ endpoint, length, rest }) => ({ ...rest, endpoint, length, data: new Uint8Array(0) }));
  const bulkLen = neg.bulk32 ? fc.integer({ min: 0, max: MAX_BULK }) : u16;
  const ctrl = fc.record({ request: u8, requesttype: u8, status: u8, value: u16, index: u16 });
  const bulkRest = fc.record({ status: u8, streamId: u32 });
  const st = fc.record({ status: u8 });
  const t = <K extends Packet['type'], R extends object>(type: K, rest: fc.Arbitrary<R>) =>
    fc.tuple(id, rest).map(([i, r]) => ({ type, id: i, ...r }) as unknown as Packet);

  const both: fc.Arbitrary<Packet>[] = [
    t('filter_filter', fc.record({ rules: fc.string({ unit: 'grapheme', maxLength: 40 }) })),
    t('control_packet', fc.oneof(withData(dataEp, ctrl), noData(reqEp, u16, ctrl))),
    t('bulk_packet', fc.oneof(withData(dataEp, bulkRest), noData(reqEp, bulkLen, bulkRest))),
    t('iso_packet', withData(dataEp, st)),
  ];
  if (receiver === 'device') {
    return fc.oneof(
      ...both,
      t('interrupt_packet', withData(dataEp, st)),
      t('reset', fc.record({})),
      t('set_configuration', fc.record({ configuration: u8 })),
      t('get_configuration', fc.record({})),
      t('set_alt_setting', fc.record({ interface: u8, alt: u8 })),
      t('get_alt_setting', fc.record({ interface: u8 })),
      t('start_iso_stream', fc.record({ endpoint: u8, pktsPerUrb: u8, noUrbs: u8 })),
      t('stop_iso_stream', fc.record({ endpoint: u8 })),
      t('start_interrupt_receiving', fc.record({ endpoint: inEp })),
      t('stop_interrupt_receiving', fc.record({ endpoint: inEp })),
      t('alloc_bulk_streams', fc.record({ endpoints: u32, noStreams: u32 })),
      t('free_bulk_streams', fc.record({ endpoints: u32 })),
      t('cancel_data_packet', fc.record({})),
      t('filter_reject', fc.record({})),
      t('device_disconnect_ack', fc.record({})),
      t('start_bulk_receiving', fc.record({ streamId: u32, bytesPerTransfer: fc.integer({ min: 0, max: MAX_BULK }), endpoint: inEp, noTransfers: u8 })),
      t('stop_bulk_receiving', fc.record({ streamId: u32, endpoint: inEp })),
    );
  }
  const connect = fc.record({
    speed: u8,
    deviceClass: u8,
    deviceSubclass: u8,
    deviceProtocol: u8,
    vendorId: u16,
    productId: u16,
  });
  return fc.oneof(
    ...both,
    t('interrupt_packet', fc.oneof(withData(inEp, st), noData(outEp, u16, st))),
    t('buffered_bulk_packet', withData(inEp, fc.record({ streamId: u32, status: u8 }))),
    t('device_connect', neg.connectVersion ? fc.tuple(connect, u16).map(([c, v]) => ({ ...c, deviceVersionBcd: v })) : connect),
    t('device_disconnect', fc.record({})),
    t(
      'interface_info',
      fc.record({
        interfaceCount: fc.integer({ min: 0, max: 32 }),
        interface: arr32(u8),
        interfaceClass: arr32(u8),
        interfaceSubclass: arr32(u8),
        interfaceProtocol: arr32(u8),
      }),
    ),
    t(
      'ep_info',
      fc.record({ epType: arr32(u8), interval: arr32(u8), interface: arr32(u8), mps: arr32(u16), ms: arr32(u32) }).map(({ mps, ms, ...r }) => ({
        ...r,
        ...(neg.epMaxPacketSize ? { maxPacketSize: mps } : {}),
        ...(neg.epMaxStreams ? { maxStreams: ms } : {}),
      })),
    ),
    t('configuration_status', fc.record({ status: u8, configuration: u8 })),
    t('alt_setting_status', fc.record({ status: u8, interface: u8, alt: u8 })),
    t('iso_stream_status', fc.record({ status: u8, endpoint: u8 })),
    t('interrupt_receiving_status', fc.record({ status: u8, endpoint: inEp })),
    t('bulk_streams_status', fc.record({ endpoints: u32, noStreams: u32, status: u8 })),
    t('bulk_receiving_status', fc.record({ streamId: u32, endpoint: inEp, status: u8 })),
  );
}

function negOf(p: UsbredirParser): Neg {
  return {
    ids64: p.hasCap('64bits_ids'),
    bulk32: p.hasCap('32bits_bulk_length'),
    connectVersion: p.hasCap('connect_device_version'),
    epMaxPacketSize: p.hasCap('ep_info_max_packet_size'),
    epMaxStreams: p.hasCap('bulk_streams'),
  };
}

/** Caps for both sides; filter / disconnect-ack / bulk-receiving always on so every type is legal. */
const capsPair = fc.tuple(u8, u8).map(([a, b]) => [a | 0x8c, b | 0x8c] as const);

function cutsFor(len: number): fc.Arbitrary<number[]> {
  return fc.array(fc.integer({ min: 0, max: Math.max(0, len) }), { maxLength: 12 });
}

function pushCuts(p: UsbredirParser, bytes: Uint8Array, cuts: number[]): Packet[] {
  const pts = [...new Set(cuts)].sort((a, b) => a - b);
  const out: Packet[] = [];
  let prev = 0;
  for (const c of [...pts, bytes.length]) {
    if (c > prev) out.push(...p.push(bytes.subarray(prev, c)));
    prev = c;
  }
  return out;
}

describe('usbredir fuzz: round trip of valid packets', () => {
  for (const dir of ['host->device', 'device->host'] as const) {
    it(`every packet type round-trips ${dir} under arbitrary caps and chunking`, () => {
      const seen = new Set<string>();
      fc.assert(
        fc.property(
          capsPair.chain(([dc, hc]) => {
            const { dev, host } = connectedPair([dc], [hc]);
            const [sender, receiver] = dir === 'host->device' ? [host, dev] : [dev, host];
            return fc
              .array(arbPacket(receiver.role, negOf(receiver)), { minLength: 1, maxLength: 8 })
              .chain((pkts) => {
                const bytes = concat(pkts.map((p) => sender.encode(p)));
                return fc.tuple(fc.constant({ receiver, pkts, bytes }), cutsFor(bytes.length));
              });
          }),
          ([{ receiver, pkts, bytes }, cuts]) => {
            const got = pushCuts(receiver, bytes, cuts);
            expect(got.map(plain)).to.deep.equal(pkts.map(plain));
            expect(receiver.pendingPartial).to.equal(0);
            for (const p of pkts) seen.add(p.type);
          },
        ),
        { numRuns: 300 },
      );
      // every type valid in this direction was generated at least once
      const expected = dir === 'host->device' ? 21 : 16;
      expect(seen.size).to.equal(expected);
    });
  }

  it('both 32/64-bit ids and 16/32-bit bulk lengths are exercised', () => {
    const combos = new Set<string>();
    for (const [dc, hc] of [
      [0xff, 0xff],
      [0xff, 0x1f],
      [0xdf, 0xff],
      [0xbf, 0xff], // 64-bit ids, 16-bit bulk length
    ] as const) {
      const { dev, host } = connectedPair([dc], [hc]);
      const p: Packet = { type: 'bulk_packet', id: dev.hasCap('64bits_ids') ? 1n << 63n : 0xffffffffn, endpoint: 0x81, status: 0, length: 0xffff, streamId: 1, data: new Uint8Array(0) };
      const enc = host.encode(p);
      expect(dev.push(enc).map(plain)).to.deep.equal([plain(p)]);
      combos.add(`${dev.headerSize}/${dev.hasCap('32bits_bulk_length')}`);
      expect(enc.length).to.equal(dev.headerSize + (dev.hasCap('32bits_bulk_length') ? 10 : 8));
    }
    expect(combos.size).to.equal(4);
  });

  it('packet type numbers cover control 0-27 and data 100-104', () => {
    const codes = Object.values(PacketType).sort((a, b) => a - b);
    expect(codes).to.deep.equal([...Array.from({ length: 28 }, (_, i) => i), 100, 101, 102, 103, 104]);
  });
});

describe('usbredir fuzz: arbitrary input never breaks the parser', () => {
  const MAX = 2048;

  /** Push chunks; only UsbredirProtocolError may escape; accounting and bounds hold throughout. */
  function feedChecked(p: UsbredirParser, bytes: Uint8Array, cuts: number[]): void {
    const start = p.bytesConsumed;
    const pts = [...new Set(cuts.map((c) => Math.min(c, bytes.length)))].sort((a, b) => a - b);
    let prev = 0;
    try {
      for (const c of [...pts, bytes.length]) {
        if (c <= prev) continue;
        p.push(bytes.subarray(prev, c));
        prev = c;
        expect(p.bytesConsumed - start + p.pendingPartial).to.equal(prev);
        expect(p.pendingPartial).to.be.at.most(MAX + 16);
      }
    } catch (e) {
      if (!(e instanceof UsbredirProtocolError)) throw e;
      expect(p.error).to.equal(e);
      expect(() => p.push(new Uint8Array(1))).to.throw(UsbredirProtocolError);
    }
  }

  it('random bytes to a fresh parser (hello expected)', () => {
    fc.assert(
      fc.property(fc.constantFrom<Role>('device', 'host'), fc.uint8Array({ maxLength: 400 }), cutsFor(400), (role, bytes, cuts) => {
        feedChecked(new UsbredirParser({ role, maxPacketSize: MAX }), bytes, cuts);
      }),
      { numRuns: 300 },
    );
  });

  it('random bytes after the handshake (no-hello parser with random caps)', () => {
    fc.assert(
      fc.property(fc.constantFrom<Role>('device', 'host'), u8, u8, fc.uint8Array({ maxLength: 400 }), cutsFor(400), (role, oc, pc, bytes, cuts) => {
        feedChecked(new UsbredirParser({ role, caps: [oc], maxPacketSize: MAX, noHello: { peerCaps: [pc] } }), bytes, cuts);
      }),
      { numRuns: 300 },
    );
  });

  it('mutated valid streams (small type numbers, flipped bytes, truncation)', () => {
    fc.assert(
      fc.property(
        capsPair.chain(([dc, hc]) => {
          const { dev, host } = connectedPair([dc], [hc], MAX);
          return fc.array(arbPacket('device', negOf(dev)), { minLength: 1, maxLength: 6 }).map((pkts) => ({
            dev,
            bytes: concat(pkts.map((p) => host.encode(p))),
          }));
        }),
        fc.array(fc.tuple(fc.nat(), fc.oneof(u8, fc.integer({ min: 0, max: 30 }), fc.constantFrom(100, 101, 102, 103, 104))), { maxLength: 4 }),
        fc.nat(),
        cutsFor(2000),
        ({ dev, bytes }, muts, trunc, cuts) => {
          const b = bytes.slice(0, bytes.length - (trunc % Math.max(1, Math.min(bytes.length, 20))));
          for (const [pos, v] of muts) if (b.length) b[pos % b.length] = v;
          feedChecked(dev, b, cuts);
        },
      ),
      { numRuns: 300 },
    );
  });

  it('a header claiming the maximum length buffers at most the maximum', () => {
    const p = new UsbredirParser({ role: 'device', maxPacketSize: MAX, noHello: { peerCaps: [0] } });
    // bulk OUT, 16-bit length: type header 8 + data; header.length = MAX exactly
    const dataLen = MAX - 8;
    const h = new Uint8Array(20);
    const dv = new DataView(h.buffer);
    dv.setUint32(0, 101, true);
    dv.setUint32(4, MAX, true);
    h[12] = 0x02;
    dv.setUint16(14, dataLen, true);
    p.push(h);
    for (let i = 0; i < dataLen - 1; i += 100) {
      p.push(new Uint8Array(Math.min(100, dataLen - 1 - i)));
      expect(p.pendingPartial).to.be.at.most(12 + MAX);
    }
    expect(p.pendingPartial).to.equal(12 + MAX - 1);
    expect(p.push(new Uint8Array(1))).to.have.length(1);
    expect(p.pendingPartial).to.equal(0);
  });
});
