// The USB host server's Prometheus metrics. Per device (a device has at most one session at a
// time, so the device label is as fine as a session label and stays bounded), counted into
// DeviceCells on the URB path and read by prom-client at scrape time (see prom-kit.ts).
import type { Counter, Gauge, Registry } from 'prom-client';
import { collectedCounter, collectedGauge, HistogramCells, LATENCY_BUCKETS, PrecountedHistogram } from '../../common/observe/prom-kit.js';
import type { Session } from '../sessions/session.js';
import type { RefusalReason } from './observer.js';

/** Label values, indexed by our TransferType / UrbStatus numbering. */
export const TYPE_NAMES = ['control', 'isochronous', 'bulk', 'interrupt'] as const;
export const STATUS_NAMES = ['success', 'cancelled', 'inval', 'ioerror', 'stall', 'timeout', 'babble'] as const;
export const SESSION_EVENTS = ['opened', 'lost', 'resumed', 'handed_off', 'expired', 'closed'] as const;
export type SessionEvent = (typeof SESSION_EVENTS)[number];

/** One device's counts; the hot path only writes numbers into it. */
export class DeviceCells {
  /** URBs completed: [type * STATUS_NAMES.length + status]. */
  readonly completed = new Float64Array(TYPE_NAMES.length * STATUS_NAMES.length);
  /** Bytes that reached the host (IN) and the device (OUT). */
  bytesIn = 0;
  bytesOut = 0;
  inFlight = 0;
  /** Service time by transfer type: device submit to completion. */
  readonly service = TYPE_NAMES.map(() => new HistogramCells(LATENCY_BUCKETS));
  readonly sessionEvents = new Float64Array(SESSION_EVENTS.length);

  urbCompleted(type: number, status: number, bytesIn: number, bytesOut: number): void {
    this.inFlight--;
    if (type >= 0 && type < TYPE_NAMES.length && status >= 0 && status < STATUS_NAMES.length) this.completed[type * STATUS_NAMES.length + status]++;
    this.bytesIn += bytesIn;
    this.bytesOut += bytesOut;
  }
}

/** Bound on the devices the metrics keep series for (libusb hot-plug could add new ids forever). */
const MAX_DEVICES = 1024;

export class ServerMetrics {
  private readonly devices = new Map<string, DeviceCells>();
  private readonly refusals = new Map<RefusalReason, number>();
  private droppedSource?: { droppedTotal: number };

  constructor(
    readonly registry: Registry,
    private readonly sessions: () => Session[],
    private readonly activeCaptures: () => number,
  ) {
    const devices = this.devices;
    const refusals = this.refusals;
    const self = this;
    const counter = (name: string, help: string, labelNames: string[], fill: (c: Counter) => void) => collectedCounter(registry, name, help, labelNames, fill);
    counter('usbroam_urbs_completed_total', 'URBs the device completed, by transfer type and status', ['device', 'type', 'status'], (c) => {
      for (const [device, d] of devices) {
        for (let t = 0; t < TYPE_NAMES.length; t++) {
          for (let s = 0; s < STATUS_NAMES.length; s++) {
            const n = d.completed[t * STATUS_NAMES.length + s];
            if (n) c.inc({ device, type: TYPE_NAMES[t], status: STATUS_NAMES[s] }, n);
          }
        }
      }
    });
    counter('usbroam_urb_bytes_total', 'URB payload bytes moved: in (device to host) and out (host to device)', ['device', 'direction'], (c) => {
      for (const [device, d] of devices) {
        c.inc({ device, direction: 'in' }, d.bytesIn);
        c.inc({ device, direction: 'out' }, d.bytesOut);
      }
    });
    counter('usbroam_session_events_total', 'Session state changes: opened, lost (stream), resumed, handed_off, expired (grace period), closed', ['device', 'event'], (c) => {
      for (const [device, d] of devices) {
        for (let e = 0; e < SESSION_EVENTS.length; e++) if (d.sessionEvents[e]) c.inc({ device, event: SESSION_EVENTS[e] }, d.sessionEvents[e]);
      }
    });
    counter('usbroam_connections_refused_total', 'Connections and URB channels refused, by reason (TLS handshake or channel open)', ['reason'], (c) => {
      for (const [reason, n] of refusals) c.inc({ reason }, n);
    });
    counter('usbroam_capture_events_dropped_total', 'URB capture events dropped because a capture client did not keep up', [], (c) => {
      c.inc(self.droppedSource?.droppedTotal ?? 0);
    });
    const gauge = (name: string, help: string, labelNames: string[], fill: (g: Gauge) => void) => collectedGauge(registry, name, help, labelNames, fill);
    gauge('usbroam_urbs_in_flight', 'URBs submitted to the device and not completed yet', ['device'], (g) => {
      for (const [device, d] of devices) g.set({ device }, d.inFlight);
    });
    gauge('usbroam_sessions', 'Live sessions: attached (a stream is connected) or detached (in the grace period)', ['state'], (g) => {
      let attached = 0;
      let detached = 0;
      for (const s of this.sessions()) {
        if (s.state === 'attached') attached++;
        else if (s.state === 'detached') detached++;
      }
      g.set({ state: 'attached' }, attached);
      g.set({ state: 'detached' }, detached);
    });
    gauge('usbroam_journal_bytes', 'Server frames sent but not acknowledged, by payload bytes, per device session', ['device'], (g) => {
      for (const s of this.sessions()) g.set({ device: s.device.id }, s.journalBytes);
    });
    gauge('usbroam_captures', 'URB captures running', [], (g) => g.set(this.activeCaptures()));
    new PrecountedHistogram(registry, 'usbroam_urb_service_seconds', 'URB service time: from the device submit to its completion, by transfer type', function* () {
      for (const [device, d] of devices) {
        for (let t = 0; t < TYPE_NAMES.length; t++) if (d.service[t].count) yield [{ device, type: TYPE_NAMES[t] }, d.service[t]];
      }
    });
  }

  /** The cells of a device, made on first use (looked up once per session, never per URB). */
  cellsFor(deviceId: string): DeviceCells | undefined {
    let c = this.devices.get(deviceId);
    if (!c && this.devices.size < MAX_DEVICES) {
      c = new DeviceCells();
      this.devices.set(deviceId, c);
    }
    return c;
  }

  /** Read the capture hub's drop count at scrape time. */
  droppedFrom(hub: { droppedTotal: number }): void {
    this.droppedSource = hub;
  }

  refused(reason: RefusalReason): void {
    this.refusals.set(reason, (this.refusals.get(reason) ?? 0) + 1);
  }
}
