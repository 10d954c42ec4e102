// ChardevOutput (cork, sent ring, held output, read flow) against a recording fake socket.
import { expect } from 'chai';
import type { Socket } from 'node:net';
import { ChardevOutput } from '../../src/client/bridge/socket-output.js';

class FakeSocket {
  writes: Uint8Array[] = [];
  corks = 0;
  uncorks = 0;
  writableLength = 0;
  paused = false;
  destroyed = false;
  cork(): void {
    this.corks++;
  }
  uncork(): void {
    this.uncorks++;
  }
  write(b: Uint8Array): boolean {
    this.writes.push(b);
    return true;
  }
  isPaused(): boolean {
    return this.paused;
  }
  pause(): void {
    this.paused = true;
  }
  resume(): void {
    this.paused = false;
  }
}

function rig(opts: { highWater?: number; maxInFlight?: number } = {}) {
  const s = new FakeSocket();
  let flows = 0;
  const out = new ChardevOutput(s as unknown as Socket, () => void flows++, opts.highWater ?? 1000, opts.maxInFlight ?? 10);
  return { s, out, flows: () => flows };
}

describe('bridge ChardevOutput', () => {
  it('writes produced in one turn share one cork, uncorked at the end of the turn', async () => {
    const { s, out, flows } = rig();
    out.write([new Uint8Array(3), new Uint8Array(2)]);
    out.write([new Uint8Array(1)]);
    expect([s.corks, s.uncorks, s.writes.length]).to.deep.equal([1, 0, 3]);
    await Promise.resolve();
    expect(s.uncorks).to.equal(1);
    expect(out.bytesWritten).to.equal(6);
    expect(flows()).to.equal(2);
  });

  it('unread(n): the last n bytes written, as views into what was written, then what is held', () => {
    const { s, out } = rig();
    const a = Uint8Array.from([1, 2, 3]);
    const b = Uint8Array.from([4, 5]);
    out.write([a, b]);
    const parts = out.unread(4);
    expect(parts.map((p) => [...p])).to.deep.equal([[2, 3], [4, 5]]);
    expect(parts[1]).to.equal(b);
    expect(parts[0]!.buffer, 'a view, not a copy').to.equal(a.buffer);
    out.hold();
    out.write([Uint8Array.from([6])]);
    expect(s.writes, 'held, not written').to.have.length(2);
    expect([out.bytesWritten, out.heldBytes]).to.deep.equal([6, 1]);
    expect(out.unread(0).map((p) => [...p])).to.deep.equal([[6]]);
    expect(() => out.unread(6)).to.throw(/only 5 are remembered/);
    const held = out.release();
    expect(held.map((p) => [...p])).to.deep.equal([[6]]);
    expect([out.holding, out.heldBytes]).to.deep.equal([false, 0]);
  });

  it('the sent ring keeps what Node buffers plus what the kernel can hold, and no more', () => {
    const { out } = rig();
    const mib = new Uint8Array(1024 * 1024);
    for (let i = 0; i < 8; i++) out.write([mib]);
    expect(out.retained).to.equal(4 * 1024 * 1024);
    expect(out.bytesWritten).to.equal(8 * 1024 * 1024);
  });

  it('read flow: paused above the high water or at the in-flight bound, resumed below; draining ignores the output', () => {
    const { s, out } = rig({ highWater: 100, maxInFlight: 3 });
    s.writableLength = 101;
    out.updateReadFlow(0, false);
    expect(s.paused).to.equal(true);
    out.updateReadFlow(0, true);
    expect(s.paused, 'a hand-off drains QEMU whatever our output').to.equal(false);
    s.writableLength = 0;
    out.updateReadFlow(3, false);
    expect(s.paused).to.equal(true);
    out.updateReadFlow(2, false);
    expect(s.paused).to.equal(false);
  });
});
