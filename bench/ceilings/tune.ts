// Explores grpc-js options for the ceilings: `npx tsx bench/ceilings/tune.ts [durationMs]`.
// Prints one line per configuration (stderr progress is silenced).
import { measureCeilings } from './client.js';

const durationMs = Number(process.argv[2] ?? 1500);
const MiB = 1024 * 1024;
// TUNE_ONLY=regex selects configurations by name; TUNE_REPS=n repeats the whole list (interleaved).
const configs: { name: string; channel?: Record<string, unknown>; server?: Record<string, unknown> }[] = [
  { name: 'grpc-js defaults', channel: { 'grpc-node.flow_control_window': undefined, 'grpc.enable_retries': 1, 'grpc.enable_channelz': 1 }, server: { 'grpc.enable_channelz': 1, 'usbroam-bench.server_flow_control_window': 0 } },
  { name: 'no flow_control_window', channel: { 'grpc-node.flow_control_window': undefined }, server: { 'usbroam-bench.server_flow_control_window': 0 } },
  { name: 'flow_control_window 1 MiB', channel: { 'grpc-node.flow_control_window': 1 * MiB }, server: { 'usbroam-bench.server_flow_control_window': 0 } },
  { name: 'flow_control_window 4 MiB', channel: { 'grpc-node.flow_control_window': 4 * MiB }, server: { 'usbroam-bench.server_flow_control_window': 0 } },
  { name: 'flow_control_window 16 MiB', server: { 'usbroam-bench.server_flow_control_window': 0 } },
  { name: 'retries enabled', channel: { 'grpc.enable_retries': 1 }, server: { 'usbroam-bench.server_flow_control_window': 0 } },
  { name: '+ server window 1 MiB (http2 patch)', server: { 'usbroam-bench.server_flow_control_window': 1 * MiB } },
  { name: '+ server window 16 MiB (http2 patch, default)' },
];
const only = process.env.TUNE_ONLY ? new RegExp(process.env.TUNE_ONLY) : undefined;
const reps = Number(process.env.TUNE_REPS ?? 1);
for (let rep = 0; rep < reps; rep++)
for (const c of configs) {
  if (only && !only.test(c.name)) continue;
  const channel = Object.fromEntries(Object.entries(c.channel ?? {}).map(([k, v]) => [k, v])) as Record<string, string | number>;
  const r = await measureCeilings({
    durationMs,
    rttCount: 3000,
    // TUNE_BULK_ONLY=1: only the 64 KiB up/down phases.
    skip: process.env.TUNE_BULK_ONLY ? { tls: true, grpcMsgs: true, grpcRtt: true } : { tls: true },
    grpcChannelOptions: channel,
    grpcServerOptions: c.server as Record<string, string | number> | undefined,
    log: () => {},
  });
  console.log(
    `${c.name.padEnd(42)} up ${r.grpc_raw_up_MBps} down ${r.grpc_raw_down_MBps} MB/s; msgs ${r.grpc_msgs_per_s}/s echo ${r.grpc_echo_msgs_per_s}/s; rtt p50 ${r.grpc_rtt_p50_us} p99 ${r.grpc_rtt_p99_us} us`,
  );
}
