// Helpers for the live-migration destination.
import type { Logger } from '../../common/log.js';
import type { RemoteDevice } from '../sdk/remote-device.js';
import { Attachment } from './attachment.js';
import { connectChardev } from './qemu-attach.js';
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
 * unknown, and the source QEMU, having seen its chardev close, dropped its usbredir parser, so
 * none migrated: the destination QEMU's parser (created in inmigrate with no_hello) knows no
 * peer caps, reads 32-bit ids and ignores a hello. Nothing can be continued, not even a replug
 * spoken on the existing connection. So the replug is done on the chardev itself: close the
 * destination's chardev connection (QEMU unplugs the usb-redir device in the guest and drops
 * that parser), reset the device at the server (its state is clean again; requests the source
 * left there are gone), reconnect to the same chardev (QEMU, running now, creates a fresh parser
 * and sends its hello) and run a fresh attachment with the full handshake.
 */
export async function sourceLostReplug(opts: { device: RemoteDevice; socket: Socket; socketPath: string; log: Logger; id: string }): Promise<Attachment> {
  const old = opts.socket;
  await new Promise<void>((resolve) => {
    if (old.closed) return resolve();
    const t = setTimeout(resolve, 2000);
    old.once('close', () => {
      clearTimeout(t);
      resolve();
    });
    old.destroy();
  });
  try {
    await opts.device.reset();
  } catch (err) {
    opts.log.warn({ attachment: opts.id, err: (err as Error).message }, 'device reset before the replug failed; replugging anyway');
  }
  const socket = await connectChardev(opts.socketPath);
  return new Attachment({ device: opts.device, socket, log: opts.log, id: opts.id });
}
