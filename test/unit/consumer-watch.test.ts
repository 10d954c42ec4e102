// ConsumerWatch (is the client reading?) on mocked clocks, and a Session held at its byte bound:
// no new URB until the client acknowledges, and the session's end when it does not within the grace period.
import { expect } from 'chai';
import { mock } from 'node:test';
import { status as Status } from '@grpc/grpc-js';
import { silentLogger } from '../../src/common/log.js';
import { TransferType, type ClientFrame, type ServerFrame, type ServerMessage } from '../../src/gen/usbroam/v1/usbhost.js';
import { LoopbackDevice, LOOP_BULK_IN } from '../../src/server/backends/emulated/loopback.js';
import { ConsumerWatch } from '../../src/server/sessions/consumer-watch.js';
import { defaultLimits, Session, type SessionStream } from '../../src/server/sessions/session.js';

describe('ConsumerWatch', () => {
  let stalls: { ms: number; blocked: boolean }[];
  let owes: boolean;
  let w: ConsumerWatch;
  beforeEach(() => {
    mock.timers.enable({ apis: ['setTimeout', 'Date'] });
    stalls = [];
    owes = true;
    w = new ConsumerWatch(1000, () => owes, (s) => stalls.push(s));
  });
  afterEach(() => {
    w.reset();
    mock.timers.reset();
  });

  it('reports a stream that does not drain for the limit', () => {
    w.setBlocked(true);
    mock.timers.tick(999);
    expect(stalls).to.deep.equal([]);
    mock.timers.tick(1);
    expect(stalls).to.deep.equal([{ ms: 1000, blocked: true }]);
  });

  it('starts over on a drain, and on an acknowledgement while held', () => {
    w.setBlocked(true);
    mock.timers.tick(900);
    w.setBlocked(false);
    w.setBlocked(true);
    mock.timers.tick(900);
    expect(stalls, 'a drain ended the first spell').to.deep.equal([]);
    w.setBlocked(false);
    w.setHeld(true);
    mock.timers.tick(900);
    w.progress();
    mock.timers.tick(900);
    expect(stalls, 'the ack moved the spell on').to.deep.equal([]);
    mock.timers.tick(100);
    expect(stalls).to.deep.equal([{ ms: 1000, blocked: false }]);
  });

  it('does not blame the client for a hold while it owes nothing (the device is slow)', () => {
    owes = false;
    w.setHeld(true);
    mock.timers.tick(5000);
    expect(stalls).to.deep.equal([]);
    owes = true;
    mock.timers.tick(1000);
    expect(stalls).to.have.length(1);
  });

  it('forgets everything on reset (a new stream)', () => {
    w.setBlocked(true);
    mock.timers.tick(900);
    w.reset();
    mock.timers.tick(5000);
    expect(stalls).to.deep.equal([]);
  });
});

/** A stream whose transport takes `room` messages and then is full until drain() (never, unless called). */
class FillingStream implements SessionStream {
  readonly peer = '127.0.0.1:4242';
  messages = 0;
  ended?: { code: Status; message: string };
  private onDrain?: () => void;
  constructor(private room = Infinity) {}
  write(_m: ServerMessage): boolean {
    return ++this.messages < this.room;
  }
  onceDrain(cb: () => void): void {
    this.onDrain = cb;
  }
  drain(): void {
    this.room = Infinity;
    const cb = this.onDrain;
    this.onDrain = undefined;
    cb?.();
  }
  end(code: Status, message: string): void {
    this.ended = { code, message };
  }
}

const opened = (seq: number): ServerFrame => ({ seq, kind: { $case: 'opened', value: { sessionId: 's', device: undefined, lastClientSeq: 0, resumed: false, standby: false } } });
const bulkIn = (seq: number, length: number): ClientFrame => ({
  seq,
  kind: { $case: 'submit', value: { urbId: seq, endpoint: LOOP_BULK_IN, type: TransferType.TRANSFER_BULK, setup: new Uint8Array(0), data: new Uint8Array(0), length, streamId: 0, flags: 0, isoPackets: [], timeoutMs: 0 } },
});
const ack = (seq: number): ClientFrame => ({ seq: 0, kind: { $case: 'ack', value: { seq } } });

async function heldSession(graceMs: number, room = Infinity) {
  const dev = new LoopbackDevice({ portPath: [9] });
  dev.markOpened();
  await dev.setConfiguration(1);
  const s = new Session('s1', 'tester', dev, { ...defaultLimits, graceMs, maxBufferedBytes: 64 * 1024 }, silentLogger);
  const stream = new FillingStream(room);
  s.attach(stream, 0, opened);
  // 16 KiB bulk INs (pattern mode: they complete at once) until the byte bound holds the next one.
  let seq = 0;
  while (s.hasSlot() && seq < 64) {
    s.handleFrame(bulkIn(++seq, 16 * 1024));
    await new Promise((r) => setImmediate(r));
  }
  return { s, stream, seq };
}

describe('Session byte bound', () => {
  it('holds submits at maxBufferedBytes until the client acknowledges', async () => {
    const { s, stream, seq } = await heldSession(60_000);
    expect(seq, 'URBs taken before the hold').to.equal(4);
    expect(s.journalBytes).to.be.at.least(64 * 1024);
    let resumed = false;
    const slot = s.waitForSlot().then(() => (resumed = true));
    await new Promise((r) => setImmediate(r));
    expect(resumed).to.equal(false);
    s.handleFrame(ack(s.highestServerSeq));
    await slot;
    expect(s.journalBytes).to.equal(0);
    expect(s.state).to.equal('attached');
    await s.close('test', { reset: false });
    expect(stream.ended?.code).to.equal(Status.OK);
  });

  it('ends the session with RESOURCE_EXHAUSTED naming session, device and peer when the client does not acknowledge for the grace period', async () => {
    const { s, stream } = await heldSession(100);
    const closed = new Promise((r) => s.once('closed', r));
    void s.waitForSlot();
    await closed;
    expect(stream.ended?.code).to.equal(Status.RESOURCE_EXHAUSTED);
    expect(stream.ended?.message).to.match(/^session s1 on device \S+: client 127\.0\.0\.1:4242 did not read completions for 0\.\d s .*it does not acknowledge/);
  });

  it('ends the session when its stream does not drain for the grace period, and keeps it when it drains in time', async () => {
    const kept = await heldSession(150, 2);
    await new Promise((r) => setTimeout(r, 50)); // part-way into its 150 ms grace period on purpose: it drains in time
    kept.stream.drain();
    kept.s.handleFrame(ack(kept.s.highestServerSeq));
    const { s, stream } = await heldSession(100, 2);
    await new Promise((r) => s.once('closed', r));
    expect(stream.ended?.code).to.equal(Status.RESOURCE_EXHAUSTED);
    expect(stream.ended?.message).to.match(/did not read completions for 0\.\d s .*its stream does not drain/);
    expect(kept.s.state, 'the session whose stream drained').to.equal('attached');
    await kept.s.close('test', { reset: false });
  });
});
