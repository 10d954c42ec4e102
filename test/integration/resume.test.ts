// Kill the stream in the middle of a transfer, resume, and prove that no URB
// was lost or executed twice: the device itself counts executions and keeps
// a CRC of every byte it received, in order.
import { expect } from 'chai';
import { randomBytes } from 'node:crypto';
import { crc32 } from 'node:zlib';
import { UsbHostClient } from '../../src/client/sdk/client.js';
import { TransferType, UrbStatus } from '../../src/gen/usbroam/v1/usbhost.js';
import type { LoopbackDevice } from '../../src/server/backends/emulated/loopback.js';
import { clientTls } from '../../src/devkit/certs.js';
import { startInProcessServer, type InProcessServer } from '../helpers/in-process.js';
import { TcpProxy } from '../helpers/tcp-proxy.js';

describe('URB channel resume after a lost stream', function () {
  this.timeout(60_000);
  let srv: InProcessServer;
  let proxy: TcpProxy;

  beforeEach(async () => {
    srv = await startInProcessServer({ limits: { graceMs: 10_000 } });
    proxy = new TcpProxy('127.0.0.1', srv.port);
  });
  afterEach(async () => {
    await proxy.stop();
    await srv.stop();
  });

  it('executes every URB exactly once and delivers every completion once across repeated connection resets', async () => {
    const address = await proxy.start();
    const client = new UsbHostClient({ address: address.replace('127.0.0.1', 'localhost'), ...clientTls('bridge') });
    const dev = await client.openDevice({ serial: 'USBROAM-LOOP-0001' });
    await dev.selectConfiguration(1);
    const loop = srv.backend.get(dev.device.id) as LoopbackDevice;
    const before = loop.stats.byEndpoint.get(0x01) ?? 0;

    const N = 3000;
    const chunks = Array.from({ length: N }, () => randomBytes(2048 + Math.floor(Math.random() * 4096)));
    const completions = new Map<number, number>();
    // Cut the connection at 20/40/60/80 % of the completions (by progress, not time: however fast
    // the machine, the resets land in the middle of the transfer).
    let cuts = 0;
    let done = 0;
    const results = await Promise.all(
      chunks.map((data, i) =>
        dev.submit({ endpoint: 0x01, type: TransferType.TRANSFER_BULK, data }).then((c) => {
          completions.set(i, (completions.get(i) ?? 0) + 1);
          if (++done % (N / 5) === 0 && done < N && proxy.connections > 0) {
            proxy.cut();
            cuts++;
          }
          return c;
        }),
      ),
    );

    expect(cuts, 'connections reset during the transfer').to.be.greaterThan(1);
    expect(dev.reconnects).to.be.greaterThanOrEqual(cuts - 1);
    expect(results.every((r) => r.status === UrbStatus.URB_STATUS_SUCCESS)).to.equal(true);
    expect([...completions.values()].every((n) => n === 1) && completions.size === N).to.equal(true);
    // The device saw each URB once, in order.
    expect((loop.stats.byEndpoint.get(0x01) ?? 0) - before).to.equal(N);
    const all = Buffer.concat(chunks);
    expect(loop.counters.bytesOut).to.equal(all.length);
    expect(loop.counters.crc32Out >>> 0).to.equal(crc32(all) >>> 0);

    // IN completions survive a cut too: the data each one carries is the source pattern.
    proxy.cut();
    const ins = await Promise.all(Array.from({ length: 64 }, () => dev.transferIn(1, 4096)));
    expect(ins.every((r) => r.status === UrbStatus.URB_STATUS_SUCCESS && r.data.length === 4096 && r.data[600] === (600 % 512) % 63)).to.equal(true);
    await dev.close();
    client.close();
  });

  it('keeps the session through a 2 s outage: URBs submitted while disconnected run after the resume', async () => {
    const address = await proxy.start();
    const client = new UsbHostClient({ address, ...clientTls('bridge') });
    const dev = await client.openDevice({ serial: 'USBROAM-LOOP-0001' });
    await dev.selectConfiguration(1);
    const outage = proxy.outage(2000);
    const during = dev.transferOut(1, Buffer.from('sent while the network was down'));
    const sessions = srv.server.sessions.list();
    expect(sessions).to.have.length(1);
    await outage;
    expect((await during).status).to.equal(UrbStatus.URB_STATUS_SUCCESS);
    expect(srv.server.sessions.list()[0].id).to.equal(sessions[0].id);
    expect(dev.reconnects).to.equal(1);
    await dev.close();
    client.close();
  });
});
