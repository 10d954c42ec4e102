// Work-around for QEMU's xHCI live migration losing transfers that are in flight.
//
// QEMU (hw/usb/hcd-xhci.c, 7.2 and still upstream) keeps one pointer per transfer ring: the
// FETCH pointer (`ring.dequeue`, advanced as TRBs are fetched and submitted to the device), and
// writes it into the endpoint context in guest memory only when an endpoint is kicked
// (xhci_set_ep_state at the start of xhci_kick_epctx) or a transfer completes synchronously.
// The controller's own state (transfers in flight) does not migrate: the destination's
// usb_xhci_post_load rebuilds each endpoint from the endpoint context in guest RAM and kicks
// it, i.e. it fetches again from the dequeue pointer written at the source's LAST kick. TDs
// fetched by an earlier kick and still in flight (a cdc-acm driver keeps 16 bulk IN reads
// queued; a completion on the endpoint kicks it and moves the pointer past all of them) are
// never fetched again on the destination: their completions are dropped ("could not find
// packet with id"), their ids stay in usb-redir's already_in_flight list (a later TD reusing
// the address is swallowed), and the guest's xHCI driver waits for them forever ("TRB DMA ptr
// not part of current TD" for every later event of that endpoint).
//
// QEMU neither reads nor writes the usb-redir chardev while the VM is stopped, so these TDs
// cannot be completed at 'pre-switchover'. What can be done there (the VM is stopped, RAM not
// finally copied, device state not saved): rewind the endpoint context's TR dequeue pointer in
// guest RAM to the OLDEST TD QEMU still has in flight on that endpoint (the usbredir packet id
// of an xHCI transfer is the address of its first TRB; the dequeue cycle state is that TRB's
// cycle bit). The destination then fetches every in-flight TD again; usb-redir answers each
// one from already_in_flight (not sent again) and the completions that come with the hand-off
// find their packets. TDs between the oldest in flight and the fetch pointer must all be in
// flight (bulk completes in order on an endpoint; checked by the caller), or they would run
// twice.
//
// Control TDs on ep0 the same way: when several processes send control requests at once the
// guest queues several TDs on ep0; QEMU's xHCI fetches them all but its USB core sends them to
// usb-redir one at a time and keeps the rest in a queue that does not migrate. The oldest one
// we know (sent to us, answered or not, and not read by QEMU) is the one usb-redir has in flight;
// every later TD on the ring is still queued in the core, so pointing the context at that TD's
// Setup TRB makes the destination fetch them all again: the first is answered from
// already_in_flight, the rest go to the device in order. (Requests QEMU answers itself,
// SET_ADDRESS and the configuration/interface ones it turns into usbredir control packets, are
// not data packets: if one of those is the oldest in flight, we do not know it and do not rewind.)
//
// Endpoints QEMU serves by usbredir bulk receiving (quirked FTDI-like devices) never send their
// TDs to us: their oldest uncompleted TD is found in the event ring (xhci-event-ring.ts); QEMU
// migrates their buffered data and does not count their TDs as in flight, so the destination
// serves the TDs it fetches again as new ones. Bulk streams (UAS): xhci-streams.ts. Skipped endpoints are
// logged.
//
// QEMU has no QMP/HMP command that writes guest memory; its gdbstub does (physical addresses
// with `Qqemu.PhyMemMode:1`). It is started on a unix socket for the write only and stopped
// again; a gdb client connecting while the VM is stopped changes nothing in its run state
// (vm_stop on a stopped VM is a no-op) and we never send a continue or detach packet.
import net from 'node:net';
import path from 'node:path';
import type { Logger } from '../../../common/log.js';
import type { QmpClient } from '../../../qemu/qmp/client.js';

/** The TDs QEMU has in flight on one bulk endpoint, or the control endpoint (0). */
export interface EndpointInFlight {
  endpoint: number;
  /** usbredir id (= guest-physical address of the first TRB) of the oldest TD in flight. */
  oldestId: bigint;
  count: number;
}

export interface DequeuePatch {
  endpoint: number;
  slot: number;
  ctxAddr: bigint;
  /** Dwords 2 and 3 of the endpoint context before and after. */
  before: [number, number];
  after: [number, number];
}

export interface RewindResult {
  patched: DequeuePatch[];
  /** Endpoints whose context already pointed at the oldest TD in flight. */
  unchanged: number[];
  skipped: { endpoint: number; why: string }[];
  tookMs: number;
}

async function hmp(qmp: QmpClient, cmd: string): Promise<string> {
  return qmp.execute<string>('human-monitor-command', { 'command-line': cmd }, { timeoutMs: 5000 });
}

