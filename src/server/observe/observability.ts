// What watches the server: metrics (when asked for), URB captures and the operator's log of
// session state changes, behind the one ServerObserver interface the core calls.
import type { Logger } from '../../common/log.js';
import { UrbEvent_Kind, type UrbEvent } from '../../gen/usbroam/v1/usbhost.js';
import { TransferType, type Urb, type UrbResult } from '../backends/types.js';
import { pbIsoPackets, pbStatus, transferTypeToProto } from '../convert.js';
import type { Session } from '../sessions/session.js';
import { CaptureHub, type CaptureListener, type CaptureSubscriber } from './capture-hub.js';
import type { DeviceCells, ServerMetrics, SessionEvent } from './metrics.js';
import { SESSION_EVENTS } from './metrics.js';
import type { RefusalReason, ServerObserver, SessionObserver } from './observer.js';

/** Submit times by backend URB id, in a ring: no allocation per URB. */
const SLOTS = 4096;
const EMPTY = new Uint8Array(0);

/** One session's tap: counts its URBs and feeds the captures that watch it. */
export class SessionTap implements SessionObserver, CaptureListener {
  captures: CaptureSubscriber[] | null = null;
  readonly sessionId: string;
  readonly deviceId: string;
  private readonly slotId = new Float64Array(SLOTS).fill(-1);
  private readonly slotT0 = new Float64Array(SLOTS);
  /** This session's share of cells.inFlight; given back when the session ends. */
  private inFlight = 0;
  private retired = false;

  constructor(
    private readonly session: Session,
    private readonly cells: DeviceCells | undefined,
  ) {
    this.sessionId = session.id;
    this.deviceId = session.device.id;
  }

  urbSubmitted(urb: Urb): void {
    const c = this.cells;
    if (c && !this.retired) {
      c.inFlight++;
      this.inFlight++;
      const slot = urb.id & (SLOTS - 1);
      this.slotId[slot] = urb.id;
      this.slotT0[slot] = performance.now();
    }
    if (this.captures) this.capture(urb, undefined);
  }

  urbCompleted(urb: Urb, r: UrbResult): void {
    const c = this.cells;
    if (c && !this.retired) {
      const isIn = urbIsIn(urb);
      this.inFlight--;
      c.urbCompleted(urb.type, r.status, isIn ? r.actualLength : 0, isIn ? 0 : r.actualLength);
      const slot = urb.id & (SLOTS - 1);
      // A URB outlived SLOTS later submits: its slot was reused, so its time is unknown.
      if (this.slotId[slot] === urb.id && urb.type < c.service.length) c.service[urb.type].observe((performance.now() - this.slotT0[slot]) / 1000);
    }
    if (this.captures) this.capture(urb, r);
  }

  /** The session ended: URBs still out (a backend that never completed them) leave the gauge. */
  retire(): void {
    if (this.cells && !this.retired) this.cells.inFlight -= this.inFlight;
    this.retired = true;
    this.inFlight = 0;
  }

  private capture(urb: Urb, r: UrbResult | undefined): void {
    const isIn = urbIsIn(urb);
    const isControl = urb.type === TransferType.Control;
    const ep = isControl ? (isIn ? 0x80 : 0) : urb.endpoint;
    const info = isControl ? undefined : this.session.device.endpoints.find((e) => e.address === urb.endpoint);
    const ev: UrbEvent = {
      kind: r ? UrbEvent_Kind.KIND_COMPLETE : UrbEvent_Kind.KIND_SUBMIT,
      sessionId: this.sessionId,
      urbTag: urb.id,
      endpoint: ep,
      type: transferTypeToProto(urb.type),
      setup: !r && isControl && urb.setup ? urb.setup : EMPTY,
      data: r ? (isIn ? (r.data ?? EMPTY) : EMPTY) : isIn ? EMPTY : (urb.data ?? EMPTY),
      length: r ? r.actualLength : isIn ? urb.length : (urb.data?.length ?? 0),
      status: r ? pbStatus(r.status) : 0,
      isoPackets: r ? pbIsoPackets(r.isoPackets) : pbIsoPackets(urb.isoPackets),
      flags: urb.flags,
      interval: info?.interval ?? 0,
      timestampUs: Math.round((performance.timeOrigin + performance.now()) * 1000),
    };
    for (const s of this.captures!) s.offer(ev);
  }
}

function urbIsIn(urb: Urb): boolean {
  if (urb.type === TransferType.Control && urb.setup && urb.setup.length === 8) return (urb.setup[0] & 0x80) !== 0;
  return (urb.endpoint & 0x80) !== 0;
}

export class ServerObservability implements ServerObserver {
  readonly capture = new CaptureHub();
  metrics?: ServerMetrics;

  constructor(private readonly log: Logger) {}

  sessionCreated(s: Session): void {
    const cells = this.metrics?.cellsFor(s.device.id);
    const tap = new SessionTap(s, cells);
    s.observer = tap;
    this.capture.addListener(tap);
    let lastPeer = '';
    let attachedBefore = false;
    let handedOver = false;
    const event = (e: SessionEvent, extra: Record<string, unknown> = {}) => {
      if (cells) cells.sessionEvents[SESSION_EVENTS.indexOf(e)]++;
      // One line per state change with the same four fields, whatever the change.
      this.log.info({ session: s.id, device: s.device.id, identity: s.identity, peer: lastPeer, sessionEvent: e, ...extra }, `session ${e.replace('_', ' ')}`);
    };
    s.on('attached', () => {
      lastPeer = s.peer;
      if (!attachedBefore) {
        attachedBefore = true;
        return event('opened');
      }
      // A hand-over emits 'handedOver' right after 'attached' (same turn): tell them apart.
      handedOver = false;
      queueMicrotask(() => {
        if (!handedOver) event('resumed');
      });
    });
    s.on('handedOver', () => {
      handedOver = true;
      event('handed_off');
    });
    s.on('detached', () => event('lost', { graceMs: s.limits.graceMs }));
    s.once('closed', (why: string) => {
      this.capture.removeListener(tap);
      tap.retire();
      event(why === 'grace period expired' ? 'expired' : 'closed', { why });
    });
  }

  refused(reason: RefusalReason, fields: { peer: string; identity?: string; message: string }): void {
    this.metrics?.refused(reason);
    this.log.warn({ reason, peer: fields.peer, identity: fields.identity, err: fields.message }, 'connection refused');
  }
}
