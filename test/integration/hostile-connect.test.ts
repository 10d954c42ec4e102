// Hostile input on the URB channel: a model-based fuzzer of the Connect stream against a real
// server over mutual TLS. Every case ends with the status the model expects (never INTERNAL),
// or is served correctly; each run ends with its session closed and the device released.
import { expect } from 'chai';
import fc from 'fast-check';
import { clientTls } from '../../src/devkit/certs.js';
import { connectProperty, newTally } from '../../src/devkit/hostile/connect-model.js';
import { startInProcessServer, type InProcessServer } from '../helpers/in-process.js';

describe('hostile input: Connect stream fuzzer', function () {
  this.timeout(120_000);
  let srv: InProcessServer;
  before(async () => {
    srv = await startInProcessServer({ limits: { maxUrbBytes: 64 * 1024, graceMs: 20_000 } });
  });
  after(async () => {
    await srv.stop();
  });

  it('answers random valid and invalid frame sequences as the model says, never INTERNAL', async () => {
    const tally = newTally();
    const target = { address: srv.address, tls: (id: string) => clientTls(id), owner: 'bridge', other: 'viewer', serial: 'USBROAM-LOOP-0001', maxUrbBytes: 64 * 1024 };
    // A fixed number of runs keeps the suite fast (30: ~4.5 commands a run, so well over 60 in all); a failure prints its seed and path (fc.assert).
    await fc.assert(connectProperty(target, tally, 20), { numRuns: 30, verbose: 1 });
    expect(tally.internal_count).to.equal(0);
    expect(tally.runs).to.be.at.least(30);
    expect(tally.commands).to.be.greaterThan(60);
    // Streams ended with the refusals the model asked for, not only OK.
    expect(Object.keys(tally.statuses)).to.include.members(['INVALID_ARGUMENT']);
    expect(srv.server.sessions.list()).to.have.length(0);
    // Closed sessions leave nothing behind on the device (each held a 'gone' listener).
    const loop = srv.server.registry.list().find((d) => d.serial === 'USBROAM-LOOP-0001')!;
    expect(srv.backend.get(loop.id)!.listenerCount('gone')).to.equal(0);
  });
});
