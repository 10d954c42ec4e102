// Hostile bytes on every method of the USB host server (a child process, real certificates):
// random and mutated messages, messages past the size limit, and 1000 Connect streams opened
// and abandoned, with the server's descriptors and memory compared before and after.
import { expect } from 'chai';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { clientTls } from '../../src/devkit/certs.js';
import { abandonedStreamsCase, oversizedServerCase, randomBytesCase, type ServerUnderTest } from '../../src/devkit/hostile/server-cases.js';
import { startServerProcess, type ServerProcess } from '../../src/devkit/server-process.js';

const GRACE_MS = 500;

describe('hostile input: bytes on every USB host server method', function () {
  this.timeout(180_000);
  let proc: ServerProcess;
  let srv: ServerUnderTest;
  let dir: string;

  before(async () => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'usbroam-hostile-'));
    proc = await startServerProcess(['--grace-ms', String(GRACE_MS), '--allow', 'bridge=*', '--admin', 'bridge', '--disk-image', path.join(dir, 'disk.img'), '--disk-size-mib', '8']);
    srv = { address: proc.address, pid: proc.child.pid!, logs: proc.logs, tls: (id) => clientTls(id), admin: 'bridge' };
  });
  after(async () => {
    const code = await proc?.stop();
    rmSync(dir, { recursive: true, force: true });
    expect(code, 'the server exits cleanly after the hostile traffic').to.equal(0);
  });

  it('answers random and mutated bytes with INVALID_ARGUMENT (never INTERNAL), logged with identity and peer', async () => {
    const seed = Number(process.env.USBROAM_FUZZ_SEED ?? Date.now() % 1e9);
    const o = await randomBytesCase(srv, 20, 'USBROAM-MSC-0001', seed);
    expect(o.violations, `seed ${seed}: ${o.detail}`).to.deep.equal([]);
    expect(o.internal_count).to.equal(0);
    expect(o.undecodable as number).to.be.greaterThan(20);
    expect(o.logged_refusals).to.equal(o.undecodable);
    if (process.env.USBROAM_FUZZ_SHOW) console.log(JSON.stringify(o));
    expect(o.ok, o.detail).to.equal(true);
  });

  it('refuses messages past the receive limit with RESOURCE_EXHAUSTED and keeps serving', async () => {
    const o = await oversizedServerCase(srv);
    expect(o.statuses).to.deep.equal({ RESOURCE_EXHAUSTED: 2 });
    if (process.env.USBROAM_FUZZ_SHOW) console.log(JSON.stringify(o));
    expect(o.ok, o.detail).to.equal(true);
  });

  it('1000 Connect streams opened and abandoned leave no session, claim or descriptor behind', async () => {
    const o = await abandonedStreamsCase(srv, 1000, 'USBROAM-MSC-0001', GRACE_MS);
    expect(o.sessions_after).to.equal(0);
    expect(o.claims_after).to.equal(0);
    expect(o.fd_delta as number, o.detail).to.be.at.most(4);
    if (process.env.USBROAM_FUZZ_SHOW) console.log(JSON.stringify(o));
    expect(o.ok, o.detail).to.equal(true);
  });
});
