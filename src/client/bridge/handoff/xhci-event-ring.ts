// The oldest TD QEMU's xHCI has fetched and not completed on an endpoint whose TDs are never sent
// to us: bulk IN served by usbredir bulk receiving (QEMU answers the guest's TDs from buffered
// data; the TD waiting for data is QEMU's pending async packet, the others are queued behind it
// in its USB core). Found in guest RAM while the VM is stopped: the newest Transfer Event of the
// endpoint in the event ring (interrupter 0) names the last TRB QEMU completed; the TD after that
// TD on the transfer ring is the oldest one still in flight. If it is where the endpoint context
// points (QEMU's fetch pointer at its last kick), nothing is in flight.
import type { QmpClient } from '../../../qemu/qmp/client.js';
import { endpointDci, readPhys, type XhciDeviceLocation } from './xhci-dequeue.js';

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
