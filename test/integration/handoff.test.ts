// Handing a session from one stream to a standby (the URB-channel half of a
// live migration): every URB executes once, every completion reaches exactly
// one side, and the standby continues where the source stopped.
import { expect } from 'chai';
import { randomBytes } from 'node:crypto';
import { crc32 } from 'node:zlib';
import { UsbHostClient } from '../../src/client/sdk/client.js';
import type { RemoteDevice } from '../../src/client/sdk/remote-device.js';
import { TransferType, UrbStatus, type UrbComplete } from '../../src/gen/usbroam/v1/usbhost.js';
import type { LoopbackDevice } from '../../src/server/backends/emulated/loopback.js';
import { clientTls } from '../../src/devkit/certs.js';
import { startInProcessServer, type InProcessServer } from '../helpers/in-process.js';
import { until } from '../helpers/wait.js';

describe('session hand-off to a standby', function () {
  this.timeout(30_000);
  let srv: InProcessServer;
  let a: UsbHostClient;
  let b: UsbHostClient;
  beforeEach(async () => {
    srv = await startInProcessServer({ acl: { bridge: '*', viewer: '*' }, limits: { standbyTakeoverMs: 300 } });
    a = new UsbHostClient({ address: srv.address, ...clientTls('bridge') });
    b = new UsbHostClient({ address: srv.address, ...clientTls('viewer') });
  });
  afterEach(async () => {
    a.close();
    b.close();
    await srv.stop();
  });

  async function openLoop(): Promise<RemoteDevice> {
    const dev = await a.openDevice({ serial: 'USBROAM-LOOP-0001' });
    await dev.selectConfiguration(1);
    return dev;
  }

  it('hands over with URBs in flight: each executes once, each completion is delivered once, by one side', async () => {
    const src = await openLoop();
    const loop = srv.backend.get(src.device.id) as LoopbackDevice;
    const dst = await b.standbySession(src.sessionId);
    // The session stays with the source while the standby waits.
    const first = await src.transferOut(1, Buffer.from('before'));
    expect(first.status).to.equal(UrbStatus.URB_STATUS_SUCCESS);

    const chunks = Array.from({ length: 200 }, () => randomBytes(4096)); // within the in-flight window: each gets its id at once
    const srcDone = new Map<number, UrbComplete>();
    const ids: number[] = [];
    for (const data of chunks) {
      ids.push(src.peekNextUrbId());
      src.submit({ endpoint: 0x01, type: TransferType.TRANSFER_BULK, data }).then(
        (c) => srcDone.set(c.urbId, c),
        () => {},
      );
    }
    await until('the first URBs to complete at the source', () => srcDone.size > 0, 10_000, 1); // some complete at the source, some are still in flight
    const state = Buffer.from(JSON.stringify({ inFlight: ids.filter((id) => !srcDone.has(id)), nextUrbId: src.peekNextUrbId() }));
    const handed = await src.handOff(state);
    const took = await dst.takeOver!;
    expect(Buffer.from(took.state).toString()).to.equal(state.toString());
    expect(took.sourceLost).to.equal(false);
    expect(took.lastServerSeq).to.equal(handed.lastServerSeq);

    const { inFlight, nextUrbId } = JSON.parse(Buffer.from(took.state).toString()) as { inFlight: number[]; nextUrbId: number };
    dst.continueUrbIdsAfter(nextUrbId - 1);
    const adopted = await Promise.all(inFlight.map((id) => dst.adopt(id)));
    expect(adopted.every((c) => c.status === UrbStatus.URB_STATUS_SUCCESS)).to.equal(true);
    // Every URB completed on exactly one side.
    const seen = new Set([...srcDone.keys(), ...adopted.map((c) => c.urbId)]);
    expect(ids.every((id) => seen.has(id))).to.equal(true);
    expect(srcDone.size + adopted.length).to.equal(ids.length);

    // The destination carries on; the device saw every byte once, in order.
    const after = await dst.transferOut(1, Buffer.from('after'));
    expect(after.status).to.equal(UrbStatus.URB_STATUS_SUCCESS);
    const all = Buffer.concat([Buffer.from('before'), ...chunks, Buffer.from('after')]);
    expect(loop.counters.bytesOut).to.equal(all.length);
    expect(loop.counters.crc32Out >>> 0).to.equal(crc32(all) >>> 0);
    // The claim moved with the session.
    expect(srv.server.registry.claimOf(loop.id)).to.deep.equal({ identity: 'viewer', sessionId: src.sessionId });
    // The source is done.
    await src.transferOut(1, Buffer.from('x')).then(
      () => expect.fail('the source still submits after its hand-off'),
      (err: Error) => expect(err.message).to.match(/handed off/),
    );
    await dst.close();
  });

  it('keeps the session with the source when no standby waits', async () => {
    const src = await openLoop();
    await src.handOff(new Uint8Array(3)).then(
      () => expect.fail('handed off to nobody'),
      (err: Error) => expect(err.message).to.match(/no standby is waiting/),
    );
    const r = await src.transferOut(1, Buffer.from('still mine'));
    expect(r.status).to.equal(UrbStatus.URB_STATUS_SUCCESS);
    await src.close();
  });

  it('a standby that leaves (a cancelled migration) changes nothing for the source', async () => {
    const src = await openLoop();
    const dst = await b.standbySession(src.sessionId);
    dst.dropStream();
    await dst.close().catch(() => {});
    await until('the standby gone from the source session', () => !srv.server.sessions.get(src.sessionId)!.hasStandby, 5000, 10);
    const r = await src.transferOut(1, Buffer.from('carry on'));
    expect(r.status).to.equal(UrbStatus.URB_STATUS_SUCCESS);
    expect(srv.server.sessions.get(src.sessionId)!.hasStandby).to.equal(false);
    await src.close();
  });

  it('promotes the standby when the source is lost, saying it took over without state', async () => {
    const src = await openLoop();
    await src.transferOut(1, Buffer.from('x'));
    const dst = await b.standbySession(src.sessionId);
    a.close(); // closes the channel but not the stream: cut it the hard way
    src.dropStream();
    (src as unknown as { closed: boolean }).closed = true; // and keep it from resuming: it "died"
    const took = await dst.takeOver!;
    expect(took.sourceLost).to.equal(true);
    expect(took.state.length).to.equal(0);
    const r = await dst.transferOut(1, Buffer.from('y'));
    expect(r.status).to.equal(UrbStatus.URB_STATUS_SUCCESS);
    await dst.close();
  });

  it('refuses a standby for an identity the ACL does not allow on the device', async () => {
    await srv.stop();
    srv = await startInProcessServer({ acl: { bridge: '*', viewer: [{ class: 2 }] } });
    a = new UsbHostClient({ address: srv.address, ...clientTls('bridge') });
    b = new UsbHostClient({ address: srv.address, ...clientTls('viewer') });
    const src = await openLoop();
    await b.standbySession(src.sessionId).then(
      () => expect.fail('standby allowed'),
      (err: Error) => expect(err.message).to.match(/may not take over session/),
    );
    await src.close();
  });
});
