// The xHCI work-around of xhci-dequeue.ts for endpoints with bulk streams (UAS data and status
// pipes).
//
// QEMU's xHCI (hw/usb/hcd-xhci.c, 7.2) keeps a fetch pointer per stream ring and writes it into
// the stream context in guest RAM at each kick of that stream (xhci_set_ep_state with a stream
// context), like the endpoint context's dequeue pointer for an endpoint without streams. Its
// usb_xhci_post_load kicks every endpoint whose context says Running with stream id 0, and
// xhci_find_stream() asserts `streamid != 0`: the destination aborts as soon as it loads a
// Running stream endpoint. Nothing migrates the stream TDs in flight either.
//
// So at 'pre-switchover' (VM stopped, state not saved): point each stream context with TDs in
// flight at the stream's oldest TD in flight (its usbredir id is the address of its first TRB,
// the dequeue cycle state that TRB's cycle bit; the context's SCT bits are kept) and mark the
// endpoint context Stopped, which post_load leaves alone (no kick, no assert). On the
// destination, once the attachment continues, ring the doorbell for each of those streams
// (DB[slot] = DCI | stream id << 16): xhci_kick_epctx restarts a Stopped endpoint, fetches the
// TD again, usb-redir finds its id in already_in_flight and the completion the hand-off carries
// finishes it. Streams without TDs in flight stay as they are: the guest rings them when it
// queues work. One more QEMU 7.2 bug needs a write for every stream, in flight or not: the
// destination starts each stream ring with cycle state 1, ignoring the context's DCS bit, so a
// ring that has wrapped (cycle state 0) is never fetched again; a Link TRB put in front of such
// a ring gives the destination the right cycle state (planStreamRewind). The doorbell is an MMIO register: the gdbstub's physical-memory writes go
// through QEMU's address space, so they reach it like a CPU store.
import type { Logger } from '../../../common/log.js';
import type { QmpClient } from '../../../qemu/qmp/client.js';
import { endpointDci, GdbWriter, locateXhciDevice, readPhys, type XhciDeviceLocation } from './xhci-dequeue.js';
import { eventRingNewestFirst } from './xhci-event-ring.js';

/** The streams of one endpoint whose TDs the destination must fetch again (sent with the hand-off state). */
export interface StreamKick {
  /** Device context index of the endpoint (the doorbell target). */
  dci: number;
  streams: number[];
}

export interface StreamRewind {
  kick?: StreamKick;
  /** Stream contexts written (stream id, dwords 0-1 before and after). */
  patched: { stream: number; before: [number, number]; after: [number, number]; link?: bigint }[];
  skipped?: string;
}

/** Endpoint context state values (xHCI 6.2.3). */
const EP_RUNNING = 1;
const EP_STOPPED = 3;
/** TRB type of a Link TRB, its Toggle Cycle and Cycle bits (xHCI 6.4.4.1). */
const TRB_LINK = 6;
const TRB_LK_TC = 1 << 1;
const TRB_C = 1;
/** The most stream contexts read per endpoint (Linux's UAS asks for at most 256 streams). */
export const MAX_STREAM_CONTEXTS = 1024;

/** The oldest usbredir id in flight per stream, from ids oldest first and their stream ids. */
export function oldestPerStream(ids: bigint[], streamIds: number[]): Map<number, bigint> {
  const out = new Map<number, bigint>();
  ids.forEach((id, i) => {
    const s = streamIds[i] ?? 0;
    if (s !== 0 && !out.has(s)) out.set(s, id);
  });
  return out;
}

export interface StreamPlan {
  writes: { addr: bigint; bytes: Uint8Array }[];
  patched: StreamRewind['patched'];
  /** Streams with TDs in flight, rewound: the destination rings their doorbells. */
  streams: number[];
  skipped: string[];
}

