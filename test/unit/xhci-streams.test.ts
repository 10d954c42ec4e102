// The stream-context rewind at pre-switchover (src/client/bridge/handoff/xhci-streams.ts), on a
// simulated guest memory, checked against a model of what QEMU 7.2's xHCI does on the
// destination with it: xhci_find_stream() starts a stream ring at the context's dequeue pointer
// with cycle state 1 (whatever DCS says) and xhci_ring_fetch() follows Link TRBs.
import { expect } from 'chai';
import { checkStreamArray, doorbellWrite, oldestPerStream, planStreamRewind, readXhciStreamArray, type StreamPlan } from '../../src/client/bridge/handoff/xhci-streams.js';
import type { QmpClient } from '../../src/qemu/qmp/client.js';

const TRB_NORMAL = 1;
const TRB_LINK = 6;

class Memory {
  readonly dw = new Map<bigint, number>();
  /** A QMP client whose HMP `xp /Nwx ADDR` reads this memory (what readPhys uses). */
  qmp(): QmpClient {
    return {
      execute: async (cmd: string, args: { 'command-line': string }) => {
        const m = /^xp \/(\d+)wx 0x([0-9a-f]+)$/.exec(args['command-line']);
        if (cmd !== 'human-monitor-command' || !m) throw new Error(`unexpected ${cmd} ${JSON.stringify(args)}`);
        const a = BigInt(`0x${m[2]}`);
        const words = Array.from({ length: Number(m[1]) }, (_, i) => `0x${this.read(a + BigInt(4 * i)).toString(16).padStart(8, '0')}`);
        const lines: string[] = [];
        for (let i = 0; i < words.length; i += 4) lines.push(`${(a + BigInt(4 * i)).toString(16).padStart(16, '0')}: ${words.slice(i, i + 4).join(' ')}`);
        return lines.join('\r\n') + '\r\n';
      },
    } as unknown as QmpClient;
  }
  read(addr: bigint): number {
    return this.dw.get(addr) ?? 0;
  }
  set(addr: bigint, words: number[]): void {
    words.forEach((w, i) => this.dw.set(addr + 4n * BigInt(i), w >>> 0));
  }
  apply(plan: StreamPlan): void {
    for (const w of plan.writes) {
      const dv = new DataView(w.bytes.buffer, w.bytes.byteOffset, w.bytes.byteLength);
      for (let i = 0; i < w.bytes.length; i += 4) this.dw.set(w.addr + BigInt(i), dv.getUint32(i, true));
    }
  }
  trb(addr: bigint, type: number, cycle: number, parameter = 0n, tc = false): void {
    this.set(addr, [Number(parameter & 0xffffffffn), Number(parameter >> 32n), 0, (type << 10) | (tc ? 2 : 0) | cycle]);
  }
}

/** QEMU 7.2 on the destination: the first TRB it fetches from stream `stream` (undefined: none). */
function destinationFirstFetch(mem: Memory, streamArray: bigint, stream: number): { addr: bigint; ccs: number } | undefined {
  const lo = mem.read(streamArray + 16n * BigInt(stream));
  const hi = mem.read(streamArray + 16n * BigInt(stream) + 4n);
  let deq = ((BigInt(hi) << 32n) | BigInt(lo)) & ~0xfn;
  let ccs = 1; // xhci_ring_init(), not the DCS bit
  for (let links = 0; links < 32; links++) {
    const ctrl = mem.read(deq + 12n);
    if ((ctrl & 1) !== ccs) return undefined;
    if (((ctrl >> 10) & 0x3f) !== TRB_LINK) return { addr: deq, ccs };
    deq = (BigInt(mem.read(deq + 4n)) << 32n) | BigInt(mem.read(deq));
    if (ctrl & 2) ccs ^= 1;
  }
  return undefined;
}

// Endpoint context dword 0: state, MaxPStreams (bits 10-14), LSA (bit 15).
const epDw0 = (state: number, maxPStreams = 3, lsa = 1) => (state | (maxPStreams << 10) | (lsa << 15)) >>> 0;
const STREAM_ARRAY = 0x7f000n;
const EP_CTX = 0x7e060n;
const SCT_PRIMARY = 1 << 1;

