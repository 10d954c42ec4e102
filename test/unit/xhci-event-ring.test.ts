// The oldest uncompleted control TD from the xHCI event ring (src/client/bridge/handoff/
// xhci-event-ring.ts): the control TD that QEMU's usb-redir has in flight but the bridge never
// saw, found in a simulated guest memory behind a fake QEMU's HMP `xp`.
import { expect } from 'chai';
import { oldestUncompletedControlTd } from '../../src/client/bridge/handoff/xhci-event-ring.js';
import { FakeQemu } from '../helpers/fake-qemu-memory.js';

const BAR = 0xfebf0000n;
const RTSOFF = 0x2000;
const ERST = 0x7010000n;
const EVENTS = 0x7011000n;
const EVENT_TRBS = 16;
const DEVCTX = 0x7001000n;
const SLOT = 2;
const RING = 0x7004000n;
const loc = { slot: SLOT, devCtx: DEVCTX, ctxSize: 32, bar: BAR, capLength: 0x40 };

const TRB = { setup: 2, data: 3, status: 4, link: 6, event: 32 };

/** Controller registers, one event ring segment of EVENT_TRBS, ep0's context (running, control). */
function controller(q: FakeQemu, dequeue: bigint, dcs: number): void {
  q.set(BAR, 0x01000040, 0, 0, 0, 0);
  q.set(BAR + 0x18n, RTSOFF);
  q.set(BAR + BigInt(RTSOFF) + 0x20n, 0, 0, 1, 0, Number(ERST), 0); // interrupter 0: ERSTSZ 1, ERSTBA
  q.set(ERST, Number(EVENTS), 0, EVENT_TRBS, 0);
  q.set(DEVCTX + 32n, 1, 4 << 3, Number(dequeue) | dcs, 0);
}

/** A control TD (Setup, Data IN, Status) at `addr` in cycle `c`. */
function td(q: FakeQemu, addr: bigint, c: number): void {
  q.set(addr, 0x5dc0, 0x00c80000, 8, (TRB.setup << 10) | (1 << 6) | c);
  q.set(addr + 16n, 0x7100000, 0, 200, (TRB.data << 10) | (1 << 16) | c);
  q.set(addr + 32n, 0, 0, 0, (TRB.status << 10) | (1 << 5) | c);
}

/** Transfer events of the slot's control endpoint (DCI 1) naming `trbs`, oldest first, in cycle 1 from the ring's start. */
function events(q: FakeQemu, trbs: bigint[], opts: { dci?: number; eventData?: boolean } = {}): void {
  trbs.forEach((t, i) => q.set(EVENTS + BigInt(16 * i), Number(t & 0xffffffffn), Number(t >> 32n), (1 << 24) | 0, (SLOT << 24) | ((opts.dci ?? 1) << 16) | (TRB.event << 10) | (opts.eventData ? 4 : 0) | 1));
}