/**
 * The writes that make one stream endpoint load right on the destination, from what was read of
 * guest RAM (pure, for tests): `epCtx` the endpoint context's dwords 0-3, `arrayBase` where its
 * stream context array is (read when the streams were allocated), `streamCtx` the 4 dwords
 * of each stream context by stream id (index 0 is the reserved entry), `trbs` the 4 dwords of
 * each stream's oldest TD's first TRB.
 *
 * - A stream with TDs in flight points at its oldest TD (dequeue cycle state = that TRB's cycle bit).
 * - A Running endpoint is marked Stopped (post_load kicks Running ones with stream 0 and aborts).
 * - The endpoint context's TR Dequeue Pointer field gets the stream context array's address back:
 *   QEMU 7.2's xhci_set_ep_state() writes the kicked stream's dequeue pointer there, and
 *   post_load takes that field as the array's address.
 * - Every stream whose dequeue cycle state is 0 gets a Link TRB in front of it: QEMU 7.2's
 *   xhci_find_stream() starts a stream ring it has not used since the load with cycle state 1,
 *   whatever the context's DCS bit says, so it would never fetch the TRBs of a ring that has
 *   wrapped (their cycle bit is 0; a UAS data TD of 512 KiB takes ~129 TRBs, so rings wrap
 *   often). The context points at a Link TRB with cycle 1 and Toggle Cycle, whose target is the
 *   real dequeue pointer: the first fetch follows it and goes on with cycle state 0, as the ring
 *   is. The Link TRB goes in a stream context nobody uses: the reserved context 0, or one past
 *   the streams the guest allocated (the array has 2 << MaxPStreams contexts, Linux fills
 *   fewer; all zero), never inside the ring: Linux's inc_enq() takes any Link TRB it meets at
 *   its enqueue pointer for the ring's own and follows it (and would toggle its cycle state).
 * A stream that cannot be handled is left as it is and named in `skipped`. Returns `skipped`
 * alone when the endpoint has no streams QEMU can use (nothing to write).
 */