/** Read `n` little-endian dwords of guest-physical memory (HMP xp). */
export async function readPhys(qmp: QmpClient, addr: bigint, n: number): Promise<number[]> {
  const out = await hmp(qmp, `xp /${n}wx 0x${addr.toString(16)}`);
  const words: number[] = [];
  for (const line of out.split('\n')) {
    const i = line.indexOf(':');
    if (i < 0) continue;
    for (const m of line.slice(i + 1).matchAll(/0x([0-9a-fA-F]+)/g)) words.push(parseInt(m[1]!, 16) >>> 0);
  }
  if (words.length < n) throw new Error(`xp 0x${addr.toString(16)}: ${JSON.stringify(out.slice(0, 200))}`);
  return words.slice(0, n);
}

/** `info usb`: the device address (= xHCI slot id) of the usb device with this qdev id. */
export function usbAddressOf(infoUsb: string, id: string): number | undefined {
  for (const line of infoUsb.split('\n')) {
    const m = /Device \d+\.(\d+), Port [^,]*,.*ID: (\S+)\s*$/.exec(line);
    if (m && m[2] === id) return Number(m[1]);
  }
  return undefined;
}

/** PCI ids of QEMU's xHCI controllers (qemu-xhci, nec-usb-xhci). */
const XHCI_PCI_IDS = ['1b36:000d', '1033:0194'];

/** `info pci`: BAR0 of the PCI device with qdev id `id`, and whether it is one of QEMU's xHCI controllers. */
export function bar0Of(infoPci: string, id: string): { bar: bigint; xhci: boolean } | undefined {
  const blocks = infoPci.split(/\n(?=\s*Bus\s+\d+,)/);
  for (const b of blocks) {
    if (!b.split('\n').some((l) => l.trim() === `id "${id}"`)) continue;
    const m = /BAR0: (?:64|32) bit memory at 0x([0-9a-fA-F]+)/.exec(b);
    if (m) return { bar: BigInt(`0x${m[1]}`), xhci: XHCI_PCI_IDS.some((x) => b.includes(`PCI device ${x}`)) };
  }
  return undefined;
}

function hex(bytes: Uint8Array): string {
  return Buffer.from(bytes).toString('hex');
}

function rspPacket(data: string): string {
  let sum = 0;
  for (let i = 0; i < data.length; i++) sum = (sum + data.charCodeAt(i)) & 0xff;
  return `$${data}#${sum.toString(16).padStart(2, '0')}`;
}

/**
 * A minimal gdb remote-protocol client: one request, one reply at a time. Requests made while
 * one is outstanding wait their turn (the rewinds of several attachments of one VM share a
 * gdbstub): a reply answers the oldest request, never a later one.
 */
class GdbLink {
  private buf = '';
  private waiter?: (reply: string) => void;
  private turn: Promise<unknown> = Promise.resolve();
  constructor(private readonly sock: net.Socket) {
    sock.setEncoding('latin1');
    sock.on('data', (d: string) => {
      this.buf += d;
      this.pump();
    });
  }
  private pump(): void {
    for (;;) {
      this.buf = this.buf.replace(/^\++/, '');
      const m = /^\$([^#]*)#([0-9a-fA-F]{2})/.exec(this.buf);
      if (!m) {
        const s = this.buf.indexOf('$');
        if (s > 0) this.buf = this.buf.slice(s);
        return;
      }
      this.buf = this.buf.slice(m[0].length);
      this.sock.write('+');
      // A stop reply (T.. / S..) is a notification, not an answer: the gdbstub sends one when
      // connecting stops a running VM. Replies to our packets are OK, E.. or hex.
      if (/^[TS][0-9a-fA-F]{2}/.test(m[1]!)) continue;
      const w = this.waiter;
      this.waiter = undefined;
      w?.(m[1]!);
    }
  }
  request(data: string, timeoutMs = 3000): Promise<string> {
    const r = this.turn.then(() => this.send(data, timeoutMs));
    this.turn = r.catch(() => {});
    return r;
  }
  private send(data: string, timeoutMs: number): Promise<string> {
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => {
        this.waiter = undefined;
        reject(new Error(`gdbstub: no reply to ${data.slice(0, 24)}`));
      }, timeoutMs);
      this.waiter = (r) => {
        clearTimeout(t);
        resolve(r);
      };
      this.sock.write(rspPacket(data));
    });
  }
}

/**
 * A temporary gdbstub on a unix socket, connected, in physical-memory mode: write() guest RAM,
 * then close() (closes the connection and stops the gdbstub; never sends continue or detach).
 */
export class GdbWriter {
  private constructor(
    private readonly qmp: QmpClient,
    private readonly sock: net.Socket,
    private readonly link: GdbLink,
  ) {}

