// Certificate revocation and SIGHUP reload of the USB host server, in its own process (`usbroam
// serve --config F --crl F`), with certificates and CRLs made by scripts/make-certs.mjs: a revoked
// client is refused at the handshake (and logged); SIGHUP after a revocation ends that client's
// live session with PERMISSION_DENIED while another client's session keeps running URBs; an ACL
// change on SIGHUP; a broken reload keeps the old material and the server serving.
import { expect } from 'chai';
import { copyFileSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Status } from 'nice-grpc';
import { UsbHostClient } from '../../src/client/sdk/client.js';
import type { RemoteDevice } from '../../src/client/sdk/remote-device.js';
import { UrbStatus } from '../../src/gen/usbroam/v1/usbhost.js';
import { certDir, clientTls, revokeCerts, type CertDir } from '../../src/devkit/certs.js';
import { startServerProcess, type ServerProcess } from '../../src/devkit/server-process.js';
import { until } from '../helpers/wait.js';

type Line = Record<string, unknown> & { msg: string };

const lines = (srv: ServerProcess): Line[] =>
  srv.logs.flatMap((l) => {
    try {
      return [JSON.parse(l) as Line];
    } catch {
      return [];
    }
  });

/** The first log line after `from` (an index into the server's log) that matches. */
function logLine(srv: ServerProcess, from: number, what: string, pred: (l: Line) => boolean, timeoutMs = 10_000): Promise<Line> {
  return until(`server log: ${what}`, () => lines(srv).slice(from).find(pred), timeoutMs, 20) as Promise<Line>;
}

/** How a call ended: its gRPC code and message. */
async function refusal(p: Promise<unknown>): Promise<{ code: number; message: string }> {
  try {
    await p;
  } catch (err) {
    const e = err as { code?: number; details?: string; message: string };
    return { code: e.code ?? -1, message: e.details ?? e.message };
  }
  throw new Error('expected a refusal, the call succeeded');
}

/** The error a RemoteDevice closes with. */
function closedWith(dev: RemoteDevice): Promise<Error & { code?: number }> {
  return new Promise((resolve) => dev.once('closed', (err: Error & { code?: number }) => resolve(err)));
}

/** One loopback round: OUT then IN, both must succeed. */
async function roundTrip(dev: RemoteDevice, i: number): Promise<void> {
  const out = await dev.transferOut(1, Buffer.alloc(512, i & 0xff));
  expect(out.status, `OUT ${i}`).to.equal(UrbStatus.URB_STATUS_SUCCESS);
  const inn = await dev.transferIn(1, 512);
  expect(inn.status, `IN ${i}`).to.equal(UrbStatus.URB_STATUS_SUCCESS);
}

