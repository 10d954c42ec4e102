// What a session is bounded by, where it writes, and how it refuses a client's frame.
import { status as Status } from '@grpc/grpc-js';
import type { ServerMessage } from '../../gen/usbroam/v1/usbhost.js';

export interface SessionLimits {
  /** Largest OUT payload or IN length of one URB. */
  maxUrbBytes: number;
  /** URBs executing at once; beyond it the session stops reading its stream (flow control). */
  maxInFlight: number;
  /** Unacknowledged server frames, in payload bytes (a backstop: maxBufferedBytes holds them first). */
  maxJournalBytes: number;
  /**
   * Bytes a session holds for its client: server frames it has not acknowledged plus the data of the
   * URBs in flight. At the bound the session takes no new URB from its stream until the client
   * acknowledges (flow control); a client that does not read for graceMs loses the session.
   */
  maxBufferedBytes: number;
  /**
   * How long a session without a stream keeps its claim; also how long a stream may not drain (or
   * its client not acknowledge at the byte bound) before the session ends.
   */
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
  maxBufferedBytes: 32 * 1024 * 1024,
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
