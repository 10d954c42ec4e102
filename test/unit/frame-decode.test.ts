// The hand-written URB-channel decoders return what ts-proto's generated decoders return, for
// every input: the frames our encoders write, any other frame kind, unknown fields, values out of
// the fast range, and bytes that do not parse (the same error, so a bad request is still refused).
import { expect } from 'chai';
import fc from 'fast-check';
import { encodeClientMessage, encodeServerMessage } from '../../src/common/frame-codec.js';
import { decodeClientMessage, decodeServerMessage } from '../../src/common/frame-decode.js';
import { ClientMessage, ServerMessage, type ClientFrame, type ServerFrame } from '../../src/gen/usbroam/v1/usbhost.js';

const u32 = fc.oneof(fc.integer({ min: 0, max: 200 }), fc.integer({ min: 0, max: 0xffffffff }));
const u53 = fc.oneof(fc.integer({ min: 0, max: 300 }), fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }));
const data = fc.oneof(fc.uint8Array({ maxLength: 64 }), fc.uint8Array({ minLength: 1000, maxLength: 5000 }));
// Negative: an enum value the reader does not know, written as a 10-byte varint.
const enumValue = fc.oneof(fc.integer({ min: 0, max: 7 }), fc.integer({ min: -3, max: -1 }), fc.integer({ min: 0, max: 0x7fffffff }));
const iso = fc.array(fc.record({ length: u32, status: enumValue, actualLength: u32 }), { maxLength: 3 });

const serverFrame: fc.Arbitrary<ServerFrame> = fc.record({
  seq: u53,
  kind: fc.oneof(
    fc.record({ $case: fc.constant('complete' as const), value: fc.record({ urbId: u53, status: enumValue, data, actualLength: u32, isoPackets: iso }) }),
    fc.record({ $case: fc.constant('received' as const), value: fc.record({ endpoint: u32, index: u53, status: enumValue, data, isoPackets: iso }) }),
    fc.record({ $case: fc.constant('ack' as const), value: fc.record({ seq: u53 }) }),
    fc.record({ $case: fc.constant('deviceGone' as const), value: fc.record({ reason: fc.string() }) }),
    fc.record({ $case: fc.constant('closed' as const), value: fc.constant({}) }),
  ),
});

const clientFrame: fc.Arbitrary<ClientFrame> = fc.record({
  seq: u53,
  kind: fc.oneof(
    fc.record({
      $case: fc.constant('submit' as const),
      value: fc.record({ urbId: u53, endpoint: u32, type: enumValue, setup: fc.uint8Array({ maxLength: 8 }), data, length: u32, streamId: u32, flags: u32, isoPackets: iso, timeoutMs: u32 }),
    }),
    fc.record({ $case: fc.constant('ack' as const), value: fc.record({ seq: u53 }) }),
    fc.record({ $case: fc.constant('cancel' as const), value: fc.record({ urbId: u53 }) }),
    fc.record({ $case: fc.constant('close' as const), value: fc.constant({}) }),
  ),
});

/** Both decoders on the same bytes: equal results, or both throw the same error. */
function sameAs<T>(fast: (b: Uint8Array) => T, generated: (b: Uint8Array) => T, bytes: Uint8Array): void {
  let want: T | undefined;
  let wantErr: string | undefined;
  try {
    want = generated(bytes);
  } catch (err) {
    wantErr = (err as Error).message;
  }
  if (wantErr !== undefined) {
    expect(() => fast(bytes)).to.throw(wantErr);
    return;
  }
  expect(fast(bytes)).to.deep.equal(want);
}

/** Bytes changed at a few places (truncated, a byte flipped, bytes inserted). */
const mutated = (bytes: fc.Arbitrary<Uint8Array>) =>
  fc.tuple(bytes, fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 }), fc.integer({ min: 0, max: 2 })), { minLength: 1, maxLength: 3 })).map(([b, edits]) => {
    let out = Uint8Array.from(b);
    for (const [at, v, how] of edits) {
      const i = out.length ? at % out.length : 0;
      if (how === 0) out = out.subarray(0, i);
      else if (how === 1 && out.length) out[i] = v;
      else out = Uint8Array.from([...out.subarray(0, i), v, ...out.subarray(i)]);
    }
    return out;
  });

describe('URB-channel frame decoders', () => {
  const serverBytes = fc.array(serverFrame, { maxLength: 6 }).map((frames) => encodeServerMessage({ frames }) as Uint8Array);
  const clientBytes = fc.array(clientFrame, { maxLength: 6 }).map((frames) => encodeClientMessage({ frames }) as Uint8Array);

  it('read server messages as the generated decoder does', () => {
    fc.assert(fc.property(serverBytes, (b) => sameAs(decodeServerMessage, (x) => ServerMessage.decode(x), b)), { numRuns: 400 });
  });

  it('read client messages as the generated decoder does', () => {
    fc.assert(fc.property(clientBytes, (b) => sameAs(decodeClientMessage, (x) => ClientMessage.decode(x), b)), { numRuns: 400 });
  });

  it('read damaged or foreign bytes as the generated decoder does (same result or same error)', () => {
    fc.assert(
      fc.property(fc.oneof(mutated(serverBytes), mutated(clientBytes), fc.uint8Array({ maxLength: 64 })), (b) => {
        sameAs(decodeServerMessage, (x) => ServerMessage.decode(x), b);
        sameAs(decodeClientMessage, (x) => ClientMessage.decode(x), b);
      }),
      { numRuns: 1500 },
    );
  });

  it('reads a URB id beyond 32 bits, and gives the data as a view of the message', () => {
    const payload = new Uint8Array(64).fill(7);
    const bytes = encodeClientMessage({ frames: [{ seq: 5, kind: { $case: 'submit', value: { urbId: 2 ** 40, endpoint: 1, type: 2, setup: new Uint8Array(0), data: payload, length: 0, streamId: 0, flags: 0, isoPackets: [], timeoutMs: 0 } } }] });
    const m = decodeClientMessage(bytes);
    const k = m.frames[0]!.kind!;
    expect(m.frames[0]!.seq).to.equal(5);
    expect(k.$case).to.equal('submit');
    if (k.$case !== 'submit') return;
    expect(k.value.urbId).to.equal(2 ** 40);
    expect(k.value.data.buffer).to.equal(bytes.buffer); // no copy
    expect(Array.from(k.value.data)).to.deep.equal(Array.from(payload));
  });

  it('keeps a frame with an unknown field: ts-proto skips the field, so does the decoder', () => {
    const frame = ClientMessage.encode({ frames: [{ seq: 3, kind: { $case: 'ack', value: { seq: 2 } } }] }).finish();
    // Append an unknown varint field (number 15) inside the frame: rewrite the frame's length.
    const inner = Uint8Array.from([...frame.subarray(2), 15 << 3, 1]);
    const bytes = Uint8Array.from([10, inner.length, ...inner]);
    expect(decodeClientMessage(bytes)).to.deep.equal({ frames: [{ seq: 3, kind: { $case: 'ack', value: { seq: 2 } } }] });
  });
});
