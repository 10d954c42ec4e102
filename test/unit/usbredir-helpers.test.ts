// Shared helpers for the usbredir-*.test.ts files (plus a self-check at the end).
import { UsbredirParser, ALL_CAPS, type Packet } from '../../src/qemu/usbredir/index.js';

/** A device-side and a host-side parser that have exchanged hellos. */
export function connectedPair(
  devCaps: readonly number[] = ALL_CAPS,
  hostCaps: readonly number[] = devCaps,
  maxPacketSize?: number,
): { dev: UsbredirParser; host: UsbredirParser } {
  const dev = new UsbredirParser({ role: 'device', caps: devCaps, maxPacketSize });
  const host = new UsbredirParser({ role: 'host', caps: hostCaps, maxPacketSize });
  const dh = dev.encode(dev.helloPacket());
  const hh = host.encode(host.helloPacket());
  const a = host.push(dh);
  const b = dev.push(hh);
  if (a.length !== 1 || b.length !== 1) throw new Error('hello exchange failed');
  return { dev, host };
}

export function hexBytes(s: string): Uint8Array {
  const clean = s.replace(/[^0-9a-fA-F]/g, '');
  const out = new Uint8Array(clean.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(clean.slice(2 * i, 2 * i + 2), 16);
  return out;
}

export function concat(parts: readonly Uint8Array[]): Uint8Array {
  const n = parts.reduce((a, p) => a + p.length, 0);
  const out = new Uint8Array(n);
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

/** Push `bytes` split at the given cut points (sorted, deduplicated internally). */
export function pushSplit(p: UsbredirParser, bytes: Uint8Array, cuts: readonly number[]): Packet[] {
  const pts = [...new Set(cuts.map((c) => Math.max(0, Math.min(bytes.length, c))))].sort((a, b) => a - b);
  const out: Packet[] = [];
  let prev = 0;
  for (const c of [...pts, bytes.length]) {
    if (c > prev) out.push(...p.push(bytes.subarray(prev, c)));
    prev = c;
  }
  return out;
}

/** Normalize packets for deep comparison (Uint8Array views -> plain copies). */
export function plain(p: Packet): unknown {
  const o: Record<string, unknown> = { ...p };
  if ('data' in p) o.data = Array.from(p.data);
  return o;
}

// The helpers live in a *.test.ts file so they stay within the usbredir test namespace; check
// them here so the file also earns its place in the suite.
import { expect } from 'chai';
describe('usbredir test helpers', () => {
  it('hexBytes / concat / pushSplit behave', () => {
    expect(Array.from(hexBytes('01 ff|0a'))).to.deep.equal([1, 255, 10]);
    expect(Array.from(concat([hexBytes('01'), hexBytes('0203')]))).to.deep.equal([1, 2, 3]);
    const { dev, host } = connectedPair();
    const bytes = host.encode({ type: 'reset', id: 5n });
    const got = pushSplit(dev, bytes, [1, 3, 3, 100]);
    expect(got).to.deep.equal([{ type: 'reset', id: 5n }]);
  });
});
