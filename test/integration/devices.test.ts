// Listing and watching devices, the CLI over them, health, reflection and a
// clean SIGTERM: a server process and clients as a user runs them.
import { expect } from 'chai';
import * as grpc from '@grpc/grpc-js';
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { promisify } from 'node:util';
import { GrpcReflection } from 'grpc-js-reflection-client';
import { UsbHostClient } from '../../src/client/sdk/client.js';
import { DeviceEvent_Kind, type DeviceEvent } from '../../src/gen/usbroam/v1/usbhost.js';
import { clientTls } from '../../src/devkit/certs.js';
import { startServerProcess, type ServerProcess } from '../../src/devkit/server-process.js';
import { withTimeout } from '../helpers/wait.js';

const run = promisify(execFile);

describe('devices, watch, CLI, health and reflection (server in its own process)', function () {
  this.timeout(60_000);
  let srv: ServerProcess;
  before(async () => {
    srv = await startServerProcess(['--allow', 'bridge=*', '--allow', 'viewer=*', '--admin', 'bridge', '--disk-size-mib', '8']);
  });
  after(async () => {
    if (srv.child.exitCode === null) await srv.stop();
  });

  const tls = (id: string) => {
    const t = clientTls(id);
    return ['--server', srv.address, '--ca', t.ca, '--cert', t.cert, '--key', t.key];
  };

  it('lists every exported device with descriptors, strings, port path and claim state', async () => {
    const client = new UsbHostClient({ address: srv.address, ...clientTls('bridge') });
    const devices = await client.listDevices();
    client.close();
    expect(devices.map((d) => d.id)).to.deep.equal(['emu-1-1', 'emu-1-2', 'emu-1-3']);
    const disk = devices[0];
    expect(disk.serial).to.equal('USBROAM-MSC-0001');
    expect(disk.product).to.not.equal('');
    expect(disk.portPath).to.deep.equal([1]);
    expect(disk.configurations[0].interfaces[0]).to.include({ interfaceClass: 8, interfaceSubclass: 6, interfaceProtocol: 0x50 });
    expect(disk.configurations[0].endpoints.map((e) => e.address).sort((a, b) => a - b)).to.deep.equal([0x02, 0x81]);
    expect(disk.claim).to.deep.include({ claimed: false });
  });

  it('watches: a snapshot, then claimed and released events', async () => {
    const watcher = new UsbHostClient({ address: srv.address, ...clientTls('viewer') });
    const abort = new AbortController();
    const events: DeviceEvent[] = [];
    let snapshotDone!: () => void;
    const snapshot = new Promise<void>((r) => (snapshotDone = r));
    const watching = (async () => {
      try {
        for await (const ev of watcher.watchDevices(abort.signal)) {
          events.push(ev);
          if (ev.kind === DeviceEvent_Kind.KIND_SNAPSHOT_END) snapshotDone();
          if (ev.kind === DeviceEvent_Kind.KIND_RELEASED) break;
        }
      } catch {
        /* aborted */
      }
    })();
    await snapshot;
    const user = new UsbHostClient({ address: srv.address, ...clientTls('bridge') });
    const dev = await user.openDevice({ id: 'emu-1-2' });
    await dev.close();
    try {
      await withTimeout(watching, 5000, 'the RELEASED event');
    } finally {
      abort.abort();
      user.close();
      watcher.close();
    }
    const kinds = events.map((e) => `${DeviceEvent_Kind[e.kind]}:${e.device?.id ?? ''}`);
    expect(kinds).to.deep.equal([
      'KIND_PRESENT:emu-1-1',
      'KIND_PRESENT:emu-1-2',
      'KIND_PRESENT:emu-1-3',
      'KIND_SNAPSHOT_END:',
      'KIND_CLAIMED:emu-1-2',
      'KIND_RELEASED:emu-1-2',
    ]);
    expect(events[4].device!.claim).to.deep.include({ claimed: true, identity: 'bridge', sessionId: dev.sessionId });
  });

  it('the CLI lists devices (readable and --json) and sessions', async () => {
    const text = await run(process.execPath, ['bin/usbroam.js', 'devices', ...tls('viewer')]);
    expect(text.stdout).to.match(/emu-1-1\s+[0-9a-f]{4}:[0-9a-f]{4}\s+1-1\s+high/);
    expect(text.stdout).to.contain('[serial USBROAM-ACM-0001]  free');
    const json = JSON.parse((await run(process.execPath, ['bin/usbroam.js', 'devices', '--json', ...tls('viewer')])).stdout);
    expect(json.map((d: { serial: string }) => d.serial)).to.deep.equal(['USBROAM-MSC-0001', 'USBROAM-LOOP-0001', 'USBROAM-ACM-0001']);
    const client = new UsbHostClient({ address: srv.address, ...clientTls('viewer') });
    const dev = await client.openDevice({ id: 'emu-1-3' });
    const sessions = JSON.parse((await run(process.execPath, ['bin/usbroam.js', 'sessions', '--json', ...tls('bridge')])).stdout);
    expect(sessions).to.have.length(1);
    expect(sessions[0]).to.include({ id: dev.sessionId, deviceId: 'emu-1-3', identity: 'viewer', state: 'attached' });
    // An admin closes it; the client sees its channel end.
    const closed = new Promise((r) => dev.once('closed', r));
    await run(process.execPath, ['bin/usbroam.js', 'sessions', 'close', dev.sessionId, ...tls('bridge')]);
    await closed;
    client.close();
    // The CLI reports refusals readably, with a non-zero exit.
    const refused = await run(process.execPath, ['bin/usbroam.js', 'devices', ...tls('intruder')]).then(
      () => undefined,
      (e: { code: number; stderr: string }) => e,
    );
    expect(refused?.code).to.equal(1);
    expect(refused?.stderr).to.match(/^usbroam: .*connect/m);
  });

  it('serves grpc.health.v1 and server reflection (v1 and v1alpha) describing UsbHost', async () => {
    const t = clientTls('viewer');
    const creds = grpc.credentials.createSsl(readFileSync(t.ca), readFileSync(t.key), readFileSync(t.cert));
    for (const version of ['v1', 'v1alpha']) {
      const reflection = new GrpcReflection(srv.address, creds, {}, version);
      const services = await reflection.listServices();
      expect(services, version).to.include.members(['usbroam.v1.UsbHost', 'grpc.health.v1.Health']);
      const methods = (await reflection.listMethods('usbroam.v1.UsbHost')).map((m) => m.name);
      expect(methods, version).to.have.members(['ListDevices', 'WatchDevices', 'Connect', 'ListSessions', 'CloseSession', 'Capture']);
    }
    const health = new grpc.Client(srv.address, creds);
    const status = await new Promise<Buffer>((resolve, reject) =>
      // HealthCheckRequest{service: "usbroam.v1.UsbHost"}; reply HealthCheckResponse{status: SERVING (1)}
      health.makeUnaryRequest('/grpc.health.v1.Health/Check', (b: Buffer) => b, (b: Buffer) => b, Buffer.concat([Buffer.from([0x0a, 18]), Buffer.from('usbroam.v1.UsbHost')]), (err, res) => (err ? reject(err) : resolve(res!))),
    );
    expect([...status]).to.deep.equal([0x08, 0x01]);
    health.close();
  });

  it('stops on SIGTERM: ends sessions, releases claims, exits 0', async () => {
    const client = new UsbHostClient({ address: srv.address, ...clientTls('bridge') });
    const dev = await client.openDevice({ id: 'emu-1-2' }, { reconnectWindowMs: 1000 });
    await dev.selectConfiguration(1);
    const closed = new Promise<Error | undefined>((r) => dev.once('closed', r));
    const code = await srv.stop('SIGTERM');
    expect(code).to.equal(0);
    const err = await closed;
    expect(err?.message ?? 'closed').to.match(/shutting down|closed|resume/);
    expect(srv.logs.join('\n')).to.contain('USB host server stopped');
    client.close();
  });
});
