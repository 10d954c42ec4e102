// Shared definitions for the transport-ceiling benchmark (bench/ceilings/*).
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { ChannelOptions, ServiceDefinition } from '@grpc/grpc-js';

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

/** Identity (de)serializers: messages are raw Buffers, no protobuf cost. */
const id = (b: Buffer): Buffer => b;
const method = (name: string) => ({
  path: `/usbroam.bench.Ceilings/${name}`,
  requestStream: true,
  responseStream: true,
  requestSerialize: id,
  requestDeserialize: id,
  responseSerialize: id,
  responseDeserialize: id,
});

/**
 * All bidi streams of Buffers:
 *  - Up:   client streams messages; server counts bytes; on client half-close the server replies
 *          one 16-byte message (u64 bytes, u64 messages) and ends.
 *  - Down: client sends one 8-byte control message (u32 message size, u32 duration ms); server
 *          streams messages of that size for that long (respecting back-pressure), then ends.
 *          A 12-byte control message adds a u32 count: that many messages, the duration ignored.
 *  - Echo: server writes back every message it receives.
 *  - Ask:  every message starts with a u32 reply size (at most ASK_MAX_REPLY); the server answers
 *          each with one message of that size, in order: a round trip with a payload each way
 *          (bench:e2e's usb-redir floor carried by raw grpc-js, one Ask per URB).
 */
export const CeilingsService = {
  Up: method('Up'),
  Down: method('Down'),
  Echo: method('Echo'),
  Ask: method('Ask'),
} satisfies ServiceDefinition;

/** The largest reply an Ask may request (a URB's data is at most 1 MiB here). */
export const ASK_MAX_REPLY = 4 * 1024 * 1024;

/**
 * grpc-js options used for the ceilings (both sides). Findings (grpc-js 1.14, Node 20, loopback mTLS):
 * - 'grpc-node.flow_control_window' (client only: connection + initial stream receive window the
 *   client advertises): 16 MiB roughly doubles server->client throughput vs the 64 KiB default.
 * - The server's receive window is not configurable in grpc-js 1.14 (Node http2 default 65535 B
 *   per stream), which caps client->server at ~100 MB/s here. 'usbroam-bench.server_flow_control_window'
 *   is NOT a grpc-js option: bench/ceilings/server.ts implements it by wrapping
 *   http2.createSecureServer (settings.initialWindowSize + session.setLocalWindowSize); 16 MiB
 *   roughly doubles client->server throughput. Set it to 0 to measure stock grpc-js.
 * - 'grpc.enable_retries': 0 avoids the retry layer buffering/copying every outgoing message.
 * - 'grpc.enable_channelz': 0 removes per-message channelz bookkeeping.
 * - message size limits only need to exceed the largest message (64 KiB here; default 4 MiB).
 */
export const CEILINGS_GRPC_CHANNEL_OPTIONS: ChannelOptions = {
  'grpc-node.flow_control_window': 16 * 1024 * 1024,
  'grpc.enable_retries': 0,
  'grpc.enable_channelz': 0,
  'grpc.max_receive_message_length': 16 * 1024 * 1024,
  'grpc.max_send_message_length': 16 * 1024 * 1024,
  'grpc.ssl_target_name_override': 'localhost',
};

export const CEILINGS_GRPC_SERVER_OPTIONS: ChannelOptions = {
  'usbroam-bench.server_flow_control_window': 16 * 1024 * 1024,
  'grpc.enable_channelz': 0,
  'grpc.max_receive_message_length': 16 * 1024 * 1024,
  'grpc.max_send_message_length': 16 * 1024 * 1024,
};

export interface CertFiles {
  ca: Buffer;
  cert: Buffer;
  key: Buffer;
}

/** Reads `${dir}/ca.pem` plus `${dir}/${name}.pem` / `${dir}/${name}.key`. */
export function loadCerts(dir: string, name: string): CertFiles {
  return {
    ca: readFileSync(path.join(dir, 'ca.pem')),
    cert: readFileSync(path.join(dir, `${name}.pem`)),
    key: readFileSync(path.join(dir, `${name}.key`)),
  };
}
