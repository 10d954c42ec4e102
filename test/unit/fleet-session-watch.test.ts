// When a change of a device's fleet claim ends the server's session on it.
import { expect } from 'chai';
import { claimEndsSession } from '../../src/fleet/session-watch.js';
import type { ClaimRecord } from '../../src/fleet/keys.js';

const rec = (claimant: string, lease = '1'): ClaimRecord => ({ host: 'h', deviceId: 'd', claimant, token: 't', lease, since: '2026-01-01T00:00:00Z' });

describe('fleet: claimEndsSession', () => {
  it('a claim that names the session\'s identity leaves it running (taken, taken back under a new lease, moved to it)', () => {
    expect(claimEndsSession('a', undefined, rec('a'))).to.equal(undefined);
    expect(claimEndsSession('a', rec('a', '1'), rec('a', '2'))).to.equal(undefined);
    expect(claimEndsSession('b', rec('a'), rec('b'))).to.equal(undefined);
  });
  it('a claim that names another identity ends it, naming the claimant', () => {
    expect(claimEndsSession('a', rec('a'), rec('b'))).to.match(/now names b .*not a/);
    expect(claimEndsSession('a', undefined, rec('b'))).to.match(/now names b/);
  });
  it('a vanished claim ends the session of its claimant only', () => {
    expect(claimEndsSession('a', rec('a'), undefined)).to.match(/vanished/);
    expect(claimEndsSession('b', rec('a'), undefined)).to.equal(undefined);
    expect(claimEndsSession('a', undefined, undefined)).to.equal(undefined);
  });
});
