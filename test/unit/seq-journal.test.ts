import { expect } from 'chai';
import { InvalidAckError, JournalOverflowError, SeqJournal, SeqReceiver } from '../../src/common/seq-journal.js';

describe('SeqJournal (the session journal)', () => {
  const fill = (j: SeqJournal<{ seq: number; tag: string }>, n: number, bytes = 10) => {
    for (let i = 0; i < n; i++) j.append((seq) => ({ seq, tag: `f${seq}` }), bytes);
  };

  it('numbers frames from 1 without gaps and hands each to the stream once', () => {
    const j = new SeqJournal<{ seq: number; tag: string }>(1e6);
    fill(j, 5);
    expect(j.takeUnsent().map((f) => f.seq)).to.deep.equal([1, 2, 3, 4, 5]);
    expect(j.takeUnsent()).to.deep.equal([]);
    fill(j, 2);
    expect(j.takeUnsent().map((f) => f.seq)).to.deep.equal([6, 7]);
  });

  it('drops acknowledged frames and their bytes', () => {
    const j = new SeqJournal<{ seq: number; tag: string }>(1e6);
    fill(j, 10, 100);
    j.takeUnsent();
    j.ack(4);
    expect(j.length).to.equal(6);
    expect(j.bytes).to.equal(600);
    expect(j.unacked()[0].seq).to.equal(5);
    j.ack(2); // acks never go backwards
    expect(j.length).to.equal(6);
  });

  it('replays from the position a resuming peer names', () => {
    const j = new SeqJournal<{ seq: number; tag: string }>(1e6);
    fill(j, 10);
    j.takeUnsent();
    j.ack(3);
    j.rewindTo(6); // the peer had received up to 6 before the stream broke
    expect(j.takeUnsent().map((f) => f.seq)).to.deep.equal([7, 8, 9, 10]);
    j.rewindTo(6);
    expect(j.takeUnsent(2).map((f) => f.seq)).to.deep.equal([7, 8]);
    expect(j.takeUnsent().map((f) => f.seq)).to.deep.equal([9, 10]);
  });

  it('refuses an ack for a seq never sent', () => {
    const j = new SeqJournal<{ seq: number; tag: string }>(1e6);
    fill(j, 3);
    expect(() => j.ack(4)).to.throw(InvalidAckError, /ack for seq 4, but the highest seq ever sent is 3/);
    expect(() => j.rewindTo(9)).to.throw(InvalidAckError);
    expect(j.length).to.equal(3);
  });

  it('bounds its bytes', () => {
    const j = new SeqJournal<{ seq: number; tag: string }>(1000);
    fill(j, 9, 100);
    expect(() => fill(j, 2, 100)).to.throw(JournalOverflowError, /over the limit of 1000/);
    j.ack(5);
    fill(j, 5, 100);
    expect(j.bytes).to.equal(1000); // 10 left after the overflow, 5 acked, 5 added
  });

  it('respects a byte budget per batch but always makes progress', () => {
    const j = new SeqJournal<{ seq: number; tag: string }>(1e9);
    fill(j, 4, 600);
    expect(j.takeUnsent(100, 1000).map((f) => f.seq)).to.deep.equal([1]);
    expect(j.takeUnsent(100, 1300).map((f) => f.seq)).to.deep.equal([2, 3]);
    fill(j, 1, 5000);
    expect(j.takeUnsent(100, 1000).map((f) => f.seq)).to.deep.equal([4]);
    expect(j.takeUnsent(100, 1000).map((f) => f.seq)).to.deep.equal([5]);
  });

  it('stays consistent across many appends and acks (compaction)', () => {
    const j = new SeqJournal<{ seq: number; tag: string }>(1e9);
    let acked = 0;
    for (let round = 0; round < 50; round++) {
      fill(j, 200, 1);
      const sent = j.takeUnsent();
      expect(sent[0].seq).to.equal(round * 200 + 1);
      acked += 150;
      j.ack(acked);
      expect(j.unacked()[0].seq).to.equal(acked + 1);
    }
    expect(j.length).to.equal(50 * 200 - acked);
  });
});

describe('SeqReceiver', () => {
  it('accepts the next seq, drops duplicates and flags gaps', () => {
    const r = new SeqReceiver();
    expect(r.accept(1)).to.equal('new');
    expect(r.accept(2)).to.equal('new');
    expect(r.accept(2)).to.equal('duplicate');
    expect(r.accept(1)).to.equal('duplicate');
    expect(r.accept(4)).to.equal('gap');
    expect(r.lastSeq).to.equal(2);
    const taken = new SeqReceiver(10);
    expect(taken.accept(10)).to.equal('duplicate');
    expect(taken.accept(11)).to.equal('new');
  });
});
