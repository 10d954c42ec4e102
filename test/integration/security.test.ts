// Who may do what: mutual TLS at the handshake, the ACL per device, the
// exclusive claim, and the grace period. Real certificates throughout.
import { expect } from 'chai';
import { ChannelCredentials } from '@grpc/grpc-js';
import { readFileSync } from 'node:fs';
import { createChannel, createClient, ClientError, Status } from 'nice-grpc';
import { UsbHostClient } from '../../src/client/sdk/client.js';
import { ChannelClosedError } from '../../src/client/sdk/remote-device.js';
import { UsbHostDefinition } from '../../src/gen/usbroam/v1/usbhost.js';
import { UsbHostServer } from '../../src/server/server.js';
import { silentLogger } from '../../src/common/log.js';
import { clientTls, testCerts } from '../../src/devkit/certs.js';
import { startServerProcess, type ServerProcess } from '../../src/devkit/server-process.js';
import { startInProcessServer, type InProcessServer } from '../helpers/in-process.js';
import { TcpProxy } from '../helpers/tcp-proxy.js';
import { until } from '../helpers/wait.js';

async function codeOf(p: Promise<unknown>): Promise<{ code: Status; message: string }> {
  try {
    await p;
  } catch (err) {
    if (err instanceof ClientError) return { code: err.code, message: err.details };
    if (err instanceof ChannelClosedError) return { code: err.code!, message: err.message };
    throw err;
  }
  throw new Error('expected a refusal');
}

describe('security: mutual TLS and the per-device ACL (server in its own process)', function () {
  this.timeout(30_000);
  let srv: ServerProcess;
  before(async () => {
    srv = await startServerProcess(['--allow', 'bridge=*', '--allow', 'viewer=0000:0000']);
  });
  after(async () => {
    await srv.stop();
  });

  it('refuses a client without a certificate at the handshake (UNAVAILABLE)', async () => {
    const c = testCerts();
    const channel = createChannel(`dns:${srv.address}`, ChannelCredentials.createSsl(readFileSync(c.file('ca.pem'))));
    const rpc = createClient(UsbHostDefinition, channel);
    const r = await codeOf(rpc.listDevices({}, { signal: AbortSignal.timeout(10_000) }));
    expect(r.code).to.be.oneOf([Status.UNAVAILABLE, Status.UNAUTHENTICATED]);
    channel.close();
  });

  it('refuses a certificate from another CA at the handshake', async () => {
    const client = new UsbHostClient({ address: srv.address, ...clientTls('intruder') });
    const r = await codeOf(client.listDevices());
    expect(r.code).to.be.oneOf([Status.UNAVAILABLE, Status.UNAUTHENTICATED]);
    client.close();
  });

  it('refuses a plaintext client', async () => {
    const client = new UsbHostClient({ address: srv.address, insecure: true });
    const r = await codeOf(client.listDevices());
    expect(r.code).to.equal(Status.UNAVAILABLE);
    client.close();
  });

  it('shows an identity only the devices its ACL allows, and refuses the rest with PERMISSION_DENIED', async () => {
    const viewer = new UsbHostClient({ address: srv.address, ...clientTls('viewer') });
    const bridge = new UsbHostClient({ address: srv.address, ...clientTls('bridge') });
    expect(await viewer.listDevices()).to.deep.equal([]);
    const all = await bridge.listDevices();
    expect(all.length).to.equal(3);
    const r = await codeOf(viewer.openDevice({ id: all[0].id }));
    expect(r.code).to.equal(Status.PERMISSION_DENIED);
    expect(r.message).to.match(/identity "viewer" may not use device emu-1-1/);
    viewer.close();
    bridge.close();
  });

  it('answers an unknown device with NOT_FOUND and a bad selector with INVALID_ARGUMENT', async () => {
    const bridge = new UsbHostClient({ address: srv.address, ...clientTls('bridge') });
    expect((await codeOf(bridge.openDevice({ serial: 'NOPE' }))).code).to.equal(Status.NOT_FOUND);
    const bad = await codeOf(bridge.openDevice({ vidPid: 'xyz' }));
    expect(bad.code).to.equal(Status.INVALID_ARGUMENT);
    expect(bad.message).to.match(/vid:pid "xyz"/);
    bridge.close();
  });
});

