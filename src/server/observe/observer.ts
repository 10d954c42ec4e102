// The one narrow interface between the server's core (sessions, service, transport) and what
// watches it (metrics, capture, operator logs). The core calls these at a few marked sites;
// everything else (state changes) the watcher reads from the session's own events.
import type { Urb, UrbResult } from '../backends/types.js';
import type { Session } from '../sessions/session.js';

/** Installed on each session as `session.observer`: called on the URB path, so it must be cheap. */
export interface SessionObserver {
  /** `urb` goes to the device (urb.id is the backend's id, unique in the session). */
  urbSubmitted(urb: Urb): void;
  /** The device completed `urb`. */
  urbCompleted(urb: Urb, result: UrbResult): void;
}

/** Why a connection or URB channel was refused (a bounded set: a metric label). */
export type RefusalReason =
  | 'tls_unknown_ca'
  | 'tls_expired'
  | 'tls_no_certificate'
  | 'tls_revoked'
  | 'tls_bad_certificate'
  | 'tls_other'
  | 'unauthenticated'
  | 'permission_denied'
  | 'not_found'
  | 'failed_precondition'
  | 'invalid_argument'
  | 'unavailable'
  | 'other';

export interface ServerObserver {
  /** A session was created (before its first stream attaches). */
  sessionCreated(session: Session): void;
  /** A URB channel open, or a TLS handshake, was refused. */
  refused(reason: RefusalReason, fields: { peer: string; identity?: string; message: string }): void;
}
