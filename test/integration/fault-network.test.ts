// Network faults as an SDK client meets them, with verified I/O running through each
// (bench/soak/sdk-faults.ts, with short figures): a cut shorter than the grace period
// is invisible to the user, a longer one ends the session clearly.
import { expect } from 'chai';
import { cutBeyondGrace, networkCut } from '../../bench/soak/sdk-faults.js';

describe('network faults under verified I/O', function () {
  this.timeout(90_000);

  it('a 1 s cut (grace 3 s): no error, the session carries on, no byte lost', async () => {
    const r = await networkCut({ cutMs: 1000, graceMs: 3000 });
    expect(r.ok, r.detail).to.equal(true);
    expect(r.data_lost).to.equal(0);
  });

  it('a cut that outlasts the client keepalive (8 s, grace 30 s): the session resumes by sequence number, no byte lost', async () => {
    const r = await networkCut({ cutMs: 8000, graceMs: 30_000 });
    expect(r.ok, r.detail).to.equal(true);
    expect(r.resumes, r.detail).to.be.greaterThan(0);
    expect(r.data_lost).to.equal(0);
  });

  it('a cut longer than the grace period (5 s, grace 2 s): the session ends with an error naming it, the server logs why', async () => {
    const r = await cutBeyondGrace({ cutMs: 5000, graceMs: 2000, mode: 'reset' });
    expect(r.ok, r.detail).to.equal(true);
    expect(r.data_lost).to.equal(0);
  });
});
