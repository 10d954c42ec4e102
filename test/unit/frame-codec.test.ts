// The hand-written URB-channel encoders produce what the generated decoders
// read back exactly as they read ts-proto's own encoding.
import { expect } from 'chai';
import fc from 'fast-check';
import { BufferPool, ScratchBuffer } from '../../src/common/encode-buffers.js';
import { encodeClientMessage, encodeServerMessage } from '../../src/common/frame-codec.js';
import { ClientMessage, ServerMessage, type ClientFrame, type ServerFrame } from '../../src/gen/usbroam/v1/usbhost.js';

const u32 = fc.integer({ min: 0, max: 0xffffffff });
const u53 = fc.oneof(fc.integer({ min: 0, max: 300 }), fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }));
const bytes = fc.oneof(fc.uint8Array({ maxLength: 40 }), fc.uint8Array({ minLength: 100, maxLength: 20000 }));
const status = fc.integer({ min: 0, max: 7 });
const iso = fc.array(fc.record({ length: u32, status, actualLength: u32 }), { maxLength: 4 });

const serverFrame: fc.Arbitrary<ServerFrame> = fc.record({
  seq: u53,
  kind: fc.oneof(
    fc.record({ $case: fc.constant('complete' as const), value: fc.record({ urbId: u53, status, data: bytes, actualLength: u32, isoPackets: iso }) }),
    fc.record({ $case: fc.constant('received' as const), value: fc.record({ endpoint: fc.integer({ min: 0, max: 255 }), index: u53, status, data: bytes, isoPackets: iso }) }),
    fc.record({ $case: fc.constant('ack' as const), value: fc.record({ seq: u53 }) }),
    fc.record({ $case: fc.constant('error' as const), value: fc.record({ code: fc.integer({ min: 0, max: 16 }), message: fc.string(), clientSeq: u53 }) }),
    fc.record({ $case: fc.constant('deviceGone' as const), value: fc.record({ reason: fc.string() }) }),
  ),
});

const clientFrame: fc.Arbitrary<ClientFrame> = fc.record({
  seq: u53,
  kind: fc.oneof(
    fc.record({
      $case: fc.constant('submit' as const),
      value: fc.record({ urbId: u53, endpoint: fc.integer({ min: 0, max: 255 }), type: fc.integer({ min: 0, max: 3 }), setup: fc.uint8Array({ maxLength: 8 }), data: bytes, length: u32, streamId: u32, flags: u32, isoPackets: iso, timeoutMs: u32 }),
    }),
    fc.record({ $case: fc.constant('ack' as const), value: fc.record({ seq: u53 }) }),
    fc.record({ $case: fc.constant('cancel' as const), value: fc.record({ urbId: u53 }) }),
    fc.record({ $case: fc.constant('close' as const), value: fc.constant({}) }),
  ),
});

describe('URB-channel frame encoders', () => {
  it('encode server messages as the generated decoder reads ts-proto output', () => {
    fc.assert(
      fc.property(fc.array(serverFrame, { maxLength: 8 }), (frames) => {
        const m: ServerMessage = { frames };
        expect(ServerMessage.decode(encodeServerMessage(m))).to.deep.equal(ServerMessage.decode(ServerMessage.encode(m).finish()));
      }),
      { numRuns: 300 },
    );
  });

  it('encode client messages as the generated decoder reads ts-proto output', () => {
    fc.assert(
      fc.property(fc.array(clientFrame, { maxLength: 8 }), (frames) => {
        const m: ClientMessage = { frames };
        expect(ClientMessage.decode(encodeClientMessage(m))).to.deep.equal(ClientMessage.decode(ClientMessage.encode(m).finish()));
      }),
      { numRuns: 300 },
    );
  });

  it('writes a 64 KiB completion into one buffer of exactly its size', () => {
    const data = new Uint8Array(65536).fill(7);
    const b = encodeServerMessage({ frames: [{ seq: 9, kind: { $case: 'complete', value: { urbId: 3, status: 0, data, actualLength: 65536, isoPackets: [] } } }] });
    expect(b.length).to.equal(ServerMessage.encode({ frames: [{ seq: 9, kind: { $case: 'complete', value: { urbId: 3, status: 0, data, actualLength: 65536, isoPackets: [] } } }] }).finish().length);
  });

  it('encodes large messages into one reused buffer, small and oversized ones into fresh buffers', () => {
    const scratch = new ScratchBuffer(1024 * 1024);
    const msg = (fill: number, n: number): ServerMessage => ({
      frames: [{ seq: fill, kind: { $case: 'complete', value: { urbId: fill, status: 0, data: new Uint8Array(n).fill(fill), actualLength: n, isoPackets: [] } } }],
    });
    const a = encodeServerMessage(msg(1, 200_000), scratch);
    expect(ServerMessage.decode(a)).to.deep.equal(msg(1, 200_000));
    const b = encodeServerMessage(msg(2, 100_000), scratch);
    expect(ServerMessage.decode(b)).to.deep.equal(msg(2, 100_000));
    expect(b.buffer, 'the second large message reuses the first one\'s memory').to.equal(a.buffer);
    const small = encodeServerMessage(msg(3, 1000), scratch);
    expect(small.buffer).to.not.equal(a.buffer);
    const big = encodeServerMessage(msg(4, 2 * 1024 * 1024), scratch);
    expect(big.buffer, 'never kept above its bound').to.not.equal(a.buffer);
    expect(ServerMessage.decode(big)).to.deep.equal(msg(4, 2 * 1024 * 1024));
  });

  it('lends pooled buffers for large messages and reuses only what was given back', () => {
    const pool = new BufferPool(2, 1024 * 1024);
    const msg = (fill: number, n: number): ClientMessage => ({
      frames: [{ seq: fill, kind: { $case: 'submit', value: { urbId: fill, endpoint: 1, type: 2, data: new Uint8Array(n).fill(fill), length: 0, setup: new Uint8Array(0), flags: 0, isoPackets: [], streamId: 0, timeoutMs: 0 } } }],
    });
    const a = encodeClientMessage(msg(1, 300_000), pool);
    const b = encodeClientMessage(msg(2, 300_000), pool);
    expect(b.buffer, 'a buffer still lent out is not handed out again').to.not.equal(a.buffer);
    expect(ClientMessage.decode(a)).to.deep.equal(ClientMessage.decode(ClientMessage.encode(msg(1, 300_000)).finish()));
    pool.release(a);
    pool.release(a); // twice: kept once
    const c = encodeClientMessage(msg(3, 200_000), pool);
    expect(c.buffer, 'a given-back buffer is reused').to.equal(a.buffer);
    const d = encodeClientMessage(msg(4, 200_000), pool);
    expect(d.buffer).to.not.equal(a.buffer);
    expect(ClientMessage.decode(c)).to.deep.equal(ClientMessage.decode(ClientMessage.encode(msg(3, 200_000)).finish()));
  });
});
