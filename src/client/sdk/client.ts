// UsbHostClient: the typed SDK entry point (nice-grpc over grpc-js; the URB
// channel drives its grpc-js call directly, without async iterables between
// the transport and the device: every hop there is per-URB latency).
import * as grpc from '@grpc/grpc-js';
import { createChannel, createClient, type Channel, type Client } from 'nice-grpc';
import { BufferPool } from '../../common/encode-buffers.js';
import { encodeClientMessage } from '../../common/frame-codec.js';
import { grpcJsServiceDefinition } from '../../common/grpc-definition.js';
import type { Logger } from '../../common/log.js';
import { UsbHostDefinition, type CaptureEvent, type ClientMessage, type Device, type DeviceEvent, type Session } from '../../gen/usbroam/v1/usbhost.js';
import { channelCredentials, resolveConnection, type ConnectionOptions } from './credentials.js';
import { RemoteDevice, type ChannelCallHandlers, type RemoteDeviceOptions, type StreamOpener } from './remote-device.js';
import { CLAIM_TOKEN_METADATA } from '../../fleet/claim-token.js';

const CONNECT = grpcJsServiceDefinition(UsbHostDefinition).Connect;

// Requests are encoded into pooled buffers (encode-buffers.ts), each given back when grpc-js calls
// the write's callback: by then it has copied the message into its own frame.
const requestBuffers = new BufferPool();
const lent = new WeakMap<ClientMessage, Buffer>();
const serializeRequest = (m: ClientMessage): Buffer => {
  const b = encodeClientMessage(m, requestBuffers);
  lent.set(m, b);
  return b;
};
const giveBack = (m: ClientMessage): void => {
  const b = lent.get(m);
  if (!b) return;
  lent.delete(m);
  requestBuffers.release(b);
};

export const CLIENT_CHANNEL_OPTIONS = {
  'grpc.max_receive_message_length': 64 * 1024 * 1024,
  'grpc.max_send_message_length': 64 * 1024 * 1024,
  'grpc-node.flow_control_window': 8 * 1024 * 1024,
  // The URB channel replays by itself; grpc-js's retry layer would only
  // buffer and account every message. No channelz bookkeeping per message.
  'grpc.enable_retries': 0,
  'grpc.enable_channelz': 0,
  // A ping every 2 s: a connection reset while the socket has a write
  // pending is not noticed by Node's http2 session (it does not read while
  // writing), so only an unanswered ping reveals it; the session's grace
  // period is running meanwhile.
  'grpc.keepalive_time_ms': 2_000,
  'grpc.keepalive_timeout_ms': 5_000,
  'grpc.keepalive_permit_without_calls': 1,
  // Reconnect fast after a network blip: the session's grace period is running.
  'grpc.initial_reconnect_backoff_ms': 100,
  'grpc.max_reconnect_backoff_ms': 1000,
};

export interface DeviceSelector {
  id?: string;
  vidPid?: string;
  serial?: string;
  portPath?: string;
}

export class UsbHostClient {
  readonly channel: Channel;
  readonly rpc: Client<typeof UsbHostDefinition>;
  readonly address: string;
  private readonly raw: grpc.Client;
  private readonly connectMetadata = new grpc.Metadata();

  /** `claimToken`: the fleet claim's token (FleetClaimant.claim), presented at session open. */
  constructor(opts: ConnectionOptions & { log?: Logger; claimToken?: string } = {}) {
    if (opts.claimToken) this.connectMetadata.set(CLAIM_TOKEN_METADATA, opts.claimToken);
    const c = resolveConnection(opts);
    this.address = c.address;
    // nice-grpc appends :80 to a bare unix:/path; unix:// keeps the path intact.
    const target = c.address.startsWith('unix:') ? `unix://${c.address.replace(/^unix:(\/\/)?/, '')}` : `dns:${c.address}`;
    this.channel = createChannel(target, channelCredentials(c), CLIENT_CHANNEL_OPTIONS);
    this.rpc = createClient(UsbHostDefinition, this.channel);
    this.raw = new grpc.Client(target, grpc.credentials.createInsecure(), { channelOverride: this.channel as unknown as grpc.Channel });
  }

  /** Opens one Connect stream for a RemoteDevice. */
  private readonly openStream: StreamOpener = (h: ChannelCallHandlers) => {
    const call = this.raw.makeBidiStreamRequest(CONNECT.path, serializeRequest, CONNECT.responseDeserialize, this.connectMetadata.clone());
    let over = false;
    const end = (error?: { code?: number; message: string }) => {
      if (over) return;
      over = true;
      h.end(error);
    };
    call.on('data', h.message);
    call.on('drain', h.drain);
    call.on('error', (e: grpc.ServiceError) => end({ code: e.code, message: e.details || e.message }));
    call.on('end', () => end()); // after the last message; an error status comes as 'error' first
    return {
      write: (m) => call.write(m, () => giveBack(m)),
      end: () => {
        try {
          call.end();
        } catch {
          /* already over */
        }
      },
      cancel: () => call.cancel(),
      setReading: (on) => (on ? call.resume() : call.pause()),
    };
  };

  async listDevices(signal?: AbortSignal): Promise<Device[]> {
    return (await this.rpc.listDevices({}, { signal })).devices;
  }

  /** A snapshot (PRESENT ... SNAPSHOT_END), then live events, until `signal` aborts. */
  watchDevices(signal?: AbortSignal): AsyncIterable<DeviceEvent> {
    return this.rpc.watchDevices({}, { signal });
  }

  async listSessions(signal?: AbortSignal): Promise<Session[]> {
    return (await this.rpc.listSessions({}, { signal })).sessions;
  }

  /** Live URB events of a session or a device (admins; a session's owner for its session), until `signal` aborts. */
  capture(target: { sessionId: string } | { deviceId: string }, opts: { snaplen?: number; signal?: AbortSignal } = {}): AsyncIterable<CaptureEvent> {
    const t = 'sessionId' in target ? { $case: 'sessionId' as const, value: target.sessionId } : { $case: 'deviceId' as const, value: target.deviceId };
    return this.rpc.capture({ target: t, snaplen: opts.snaplen ?? 0 }, { signal: opts.signal });
  }

  async closeSession(sessionId: string): Promise<void> {
    await this.rpc.closeSession({ sessionId });
  }

  /** Claim a device and open a URB channel to it. */
  openDevice(selector: DeviceSelector, opts: RemoteDeviceOptions = {}): Promise<RemoteDevice> {
    return RemoteDevice.open(this.openStream, selector, opts);
  }

  /** Take over an existing session at a known position. */
  resumeSession(sessionId: string, lastServerSeq: number, opts: RemoteDeviceOptions = {}): Promise<RemoteDevice> {
    return RemoteDevice.resume(this.openStream, sessionId, lastServerSeq, opts);
  }

  /** Stand by to take a session over (live migration's destination); see RemoteDevice.standby. */
  standbySession(sessionId: string, opts: RemoteDeviceOptions = {}): Promise<RemoteDevice> {
    return RemoteDevice.standby(this.openStream, sessionId, opts);
  }

  close(): void {
    this.channel.close();
  }
}
