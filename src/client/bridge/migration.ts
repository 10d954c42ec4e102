// Helpers for the live-migration destination.
import type { Logger } from '../../common/log.js';
import { Device } from '../../gen/usbroam/v1/usbhost.js';
import { ALL_CAPS, UsbredirParser } from '../../qemu/usbredir/index.js';
import type { RemoteDevice } from '../sdk/remote-device.js';
import { Attachment } from './attachment.js';
import type { Socket } from 'node:net';

/**
 * Drop a standby that will not take over (the migration was cancelled or failed, or the
 * destination QEMU went away): end its stream; the server forgets the standby.
 * The SDK has no public call for this yet (RemoteDevice.close() refuses on a standby), so
 * this ends the stream without the reconnect a lost stream would trigger.
 */
export function releaseStandby(dev: RemoteDevice): void {
  const d = dev as unknown as { closed: boolean; takeOverWaiter?: { reject: (e: Error) => void }; dropStream: () => void };
  d.closed = true;
  d.takeOverWaiter?.reject(new Error('standby released'));
  d.takeOverWaiter = undefined;
  d.dropStream();
}

/**
 * The source bridge was lost before handing off: where QEMU is in either usbredir stream is
 * unknown, so nothing can be continued byte-exactly. The destination tells the guest a clean
 * unplug and replug instead: device_disconnect, then interface_info, ep_info, device_connect
 * (QEMU cancels the requests it had pending at the disconnect). No hello: the destination
 * QEMU expects none.
 */
export function sourceLostReconnect(opts: { device: RemoteDevice; socket: Socket; log: Logger; id: string; peerCaps?: readonly number[] }): Attachment {
  const caps = [...ALL_CAPS];
  const peerCaps = [...(opts.peerCaps ?? ALL_CAPS)];
  const p = new UsbredirParser({ role: 'device', caps, noHello: { peerCaps } });
  const disconnect = Buffer.concat(p.encodeParts({ type: 'device_disconnect', id: 0n }));
  const state = {
    v: 1,
    id: opts.id,
    ourCaps: caps,
    peerCaps,
    toQemu: disconnect.toString('base64'),
    fromQemuPartial: '',
    inFlight: [],
    byRedirId: [],
    streams: [],
    activeConfiguration: 0,
    connectSent: false,
    deviceGone: false,
    state: 'starting',
    lastUrbId: opts.device.peekNextUrbId() - 1,
    device: Buffer.from(Device.encode(opts.device.device).finish()).toString('base64'),
    positions: { bytesFromQemu: 0, bytesToQemu: 0, consumedByQemu: -1 },
  };
  return Attachment.fromHandOff({ device: opts.device, socket: opts.socket, log: opts.log, id: opts.id, state: new TextEncoder().encode(JSON.stringify(state)) });
}
