// `usbroam bridge --capture-dir DIR`: a pcap per attachment of the URBs as the bridge sees them
// (its own submit and completion times), in the same usbmon format as `usbroam capture` on the
// server, so that the two ends can be compared. Bounded: while the file lags more than
// MAX_PENDING_BYTES behind, events are dropped and counted (logged when the attachment ends).
import { createWriteStream, mkdirSync, type WriteStream } from 'node:fs';
import path from 'node:path';
import { usbmonFromUrbEvent } from '../../common/capture/urb-events.js';
import { encodeUsbmonRecord, pcapFileHeader, USBMON_HEADER_BYTES, USBMON_ISO_DESC_BYTES } from '../../common/capture/usbmon-pcap.js';
import type { Logger } from '../../common/log.js';
import { TransferType, UrbEvent_Kind, UrbStatus, type UrbComplete, type UrbEvent, type UrbSubmit } from '../../gen/usbroam/v1/usbhost.js';
import type { RemoteDevice } from '../sdk/remote-device.js';
import type { Attachment } from './attachment.js';
import { chainUrbObservers, type AttachmentOrigin, type BridgeObserver } from './bridge-metrics.js';

const SNAPLEN = 65536;
const MAX_ISO_DESCS = 128;
const MAX_PENDING_BYTES = 8 * 1024 * 1024;
const EMPTY = new Uint8Array(0);

export class BridgeCapture implements BridgeObserver {
  constructor(
    readonly dir: string,
    private readonly log: Logger,
  ) {
    mkdirSync(dir, { recursive: true });
  }

  attachmentStarted(att: Attachment, device: RemoteDevice, origin: AttachmentOrigin): void {
    const file = path.join(this.dir, `${att.id}.${device.sessionId.slice(0, 8)}.${origin}.pcap`.replace(/[^A-Za-z0-9_.-]/g, '-'));
    const out = createWriteStream(file);
    out.on('error', (err) => this.log.warn({ attachment: att.id, file, err: err.message }, 'bridge capture file failed'));
    out.write(pcapFileHeader(USBMON_HEADER_BYTES + MAX_ISO_DESCS * USBMON_ISO_DESC_BYTES + SNAPLEN));
    const bus = device.device.bus || 1;
    const rec = new CaptureFile(out, device.sessionId, bus, 2);
    device.urbObserver = chainUrbObservers(device.urbObserver, {
      submitted: (s) => rec.submitted(s),
      completed: (s, c) => rec.completed(s, c),
    });
    this.log.info({ attachment: att.id, session: device.sessionId, file }, 'bridge capture started');
    att.once('closed', () => {
      rec.closed = true;
      out.end();
      this.log.info({ attachment: att.id, file, events: rec.events, dropped: rec.dropped }, 'bridge capture ended');
    });
  }
}

class CaptureFile {
  events = 0;
  dropped = 0;
  closed = false;

  constructor(
    private readonly out: WriteStream,
    private readonly sessionId: string,
    private readonly bus: number,
    private readonly address: number,
  ) {}

  submitted(s: UrbSubmit): void {
    const isIn = direction(s) !== 0;
    this.write(s, {
      kind: UrbEvent_Kind.KIND_SUBMIT,
      setup: s.type === TransferType.TRANSFER_CONTROL ? s.setup : EMPTY,
      data: isIn ? EMPTY : s.data,
      length: isIn ? s.length : s.data.length,
      status: UrbStatus.URB_STATUS_SUCCESS,
      isoPackets: s.isoPackets,
    });
  }

  completed(s: UrbSubmit, c: UrbComplete): void {
    this.write(s, { kind: UrbEvent_Kind.KIND_COMPLETE, setup: EMPTY, data: c.data, length: c.actualLength, status: c.status, isoPackets: c.isoPackets });
  }

  private write(s: UrbSubmit, e: Pick<UrbEvent, 'kind' | 'setup' | 'data' | 'length' | 'status' | 'isoPackets'>): void {
    if (this.closed) return;
    if (this.out.writableLength > MAX_PENDING_BYTES) {
      this.dropped++;
      return;
    }
    const ev: UrbEvent = {
      ...e,
      data: e.data.subarray(0, SNAPLEN),
      isoPackets: e.isoPackets.slice(0, MAX_ISO_DESCS),
      sessionId: this.sessionId,
      urbTag: s.urbId,
      endpoint: s.type === TransferType.TRANSFER_CONTROL ? direction(s) : s.endpoint,
      type: s.type,
      flags: s.flags,
      interval: 0,
      timestampUs: Math.round((performance.timeOrigin + performance.now()) * 1000),
    };
    this.events++;
    this.out.write(encodeUsbmonRecord(usbmonFromUrbEvent(ev, this.bus, this.address)));
  }
}

/** 0x80 for IN, 0 for OUT (control: the setup packet's direction). */
function direction(s: UrbSubmit): number {
  if (s.type === TransferType.TRANSFER_CONTROL && s.setup.length === 8) return s.setup[0] & 0x80;
  return s.endpoint & 0x80;
}