describe('certificate revocation and SIGHUP reload (server in its own process)', function () {
  this.timeout(60_000);
  let certs: CertDir;
  let dir: string;
  let configFile: string;
  let crl: string;
  let srv: ServerProcess;
  const clients: UsbHostClient[] = [];
  const client = (identity: string) => {
    const c = new UsbHostClient({ address: srv.address, ...clientTls(identity, 'ca.pem', certs) });
    clients.push(c);
    return c;
  };
  const writeConfig = (acl: Record<string, '*'>) => writeFileSync(configFile, JSON.stringify({ acl }));
  const sighup = () => {
    const from = srv.logs.length;
    srv.child.kill('SIGHUP');
    return from;
  };
  /** SIGHUP, and the log line that says how the reload went. */
  const reload = async (): Promise<Line> => {
    const from = sighup();
    return logLine(srv, from, 'a reload outcome', (l) => l.reload === 'done' || l.reload === 'refused');
  };

  before(async () => {
    certs = certDir(['carol', 'dave', 'erin']);
    crl = revokeCerts(certs, ['carol']); // carol is revoked before the server starts
    dir = mkdtempSync(path.join(os.tmpdir(), 'usbroam-crl-'));
    configFile = path.join(dir, 'server.json');
    writeConfig({ bridge: '*', viewer: '*', carol: '*', dave: '*', erin: '*' });
    srv = await startServerProcess(['--config', configFile, '--crl', crl, '--emulated-count', '5'], { certs });
  });
  afterEach(() => {
    for (const c of clients.splice(0)) c.close();
  });
  after(async () => {
    await srv?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
    if (certs) rmSync(certs.dir, { recursive: true, force: true });
  });

  it('refuses a revoked certificate at the handshake and logs the peer and the reason', async () => {
    const from = srv.logs.length;
    const r = await refusal(client('carol').listDevices(AbortSignal.timeout(10_000)));
    expect(r.code).to.be.oneOf([Status.UNAVAILABLE, Status.UNAUTHENTICATED]);
    const l = await logLine(srv, from, 'the refused handshake', (x) => x.msg === 'connection refused');
    expect(l.reason).to.equal('tls_revoked');
    expect(l.peer).to.match(/^127\.0\.0\.1:\d+$/);
    expect(String(l.err)).to.equal('TLS handshake refused: client certificate refused: CERT_REVOKED');
    // Another certificate of the same CA is not affected.
    expect(await client('bridge').listDevices()).to.have.length.greaterThan(0);
  });

  it('SIGHUP after revoking a client ends its live session with PERMISSION_DENIED; another session keeps running URBs', async () => {
    const keeper = await client('bridge').openDevice({ id: 'emu-2-1' });
    await keeper.selectConfiguration(1);
    const doomed = await client('viewer').openDevice({ id: 'emu-2-2' });
    await doomed.selectConfiguration(1);
    await roundTrip(doomed, 0);
    // URBs run on the keeper's session across the whole reload.
    let running = true;
    let rounds = 0;
    const traffic = (async () => {
      while (running) await roundTrip(keeper, rounds++);
    })();
    const ended = closedWith(doomed);
    revokeCerts(certs, ['viewer']);
    const outcome = await reload();
    expect(outcome.reload, JSON.stringify(outcome)).to.equal('done');
    expect(outcome).to.include({ sessionsEnded: 1, connectionsClosed: 1, revoked: 2 });
    const err = await ended;
    expect(err.code).to.equal(Status.PERMISSION_DENIED);
    expect(err.message).to.match(new RegExp(`session ${doomed.sessionId} on device emu-2-2 ended by a configuration reload: the client certificate of "viewer" is no longer accepted: certificate serial [0-9A-F]+ is revoked by the CRL`));
    const logged = lines(srv).find((l) => l.msg === 'session ended by reload');
    expect(logged).to.include({ session: doomed.sessionId, device: 'emu-2-2', identity: 'viewer', reason: 'tls_revoked' });
    // Well after the reload: the keeper's session is the same one and still moves URBs.
    const at = rounds;
    await until('more URBs on the surviving session', () => rounds > at + 20, 20_000, 10);
    running = false;
    await traffic;
    await roundTrip(keeper, -1);
    expect(keeper.reconnects).to.equal(0);
    // New handshakes use the new CRL.
    const r = await refusal(client('viewer').listDevices(AbortSignal.timeout(10_000)));
    expect(r.code).to.be.oneOf([Status.UNAVAILABLE, Status.UNAUTHENTICATED]);
    await keeper.close();
  });

  it('SIGHUP after an ACL change ends the sessions it no longer allows, naming session, device and reason', async () => {
    const keeper = await client('bridge').openDevice({ id: 'emu-2-3' });
    await keeper.selectConfiguration(1);
    const daves = client('dave');
    const doomed = await daves.openDevice({ id: 'emu-2-4' });
    await doomed.selectConfiguration(1);
    const ended = closedWith(doomed);
    writeConfig({ bridge: '*', erin: '*' }); // dave (and viewer) lose every device
    const outcome = await reload();
    expect(outcome).to.include({ reload: 'done', sessionsEnded: 1, connectionsClosed: 0 });
    const err = await ended;
    expect(err.code).to.equal(Status.PERMISSION_DENIED);
    expect(err.message).to.contain(`session ${doomed.sessionId} on device emu-2-4 ended by a configuration reload: the ACL no longer allows identity "dave" on device emu-2-4`);
    await roundTrip(keeper, 1);
    // dave still connects (its certificate is good) but sees nothing and may open nothing.
    expect(await daves.listDevices()).to.deep.equal([]);
    expect((await refusal(daves.openDevice({ id: 'emu-2-4' }))).code).to.equal(Status.PERMISSION_DENIED);
    await keeper.close();
  });

  it('a reload with broken files keeps the previous material and ACL, and the server serving', async () => {
    const keeper = await client('bridge').openDevice({ id: 'emu-2-5' });
    await keeper.selectConfiguration(1);
    const good = path.join(dir, 'crl.good.pem');
    copyFileSync(crl, good);
    try {
      writeFileSync(crl, '-----BEGIN X509 CRL-----\nbm90IGEgQ1JM\n-----END X509 CRL-----\n');
      let outcome = await reload();
      expect(outcome.reload).to.equal('refused');
      expect(outcome.level).to.equal(50);
      expect(String(outcome.err)).to.contain(`CRL ${crl} is not a valid X.509 CRL`);
      // A CRL of another CA would refuse every client: refused too.
      const other = certDir();
      try {
        copyFileSync(revokeCerts(other, ['viewer']), crl);
        outcome = await reload();
        expect(outcome.reload).to.equal('refused');
        expect(String(outcome.err)).to.contain('is not signed by the CA');
      } finally {
        rmSync(other.dir, { recursive: true, force: true });
      }
      copyFileSync(good, crl);
      writeFileSync(configFile, '{ "acl": ');
      outcome = await reload();
      expect(outcome.reload).to.equal('refused');
      expect(String(outcome.err)).to.match(/not valid JSON/);
      // Still serving, with the old material (carol stays revoked) and the old ACL (erin allowed).
      expect(srv.child.exitCode).to.equal(null);
      await roundTrip(keeper, 2);
      expect((await client('erin').listDevices()).length).to.be.greaterThan(0);
      expect((await refusal(client('carol').listDevices(AbortSignal.timeout(10_000)))).code).to.be.oneOf([Status.UNAVAILABLE, Status.UNAUTHENTICATED]);
    } finally {
      copyFileSync(good, crl);
      writeConfig({ bridge: '*', erin: '*' });
    }
    expect((await reload()).reload).to.equal('done');
    await keeper.close();
  });
});