  static async open(qmp: QmpClient, runDir: string): Promise<GdbWriter> {
    const sockPath = path.join(runDir, `gdb-${process.pid}-${Date.now() % 100000}.sock`);
    const started = await hmp(qmp, `gdbserver unix:${sockPath},server=on,wait=off`);
    if (/error|could not|failed/i.test(started)) throw new Error(`gdbserver: ${started.trim()}`);
    let sock: net.Socket | undefined;
    try {
      sock = await new Promise<net.Socket>((resolve, reject) => {
        const s = net.connect(sockPath);
        s.once('connect', () => resolve(s));
        s.once('error', reject);
      });
      sock.on('error', () => {});
      const link = new GdbLink(sock);
      const mode = await link.request('Qqemu.PhyMemMode:1');
      if (mode !== 'OK') throw new Error(`gdbstub refused physical memory mode: ${mode}`);
      return new GdbWriter(qmp, sock, link);
    } catch (err) {
      sock?.destroy();
      await hmp(qmp, 'gdbserver none').catch(() => {});
      throw err;
    }
  }

  async write(addr: bigint, bytes: Uint8Array): Promise<void> {
    const r = await this.link.request(`M${addr.toString(16)},${bytes.length.toString(16)}:${hex(bytes)}`);
    if (r !== 'OK') throw new Error(`gdbstub memory write at 0x${addr.toString(16)}: ${r}`);
  }

  async close(): Promise<void> {
    this.sock.destroy();
    await hmp(this.qmp, 'gdbserver none').catch(() => {});
  }
}

/** Where a usb device's contexts are in guest RAM. */
export interface XhciDeviceLocation {
  slot: number;
  /** Guest-physical address of the device context. */
  devCtx: bigint;
  /** 32 or 64 (HCCPARAMS1.CSZ). */
  ctxSize: number;
  /** The controller's BAR0 and CAPLENGTH (for its runtime registers). */
  bar?: bigint;
  capLength?: number;
}

/**
 * Find the device context of usb device `deviceId` (its qdev id) on xHCI controller
 * `controllerId` (qdev id): its slot is its USB address (`info usb`), DCBAAP is in the
 * controller's operational registers (BAR0 from `info pci`), the device context pointer in DCBAA.
 */
export async function locateXhciDevice(qmp: QmpClient, controllerId: string, deviceId: string): Promise<XhciDeviceLocation> {
  const [infoUsb, infoPci] = await Promise.all([hmp(qmp, 'info usb'), hmp(qmp, 'info pci')]);
  const slot = usbAddressOf(infoUsb, deviceId);
  if (!slot) throw new Error(`no usb device ${deviceId} in 'info usb'`);
  const pci = bar0Of(infoPci, controllerId);
  if (pci === undefined) throw new Error(`no PCI device "${controllerId}" with a memory BAR0 in 'info pci'`);
  if (!pci.xhci) throw new Error(`PCI device "${controllerId}" is not an xHCI controller`);
  const bar = pci.bar;
  const [capWord, , , , hcc1] = await readPhys(qmp, bar, 5);
  const capLength = capWord! & 0xff;
  const ctxSize = hcc1! & 0x4 ? 64 : 32;
  const [dcLo, dcHi] = await readPhys(qmp, bar + BigInt(capLength) + 0x30n, 2);
  const dcbaap = ((BigInt(dcHi!) << 32n) | BigInt(dcLo!)) & ~0x3fn;
  if (dcbaap === 0n) throw new Error('xHCI DCBAAP is 0');
  const [ctxLo, ctxHi] = await readPhys(qmp, dcbaap + 8n * BigInt(slot), 2);
  const devCtx = ((BigInt(ctxHi!) << 32n) | BigInt(ctxLo!)) & ~0x3fn;
  if (devCtx === 0n) throw new Error(`xHCI slot ${slot} has no device context`);
  return { slot, devCtx, ctxSize, bar, capLength };
}

/** Device context index of an endpoint address: 1 for the control endpoint, else 2n + IN. */
export function endpointDci(endpoint: number): number {
  const n = endpoint & 0x0f;
  return n === 0 ? 1 : n * 2 + (endpoint & 0x80 ? 1 : 0);
}

function le32(a: number, b: number): Uint8Array {
  const out = new Uint8Array(8);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, a >>> 0, true);
  dv.setUint32(4, b >>> 0, true);
  return out;
}

