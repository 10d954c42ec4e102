// V8 garbage-collector setting for processes that move bulk URB data (the server, the bridge).
//
// Every 1 MiB URB allocates a few off-heap buffers (the usbredir packet, the protobuf message,
// grpc-js's framed copy, TLS records). V8 counts that as external memory and starts incremental
// marking of the (small) JS heap every ~64 MiB of it; the marking steps then run interleaved
// with the transfers. With a heap of tens of MiB, one non-incremental mark-compact is cheaper
// than those steps: sequential 1 MiB URBs over the channel got ~15-25% faster at the median and
// the p90 halved (measured with interleaved runs, see the issue notes).
import v8 from 'node:v8';

let applied = false;

/** Switch off incremental marking in this process (idempotent). Call once at startup. */
export function tuneGcForBulkTransfers(): void {
  if (applied || process.env.USBROAM_GC_DEFAULT === '1') return;
  applied = true;
  v8.setFlagsFromString('--no-incremental-marking');
}
