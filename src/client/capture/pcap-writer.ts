// A Capture RPC stream written as a pcap file (usbmon records, LINKTYPE_USB_LINUX_MMAPPED), for
// Wireshark, tshark and tcpdump.
import { once } from 'node:events';
import type { Writable } from 'node:stream';
import { usbmonFromUrbEvent } from '../../common/capture/urb-events.js';
import { encodeUsbmonRecord, pcapFileHeader, USBMON_HEADER_BYTES, USBMON_ISO_DESC_BYTES } from '../../common/capture/usbmon-pcap.js';
import type { CaptureEvent, CaptureStarted } from '../../gen/usbroam/v1/usbhost.js';

/** Iso descriptors a record may carry: what Linux's usbmon keeps at most. */
const MAX_ISO_DESCS = 128;

export interface PcapWriteOptions {
  /** Stop after this many URB events. */
  count?: number;
  /** Told once the server confirms the capture (device, bus, address). */
  onStarted?: (s: CaptureStarted) => void;
  /** Told each time the server reports events it dropped. */
  onDropped?: (events: number, total: number) => void;
  /** Told after each URB event is written. */
  onEvent?: () => void;
}

export interface PcapWriteResult {
  events: number;
  dropped: number;
}

/** Write `events` to `out` as pcap until the stream ends (or `count` URB events). Does not end `out`. */
export async function writeCapturePcap(events: AsyncIterable<CaptureEvent>, out: Writable, opts: PcapWriteOptions = {}): Promise<PcapWriteResult> {
  let started: CaptureStarted | undefined;
  let n = 0;
  let dropped = 0;
  const write = async (b: Uint8Array) => {
    if (!out.write(b)) await once(out, 'drain');
  };
  for await (const ev of events) {
    const k = ev.kind;
    if (!k) continue;
    if (k.$case === 'started') {
      if (started) continue;
      started = k.value;
      opts.onStarted?.(started);
      await write(pcapFileHeader(USBMON_HEADER_BYTES + MAX_ISO_DESCS * USBMON_ISO_DESC_BYTES + started.snaplen));
    } else if (k.$case === 'dropped') {
      dropped += k.value.events;
      opts.onDropped?.(k.value.events, dropped);
    } else if (k.$case === 'urb') {
      if (!started) throw new Error('the server sent URB events before confirming the capture');
      const e = k.value;
      if (e.isoPackets.length > MAX_ISO_DESCS) e.isoPackets = e.isoPackets.slice(0, MAX_ISO_DESCS);
      await write(encodeUsbmonRecord(usbmonFromUrbEvent(e, started.bus, started.address)));
      opts.onEvent?.();
      if (++n === opts.count) break;
    }
  }
  return { events: n, dropped };
}
