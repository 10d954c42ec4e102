// The bridge's Prometheus metrics: attachments by state, usbredir packets and bytes each way,
// the URB round trip over the channel, hand-offs with their duration, and replugs. Like the
// server's, the URB path only writes numbers (HistogramCells); prom-client reads at scrape time.
import type { Counter, Registry } from 'prom-client';
import { collectedCounter, collectedGauge, HistogramCells, LATENCY_BUCKETS, PrecountedHistogram } from '../../common/observe/prom-kit.js';
import type { RemoteDevice, RemoteUrbObserver } from '../sdk/remote-device.js';
import type { Attachment, AttachmentStats } from './attachment.js';
import type { Bridge, HandOffEvent } from './bridge.js';

/** How an attachment came to be: attach (control API), takeover (migration destination), replug (source lost). */
export type AttachmentOrigin = 'attach' | 'takeover' | 'replug';

/** The one interface the bridge calls (bridge.observer): each attachment as it starts. */
export interface BridgeObserver {
  attachmentStarted(att: Attachment, device: RemoteDevice, origin: AttachmentOrigin): void;
}

/** Both observers, in order (either may be absent). */
export function chainUrbObservers(a: RemoteUrbObserver | undefined, b: RemoteUrbObserver): RemoteUrbObserver {
  if (!a) return b;
  return {
    submitted: (s) => {
      a.submitted(s);
      b.submitted(s);
    },
    completed: (s, c, t) => {
      a.completed(s, c, t);
      b.completed(s, c, t);
    },
  };
}

/** Several observers behind the bridge's one observer field. */
export function allOf(observers: BridgeObserver[]): BridgeObserver {
  return { attachmentStarted: (att, device, origin) => observers.forEach((o) => o.attachmentStarted(att, device, origin)) };
}

const HANDOFF_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];
const STATS: (keyof AttachmentStats)[] = ['packetsFromQemu', 'packetsToQemu', 'bytesFromQemu', 'bytesToQemu'];

export class BridgeMetrics implements BridgeObserver {
  private readonly live = new Set<Attachment>();
  /** What attachments that ended had counted (so the counters never go back). */
  private readonly retired: Record<string, number> = { packetsFromQemu: 0, packetsToQemu: 0, bytesFromQemu: 0, bytesToQemu: 0 };
  private readonly started = new Map<AttachmentOrigin, number>();
  private readonly handOffs = { ok: 0, failed: 0 };
  private readonly handOffTime = new HistogramCells(HANDOFF_BUCKETS);
  /** URB submit to completion, as the bridge sees it (network + server + device). */
  readonly roundTrip = new HistogramCells(LATENCY_BUCKETS);

  constructor(
    readonly registry: Registry,
    bridge: Bridge,
  ) {
    bridge.on('handOff', (e: HandOffEvent) => {
      if (e.ok) {
        this.handOffs.ok++;
        if (e.info) this.handOffTime.observe(e.info.totalMs / 1000);
      } else this.handOffs.failed++;
    });
    const total = (stat: keyof AttachmentStats) => {
      let n = this.retired[stat];
      for (const a of this.live) n += a.stats[stat];
      return n;
    };
    const self = this;
    const counter = (name: string, help: string, labelNames: string[], fill: (c: Counter) => void) => collectedCounter(registry, name, help, labelNames, fill);
    counter('usbroam_bridge_usbredir_packets_total', 'usbredir packets between QEMU and the bridge: from_qemu (guest requests) and to_qemu (completions, data)', ['direction'], (c) => {
      c.inc({ direction: 'from_qemu' }, total('packetsFromQemu'));
      c.inc({ direction: 'to_qemu' }, total('packetsToQemu'));
    });
    counter('usbroam_bridge_usbredir_bytes_total', 'usbredir bytes between QEMU and the bridge, each way', ['direction'], (c) => {
      c.inc({ direction: 'from_qemu' }, total('bytesFromQemu'));
      c.inc({ direction: 'to_qemu' }, total('bytesToQemu'));
    });
    collectedGauge(registry, 'usbroam_bridge_attachments', 'Attachments by state: starting, connected (to QEMU), disconnecting', ['state'], (g) => {
      const by = { starting: 0, connected: 0, disconnecting: 0 };
      for (const a of self.live) if (a.state in by) by[a.state as keyof typeof by]++;
      for (const [state, n] of Object.entries(by)) g.set({ state }, n);
    });
    counter('usbroam_bridge_attachments_started_total', 'Attachments started: attach (control API), takeover (migration destination), replug (the source was lost: clean replug)', ['origin'], (c) => {
      for (const o of ['attach', 'takeover', 'replug'] as const) c.inc({ origin: o }, self.started.get(o) ?? 0);
    });
    counter('usbroam_bridge_replugs_total', 'Clean replugs in the guest after a migration whose source bridge was lost before handing off', [], (c) => c.inc(self.started.get('replug') ?? 0));
    counter('usbroam_bridge_handoffs_total', 'Session hand-offs to a migration destination, by result', ['result'], (c) => {
      c.inc({ result: 'ok' }, self.handOffs.ok);
      c.inc({ result: 'failed' }, self.handOffs.failed);
    });
    new PrecountedHistogram(registry, 'usbroam_bridge_handoff_seconds', 'Hand-off duration: from the start of the hand-off to the server confirming it', () => [[{}, this.handOffTime]]);
    new PrecountedHistogram(registry, 'usbroam_bridge_channel_round_trip_seconds', 'URB round trip over the URB channel: bridge submit to completion', () => [[{}, this.roundTrip]]);
  }

  attachmentStarted(att: Attachment, device: RemoteDevice, origin: AttachmentOrigin): void {
    this.started.set(origin, (this.started.get(origin) ?? 0) + 1);
    this.live.add(att);
    const rt = this.roundTrip;
    device.urbObserver = chainUrbObservers(device.urbObserver, { submitted: () => {}, completed: (_s, _c, seconds) => rt.observe(seconds) });
    att.once('closed', () => {
      const s = att.stats;
      for (const k of STATS) this.retired[k] += s[k];
      this.live.delete(att);
    });
  }
}
