// Frame handling of a session, without gRPC: a fake stream and the emulated
// loopback device.
import { expect } from 'chai';
import { status as Status } from '@grpc/grpc-js';
import { silentLogger } from '../../src/common/log.js';
import { TransferType, type ClientFrame, type ServerFrame, type ServerMessage } from '../../src/gen/usbroam/v1/usbhost.js';
import { LoopbackDevice } from '../../src/server/backends/emulated/loopback.js';
import { ChannelProtocolError, defaultLimits, Session, type SessionStream } from '../../src/server/sessions/session.js';
import { until } from '../helpers/wait.js';

class FakeStream implements SessionStream {
  readonly peer = 'test';
  readonly frames: ServerFrame[] = [];
  ended?: { code: Status; message: string };
  write(m: ServerMessage) {
    this.frames.push(...m.frames);
    return true;
  }
  onceDrain() {}
  end(code: Status, message: string) {
    this.ended = { code, message };
  }
  completes() {
    return this.frames.filter((f) => f.kind?.$case === 'complete');
  }
}

const tick = () => new Promise((r) => setTimeout(r, 20));
/** Waits until `stream` has been sent `n` completions. */
const completions = (stream: FakeStream, n: number) => until(`${n} completions sent`, () => stream.completes().length >= n, 5000, 1);
const opened = (seq: number): ServerFrame => ({ seq, kind: { $case: 'opened', value: { sessionId: 's', device: undefined, lastClientSeq: 0, resumed: false, standby: false } } });
const out = (seq: number, urbId: number, n = 8): ClientFrame => ({
  seq,
  kind: { $case: 'submit', value: { urbId, endpoint: 0x01, type: TransferType.TRANSFER_BULK, setup: new Uint8Array(0), data: new Uint8Array(n).fill(seq), length: 0, streamId: 0, flags: 0, isoPackets: [], timeoutMs: 0 } },
});

async function newSession(limits = {}) {
  const dev = new LoopbackDevice({ portPath: [9] });
  dev.markOpened();
  await dev.setConfiguration(1);
  const s = new Session('s', 'tester', dev, { ...defaultLimits, ...limits }, silentLogger);
  const stream = new FakeStream();
  s.attach(stream, 0, opened);
  return { s, dev, stream };
}

describe('Session frame handling', () => {
  it('executes a replayed (duplicate) frame only once', async () => {
    const { s, dev, stream } = await newSession();
    await s.handleFrame(out(1, 1));
    await s.handleFrame(out(2, 2));
    await s.handleFrame(out(1, 1)); // replay after a reconnect
    await s.handleFrame(out(2, 2));
    await completions(stream, 2);
    await tick(); // proves no third completion (a replay executed again) arrives within 20 ms
    expect(dev.stats.byEndpoint.get(0x01)).to.equal(2);
    expect(stream.completes().map((f) => f.seq)).to.deep.equal([1, 2]);
    expect(s.lastClientSeq).to.equal(2);
    await s.close('test', { reset: false });
  });

  it('refuses a gap, an unknown kind, a second open and an ack beyond what was sent', async () => {
    const { s, stream } = await newSession();
    await s.handleFrame(out(1, 1));
    await completions(stream, 1);
    const refuse = async (f: ClientFrame, re: RegExp) => {
      try {
        await s.handleFrame(f);
      } catch (err) {
        expect(err).to.be.instanceOf(ChannelProtocolError);
        expect((err as ChannelProtocolError).code).to.equal(Status.INVALID_ARGUMENT);
        expect((err as Error).message).to.match(re);
        return;
      }
      throw new Error('accepted a bad frame');
    };
    await refuse(out(3, 3), /seq 3 skips ahead: expected 2/);
    await refuse({ seq: 2, kind: undefined }, /no known kind/);
    await refuse({ seq: 0, kind: { $case: 'open', value: { target: undefined } } }, /already open/);
    await refuse({ seq: 1, kind: { $case: 'ack', value: { seq: 2 } } }, /ack for seq 2, but the highest seq ever sent is 1/);
    await s.close('test', { reset: false });
  });

  it('journals completions while detached and replays them after the position the client names', async () => {
    const { s, stream } = await newSession();
    for (let i = 1; i <= 3; i++) await s.handleFrame(out(i, i));
    await completions(stream, 3);
    s.detach(stream, 'test: stream lost');
    // The client had received only seq 1; more completes while nobody listens.
    expect(s.state).to.equal('detached');
    const again = new FakeStream();
    s.attach(again, 1, opened);
    await completions(again, 2);
    expect(again.frames[0].kind?.$case).to.equal('opened');
    expect(again.completes().map((f) => f.seq)).to.deep.equal([2, 3]);
    await s.close('test', { reset: false });
  });

  it('refuses a resume from behind what the client already acknowledged', async () => {
    const { s, stream } = await newSession();
    for (let i = 1; i <= 3; i++) await s.handleFrame(out(i, i));
    await completions(stream, 3);
    await s.handleFrame({ seq: 3, kind: { $case: 'ack', value: { seq: 3 } } });
    s.detach(stream, 'lost');
    expect(() => s.attach(new FakeStream(), 1, opened)).to.throw(ChannelProtocolError, /already acknowledged 3/);
    await s.close('test', { reset: false });
  });

  it('closes the session with RESOURCE_EXHAUSTED when the client never acknowledges and the journal fills', async () => {
    const { s, stream } = await newSession({ maxJournalBytes: 4096 });
    for (let i = 1; i <= 200 && s.state !== "closed"; i++) await s.handleFrame(out(i, i, 8)); // 32 bytes of journal each
    await until('the session closed', () => s.state === 'closed', 5000, 1);
    expect(stream.ended?.code).to.equal(Status.RESOURCE_EXHAUSTED);
    expect(stream.ended?.message).to.match(/over the limit of 4096/);
  });
});
