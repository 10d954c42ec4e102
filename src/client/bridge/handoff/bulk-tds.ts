// Which bulk and control TDs QEMU still has in flight at a switchover: requests not answered
// yet, and those answered with bytes QEMU has not read. QEMU's xHCI does not migrate its
// transfers, so the destination must fetch these again (xhci-dequeue.ts points the endpoint
// context at the oldest). Control requests (either direction) are kept under endpoint 0: QEMU
// sends the control TDs of ep0 one at a time (its USB core queues the others, and that queue
// does not migrate either), so the oldest one we know is the one the ring must go back to.
import type { BulkPacket } from '../../../qemu/usbredir/index.js';
import type { InFlight } from '../redir-host.js';

export interface QemuBulkInFlight {
  /** 0: the control endpoint. */
  endpoint: number;
  /** usbredir ids, oldest first. */
  ids: bigint[];
  /** The bulk stream id of each (0: none), beside `ids`. */
  streamIds: number[];
  /** They are the newest on the endpoint (everything older was answered and read). */
  contiguous: boolean;
  /** Some use bulk streams (no rewind possible). */
  streams: boolean;
}

interface Answered {
  id: bigint;
  urbId: number;
  streamId: number;
  /** Our output offset after the answer. */
  end: number;
}

const MAX_PER_ENDPOINT = 4096;

export class BulkAnswers {
  /** Bulk completions written to QEMU, per endpoint, oldest first. Entries surely read by QEMU are dropped. */
  private readonly answered = new Map<number, Answered[]>();
  /** Per endpoint: the highest URB id of the entries dropped from `answered`. */
  private readonly dropped = new Map<number, number>();

  /**
   * A bulk request was answered; `end` is our output offset after the answer and `read` the
   * offset QEMU has surely read up to (output minus what the sent ring keeps).
   */
  note(urbId: number, id: bigint, endpoint: number, end: number, read: number, streamId = 0): void {
    let list = this.answered.get(endpoint);
    if (!list) this.answered.set(endpoint, (list = []));
    list.push({ id, urbId, end, streamId });
    while (list.length && (list[0]!.end <= read || list.length > MAX_PER_ENDPOINT)) {
      const d = list.shift()!;
      this.dropped.set(endpoint, Math.max(this.dropped.get(endpoint) ?? 0, d.urbId));
    }
  }

  /**
   * Per bulk endpoint, the TDs QEMU has in flight when it has read our output up to `consumed`:
   * the answered ones past it and the requests still at the server.
   */
  inFlight(consumed: number, requests: ReadonlyMap<number, InFlight>): QemuBulkInFlight[] {
    const per = new Map<number, { urbId: number; id: bigint; streamId: number }[]>();
    for (const [ep, list] of this.answered) for (const x of list) if (x.end > consumed) (per.get(ep) ?? per.set(ep, []).get(ep)!).push({ urbId: x.urbId, id: x.id, streamId: x.streamId });
    for (const [urbId, e] of requests) {
      if ((e.kind !== 'bulk' && e.kind !== 'control') || e.cancelled) continue;
      const ep = e.kind === 'control' ? 0 : e.endpoint;
      (per.get(ep) ?? per.set(ep, []).get(ep)!).push({ urbId, id: e.id, streamId: e.kind === 'bulk' ? ((e.pkt as BulkPacket).streamId ?? 0) : 0 });
    }
    const out: QemuBulkInFlight[] = [];
    for (const [ep, xs] of per) {
      xs.sort((a, b) => a.urbId - b.urbId);
      const minOut = xs[0]!.urbId;
      let maxRead = this.dropped.get(ep) ?? 0;
      for (const x of this.answered.get(ep) ?? []) if (x.end <= consumed) maxRead = Math.max(maxRead, x.urbId);
      out.push({ endpoint: ep, ids: xs.map((x) => x.id), streamIds: xs.map((x) => x.streamId), contiguous: maxRead < minOut, streams: xs.some((x) => x.streamId !== 0) });
    }
    return out;
  }
}

/** Bulk or control requests of QEMU in flight at the server (a hint that a rewind may be needed). */
export function hasBulkInFlight(requests: ReadonlyMap<number, InFlight>): boolean {
  for (const e of requests.values()) if ((e.kind === 'bulk' || e.kind === 'control') && !e.cancelled) return true;
  return false;
}
