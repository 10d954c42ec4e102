// A client that stops reading its completions but keeps submitting (RemoteDevice.pauseReading):
// the server holds its URBs at the session's byte bound, so its memory stays bounded; after the
// grace period it ends that session with RESOURCE_EXHAUSTED naming session, device and peer, and
// releases the device. Another client's session on another device carries on the whole time.
import { expect } from 'chai';
import { UsbHostClient } from '../../src/client/sdk/client.js';
import { ChannelClosedError, TransferType } from '../../src/client/sdk/remote-device.js';
import { Status } from 'nice-grpc';
import { clientTls } from '../../src/devkit/certs.js';
import { LoopIo, prepareLoop } from '../../src/devkit/loop-io.js';
import { startServerProcess, type ServerProcess } from '../../src/devkit/server-process.js';
import { LOOP_BULK_IN } from '../../src/server/backends/emulated/loopback.js';
import { rssKib, settledRssKib } from '../../bench/soak/support.js';
import { sleep, until } from '../helpers/wait.js';

const GRACE_MS = 3000;
const BUFFER_MIB = 8;
/** 64 KiB bulk INs the paused client submits: 375 MiB of completions, past the 256 MiB journal backstop. */
const URBS = 6000;
const URB_BYTES = 64 * 1024;
/** Server RSS growth allowed while the paused client is held: the byte bound, grpc-js and HTTP/2 buffers, heap slack. */
const RSS_GROWTH_BOUND_KIB = 96 * 1024;

describe('a client that stops reading its completions', function () {
  this.timeout(90_000);
  let server: ServerProcess | undefined;
  const clients: UsbHostClient[] = [];
  const newClient = () => {
    const c = new UsbHostClient({ address: server!.address, ...clientTls('bridge') });
    clients.push(c);
    return c;
  };

  after(async () => {
    for (const c of clients) c.close();
    await server?.stop();
  });

  it('is held at the byte bound, loses its session after the grace period with a clear status, and another session carries on', async () => {
    server = await startServerProcess(['--allow', 'bridge=*', '--disk-size-mib', '8', '--emulated-count', '1', '--grace-ms', String(GRACE_MS), '--session-buffer-mib', String(BUFFER_MIB)]);
    const pid = server.child.pid!;

    // The other session: verified loop I/O on its own device and connection, throughout.
    const other = await newClient().openDevice({ id: 'emu-2-1' });
    await prepareLoop(other);
    const io = new LoopIo(other, { urbBytes: 16 * 1024, window: 4 }).start();
    const verified = () => io.progress.bytesVerified;
    const carriesOn = async (phase: string) => {
      const v = verified();
      await until(`the other session to complete URBs ${phase}`, () => verified() > v, 20_000, 50);
    };
    await carriesOn('before the slow client');

    // The slow client: pattern-mode loopback (bulk IN completes at once), reading paused, submitting.
    const slow = await newClient().openDevice({ id: 'emu-1-2' }, { maxInFlight: URBS });
    await slow.selectConfiguration(1);
    const closed = new Promise<Error>((resolve) => slow.once('closed', (err: Error) => resolve(err)));
    const before = await settledRssKib(pid);
    slow.pauseReading();
    const urbs = Array.from({ length: URBS }, () => slow.submit({ endpoint: LOOP_BULK_IN, type: TransferType.TRANSFER_BULK, length: URB_BYTES }));
    for (const u of urbs) u.catch(() => {});

    let peak = before;
    const sampler = setInterval(() => {
      try {
        peak = Math.max(peak, rssKib(pid));
      } catch {
        /* the server is gone: the assertions below say so */
      }
    }, 50);
    try {
      await sleep(GRACE_MS / 2); // part-way into the grace period on purpose: the other session must carry on while the slow one is held
      await carriesOn('while the slow client is held');
      const stalled = () => server!.logs.some((l) => l.includes('did not read completions') && l.includes(slow.sessionId));
      await until('the server to end the slow session', stalled, GRACE_MS + 20_000, 50);
      await carriesOn('after the slow session ended');
    } finally {
      clearInterval(sampler);
    }
    const growth = peak - before;
    expect(growth, `server RSS grew ${before} -> ${peak} KiB`).to.be.below(RSS_GROWTH_BOUND_KIB);

    // The device is released: another client can claim it.
    const listed = async () => (await clients[0].listSessions()).map((s) => s.id);
    expect(await listed()).to.include(other.sessionId);
    await until('the slow session to be closed', async () => !(await listed()).includes(slow.sessionId), 10_000, 50);
    const again = await newClient().openDevice({ id: 'emu-1-2' });
    await again.close();

    // Reading again, the slow client hears why.
    slow.resumeReading();
    const err = (await closed) as ChannelClosedError;
    expect(err).to.be.instanceOf(ChannelClosedError);
    expect(err.code).to.equal(Status.RESOURCE_EXHAUSTED);
    expect(err.message).to.match(/did not read completions for \d+\.\d s/);
    expect(err.message).to.include(slow.sessionId).and.to.include('emu-1-2').and.to.match(/client 127\.0\.0\.1:\d+/);

    const res = await io.stop();
    expect(res.errors, res.errors.join('; ')).to.deep.equal([]);
    expect(res.bytesLost).to.equal(0);
    await other.close();
  });
});
