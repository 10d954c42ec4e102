// The destination end of a live migration: stand by on the session the source bridge holds,
// with the destination QEMU's chardev connected but not read; at the take-over continue from
// the source's hand-off state, or (the source was lost) replug the device cleanly.
import type { Socket } from 'node:net';
import type { Logger } from '../../../common/log.js';
import type { UsbHostClient } from '../../sdk/client.js';
import type { RemoteDevice } from '../../sdk/remote-device.js';
import { Attachment } from '../attachment.js';
import { connectChardev } from '../qemu-attach.js';

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

export interface Standby {
  device: RemoteDevice;
  /** Give the standby up (idempotent). */
  release(): void;
  /** The attachment (not started) once the session was handed over to this bridge: by a hand-off, or a clean replug after the source was lost. */
  takeOver: Promise<{ attachment: Attachment; origin: 'takeover' | 'replug' }>;
}

/**
 * Connect the destination QEMU's chardev (before its device state loads: QEMU requires it; not
 * read until the take-over) and stand by on the session. `onEnd` runs once when the standby
 * ends (taken over or released). Throws (the socket closed) if the standby cannot be opened.
 */
export async function standBy(opts: { client: UsbHostClient; sessionId: string; socketPath: string; id: string; log: Logger; sessionLog: Logger; onEnd: () => void }): Promise<Standby> {
  const { log, id, socketPath } = opts;
  let socket: Socket | undefined;
  let dev: RemoteDevice;
  try {
    socket = await connectChardev(socketPath);
    socket.pause();
    dev = await opts.client.standbySession(opts.sessionId, { log: opts.sessionLog, maxInFlight: 1 << 30 });
  } catch (err) {
    socket?.destroy();
    throw err;
  }
  const sock = socket;
  let ended = false;
  const end = () => {
    if (ended) return false;
    ended = true;
    opts.onEnd();
    return true;
  };
  const release = () => {
    if (end()) releaseStandby(dev);
  };
  const onSocketGone = () => {
    if (ended) return;
    log.info('destination QEMU closed the chardev before the hand-off; standby released');
    release();
  };
  sock.once('close', onSocketGone);
  const takeOver = (async (): Promise<{ attachment: Attachment; origin: 'takeover' | 'replug' }> => {
    const t = await dev.takeOver!;
    sock.off('close', onSocketGone);
    end();
    if (t.sourceLost || t.state.length === 0) {
      log.warn(
        { lastServerSeq: t.lastServerSeq },
        'the source bridge was lost before handing off: the position in the usbredir streams is unknown and no usbredir parser state migrated; clean replug (closing and reconnecting the chardev, device reset, full usbredir handshake)',
      );
      return { attachment: await sourceLostReplug({ device: dev, socket: sock, socketPath, log, id }), origin: 'replug' };
    }
    return { attachment: Attachment.fromHandOff({ device: dev, socket: sock, log, id, state: t.state }), origin: 'takeover' };
  })();
  return { device: dev, release, takeOver };
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
