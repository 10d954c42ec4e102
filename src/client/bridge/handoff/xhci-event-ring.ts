// The oldest TD QEMU's xHCI has fetched and not completed on an endpoint whose TDs are never sent
// to us: bulk IN served by usbredir bulk receiving (QEMU answers the guest's TDs from buffered
// data; the TD waiting for data is QEMU's pending async packet, the others are queued behind it
// in its USB core). Found in guest RAM while the VM is stopped: the newest Transfer Event of the
// endpoint in the event ring (interrupter 0) names the last TRB QEMU completed; the TD after that
// TD on the transfer ring is the oldest one still in flight. If it is where the endpoint context
// points (QEMU's fetch pointer at its last kick), nothing is in flight.
//
// The control endpoint the same way, for the control TD the bridge never saw: when the source
// QEMU reads a control completion after the VM stopped (see AttachmentHandOff.freeze: its
// chardev watch was armed while the VM ran), its USB core at once hands the next queued control
// TD to usb-redir, which counts it in flight (already_in_flight) but keeps the request in its
// parser's write buffer (usbredir_write writes nothing unless the VM runs). The request reaches
// the destination bridge only when the destination runs, and the endpoint context points past
// that TD (its last kick came after the TD was fetched): nobody fetches it again, its
// completion finds no packet, and every control TD behind it waits forever.
import type { QmpClient } from '../../../qemu/qmp/client.js';
import { endpointDci, readPhys, type XhciDeviceLocation } from './xhci-dequeue.js';

const TRB_SETUP = 2;
const TRB_STATUS = 4;
const TRB_LINK = 6;
const TRB_TRANSFER_EVENT = 32;
/** Bound on the TRBs walked from the completed TRB to the end of its TD. */
const MAX_TD_TRBS = 64;
/** Bound on the event ring read (Linux uses one segment of 256 TRBs). */
const MAX_EVENT_TRBS = 4096;

function ptr(lo: number, hi: number): bigint {
  return (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0);
}

/** Every TRB of interrupter 0's event ring, newest first (by the producer's cycle boundary). */
export async function eventRingNewestFirst(qmp: QmpClient, bar: bigint, capLength: number): Promise<number[][]> {
  const [rtsoff] = await readPhys(qmp, bar + 0x18n, 1);
  const ir0 = bar + BigInt(rtsoff! & ~0x1f) + 0x20n;
  const [, , erstsz, , baLo, baHi] = await readPhys(qmp, ir0, 6);
  void capLength;
  const segs = (erstsz! & 0xffff) >>> 0;
  if (!segs) throw new Error('xHCI interrupter 0 has no event ring');
  const erst = await readPhys(qmp, ptr(baLo!, baHi!) & ~0x3fn, 4 * segs);
  const trbs: number[][] = [];
  for (let s = 0; s < segs; s++) {
    const base = ptr(erst[4 * s]!, erst[4 * s + 1]!) & ~0x3fn;
    const size = erst[4 * s + 2]! & 0xffff;
    if (trbs.length + size > MAX_EVENT_TRBS) throw new Error(`event ring larger than ${MAX_EVENT_TRBS} TRBs`);
    const words = await readPhys(qmp, base, 4 * size);
    for (let i = 0; i < size; i++) trbs.push(words.slice(4 * i, 4 * i + 4));
  }
  // Written in order with the producer's cycle bit: [c .. c, !c .. !c]; the newest is before the change.
  const c0 = trbs[0]![3]! & 1;
  let k = trbs.findIndex((t) => (t[3]! & 1) !== c0);
  if (k < 0) k = trbs.length;
  return [...trbs.slice(0, k).reverse(), ...trbs.slice(k).reverse()];
}

async function trbAt(qmp: QmpClient, addr: bigint): Promise<number[]> {
  return readPhys(qmp, addr, 4);
}

/** The TRB after `addr` on its ring (following a Link TRB). */
async function nextTrb(qmp: QmpClient, addr: bigint): Promise<bigint> {
  const n = addr + 16n;
  const t = await trbAt(qmp, n);
  return ((t[3]! >> 10) & 0x3f) === TRB_LINK ? ptr(t[0]!, t[1]!) & ~0xfn : n;
}

/**
 * The address of the oldest TD fetched and not completed on `endpoint` of the device at `loc`, or
 * undefined with the reason (no completion in the event ring yet, an event-data event, a TD
 * that does not end within MAX_TD_TRBS). `dequeue` is the endpoint context's TR dequeue pointer:
 * when `id` is the same, the destination fetches that TD (if the guest wrote it) anyway.
 */
export async function oldestUncompletedTd(
  qmp: QmpClient,
  loc: XhciDeviceLocation & { bar: bigint; capLength: number },
  endpoint: number,
): Promise<{ id?: bigint; dequeue: bigint; why?: string }> {
  const dci = endpointDci(endpoint);
  const ctx = await readPhys(qmp, loc.devCtx + BigInt(loc.ctxSize * dci), 4);
  const dequeue = ptr(ctx[2]!, ctx[3]!) & ~0xfn;
  const events = await eventRingNewestFirst(qmp, loc.bar, loc.capLength);
  const ev = events.find((t) => ((t[3]! >> 10) & 0x3f) === TRB_TRANSFER_EVENT && t[3]! >>> 24 === loc.slot && ((t[3]! >> 16) & 0x1f) === dci);
  if (!ev) return { dequeue, why: 'no transfer event of the endpoint in the event ring' };
  if (ev[3]! & 0x4) return { dequeue, why: 'the newest transfer event is an event-data event' };
  let p = ptr(ev[0]!, ev[1]!) & ~0xfn;
  for (let i = 0; ; i++) {
    if (i >= MAX_TD_TRBS) return { dequeue, why: `the completed TD does not end within ${MAX_TD_TRBS} TRBs` };
    const t = await trbAt(qmp, p);
    const type = (t[3]! >> 10) & 0x3f;
    if (type === TRB_LINK) {
      p = ptr(t[0]!, t[1]!) & ~0xfn;
      continue;
    }
    if (!(t[3]! & 0x10)) break; // no chain bit: the TD's last TRB
    p = await nextTrb(qmp, p);
  }
  return { id: await nextTrb(qmp, p), dequeue };
}

