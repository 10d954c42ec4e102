// UsbHostClient: the typed SDK entry point (nice-grpc over grpc-js).
import { createChannel, createClient, type Channel, type Client } from 'nice-grpc';
import type { Logger } from '../../common/log.js';
import { UsbHostDefinition, type Device, type DeviceEvent, type Session } from '../../gen/usbroam/v1/usbhost.js';
import { channelCredentials, resolveConnection, type ConnectionOptions } from './credentials.js';
import { RemoteDevice, type RemoteDeviceOptions } from './remote-device.js';

export const CLIENT_CHANNEL_OPTIONS = {
  'grpc.max_receive_message_length': 64 * 1024 * 1024,
  'grpc.max_send_message_length': 64 * 1024 * 1024,
  'grpc-node.flow_control_window': 8 * 1024 * 1024,
  'grpc.keepalive_time_ms': 10_000,
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

  constructor(opts: ConnectionOptions & { log?: Logger } = {}) {
    const c = resolveConnection(opts);
    this.address = c.address;
    // nice-grpc appends :80 to a bare unix:/path; unix:// keeps the path intact.
    const target = c.address.startsWith('unix:') ? `unix://${c.address.replace(/^unix:(\/\/)?/, '')}` : `dns:${c.address}`;
    this.channel = createChannel(target, channelCredentials(c), CLIENT_CHANNEL_OPTIONS);
    this.rpc = createClient(UsbHostDefinition, this.channel);
  }

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

  async closeSession(sessionId: string): Promise<void> {
    await this.rpc.closeSession({ sessionId });
  }

  /** Claim a device and open a URB channel to it. */
  openDevice(selector: DeviceSelector, opts: RemoteDeviceOptions = {}): Promise<RemoteDevice> {
    return RemoteDevice.open((req, signal) => this.rpc.connect(req, { signal }), selector, opts);
  }

  /** Take over an existing session at a known position. */
  resumeSession(sessionId: string, lastServerSeq: number, opts: RemoteDeviceOptions = {}): Promise<RemoteDevice> {
    return RemoteDevice.resume((req, signal) => this.rpc.connect(req, { signal }), sessionId, lastServerSeq, opts);
  }

  /** Stand by to take a session over (live migration's destination); see RemoteDevice.standby. */
  standbySession(sessionId: string, opts: RemoteDeviceOptions = {}): Promise<RemoteDevice> {
    return RemoteDevice.standby((req, signal) => this.rpc.connect(req, { signal }), sessionId, opts);
  }

  close(): void {
    this.channel.close();
  }
}
