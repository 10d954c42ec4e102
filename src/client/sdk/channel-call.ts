// One Connect stream as the SDK's RemoteDevice drives it: the narrow call interface the
// UsbHostClient opens, what the stream reports back, and how a stream that ended is judged.
import { Status } from 'nice-grpc';
import type { ChannelLink } from '../../common/seq-channel.js';
import type { ClientFrame, ClientMessage, ServerMessage } from '../../gen/usbroam/v1/usbhost.js';

/** One Connect stream, as a RemoteDevice drives it (see UsbHostClient). */
export interface ChannelCall {
  /** false: the transport is full, wait for `drain`. */
  write(msg: ClientMessage): boolean;
  /** Half-close: no more client messages. */
  end(): void;
  /** Break the stream (as a lost connection would). */
  cancel(): void;
  /** Stop (true) or go on (false) reading server messages: the transport's flow control backs up to the server. */
  setReading(on: boolean): void;
}

/** What a Connect stream reports to its RemoteDevice. */
export interface ChannelCallHandlers {
  message(msg: ServerMessage): void;
  drain(): void;
  /** Called once when the stream is over: without `error` when it ended with OK after its last message. */
  end(error?: { code?: number; message: string }): void;
}

/** Opens a Connect stream; given by UsbHostClient. */
export type StreamOpener = (handlers: ChannelCallHandlers) => ChannelCall;

/** One Connect stream; the device's SeqChannel writes to it once the session is open. */
export class StreamState implements ChannelLink<ClientFrame> {
  call?: ChannelCall;
  ended = false;
  private onDrain?: () => void;

  write(msg: ClientMessage): boolean {
    return this.ended || !this.call ? true : this.call.write(msg);
  }
  onceDrain(cb: () => void): void {
    this.onDrain = cb;
  }
  drained(): void {
    const cb = this.onDrain;
    this.onDrain = undefined;
    cb?.();
  }
}

/** Status codes after which reconnecting cannot help. */
export const FINAL_CODES = new Set([
  Status.NOT_FOUND,
  Status.PERMISSION_DENIED,
  Status.UNAUTHENTICATED,
  Status.INVALID_ARGUMENT,
  Status.FAILED_PRECONDITION,
  Status.RESOURCE_EXHAUSTED,
  Status.ABORTED,
  Status.OUT_OF_RANGE,
]);

export class ChannelClosedError extends Error {
  constructor(
    message: string,
    readonly code?: Status,
  ) {
    super(message);
    this.name = 'ChannelClosedError';
  }
}