/** Bound on the TRBs walked from the oldest uncompleted control TD to the fetch pointer. */
const MAX_CONTROL_WALK = 256;

/**
 * TRBs of guest RAM, read a 4 KiB page at a time (a transfer ring segment of Linux's is one
 * aligned page): a walk along a ring costs one HMP round trip per page, not one per TRB.
 */
class TrbPages {
  private readonly pages = new Map<bigint, number[]>();
  constructor(private readonly qmp: QmpClient) {}
  async at(addr: bigint): Promise<number[]> {
    const page = addr & ~0xfffn;
    let words = this.pages.get(page);
    if (!words) this.pages.set(page, (words = await readPhys(this.qmp, page, 1024)));
    const i = Number(addr - page) / 4;
    return words.slice(i, i + 4);
  }
}

/**
 * The Setup Stage TRB of the oldest control TD QEMU has fetched and not completed on the control
 * endpoint (DCI 1) of the device at `loc`, when it is before the endpoint context's TR dequeue
 * pointer (QEMU's fetch pointer at its last kick): the TD after the one the newest control
 * Transfer Event completed. `id` undefined with `why` when that cannot be told safely: no
 * control event in the event ring, an event-data event, a TD that does not end in a Status
 * Stage TRB, a TRB after it that is not a Setup Stage TRB of the current cycle, or the fetch
 * pointer not reached from it within MAX_CONTROL_WALK TRBs (an event older than the ring's
 * last lap). `id === dequeue`: the destination fetches that TD anyway; nothing to do.
 * `events` may be given (interrupter 0's event ring, newest first), else it is read.
 */
export async function oldestUncompletedControlTd(
  qmp: QmpClient,
  loc: XhciDeviceLocation & { bar: bigint; capLength: number },
  events?: number[][],
): Promise<{ id?: bigint; dequeue: bigint; why?: string }> {
  const ctx = await readPhys(qmp, loc.devCtx + BigInt(loc.ctxSize), 4);
  const dequeue = ptr(ctx[2]!, ctx[3]!) & ~0xfn;
  const dcs = ctx[2]! & 1;
  const evs = events ?? (await eventRingNewestFirst(qmp, loc.bar, loc.capLength));
  const ev = evs.find((t) => ((t[3]! >> 10) & 0x3f) === TRB_TRANSFER_EVENT && t[3]! >>> 24 === loc.slot && ((t[3]! >> 16) & 0x1f) === 1);
  if (!ev) return { dequeue, why: 'no control transfer event in the event ring' };
  if (ev[3]! & 0x4) return { dequeue, why: 'the newest control transfer event is an event-data event' };
  const ring = new TrbPages(qmp);
  // The completed TD's Status Stage TRB: the event names it, or a Data Stage TRB before it (short packet).
  let p = ptr(ev[0]!, ev[1]!) & ~0xfn;
  for (let i = 0; ; i++) {
    if (i >= MAX_TD_TRBS) return { dequeue, why: `the completed control TD has no Status Stage TRB within ${MAX_TD_TRBS} TRBs` };
    const t = await ring.at(p);
    const type = (t[3]! >> 10) & 0x3f;
    if (type === TRB_STATUS) break;
    p = type === TRB_LINK ? ptr(t[0]!, t[1]!) & ~0xfn : p + 16n;
  }
  // From the TRB after it to the fetch pointer, counting the cycle toggles on the way: the TRB
  // after the completed TD is a new TD's Setup Stage TRB written in the cycle the fetch pointer
  // is in (or the one before, behind a toggling Link TRB), else it is stale.
  let id: bigint | undefined;
  let cycleAtId = 0;
  /** Parity of the toggling Link TRBs crossed, from the completed TD on; and where `id` was. */
  let toggles = 0;
  let togglesAtId = 0;
  let q = p + 16n;
  for (let i = 0; ; i++) {
    if (i >= MAX_CONTROL_WALK) return { dequeue, why: `the fetch pointer is not within ${MAX_CONTROL_WALK} TRBs of the newest control completion` };
    if (q === dequeue) break;
    const t = await ring.at(q);
    const type = (t[3]! >> 10) & 0x3f;
    if (type === TRB_LINK) {
      if (t[3]! & 0x2) toggles ^= 1;
      q = ptr(t[0]!, t[1]!) & ~0xfn;
      continue;
    }
    if (id === undefined) {
      if (type !== TRB_SETUP) return { dequeue, why: `the TRB after the newest completed control TD (0x${q.toString(16)}) has type ${type}, not Setup Stage` };
      id = q;
      cycleAtId = t[3]! & 1;
      togglesAtId = toggles;
    }
    q += 16n;
  }
  if (id === undefined) return { id: dequeue, dequeue };
  // Its cycle bit, flipped once per toggling link between it and the fetch pointer, is the cycle state there.
  if ((cycleAtId ^ toggles ^ togglesAtId) !== dcs) return { dequeue, why: `the Setup Stage TRB at 0x${id.toString(16)} is not of the current cycle (stale)` };
  return { id, dequeue };
}
