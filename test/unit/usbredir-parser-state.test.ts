// UsbredirParser.serialize() / fromState(): the parser's share of a migration hand-off, on bytes.
import { expect } from 'chai';
import { ALL_CAPS, Cap, UsbredirParser, UsbredirProtocolError, makeCaps, type Packet } from '../../src/qemu/usbredir/index.js';

const u32 = (...v: number[]) => {
  const b = Buffer.alloc(4 * v.length);
  v.forEach((x, i) => b.writeUInt32LE(x >>> 0, 4 * i));
  return b;
};
const MAGIC = 0x53505255;

/** A device-side parser after the hello exchange with a host peer of the given caps. */
function exchanged(peerCaps: readonly number[] = ALL_CAPS): { dev: UsbredirParser; host: UsbredirParser } {
  const dev = new UsbredirParser({ role: 'device' });
  const host = new UsbredirParser({ role: 'host', caps: peerCaps });
  host.push(dev.encode(dev.helloPacket()));
  dev.push(host.encode(host.helloPacket()));
  return { dev, host };
}

function expectStateError(fn: () => unknown, msg: RegExp): void {
  try {
    fn();
  } catch (e) {
    expect(e).to.be.instanceOf(UsbredirProtocolError);
    expect((e as UsbredirProtocolError).code).to.equal('invalid_field');
    expect((e as Error).message).to.match(msg);
    return;
  }
  expect.fail('no error thrown');
}

describe('UsbredirParser serialize / fromState', () => {
  it('serializes caps, the partial packet and the unread output in the documented layout', () => {
    const peerCaps = makeCaps(Cap['64bits_ids'], Cap.ep_info_max_packet_size);
    const { dev, host } = exchanged(peerCaps);
    const bytes = host.encode({ type: 'control_packet', id: 7n, endpoint: 0x80, request: 6, requesttype: 0x80, status: 0, value: 0x100, index: 0, length: 18, data: new Uint8Array(0) });
    expect(dev.push(bytes.subarray(0, 13))).to.deep.equal([]);
    const state = dev.serialize([new Uint8Array([1, 2]), new Uint8Array([3])]);
    const expected = Buffer.concat([u32(MAGIC, 0, dev.ourCaps.length, ...dev.ourCaps, peerCaps.length, ...peerCaps, 13), Buffer.from(bytes.subarray(0, 13)), u32(3), Buffer.from([1, 2, 3])]);
    expect(Buffer.from(state).toString('hex')).to.equal(expected.toString('hex'));
  });

  it('fromState continues the packet in progress without a hello, with both caps, and returns the unread output', () => {
    const { dev, host } = exchanged();
    const p: Packet = { type: 'bulk_packet', id: 0x1_0000_0001n, endpoint: 0x01, status: 0, length: 5, streamId: 0, data: new Uint8Array([9, 8, 7, 6, 5]) };
    const bytes = host.encode(p);
    dev.push(bytes.subarray(0, 20)); // inside the data
    const unread = new Uint8Array([0xaa, 0xbb]);
    const { parser, unreadOutput } = UsbredirParser.fromState(dev.serialize([unread]), { version: 'dest' });
    expect([...unreadOutput]).to.deep.equal([0xaa, 0xbb]);
    expect(parser.noHello).to.equal(true);
    expect(parser.role).to.equal('device');
    expect(parser.peerCaps).to.deep.equal(dev.peerCaps);
    expect(parser.ourCaps).to.deep.equal(dev.ourCaps);
    expect(parser.pendingPartial).to.equal(20);
    expect(parser.using64BitIds).to.equal(true);
    const [got] = parser.push(bytes.subarray(20));
    expect(got).to.deep.include({ type: 'bulk_packet', id: 0x1_0000_0001n, endpoint: 0x01, length: 5 });
    expect([...(got as { data: Uint8Array }).data]).to.deep.equal([9, 8, 7, 6, 5]);
    // It encodes for the same peer: the host side decodes its answers.
    const answer = parser.encode({ ...p, data: new Uint8Array(0) } as Packet);
    expect(host.push(answer)[0]).to.deep.include({ type: 'bulk_packet', id: 0x1_0000_0001n });
  });

  it('before the peer hello: no peer caps; a state at a packet boundary has no partial', () => {
    const dev = new UsbredirParser({ role: 'device' });
    dev.encode(dev.helloPacket());
    const st = dev.serialize();
    expect(st.length).to.equal(4 * (5 + dev.ourCaps.length) + 4);
    const { parser, unreadOutput } = UsbredirParser.fromState(st);
    expect(parser.peerCaps, 'none: normalized to one empty word').to.deep.equal([0]);
    expect(parser.pendingPartial).to.equal(0);
    expect(unreadOutput.length).to.equal(0);
  });

  it('rejects malformed states with a clear error', () => {
    const { dev } = exchanged();
    const good = Buffer.from(dev.serialize([new Uint8Array(4)]));
    expectStateError(() => UsbredirParser.fromState(good.subarray(0, 10)), /truncated/);
    expectStateError(() => UsbredirParser.fromState(Buffer.concat([good, Buffer.from([0])])), /trailing/);
    const badMagic = Buffer.from(good);
    badMagic.writeUInt32LE(1, 0);
    expectStateError(() => UsbredirParser.fromState(badMagic), /magic/);
    const badRole = Buffer.from(good);
    badRole.writeUInt32LE(7, 4);
    expectStateError(() => UsbredirParser.fromState(badRole), /role/);
    const hugeCaps = Buffer.from(good);
    hugeCaps.writeUInt32LE(1_000_000, 8);
    expectStateError(() => UsbredirParser.fromState(hugeCaps), /caps words/);
    const longUnread = Buffer.from(good);
    longUnread.writeUInt32LE(0xffffffff, good.length - 8);
    expectStateError(() => UsbredirParser.fromState(longUnread), /exceeds the state/);
    // A "partial" packet that is really complete, or garbage.
    const { dev: d2, host } = exchanged();
    const whole = host.encode({ type: 'get_configuration', id: 1n });
    const st = Buffer.from(d2.serialize());
    const partialAt = st.length - 8;
    const forged = Buffer.concat([st.subarray(0, partialAt), u32(whole.length), Buffer.from(whole), u32(0)]);
    expectStateError(() => UsbredirParser.fromState(forged), /complete/);
    const garbage = Buffer.concat([st.subarray(0, partialAt), u32(16), u32(9999, 4, 0, 0), u32(0)]);
    expectStateError(() => UsbredirParser.fromState(garbage), /partial packet/);
  });

  it('a failed parser cannot be serialized', () => {
    const { dev } = exchanged();
    expect(() => dev.push(u32(9999, 0, 0, 0))).to.throw(UsbredirProtocolError);
    expect(() => dev.serialize()).to.throw(/failed/);
  });
});