export function planStreamRewind(
  ep: { ctxAddr: bigint; epCtx: number[]; arrayBase: bigint },
  oldest: Map<number, bigint>,
  streamCtx: number[][],
  trbs: Map<number, number[]>,
): StreamPlan | { skipped: string } {
  const [d0, , d2, d3] = ep.epCtx;
  const state = d0! & 0x7;
  const maxPStreams = (d0! >> 10) & 0x1f;
  const lsa = (d0! >> 15) & 1;
  if (!maxPStreams) return { skipped: 'endpoint context has no streams' };
  if (!lsa) return { skipped: 'secondary stream arrays (LSA 0) are not supported by QEMU' };
  const nrStreams = 2 << maxPStreams;
  const base = ep.arrayBase;
  const writes: StreamPlan['writes'] = [];
  const patched: StreamPlan['patched'] = [];
  const streams: number[] = [];
  const skipped: string[] = [];
  // Free 16-byte slots for Link TRBs: all-zero contexts, or a Link TRB of ours from an earlier
  // migration that no stream points at any more; reserved context 0 first, then from the end.
  const isFree = (c: number[] | undefined) =>
    !!c && ((c.every((w) => w === 0)) || (c[2] === 0 && (c[3]! & 0xfc03) === ((TRB_LINK << 10) | TRB_LK_TC | TRB_C) && (c[0]! & 0xf) === 0));
  // A Link TRB a stream context still points at (its stream not kicked since) is not free.
  const nRead = Math.min(nrStreams, streamCtx.length);
  const referenced = new Set<bigint>();
  for (let i = 1; i < nRead; i++) if (((streamCtx[i]![0]! >> 1) & 0x7) === 1) referenced.add(((BigInt(streamCtx[i]![1]! >>> 0) << 32n) | BigInt(streamCtx[i]![0]! >>> 0)) & ~0xfn);
  const usable = (i: number) => isFree(streamCtx[i]) && !referenced.has(base + 16n * BigInt(i)) && !oldest.has(i);
  const free: number[] = [];
  if (usable(0)) free.push(0);
  for (let i = nRead - 1; i >= 1; i--) if (usable(i)) free.push(i);
  for (const [stream] of oldest) if (stream >= nrStreams) skipped.push(`stream ${stream}: beyond the endpoint's ${nrStreams} streams`);
  for (let stream = 1; stream < nRead; stream++) {
    const sc = streamCtx[stream]! as [number, number, ...number[]];
    const sct = (sc[0] >> 1) & 0x7;
    const id = oldest.get(stream);
    if (sct !== 1) {
      // Unused contexts are 0; a stream in flight on a context that is not a ring is an error.
      if (id !== undefined) skipped.push(`stream ${stream}: stream context type ${sct}, not a primary transfer ring`);
      continue;
    }
    let deq = ((BigInt(sc[1] >>> 0) << 32n) | BigInt(sc[0] >>> 0)) & ~0xfn;
    let dcs = sc[0] & 1;
    if (id !== undefined) {
      const trb = trbs.get(stream);
      const why =
        id === 0n || (id & 0xfn) !== 0n
          ? `packet id 0x${id.toString(16)} is not a TRB address`
          : !trb
            ? 'its TRB was not read'
            : ((trb[3]! >> 10) & 0x3f) !== 1
              ? `TRB at 0x${id.toString(16)} has type ${(trb[3]! >> 10) & 0x3f}, not Normal`
              : undefined;
      if (why || !trb) skipped.push(`stream ${stream}: ${why}`);
      else {
        deq = id;
        dcs = trb[3]! & 1;
      }
    }
    let ptr = deq;
    let link: bigint | undefined;
    if (dcs === 0) {
      const slot = free.shift();
      if (slot === undefined) {
        skipped.push(`stream ${stream}: no free stream context for the Link TRB (cycle state 0 is lost on load)`);
        continue;
      }
      link = base + 16n * BigInt(slot);
      writes.push({ addr: link, bytes: le32s([Number(deq & 0xffffffffn), Number(deq >> 32n), 0, (TRB_LINK << 10) | TRB_LK_TC | TRB_C]) });
      ptr = link;
    }
    if (deq === id) streams.push(stream);
    const lo = (Number(ptr & 0xfffffff0n) | (sc[0] & 0xe) | (link !== undefined ? 1 : dcs)) >>> 0;
    const hi = Number(ptr >> 32n) >>> 0;
    if (lo === sc[0] >>> 0 && hi === sc[1] >>> 0) continue;
    writes.push({ addr: base + 16n * BigInt(stream), bytes: le32s([lo, hi]) });
    patched.push({ stream, before: [sc[0] >>> 0, sc[1] >>> 0], after: [lo, hi], ...(link !== undefined ? { link } : {}) });
  }
  for (const [stream] of oldest) if (stream < nrStreams && stream >= streamCtx.length) skipped.push(`stream ${stream}: its context was not read`);
  // Stopped: post_load neither kicks it with stream 0 nor asserts; doorbells restart it.
  if (state === EP_RUNNING) writes.push({ addr: ep.ctxAddr, bytes: le32s([((d0! & ~0x7) | EP_STOPPED) >>> 0]) });
  // The array pointer back in the endpoint context (QEMU wrote a stream's dequeue pointer there).
  const lo = Number(base & 0xffffffffn) >>> 0;
  const hi = Number(base >> 32n) >>> 0;
  if (lo !== d2! >>> 0 || hi !== d3! >>> 0) writes.push({ addr: ep.ctxAddr + 8n, bytes: le32s([lo, hi]) });
  return { writes, patched, streams: streams.sort((a, b) => a - b), skipped };
}

function le32s(words: number[]): Uint8Array {
  const out = new Uint8Array(4 * words.length);
  const dv = new DataView(out.buffer);
  words.forEach((w, i) => dv.setUint32(4 * i, w >>> 0, true));
  return out;
}

/**
 * Whether `epCtx` (dwords 0-3 of an endpoint context) still holds the guest's own pointer to its
 * stream context array, and `array` (dwords of its first contexts) looks like one: context 0
 * reserved (zero), contexts 1.. primary transfer rings. Returns the array's address, or why not
 * (pure). Once QEMU has kicked a stream the field holds that stream's dequeue pointer instead.
 */
