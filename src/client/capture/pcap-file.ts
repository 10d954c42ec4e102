// A capture running in this process into a pcap file: `usbroam demo --capture` and the bridge's
// --capture-dir.
import { createWriteStream } from 'node:fs';
import type { CaptureStarted } from '../../gen/usbroam/v1/usbhost.js';
import { UsbHostClient } from '../sdk/client.js';
import type { ConnectionOptions } from '../sdk/credentials.js';
import { writeCapturePcap, type PcapWriteResult } from './pcap-writer.js';

export interface PcapCapture {
  /** End the capture and close the file. */
  stop(): Promise<PcapWriteResult>;
}

/** Start capturing `target` into `file`; resolves once the server confirms the capture. */
export async function startPcapCapture(opts: { server: ConnectionOptions; target: { sessionId: string } | { deviceId: string }; file: string; snaplen?: number }): Promise<PcapCapture> {
  const client = new UsbHostClient(opts.server);
  const ac = new AbortController();
  const out = createWriteStream(opts.file);
  let started!: (s: CaptureStarted) => void;
  const confirmed = new Promise<CaptureStarted>((resolve) => (started = resolve));
  let result: PcapWriteResult = { events: 0, dropped: 0 };
  let events = 0;
  let dropped = 0;
  const done = writeCapturePcap(client.capture(opts.target, { snaplen: opts.snaplen, signal: ac.signal }), out, {
    onStarted: started,
    onDropped: (_n, total) => (dropped = total),
    onEvent: () => events++,
  }).then(
    (r) => {
      result = r;
    },
    (err: Error) => {
      if (!ac.signal.aborted) throw err;
      result = { events, dropped };
    },
  );
  await Promise.race([confirmed, done.then(() => Promise.reject(new Error('the capture ended before the server confirmed it')))]);
  return {
    stop: async () => {
      ac.abort();
      await done.catch(() => {});
      client.close();
      await new Promise<void>((resolve) => out.end(resolve));
      return result;
    },
  };
}
