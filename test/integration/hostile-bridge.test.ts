// Hostile input on the bridge: its control API (random, mutated and oversized requests, 1000
// streams abandoned) and a misbehaving QEMU sending random or mutated usbredir over a real unix
// socket, against a real USB host server with mutual TLS.
import { expect } from 'chai';
import { silentLogger } from '../../src/common/log.js';
import { clientTls } from '../../src/devkit/certs.js';
import { controlApiCase, usbredirCase } from '../../src/devkit/hostile/bridge-cases.js';
import { startInProcessServer, type InProcessServer } from '../helpers/in-process.js';

describe('hostile input: the bridge', function () {
  this.timeout(180_000);
  let srv: InProcessServer;
  const seed = Number(process.env.USBROAM_FUZZ_SEED ?? Date.now() % 1e9);
  before(async () => {
    srv = await startInProcessServer({ limits: { graceMs: 500 } });
  });
  after(async () => {
    await srv.stop();
  });

  it('control API: undecodable requests INVALID_ARGUMENT, none INTERNAL, abandoned streams leave no descriptor', async () => {
    const o = await controlApiCase({ server: { address: srv.address, tls: clientTls('bridge') }, log: silentLogger }, 20, 1000, seed);
    expect(o.violations, `seed ${seed}: ${o.detail}`).to.deep.equal([]);
    expect(o.internal_count).to.equal(0);
    expect(o.undecodable as number).to.be.greaterThan(10);
    expect(o.fd_delta as number, o.detail).to.be.at.most(2);
    expect(o.ok, o.detail).to.equal(true);
  });

  it('a misbehaving QEMU: each attachment closes with a reason or serves; another attachment is not disturbed', async () => {
    const o = await usbredirCase({ server: { address: srv.address, tls: clientTls('bridge') }, log: silentLogger }, 15, 'USBROAM-LOOP-0001', 'USBROAM-ACM-0001', seed);
    expect(o.bystander_answers, `seed ${seed}: ${o.detail}`).to.equal(15);
    expect(o.closed as number, o.detail).to.be.greaterThan(0);
    expect(o.ok, `seed ${seed}: ${o.detail}`).to.equal(true);
    expect(srv.server.sessions.list().filter((s) => s.device.serial === 'USBROAM-LOOP-0001' && s.state !== 'closed')).to.have.length(0);
  });
});