export function checkStreamArray(epCtx: number[], array: number[]): bigint | string {
  const [d0, , d2, d3] = epCtx;
  if (!((d0! >> 10) & 0x1f)) return 'endpoint context has no streams';
  if (!((d0! >> 15) & 1)) return 'secondary stream arrays (LSA 0) are not supported by QEMU';
  if (d2! & 0xf) return `TR dequeue field 0x${(d2! >>> 0).toString(16)} has low bits set: a stream's dequeue pointer (QEMU kicked a stream already), not the array`;
  const base = (BigInt(d3! >>> 0) << 32n) | BigInt(d2! >>> 0);
  if (base === 0n) return 'stream context array pointer is 0';
  if (array[0] || array[1]) return `stream context 0 at 0x${base.toString(16)} is not zero: not a stream context array`;
  for (let i = 4; i + 1 < array.length; i += 4) {
    const sct = (array[i]! >> 1) & 0x7;
    if (sct !== 1 || !(array[i]! & ~0xf)) return `stream context ${i / 4} at 0x${(base + BigInt(4 * i)).toString(16)} is not a primary transfer ring (0x${(array[i]! >>> 0).toString(16)})`;
  }
  return base;
}

/** Event and command TRB types (xHCI 6.4.2.2, 6.4.3.5). */
const TRB_COMMAND_COMPLETION = 33;
const TRB_CONFIGURE_ENDPOINT = 12;

/**
 * The stream context array of `endpoint` from the guest's Configure Endpoint command that gave
 * it streams: the newest successful Command Completion Event of the slot in the event ring names
 * the command TRB, whose parameter is the input context, whose endpoint context holds the array
 * pointer the guest wrote. Linux frees that input context after the command; its memory keeps
 * the values until the pool reuses it, and checkStreamArray() refuses what no longer fits.
 */
async function streamArrayFromConfigureCommand(qmp: QmpClient, loc: XhciDeviceLocation, dci: number, n: number): Promise<bigint> {
  if (loc.bar === undefined || loc.capLength === undefined) throw new Error('no xHCI BAR0');
  const events = await eventRingNewestFirst(qmp, loc.bar, loc.capLength);
  let why = 'no Configure Endpoint command of the slot in the event ring';
  for (const ev of events) {
    if (((ev[3]! >> 10) & 0x3f) !== TRB_COMMAND_COMPLETION || ev[3]! >>> 24 !== loc.slot || ev[2]! >>> 24 !== 1) continue;
    const cmd = await readPhys(qmp, ((BigInt(ev[1]! >>> 0) << 32n) | BigInt(ev[0]! >>> 0)) & ~0xfn, 4);
    if (((cmd[3]! >> 10) & 0x3f) !== TRB_CONFIGURE_ENDPOINT) continue;
    const ictx = ((BigInt(cmd[1]! >>> 0) << 32n) | BigInt(cmd[0]! >>> 0)) & ~0xfn;
    const [, add] = await readPhys(qmp, ictx, 2);
    if (!((add! >>> dci) & 1)) continue; // this command did not add the endpoint
    const epCtx = await readPhys(qmp, ictx + BigInt(loc.ctxSize * (dci + 1)), 4);
    const base = (BigInt(epCtx[3]! >>> 0) << 32n) | BigInt(epCtx[2]! >>> 0);
    const array = base & 0xfn || base === 0n ? [0, 0, 0, 0] : await readPhys(qmp, base, 4 * n);
    const r = checkStreamArray(epCtx, array);
    if (typeof r !== 'string') return r;
    why = `the input context of the newest Configure Endpoint command: ${r}`;
    break;
  }
  throw new Error(why);
}