/**
 * At 'pre-switchover' (VM stopped, device state not saved yet): point the endpoint context of
 * every bulk endpoint with TDs in flight at the oldest of them (see the header comment). Only
 * for a usb device `deviceId` on the xHCI controller `controllerId`; anything unexpected (not
 * xHCI, a stream endpoint, a TRB that is not a Normal TRB, an endpoint not running) skips
 * that endpoint with the reason. Never throws for an endpoint; throws if the lookup fails.
 * `location` and `gdb` may be started beforehand (in parallel with the freeze: less downtime);
 * a gdb writer given is not closed here.
 */
export async function rewindXhciDequeues(
  qmp: QmpClient,
  opts: {
    controllerId: string;
    deviceId: string;
    endpoints: EndpointInFlight[];
    runDir: string;
    log: Logger;
    location?: Promise<XhciDeviceLocation>;
    gdb?: () => Promise<GdbWriter>;
  },
): Promise<RewindResult> {
  const t0 = performance.now();
  const res: RewindResult = { patched: [], unchanged: [], skipped: [], tookMs: 0 };
  if (!opts.endpoints.length) return res;
  const { slot, devCtx, ctxSize } = await (opts.location ?? locateXhciDevice(qmp, opts.controllerId, opts.deviceId));
  const reads = await Promise.all(
    opts.endpoints.map(async (ep) => {
      const dci = endpointDci(ep.endpoint);
      const ctxAddr = devCtx + BigInt(ctxSize * dci);
      const okId = ep.oldestId !== 0n && (ep.oldestId & 0xfn) === 0n;
      const [ctx, trb] = await Promise.all([readPhys(qmp, ctxAddr, 4), okId ? readPhys(qmp, ep.oldestId, 4) : Promise.resolve(undefined)]);
      return { ep, ctxAddr, ctx, trb };
    }),
  );
  const writes: { addr: bigint; bytes: Uint8Array }[] = [];
  for (const { ep, ctxAddr, ctx, trb } of reads) {
    const [d0, d1, d2, d3] = ctx;
    const state = d0! & 0x7;
    const type = (d1! >> 3) & 0x7;
    const control = (ep.endpoint & 0x0f) === 0;
    const wantType = control ? 4 : ep.endpoint & 0x80 ? 6 : 2;
    const what = control ? 'control' : `bulk ${ep.endpoint & 0x80 ? 'IN' : 'OUT'}`;
    if (state !== 1) {
      res.skipped.push({ endpoint: ep.endpoint, why: `endpoint context state ${state}, not running` });
      continue;
    }
    if (type !== wantType) {
      res.skipped.push({ endpoint: ep.endpoint, why: `endpoint context type ${type}, not ${what}` });
      continue;
    }
    if ((d0! >> 10) & 0x1f) {
      res.skipped.push({ endpoint: ep.endpoint, why: 'endpoint with streams' });
      continue;
    }
    const id = ep.oldestId;
    if (!trb) {
      res.skipped.push({ endpoint: ep.endpoint, why: `packet id 0x${id.toString(16)} is not a TRB address` });
      continue;
    }
    const ctl = trb[3]!;
    const trbType = (ctl >> 10) & 0x3f;
    // A bulk TD starts with a Normal TRB (1), a control TD with a Setup Stage TRB (2).
    const wantTrb = control ? 2 : 1;
    if (trbType !== wantTrb) {
      res.skipped.push({ endpoint: ep.endpoint, why: `TRB at 0x${id.toString(16)} has type ${trbType}, not ${control ? 'Setup Stage' : 'Normal'}` });
      continue;
    }
    const lo = Number(id & 0xfffffff0n) | (ctl & 1);
    const hi = Number(id >> 32n);
    const cur = (BigInt(d3!) << 32n) | BigInt(d2! & ~0xf);
    if (cur === id && (d2! & 1) === (ctl & 1)) {
      res.unchanged.push(ep.endpoint);
      continue;
    }
    writes.push({ addr: ctxAddr + 8n, bytes: le32(lo, hi) });
    res.patched.push({ endpoint: ep.endpoint, slot, ctxAddr, before: [d2!, d3!], after: [lo >>> 0, hi >>> 0] });
  }
  if (writes.length) {
    const own = !opts.gdb;
    const gdb = await (opts.gdb ? opts.gdb() : GdbWriter.open(qmp, opts.runDir));
    try {
      for (const w of writes) await gdb.write(w.addr, w.bytes);
    } finally {
      if (own) await gdb.close();
    }
    const back = await Promise.all(res.patched.map((p) => readPhys(qmp, p.ctxAddr + 8n, 2)));
    res.patched.forEach((p, i) => {
      const [d2, d3] = back[i]!;
      if (d2 !== p.after[0] || d3 !== p.after[1]) throw new Error(`endpoint context at 0x${p.ctxAddr.toString(16)} reads back ${d2}/${d3}`);
    });
  }
  res.tookMs = performance.now() - t0;
  return res;
}