function setup(state = 1) {
  const mem = new Memory();
  const epCtx = [epDw0(state), 0, Number(STREAM_ARRAY), 0];
  mem.set(EP_CTX, epCtx);
  return { mem, epCtx };
}
function streamCtxOf(mem: Memory, n = 16): number[][] {
  return Array.from({ length: n }, (_, i) => [0n, 4n, 8n, 12n].map((o) => mem.read(STREAM_ARRAY + 16n * BigInt(i) + o)));
}
function plan(mem: Memory, epCtx: number[], oldest = new Map<number, bigint>(), trbs = new Map<number, number[]>()): StreamPlan {
  const p = planStreamRewind({ ctxAddr: EP_CTX, epCtx, arrayBase: STREAM_ARRAY }, oldest, streamCtxOf(mem), trbs);
  if (!('writes' in p)) throw new Error(p.skipped);
  return p;
}

describe('xHCI stream contexts at the switchover', () => {
  it('oldestPerStream keeps the first id of each stream and ignores stream 0', () => {
    const m = oldestPerStream([0x100n, 0x200n, 0x300n, 0x400n], [2, 1, 2, 0]);
    expect([...m]).to.deep.equal([
      [2, 0x100n],
      [1, 0x200n],
    ]);
  });

  it('doorbellWrite targets DB[slot] with the endpoint and stream', () => {
    const w = doorbellWrite(0xfebf0000n, 0x2003, 3, 4, 7);
    expect(w.addr).to.equal(0xfebf0000n + 0x2000n + 12n);
    expect(w.value).to.equal((7 << 16) | 4);
  });

  it('a wrapped idle ring (cycle state 0) is fetched on the destination only behind the Link TRB', () => {
    const { mem, epCtx } = setup();
    const D = 0x90240n; // the next TRB the guest writes, in the middle of a 4 KiB segment
    mem.set(STREAM_ARRAY + 16n, [Number(D) | SCT_PRIMARY | 0, 0]); // DCS 0
    mem.trb(D - 16n, TRB_NORMAL, 0); // consumed, this lap
    mem.trb(D, TRB_NORMAL, 0); // the guest's next TD on this lap (cycle 0)
    expect(destinationFirstFetch(mem, STREAM_ARRAY, 1), 'QEMU 7.2 without the fix').to.equal(undefined);
    const p = plan(mem, epCtx);
    expect(p.streams).to.deep.equal([]);
    // In the reserved stream context 0, never inside the ring (Linux would take it for its own link).
    expect(p.patched.map((x) => [x.stream, x.link])).to.deep.equal([[1, STREAM_ARRAY]]);
    mem.apply(p);
    expect(mem.read(D - 16n + 12n), 'the ring itself is not written').to.equal(TRB_NORMAL << 10);
    expect(destinationFirstFetch(mem, STREAM_ARRAY, 1)).to.deep.equal({ addr: D, ccs: 0 });
    expect(mem.read(STREAM_ARRAY + 16n) & 0xe, 'stream context type kept').to.equal(SCT_PRIMARY);
    expect(mem.read(EP_CTX) & 7, 'Running endpoint marked Stopped').to.equal(3);
  });

  it('a stream with a TD in flight is pointed at its oldest TD, with that TRB cycle bit', () => {
    const { mem, epCtx } = setup();
    const td = 0x91100n;
    const fetched = td + 16n * 130n; // QEMU's fetch pointer, past the TD
    mem.set(STREAM_ARRAY + 32n, [Number(fetched) | SCT_PRIMARY | 1, 0]);
    mem.trb(td, TRB_NORMAL, 1);
    const p = plan(mem, epCtx, new Map([[2, td]]), new Map([[2, [0, 0, 0, (TRB_NORMAL << 10) | 1]]]));
    expect(p.streams).to.deep.equal([2]);
    expect(p.patched).to.have.length(1);
    expect(p.patched[0]!.link).to.equal(undefined);
    mem.apply(p);
    expect(destinationFirstFetch(mem, STREAM_ARRAY, 2)).to.deep.equal({ addr: td, ccs: 1 });
  });

  it('TDs in flight with cycle 0 are reached through Link TRBs in free stream contexts; a stream with none left is skipped', () => {
    const { mem, epCtx } = setup();
    // Streams 1-13 allocated (rings), 14-15 and the reserved 0 free: three slots for Link TRBs.
    for (let st = 1; st <= 13; st++) mem.set(STREAM_ARRAY + 16n * BigInt(st), [(0xa0000 + 0x1000 * st + 0x800) | SCT_PRIMARY | 1, 0]);
    const tds = [1, 2, 3, 4].map((st) => BigInt(0xa0000 + 0x1000 * st + 0x400));
    tds.forEach((td, i) => {
      mem.set(STREAM_ARRAY + 16n * BigInt(i + 1), [Number(td + 0x800n) | SCT_PRIMARY | 0, 0]);
      mem.trb(td, TRB_NORMAL, 0);
    });
    const normal0 = [0, 0, 0, TRB_NORMAL << 10];
    const p = plan(mem, epCtx, new Map(tds.map((td, i) => [i + 1, td])), new Map(tds.map((_, i) => [i + 1, normal0])));
    expect(p.streams, 'the skipped stream is not rung').to.deep.equal([1, 2, 3]);
    expect(p.skipped).to.have.length(1);
    expect(p.skipped[0]).to.match(/^stream 4: no free stream context/);
    expect(p.patched.map((x) => x.link)).to.deep.equal([STREAM_ARRAY, STREAM_ARRAY + 16n * 15n, STREAM_ARRAY + 16n * 14n]);
    mem.apply(p);
    for (let i = 0; i < 3; i++) expect(destinationFirstFetch(mem, STREAM_ARRAY, i + 1), `stream ${i + 1}`).to.deep.equal({ addr: tds[i], ccs: 0 });
    expect(destinationFirstFetch(mem, STREAM_ARRAY, 4), 'the skipped stream is left as it was').to.equal(undefined);
    // The next migration: Link TRBs that streams still point at stay; once the destination has
    // kicked stream 1 (its context moved on), its slot is free again.
    const stillUsed = plan(mem, epCtx, new Map([[4, tds[3]!]]), new Map([[4, normal0]]));
    expect(stillUsed.skipped[0]).to.match(/^stream 4: no free stream context/);
    mem.set(STREAM_ARRAY + 16n, [Number(tds[0]! + 0x10n) | SCT_PRIMARY | 1, 0]);
    const again = plan(mem, epCtx, new Map([[4, tds[3]!]]), new Map([[4, normal0]]));
    expect(again.skipped).to.deep.equal([]);
    expect(again.patched.find((x) => x.stream === 4)?.link).to.equal(STREAM_ARRAY);
  });

  it('leaves unused and already right contexts alone, keeps a Stopped endpoint Stopped', () => {
    const { mem, epCtx } = setup(3);
    epCtx[0] = epDw0(3);
    mem.set(STREAM_ARRAY + 16n, [0x95000 | SCT_PRIMARY | 1, 0]);
    const p = plan(mem, epCtx);
    expect(p.writes).to.deep.equal([]);
    expect(p.skipped).to.deep.equal([]);
  });

  it('names what it cannot rewind: a TRB that is not Normal, a stream context that is not a ring, no streams', () => {
    const { mem, epCtx } = setup();
    mem.set(STREAM_ARRAY + 16n, [0x96100 | SCT_PRIMARY | 1, 0]);
    const p = plan(
      mem,
      epCtx,
      new Map([
        [1, 0x96000n],
        [4, 0x97000n],
      ]),
      new Map([[1, [0, 0, 0, (TRB_LINK << 10) | 1]]]),
    );
    expect(p.streams).to.deep.equal([]);
    expect(p.skipped.join('; ')).to.match(/stream 1: TRB at 0x96000 has type 6, not Normal/);
    expect(p.skipped.join('; ')).to.match(/stream 4: stream context type 0, not a primary transfer ring/);
    expect(planStreamRewind({ ctxAddr: EP_CTX, epCtx: [1, 0, 0x1000, 0], arrayBase: 0x1000n }, new Map(), [], new Map())).to.deep.equal({ skipped: 'endpoint context has no streams' });
    expect(planStreamRewind({ ctxAddr: EP_CTX, epCtx: [epDw0(1, 3, 0), 0, 0x1000, 0], arrayBase: 0x1000n }, new Map(), [], new Map())).to.have.property('skipped').that.matches(/LSA 0/);
  });

  it('puts the stream context array address back where QEMU wrote a stream dequeue pointer', () => {
    const { mem, epCtx } = setup();
    const clobbered = 0x98231; // QEMU's last stream kick: that ring's dequeue pointer | ccs
    epCtx[2] = clobbered;
    mem.set(EP_CTX + 8n, [clobbered, 0]);
    mem.set(STREAM_ARRAY + 16n, [0x98230 | SCT_PRIMARY | 1, 0]);
    const p = plan(mem, epCtx);
    mem.apply(p);
    expect([mem.read(EP_CTX + 8n), mem.read(EP_CTX + 12n)]).to.deep.equal([Number(STREAM_ARRAY), 0]);
    expect(mem.read(EP_CTX) & 7).to.equal(3);
  });

  it('checkStreamArray accepts the guest array and refuses a clobbered pointer or memory that is no array', () => {
    const ep = [epDw0(1), 0, Number(STREAM_ARRAY), 0];
    const array = [0, 0, 0, 0, 0x99000 | SCT_PRIMARY | 1, 0, 0, 0, 0x9a000 | SCT_PRIMARY | 1, 0, 0, 0];
    expect(checkStreamArray(ep, array)).to.equal(STREAM_ARRAY);
    expect(checkStreamArray([epDw0(1), 0, 0x99041, 0], array)).to.match(/low bits set/);
    expect(checkStreamArray(ep, [0, 0, 0, 0, (TRB_NORMAL << 10) | 1, 0, 0, 0])).to.match(/stream context 1 .* not a primary transfer ring/);
    expect(checkStreamArray(ep, [0x1000, 0, 0, 0])).to.match(/stream context 0 .* not zero/);
    expect(checkStreamArray([1, 0, Number(STREAM_ARRAY), 0], array)).to.match(/no streams/);
  });

  describe('reading the stream context array when QEMU allocates the streams', () => {
    const BAR = 0xfebf0000n;
    const DEV_CTX = 0x7e000n;
    const loc = { slot: 2, devCtx: DEV_CTX, ctxSize: 32, bar: BAR, capLength: 0x40 };
    const DCI = 7; // ep 0x83
    /** Guest RAM as after the guest's Configure Endpoint command for `DCI` with 4 streams. */
    function guest(epDw2: number, opts: { inputCtxArray?: number; event?: boolean } = {}) {
      const mem = new Memory();
      mem.set(DEV_CTX + 32n * BigInt(DCI), [epDw0(1), 0, epDw2, 0]);
      mem.set(STREAM_ARRAY, [0, 0, 0, 0]);
      for (let st = 1; st <= 4; st++) mem.set(STREAM_ARRAY + 16n * BigInt(st), [(0xb0000 + 0x1000 * st) | SCT_PRIMARY | 1, 0, 0, 0]);
      // Interrupter 0's event ring (RTSOFF 0x1000; one segment of 16 TRBs at 0x51000).
      mem.set(BAR + 0x18n, [0x1000]);
      mem.set(BAR + 0x1000n + 0x20n, [0, 0, 1, 0, 0x50000, 0]);
      mem.set(0x50000n, [0x51000, 0, 16, 0]);
      const CMD = 0x52040n;
      const ICTX = 0x53000n;
      if (opts.event !== false) {
        mem.set(0x51000n, [Number(CMD), 0, 1 << 24, (33 << 10) | (loc.slot << 24) | 1]); // Command Completion, success
        mem.set(0x51010n, [0x60000, 0, 1 << 24, (32 << 10) | (loc.slot << 24) | (3 << 16) | 1]); // a later transfer event
      }
      mem.set(CMD, [Number(ICTX), 0, 0, (12 << 10) | (loc.slot << 24) | 1]); // Configure Endpoint
      mem.set(ICTX, [0, 1 << DCI]);
      mem.set(ICTX + 32n * BigInt(DCI + 1), [epDw0(0), 0, opts.inputCtxArray ?? Number(STREAM_ARRAY), 0]);
      return mem;
    }

    it('takes the endpoint context while no stream was kicked', async () => {
      const mem = guest(Number(STREAM_ARRAY));
      expect(await readXhciStreamArray(mem.qmp(), loc, 0x83, 4)).to.deep.equal({ base: STREAM_ARRAY, from: 'endpoint context' });
    });

    it('after a stream kick overwrote it, finds the guest Configure Endpoint command through its completion event', async () => {
      const mem = guest(0xb1021);
      expect(await readXhciStreamArray(mem.qmp(), loc, 0x83, 4)).to.deep.equal({ base: STREAM_ARRAY, from: 'configure command' });
    });

    it('refuses with both reasons when neither holds a stream context array', async () => {
      const reused = guest(0xb1021, { inputCtxArray: 0x60000 }); // the freed input context reused: points at no array
      reused.set(0x60000n, [0x1234, 0, 0, 0]);
      let err = await readXhciStreamArray(reused.qmp(), loc, 0x83, 4).catch((e: Error) => e);
      expect(String(err)).to.match(/endpoint context: TR dequeue field 0xb1021 has low bits set.*; the input context of the newest Configure Endpoint command: stream context 0 .* not zero/);
      err = await readXhciStreamArray(guest(0xb1021, { event: false }).qmp(), loc, 0x83, 4).catch((e: Error) => e);
      expect(String(err)).to.match(/no Configure Endpoint command of the slot in the event ring/);
    });
  });
});
