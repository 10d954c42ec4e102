// The state one bridge hands to the next at a live migration, the phase of an attachment's
// hand-off, and what the source learnt. Encoded as JSON (bigints tagged, packet data stripped)
// with the usbredir parser's own share as UsbredirParser.serialize() bytes.
import type { RedirHostSnapshot } from '../redir-host.js';
import type { StreamKick } from './xhci-streams.js';

/**
 * Where an attachment is in a hand-off. Output to QEMU is held (and QEMU's output drained
 * whatever the backpressure) exactly in 'freezing', 'frozen', 'measuring' and 'exported'.
 *
 *   live --freeze()--> freezing --measured--> frozen --handOff()--> exported --confirmed--> handedOff
 *   live --handOff() without a freeze--> measuring --measured--> exported
 *   freezing | frozen --unfreeze() / measurement failed--> live (held output written)
 *   measuring | exported --measurement failed / refused by the server--> live (held output written)
 *   resuming (destination, from the state) --start()--> live
 */
export type HandOffPhase =
  | { readonly kind: 'live' }
  | { readonly kind: 'resuming'; readonly state: HandOffState; readonly unreadOutput: Uint8Array }
  | { readonly kind: 'freezing'; readonly measured: Promise<FrozenPosition> }
  | { readonly kind: 'frozen'; readonly measured: Promise<FrozenPosition>; readonly pos: FrozenPosition }
  | { readonly kind: 'measuring' }
  | { readonly kind: 'exported'; readonly frozen?: FrozenPosition }
  | { readonly kind: 'handedOff' };

/** What a freeze measured: QEMU's position in our output. */
export interface FrozenPosition {
  /** Bytes we wrote to the socket that QEMU has not read. */
  unread: number;
  /** ms spent measuring the socket queues (ss). */
  measureMs: number;
  /** ms from the start of the freeze to the measurement. */
  tookMs: number;
}

/** What the source bridge learnt at a hand-off (for logs, tests and benchmarks). */
export interface HandOffInfo {
  /** Bytes we wrote that QEMU had not read (re-sent by the destination), incl. held ones. */
  toQemuBytes: number;
  /** Of those, bytes written to the socket (the rest were held after the freeze). */
  unreadInSocket: number;
  /** Partial guest->host packet bytes. */
  fromQemuPartial: number;
  inFlight: number;
  stateBytes: number;
  /** ms spent measuring the socket queues (ss). */
  measureMs: number;
  /**
   * The measurement was taken while QEMU was paused before its device state was saved
   * ('pre-switchover', see SourceHandOff.freeze): exact. False: measured after 'completed'
   * (QEMU may have read a last chunk after saving its state).
   */
  frozenBeforeSave: boolean;
  /** ms from freeze() to its measurement (added to the migration downtime). 0 without freeze. */
  freezeBeforeSaveMs: number;
  /** ms from handOff() to the state being sent. */
  freezeMs: number;
  /** ms from handOff() to the server's confirmation. */
  totalMs: number;
}

/** Thrown when the session stays with the source (no standby, or the hand-off failed). */
export class HandOffRefusedError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'HandOffRefusedError';
  }
}

/** Version 2 of the state handed from the source bridge to the destination bridge. */
export interface HandOffState extends RedirHostSnapshot {
  v: 2;
  id: string;
  /** base64 of UsbredirParser.serialize(): caps, the partial guest->host packet, and the host->guest bytes QEMU has not consumed. */
  usbredir: string;
  /** The highest URB id the source used. */
  lastUrbId: number;
  /** base64 of usbroam.v1.Device. */
  device: string;
  positions: { bytesFromQemu: number; bytesToQemu: number; consumedByQemu: number };
  /** xHCI streams the source rewound at pre-switchover: the destination rings their doorbells (xhci-streams.ts). */
  xhciStreamKicks?: StreamKick[];
  /** Per stream endpoint, the guest-physical address of its stream context array (xhci-streams.ts). */
  xhciStreamArrays?: [number, bigint][];
}

/** Bound of the hand-off state (the URB channel's message limit is 64 MiB). */
export const MAX_STATE_BYTES = 48 * 1024 * 1024;

/** Bigints tagged; packet data dropped (checked on the raw value: a Buffer's toJSON runs first). */
function jsonReplacer(this: Record<string, unknown>, k: string, v: unknown): unknown {
  if (typeof v === 'bigint') return { $big: v.toString() };
  if (this[k] instanceof Uint8Array) return undefined;
  return v;
}
function jsonReviver(_k: string, v: unknown): unknown {
  if (v && typeof v === 'object' && '$big' in (v as object) && Object.keys(v as object).length === 1) return BigInt((v as { $big: string }).$big);
  return v;
}

export function encodeHandOffState(st: HandOffState): Uint8Array {
  const bytes = new TextEncoder().encode(JSON.stringify(st, jsonReplacer));
  if (bytes.length > MAX_STATE_BYTES) throw new Error(`hand-off state of ${bytes.length} bytes exceeds ${MAX_STATE_BYTES}`);
  return bytes;
}

/** Parse a hand-off state (throws on a malformed or unknown one). */
export function parseHandOffState(state: Uint8Array): HandOffState {
  if (state.length > MAX_STATE_BYTES) throw new Error(`hand-off state of ${state.length} bytes exceeds ${MAX_STATE_BYTES}`);
  const st = JSON.parse(new TextDecoder().decode(state), jsonReviver) as HandOffState;
  if (!st || st.v !== 2 || typeof st.usbredir !== 'string' || !Array.isArray(st.inFlight) || !Array.isArray(st.streams) || !Array.isArray(st.byRedirId)) {
    throw new Error('unknown hand-off state');
  }
  return st;
}