/**
 * When QEMU asks for bulk streams on `endpoint` (usbredir alloc_bulk_streams, sent while it runs
 * the guest's Configure Endpoint command): the address of its stream context array. From the
 * endpoint context if QEMU has not kicked a stream yet (its first kick overwrites the field: the
 * guest's first command often comes sooner than these reads), else from the command's input
 * context. Throws with the reasons if neither holds it.
 */
export async function readXhciStreamArray(qmp: QmpClient, location: XhciDeviceLocation, endpoint: number, numStreams: number): Promise<{ base: bigint; from: 'endpoint context' | 'configure command' }> {
  const dci = endpointDci(endpoint);
  const ctxAddr = location.devCtx + BigInt(location.ctxSize * dci);
  const epCtx = await readPhys(qmp, ctxAddr, 4);
  const base = (BigInt(epCtx[3]! >>> 0) << 32n) | BigInt(epCtx[2]! >>> 0);
  const n = Math.min(Math.max(numStreams, 1) + 1, 4);
  const array = base & 0xfn || base === 0n ? [0, 0, 0, 0] : await readPhys(qmp, base, 4 * n);
  const r = checkStreamArray(epCtx, array);
  if (typeof r !== 'string') return { base: r, from: 'endpoint context' };
  try {
    return { base: await streamArrayFromConfigureCommand(qmp, location, dci, n), from: 'configure command' };
  } catch (err) {
    throw new Error(`endpoint context: ${r}; ${(err as Error).message}`);
  }
}

/**
 * QEMU is allocating bulk streams on `endpoints` of usb device `deviceId` (a UAS disk binding):
 * keep each endpoint's stream context array address on the attachment, for the stream rewind at
 * the next migration (it goes with every hand-off). Read at once: QEMU's first stream kick
 * replaces it in the endpoint context. Never throws: what cannot be read is logged.
 */
export async function captureXhciStreamArrays(
  qmp: QmpClient,
  opts: { controllerId: string; deviceId: string; endpoints: number[]; numStreams: number; att: { setXhciStreamArray(ep: number, base: bigint): void }; log: Logger },
): Promise<void> {
  const t0 = performance.now();
  try {
    const loc = await locateXhciDevice(qmp, opts.controllerId, opts.deviceId);
    const read = await Promise.all(
      opts.endpoints.map(async (ep) => {
        try {
          const { base, from } = await readXhciStreamArray(qmp, loc, ep, opts.numStreams);
          opts.att.setXhciStreamArray(ep, base);
          return { ep: ep.toString(16), array: base.toString(16), from };
        } catch (err) {
          return { ep: ep.toString(16), err: (err as Error).message };
        }
      }),
    );
    const tookMs = Math.round(performance.now() - t0);
    if (read.some((r) => 'err' in r)) opts.log.warn({ read, tookMs }, 'cannot read some xHCI stream context arrays: those streams break if the VM migrates');
    else opts.log.info({ read, tookMs }, 'xHCI stream context arrays read (for the stream rewind at a migration)');
  } catch (err) {
    opts.log.warn({ endpoints: opts.endpoints, err: (err as Error).message }, 'cannot locate the xHCI device for its stream context arrays (not on xHCI?)');
  }
}

/**
 * At 'pre-switchover': rewind the stream contexts of `endpoint` (see planStreamRewind) and mark
 * the endpoint Stopped. Without `arrayBase` (the streams were allocated before this bridge could
 * read it) only the endpoint is stopped, so that the destination does not abort. Throws if guest
 * RAM cannot be read or written.
 */
