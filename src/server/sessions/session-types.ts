// What a session is bounded by, where it writes, and how it refuses a client's frame.
import { status as Status } from '@grpc/grpc-js';
import type { ServerMessage } from '../../gen/usbroam/v1/usbhost.js';

export interface SessionLimits {
  /** Largest OUT payload or IN length of one URB. */
  maxUrbBytes: number;
  /** URBs executing at once; beyond it the session stops reading its stream (flow control). */
  maxInFlight: number;
  /** Unacknowledged server frames, in payload bytes. */
  maxJournalBytes: number;
  /** How long a session without a stream keeps its claim. */
  graceMs: number;
  /** Receiving streams pause (stop resubmitting) while the journal holds more than this. */
  receivingPauseBytes: number;
  /** With a standby waiting, how long a lost stream has to come back before the standby takes over. */
  standbyTakeoverMs: number;
}

export const defaultLimits: SessionLimits = {
  maxUrbBytes: 8 * 1024 * 1024,
  maxInFlight: 512,
  maxJournalBytes: 256 * 1024 * 1024,
  graceMs: 30_000,
  receivingPauseBytes: 8 * 1024 * 1024,
  standbyTakeoverMs: 3000,
};

/** Where a session writes: the attached gRPC stream, seen through a narrow interface. */
export interface SessionStream {
  readonly peer: string;
  /** false: the transport buffer is full; wait for drain. */
  write(msg: ServerMessage): boolean;
  onceDrain(cb: () => void): void;
  /** End the stream: OK, or an error status with a message. */
  end(code: Status, message: string): void;
}

/** A violation of the channel protocol by the client: ends the stream (not the session). */
export class ChannelProtocolError extends Error {
  constructor(
    readonly code: Status,
    message: string,
    readonly clientSeq = 0,
  ) {
    super(message);
    this.name = 'ChannelProtocolError';
  }
}