describe('xHCI event ring: the oldest uncompleted control TD (a request in flight in QEMU that the bridge never saw)', () => {
  it('is the TD after the one the newest control event completed, when the fetch pointer is past it', async () => {
    const q = new FakeQemu('');
    // 5 TDs; TD 0 completed, TDs 1-3 fetched (the context points at TD 4: QEMU's last kick).
    for (let i = 0; i < 5; i++) td(q, RING + BigInt(48 * i), 1);
    controller(q, RING + 48n * 4n, 1);
    // An older control event (naming TD 4's Status Stage TRB) must not count: the newest names TD 0's.
    events(q, [RING + 48n * 4n + 32n, RING + 32n]);
    const r = await oldestUncompletedControlTd(q.qmp(), loc);
    expect(r.why).to.equal(undefined);
    expect(r.id).to.equal(RING + 48n);
    expect(r.dequeue).to.equal(RING + 48n * 4n);
  });

  it('names the fetch pointer itself (nothing to rewind) when the TD after the newest completion is where the context points', async () => {
    const q = new FakeQemu('');
    for (let i = 0; i < 5; i++) td(q, RING + BigInt(48 * i), 1);
    controller(q, RING + 48n * 3n, 1);
    events(q, [RING + 48n * 2n + 32n]);
    const r = await oldestUncompletedControlTd(q.qmp(), loc);
    expect(r).to.deep.equal({ id: RING + 48n * 3n, dequeue: RING + 48n * 3n });
  });

  it('walks from a Data Stage event (short packet) to the end of its TD', async () => {
    const q = new FakeQemu('');
    for (let i = 0; i < 4; i++) td(q, RING + BigInt(48 * i), 1);
    controller(q, RING + 48n * 3n, 1);
    events(q, [RING + 16n]);
    expect((await oldestUncompletedControlTd(q.qmp(), loc)).id).to.equal(RING + 48n);
  });

  it('follows a toggling Link TRB on either side of the TD, and checks its cycle bit against the fetch pointer\'s cycle state', async () => {
    // A ring of 7 TRBs and a Link back to the start (toggle cycle): TDs at 0 and 3.
    const link = (q: FakeQemu) => q.set(RING + 16n * 6n, Number(RING), 0, 0, (TRB.link << 10) | 2 | 1);
    // The completed TD at 3 (cycle 1), the next at 0 behind the link (cycle 0), the fetch pointer back at 3 in cycle 0.
    let q = new FakeQemu('');
    td(q, RING + 48n, 1);
    td(q, RING, 0);
    link(q);
    controller(q, RING + 48n, 0);
    events(q, [RING + 48n + 32n]);
    expect((await oldestUncompletedControlTd(q.qmp(), loc)).id).to.equal(RING);
    // The completed TD at 0, the next at 3 (cycle 1), the fetch pointer behind the link at 0 in cycle 0.
    q = new FakeQemu('');
    td(q, RING, 1);
    td(q, RING + 48n, 1);
    link(q);
    controller(q, RING, 0);
    events(q, [RING + 32n]);
    expect((await oldestUncompletedControlTd(q.qmp(), loc)).id).to.equal(RING + 48n);
    // The same with the TD at 3 left from the previous lap (cycle 0): stale, not a TD in flight.
    q = new FakeQemu('');
    td(q, RING, 1);
    td(q, RING + 48n, 0);
    link(q);
    controller(q, RING, 0);
    events(q, [RING + 32n]);
    const r = await oldestUncompletedControlTd(q.qmp(), loc);
    expect(r.id).to.equal(undefined);
    expect(r.why).to.match(/not of the current cycle/);
  });

  it('says why, and names no TD, when it cannot tell safely', async () => {
    const cases: { name: string; build: (q: FakeQemu) => void; why: RegExp }[] = [
      {
        name: 'no control event',
        build: (q) => {
          td(q, RING, 1);
          controller(q, RING + 48n, 1);
          events(q, [RING + 32n], { dci: 3 });
        },
        why: /no control transfer event/,
      },
      {
        name: 'an event-data event',
        build: (q) => {
          td(q, RING, 1);
          controller(q, RING + 48n, 1);
          events(q, [RING + 32n], { eventData: true });
        },
        why: /event-data/,
      },
      {
        name: 'a TRB after the completed TD that is not a Setup Stage TRB',
        build: (q) => {
          td(q, RING, 1);
          q.set(RING + 48n, 0, 0, 8, (TRB.status << 10) | 1);
          controller(q, RING + 96n, 1);
          events(q, [RING + 32n]);
        },
        why: /not Setup Stage/,
      },
      {
        name: 'a fetch pointer far from the newest completion (an event from an older lap)',
        build: (q) => {
          for (let i = 0; i < 100; i++) td(q, RING + BigInt(48 * i), 1);
          controller(q, RING + 48n * 99n, 1);
          events(q, [RING + 32n]);
        },
        why: /not within 256 TRBs/,
      },
    ];
    for (const c of cases) {
      const q = new FakeQemu('');
      c.build(q);
      const r = await oldestUncompletedControlTd(q.qmp(), loc);
      expect(r.id, c.name).to.equal(undefined);
      expect(r.why, c.name).to.match(c.why);
    }
  });

  it('reads the ring a page at a time (one xp per 4 KiB page, not per TRB)', async () => {
    const q = new FakeQemu('');
    for (let i = 0; i < 5; i++) td(q, RING + BigInt(48 * i), 1);
    controller(q, RING + 48n * 4n, 1);
    events(q, [RING + 32n]);
    await oldestUncompletedControlTd(q.qmp(), loc);
    const xps = q.hmpLog.filter((l) => l.startsWith('xp '));
    // The context, RTSOFF, the interrupter, ERST, the event segment, and the ring's page once.
    expect(xps.filter((l) => l.endsWith(`0x${RING.toString(16)}`))).to.have.length(1);
    expect(xps).to.have.length(6);
  });
});