export async function rewindXhciStreams(
  qmp: QmpClient,
  opts: { location: XhciDeviceLocation; endpoint: number; ids: bigint[]; streamIds: number[]; arrayBase?: bigint; gdb: () => Promise<GdbWriter> },
): Promise<StreamRewind> {
  const { devCtx, ctxSize } = opts.location;
  const dci = endpointDci(opts.endpoint);
  const ctxAddr = devCtx + BigInt(ctxSize * dci);
  const epCtx = await readPhys(qmp, ctxAddr, 4);
  const oldest = oldestPerStream(opts.ids, opts.streamIds);
  const maxPStreams = (epCtx[0]! >> 10) & 0x1f;
  if (opts.arrayBase === undefined) {
    if (maxPStreams && (epCtx[0]! & 0x7) === EP_RUNNING) {
      const gdb = await opts.gdb();
      await gdb.write(ctxAddr, le32s([((epCtx[0]! & ~0x7) | EP_STOPPED) >>> 0]));
    }
    return { patched: [], skipped: 'its stream context array is not known (allocated before this bridge could read it): endpoint stopped only, its streams break on the destination' };
  }
  const base = opts.arrayBase;
  const streamCtx: number[][] = [];
  const trbs = new Map<number, number[]>();
  if (maxPStreams) {
    // The whole stream context array in one read (16 bytes a stream).
    const n = Math.min(2 << maxPStreams, MAX_STREAM_CONTEXTS);
    const [arr] = await Promise.all([
      readPhys(qmp, base, 4 * n),
      ...[...oldest].map(async ([stream, id]) => {
        if (id !== 0n && (id & 0xfn) === 0n) trbs.set(stream, await readPhys(qmp, id, 4));
      }),
    ]);
    for (let i = 0; i < n; i++) streamCtx.push(arr.slice(4 * i, 4 * i + 4));
  }
  const plan = planStreamRewind({ ctxAddr, epCtx, arrayBase: base }, oldest, streamCtx, trbs);
  if (!('writes' in plan)) return { patched: [], skipped: plan.skipped };
  if (plan.writes.length) {
    const gdb = await opts.gdb();
    for (const w of plan.writes) await gdb.write(w.addr, w.bytes);
    const [d0] = await readPhys(qmp, ctxAddr, 1);
    if ((d0! & 0x7) === EP_RUNNING) throw new Error(`endpoint context at 0x${ctxAddr.toString(16)} still reads Running after the write`);
  }
  return { kick: { dci, streams: plan.streams }, patched: plan.patched, ...(plan.skipped.length ? { skipped: plan.skipped.join('; ') } : {}) };
}

/** The doorbell register of `slot` and the value that kicks `stream` of endpoint `dci` (pure). */
export function doorbellWrite(bar: bigint, dbOff: number, slot: number, dci: number, stream: number): { addr: bigint; value: number } {
  return { addr: bar + BigInt(dbOff & ~0x3) + 4n * BigInt(slot), value: ((stream & 0xffff) << 16) | (dci & 0xff) };
}

/**
 * On the destination, after the attachment continues: ring the doorbell of each stream the
 * source rewound. Connecting the gdbstub pauses a running VM (QEMU's gdbstub stops it on
 * connect), so a VM that was running is continued after the writes. Throws on failure.
 */
export async function kickXhciStreams(qmp: QmpClient, opts: { controllerId: string; deviceId: string; kicks: StreamKick[]; runDir: string; log: Logger }): Promise<number> {
  const writes = opts.kicks.flatMap((k) => k.streams.map((s) => ({ dci: k.dci, stream: s })));
  if (!writes.length) return 0;
  const loc = await locateXhciDevice(qmp, opts.controllerId, opts.deviceId);
  if (loc.bar === undefined) throw new Error('no xHCI BAR0');
  const [dbOff] = await readPhys(qmp, loc.bar + 0x14n, 1);
  const before = await qmp.execute<{ status: string; running: boolean }>('query-status');
  let rung = 0;
  try {
    const gdb = await GdbWriter.open(qmp, opts.runDir);
    try {
      for (const { dci, stream } of writes) {
        const w = doorbellWrite(loc.bar, dbOff!, loc.slot, dci, stream);
        await gdb.write(w.addr, le32s([w.value]));
        rung++;
      }
    } finally {
      await gdb.close();
    }
  } finally {
    // Connecting the gdbstub paused the VM: whatever happened, it runs again if it ran before.
    if (before.running) await qmp.execute('cont').catch((err: Error) => opts.log.error({ err: err.message }, 'cont after the stream doorbells failed'));
  }
  return rung;
}
