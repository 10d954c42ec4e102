// The sequenced channel alone, against a recording link: what goes out, when, in which batches,
// and what a resume replays.
import { expect } from 'chai';
import { FRAME_OVERHEAD, MAX_BYTES_PER_MESSAGE, MAX_FRAMES_PER_MESSAGE, SeqChannel, type ChannelLink } from '../../src/common/seq-channel.js';
import { InvalidAckError, JournalOverflowError } from '../../src/common/seq-journal.js';
import { until } from '../helpers/wait.js';

type Kind = { $case: 'data'; value: { n: number; bytes: number } } | { $case: 'ack'; value: { seq: number } };
interface Frame {
  seq: number;
  kind?: Kind;
}

class RecordingLink implements ChannelLink<Frame> {
  readonly messages: Frame[][] = [];
  /** write() answers false once this many messages were written (flow control). */
  fullAfter = Infinity;
  private drain?: () => void;
  write(msg: { frames: Frame[] }): boolean {
    this.messages.push(msg.frames.slice());
    return this.messages.length < this.fullAfter;
  }
  onceDrain(cb: () => void): void {
    this.drain = cb;
  }
  drained(): void {
    const cb = this.drain;
    this.drain = undefined;
    cb?.();
  }
  get frames(): Frame[] {
    return this.messages.flat();
  }
  dataSeqs(): number[] {
    return this.frames.filter((f) => f.kind?.$case === 'data').map((f) => f.seq);
  }
  acks(): number[] {
    return this.frames.flatMap((f) => (f.kind?.$case === 'ack' ? [f.kind.value.seq] : []));
  }
}

const data = (n: number, bytes = 0): Kind => ({ $case: 'data', value: { n, bytes } });
/** Until every microtask and one setImmediate turn ran (the channel's batching turn). */
const turn = () => new Promise((r) => setImmediate(r));
const ms = (n: number) => new Promise((r) => setTimeout(r, n));
/** Waits until `link` has been sent `n` acks (a delayed ack is due). */
const acks = (link: RecordingLink, n: number) => until(`${n} acks sent`, () => link.acks().length >= n, 1000, 1);

function channel(maxJournalBytes = 1 << 30) {
  const ch = new SeqChannel<Frame>({ maxJournalBytes });
  const link = new RecordingLink();
  return { ch, link };
}

