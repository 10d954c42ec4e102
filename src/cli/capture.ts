// usbroam capture: a session's or a device's URBs as a pcap file (usbmon format) for Wireshark:
//   usbroam capture --device emu-1-1 -w - | wireshark -k -i -
import { Command } from 'commander';
import { createWriteStream } from 'node:fs';
import type { Writable } from 'node:stream';
import { writeCapturePcap } from '../client/capture/pcap-writer.js';
import { clientFrom, reportError, withConnectionFlags, type ConnectionFlags } from './common.js';

interface CaptureFlags extends ConnectionFlags {
  session?: string;
  device?: string;
  write: string;
  snaplen?: string;
  count?: string;
}

const positive = (v: string | undefined, what: string): number | undefined => {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isInteger(n) || n <= 0) throw new Error(`${what} must be a positive integer, not "${v}"`);
  return n;
};

export function captureCommand(): Command {
  return withConnectionFlags(
    new Command('capture')
      .description('capture the URBs of a session or a device as pcap (usbmon, LINKTYPE_USB_LINUX_MMAPPED): admins, or a session\'s owner')
      .option('--session <id>', 'capture this session')
      .option('--device <id>', 'capture this device, whichever session uses it (admins only)')
      .requiredOption('-w, --write <file>', 'pcap file to write; - for stdout (e.g. | wireshark -k -i -)')
      .option('--snaplen <bytes>', 'most data bytes kept per URB event (default 65536, at most 1048576)')
      .option('-c, --count <n>', 'stop after n URB events'),
  ).action(async (f: CaptureFlags) => {
    const ac = new AbortController();
    let out: Writable | undefined;
    const client = clientFrom(f);
    try {
      if (!!f.session === !!f.device) throw new Error('name exactly one of --session ID and --device ID');
      const snaplen = positive(f.snaplen, '--snaplen');
      const count = positive(f.count, '--count');
      out = f.write === '-' ? process.stdout : createWriteStream(f.write);
      const stop = () => ac.abort();
      process.once('SIGINT', stop);
      process.once('SIGTERM', stop);
      const what = f.session ? `session ${f.session}` : `device ${f.device}`;
      const r = await writeCapturePcap(client.capture(f.session ? { sessionId: f.session } : { deviceId: f.device! }, { snaplen, signal: ac.signal }), out, {
        count,
        onStarted: (s) => process.stderr.write(`capturing ${what} (${s.device?.product ?? '?'}, usbmon bus ${s.bus} device ${s.address}) to ${f.write === '-' ? 'stdout' : f.write}\n`),
        onDropped: (n, total) => process.stderr.write(`usbroam: the server dropped ${n} events of this capture (${total} so far): it was not read fast enough\n`),
      }).catch((err: Error & { name?: string }) => {
        if (ac.signal.aborted || err.name === 'AbortError') return undefined;
        throw err;
      });
      if (r) process.stderr.write(`${r.events} URB events${r.dropped ? `, ${r.dropped} dropped` : ''}\n`);
    } catch (err) {
      reportError(err);
    } finally {
      ac.abort();
      client.close();
      if (out && out !== process.stdout) await new Promise<void>((resolve) => out!.end(resolve));
    }
  });
}
