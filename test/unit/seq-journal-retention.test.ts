// An acknowledged frame is dropped by the journal at once, not at its next compaction: a session
// under load acknowledges hundreds of completions between compactions, and each holds its payload.
import { expect } from 'chai';
import v8 from 'node:v8';
import vm from 'node:vm';
import { SeqJournal } from '../../src/common/seq-journal.js';

v8.setFlagsFromString('--expose-gc');
const gc = vm.runInNewContext('gc') as () => void;

describe('SeqJournal retention', () => {
  it('lets acknowledged frames and their payloads be collected before the array is compacted', async () => {
    const j = new SeqJournal<{ seq: number; data: Uint8Array }>(1 << 30);
    const refs: WeakRef<Uint8Array>[] = [];
    for (let i = 0; i < 200; i++) {
      const data = new Uint8Array(64 * 1024);
      refs.push(new WeakRef(data));
      j.push({ seq: 0, data }, data.length);
    }
    j.takeUnsent();
    j.ack(150); // fewer than the 1024 acknowledged entries that trigger a compaction
    await new Promise((r) => setImmediate(r)); // WeakRef targets live until the end of the job that made them
    gc();
    const alive = refs.map((r) => r.deref() !== undefined);
    expect(alive.slice(0, 150).filter(Boolean).length, 'acknowledged payloads still reachable').to.equal(0);
    expect(alive.slice(150).every(Boolean), 'unacknowledged payloads kept').to.equal(true);
    expect(j.unacked().map((f) => f.seq)).to.deep.equal(Array.from({ length: 50 }, (_, i) => 151 + i));
  });
});