describe('SeqChannel (one end of the sequenced URB channel)', () => {
  it('numbers data frames 1, 2, 3 in place and sends what one turn queued as one message', async () => {
    const { ch, link } = channel();
    ch.attach(link, 0);
    expect([ch.send(data(1), 10), ch.send(data(2), 10), ch.send(data(3), 10)]).to.deep.equal([1, 2, 3]);
    expect(link.messages).to.have.length(0); // nothing synchronously: batched
    await turn();
    expect(link.messages).to.have.length(1);
    expect(link.dataSeqs()).to.deep.equal([1, 2, 3]);
    expect(ch.highestSeq).to.equal(3);
  });

  it('bounds the journal: unacknowledged bytes (payload + frame overhead) beyond the limit throw, acks make room', () => {
    const { ch } = channel(3 * (100 + FRAME_OVERHEAD));
    ch.send(data(1), 100);
    ch.send(data(2), 100);
    ch.send(data(3), 100);
    expect(ch.journalBytes).to.equal(3 * (100 + FRAME_OVERHEAD));
    expect(() => ch.send(data(4), 100)).to.throw(JournalOverflowError, /over the limit of 396/);
    expect(ch.highestSeq).to.equal(3); // the refused frame took no seq
    ch.peerAcked(1);
    expect(ch.send(data(4), 100)).to.equal(4);
  });

  it('refuses an ack, or a resume position, beyond the highest seq ever sent', () => {
    const { ch, link } = channel();
    ch.send(data(1), 0);
    ch.send(data(2), 0);
    expect(() => ch.peerAcked(3)).to.throw(InvalidAckError, /ack for seq 3, but the highest seq ever sent is 2/);
    expect(() => ch.attach(link, 5)).to.throw(InvalidAckError);
    expect(ch.attached).to.equal(false);
    ch.peerAcked(2);
    expect(ch.ackedSeq).to.equal(2);
    expect(ch.unacked()).to.deep.equal([]);
  });

  it('after a lost stream replays exactly what the peer does not have, on the new link', async () => {
    const { ch, link } = channel();
    ch.attach(link, 0);
    for (let i = 1; i <= 5; i++) ch.send(data(i), 8);
    await turn();
    expect(link.dataSeqs()).to.deep.equal([1, 2, 3, 4, 5]);
    ch.peerAcked(2);
    ch.detach(link);
    ch.send(data(6), 8); // queued while no stream is attached
    await turn();
    expect(link.dataSeqs()).to.have.length(5);
    const again = new RecordingLink();
    ch.attach(again, 3); // the peer got up to 3 before the loss
    await turn();
    expect(again.dataSeqs()).to.deep.equal([4, 5, 6]);
    expect(ch.unacked().map((f) => f.seq)).to.deep.equal([4, 5, 6]);
    // detaching another link than the attached one changes nothing
    ch.detach(link);
    expect(ch.attached).to.equal(true);
  });

  it('drops a replayed frame by seq without acknowledging it again, and takes up a position it is given', async () => {
    const { ch, link } = channel();
    ch.attach(link, 0);
    const verdicts = [1, 2, 1, 2, 4].map((seq) => ch.receive(seq));
    expect(verdicts).to.deep.equal(['new', 'new', 'duplicate', 'duplicate', 'gap']);
    ch.send(data(1), 0);
    await turn();
    expect(link.acks()).to.deep.equal([2]); // the position, not the gap
    expect(ch.receive(2)).to.equal('duplicate');
    await ms(30); // proves no new ack goes out within 30 ms (6 x the 5 ms ack delay)
    expect(link.acks()).to.deep.equal([2]); // a duplicate makes no new ack due
    ch.receiveAfter(10);
    expect([ch.receive(10), ch.receive(11)]).to.deep.equal(['duplicate', 'new']);
    await acks(link, 2);
    expect(link.acks()).to.deep.equal([2, 11]);
  });

  it('splits a backlog into messages of at most MAX_FRAMES_PER_MESSAGE frames and about MAX_BYTES_PER_MESSAGE bytes', async () => {
    const { ch, link } = channel();
    ch.attach(link, 0);
    for (let i = 0; i < 2500; i++) ch.send(data(i), 0);
    await turn();
    expect(link.messages.map((m) => m.length)).to.deep.equal([MAX_FRAMES_PER_MESSAGE, MAX_FRAMES_PER_MESSAGE, 2500 - 2 * MAX_FRAMES_PER_MESSAGE]);
    const big = channel();
    big.ch.attach(big.link, 0);
    const size = 100 * 1024;
    for (let i = 0; i < 5; i++) big.ch.send(data(i, size), size);
    big.ch.send(data(9, 2 * MAX_BYTES_PER_MESSAGE), 2 * MAX_BYTES_PER_MESSAGE); // larger than a message: goes alone
    await turn();
    const perMessage = (size + FRAME_OVERHEAD) * 2;
    expect(perMessage).to.be.at.most(MAX_BYTES_PER_MESSAGE);
    expect(big.link.messages.map((m) => m.length)).to.deep.equal([2, 2, 1, 1]);
    expect(big.link.dataSeqs()).to.deep.equal([1, 2, 3, 4, 5, 6]);
  });

  it('flow control: writes nothing more while the link is full, and goes on when it drains', async () => {
    const { ch, link } = channel();
    link.fullAfter = 1;
    ch.attach(link, 0);
    for (let i = 0; i < 1500; i++) ch.send(data(i), 0);
    await turn();
    expect(link.messages).to.have.length(1); // the first message filled the link
    ch.send(data(2000), 0);
    ch.flush();
    await turn();
    expect(link.messages).to.have.length(1);
    link.fullAfter = Infinity;
    link.drained();
    expect(link.dataSeqs()).to.deep.equal(Array.from({ length: 1501 }, (_, i) => i + 1));
    // a drain from a link no longer attached does not write to the new one
    const next = new RecordingLink();
    next.fullAfter = 1;
    ch.attach(next, 1501);
    ch.send(data(3000), 0);
    ch.send(data(3001), 0);
    ch.flush();
    ch.attach(new RecordingLink(), ch.ackedSeq);
    const before = next.messages.length;
    next.drained();
    expect(next.messages.length).to.equal(before);
  });

  it('lets an ack ride with data, sends a bare one after a short delay, and repeats the position on a new link', async () => {
    const { ch, link } = channel();
    ch.attach(link, 0);
    ch.receive(1);
    ch.send(data(1), 0);
    await turn();
    expect(link.messages).to.have.length(1);
    expect(link.messages[0].map((f) => f.kind?.$case)).to.deep.equal(['data', 'ack']);
    expect(link.acks()).to.deep.equal([1]);
    ch.receive(2);
    await turn();
    expect(link.acks()).to.deep.equal([1]); // a lone ack waits for data to ride with...
    await acks(link, 2);
    expect(link.acks()).to.deep.equal([1, 2]); // ...but not for long
    const again = new RecordingLink();
    ch.attach(again, 1);
    await acks(again, 1);
    expect(again.acks()).to.deep.equal([2]);
    expect(again.dataSeqs()).to.deep.equal([]); // the peer already had seq 1
  });

  it('flushAll sends everything and a final ack at once, even on a full link', () => {
    const { ch, link } = channel();
    link.fullAfter = 0;
    ch.attach(link, 0);
    ch.receive(1);
    for (let i = 0; i < 1100; i++) ch.send(data(i), 0);
    ch.flushAll();
    expect(link.dataSeqs()).to.have.length(1100);
    expect(link.acks()).to.deep.equal([1]);
    expect(link.messages).to.have.length(2);
  });
});