describe('claims and the grace period', function () {
  this.timeout(30_000);
  let srv: InProcessServer;
  beforeEach(async () => {
    srv = await startInProcessServer({ acl: { bridge: '*', viewer: '*' }, limits: { graceMs: 600 } });
  });
  afterEach(() => srv.stop());

  it('refuses a second claim with FAILED_PRECONDITION naming the holder', async () => {
    const a = new UsbHostClient({ address: srv.address, ...clientTls('bridge') });
    const b = new UsbHostClient({ address: srv.address, ...clientTls('viewer') });
    const dev = await a.openDevice({ serial: 'USBROAM-ACM-0001' });
    const r = await codeOf(b.openDevice({ serial: 'USBROAM-ACM-0001' }));
    expect(r.code).to.equal(Status.FAILED_PRECONDITION);
    expect(r.message).to.contain(`claimed by bridge (session ${dev.sessionId})`);
    const listed = (await b.listDevices()).find((d) => d.serial === 'USBROAM-ACM-0001')!;
    expect(listed.claim).to.deep.include({ claimed: true, identity: 'bridge', sessionId: dev.sessionId });
    await dev.close();
    // Released: now the other identity gets it.
    const dev2 = await b.openDevice({ serial: 'USBROAM-ACM-0001' });
    expect(dev2.sessionId).to.not.equal(dev.sessionId);
    await dev2.close();
    a.close();
    b.close();
  });

  it('keeps a lost session for the grace period, then cancels, resets and releases the device', async () => {
    const proxy = new TcpProxy('127.0.0.1', srv.port);
    const a = new UsbHostClient({ address: await proxy.start(), ...clientTls('bridge') });
    const dev = await a.openDevice({ serial: 'USBROAM-ACM-0001' }, { reconnectWindowMs: 5000 });
    await dev.selectConfiguration(1);
    // A read on the echo device stays in flight until something is written.
    const pendingRead = dev.transferIn(1, 64).then(
      () => 'completed',
      (err: Error) => err.message,
    );
    const device = srv.backend.get(dev.device.id)!;
    let resets = 0;
    const origReset = device.reset.bind(device);
    device.reset = async () => {
      resets++;
      return origReset();
    };
    const session = srv.server.sessions.get(dev.sessionId)!;
    void proxy.outage(3000); // the network goes away for longer than the grace period
    await until('the session detached', () => session.state === 'detached', 2000, 10);
    expect(srv.server.registry.claimOf(device.id)?.sessionId).to.equal(dev.sessionId);
    // Closed by the grace period, well before the network comes back.
    await until('the session closed', () => session.state === 'closed', 2500, 10);
    expect(resets).to.equal(1);
    expect((device as unknown as { inFlight(): number }).inFlight()).to.equal(0);
    expect(await pendingRead).to.match(/could not resume|unknown or has expired/);
    expect(srv.server.registry.claimOf(device.id)).to.equal(undefined);
    expect(srv.server.sessions.list()).to.have.length(0);
    await proxy.stop();
    a.close();
    // The session is gone: resuming it is NOT_FOUND.
    const b = new UsbHostClient({ address: srv.address, ...clientTls('bridge') });
    const r = await codeOf(b.resumeSession(dev.sessionId, 0));
    expect(r.code).to.equal(Status.NOT_FOUND);
    b.close();
  });

  it('lets only the owner resume a session', async () => {
    const a = new UsbHostClient({ address: srv.address, ...clientTls('bridge') });
    const dev = await a.openDevice({ serial: 'USBROAM-ACM-0001' });
    const b = new UsbHostClient({ address: srv.address, ...clientTls('viewer') });
    const r = await codeOf(b.resumeSession(dev.sessionId, 0));
    expect(r.code).to.equal(Status.PERMISSION_DENIED);
    await dev.close();
    a.close();
    b.close();
  });
});

describe('--insecure', () => {
  it('is refused on anything but loopback or a unix socket', () => {
    expect(() => new UsbHostServer({ listen: '0.0.0.0:7470', insecure: true, backends: [], acl: {}, log: silentLogger })).to.throw(/only on loopback or a unix socket/);
    expect(() => new UsbHostServer({ listen: '127.0.0.1:0', backends: [], acl: {}, log: silentLogger })).to.throw(/mutual TLS needs/);
  });
});
