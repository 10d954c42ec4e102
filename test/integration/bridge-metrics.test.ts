// The bridge's Prometheus metrics with a fake QEMU on a cold-plugged chardev: promtool accepts
// the scrape; attachments by state, usbredir packets each way and the URB round trip count
// exactly what went through.
import { expect } from 'chai';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Bridge } from '../../src/client/bridge/bridge.js';
import { allOf, BridgeMetrics } from '../../src/client/bridge/bridge-metrics.js';
import { BridgeCapture } from '../../src/client/bridge/bridge-capture.js';
import { startPcapCapture } from '../../src/client/capture/pcap-file.js';
import { decodeUsbmonPcap, UsbmonXfer } from '../../src/common/capture/usbmon-pcap.js';
import { silentLogger } from '../../src/common/log.js';
import { newRegistry, serveMetrics, type MetricsEndpoint } from '../../src/common/observe/prom-kit.js';
import { Status } from '../../src/qemu/usbredir/index.js';
import { FakeQemu } from '../helpers/bridge-fake-qemu.js';
import { clientTls } from '../../src/devkit/certs.js';
import { startInProcessServer, type InProcessServer } from '../helpers/in-process.js';
import { parseExposition, promtoolCheck, scrape, valueOf } from '../helpers/prometheus.js';

describe('bridge metrics (`usbroam bridge --metrics-listen`) and capture (--capture-dir), fake QEMU', function () {
  this.timeout(60_000);
  let srv: InProcessServer;
  let dir: string;
  let bridge: Bridge;
  let endpoint: MetricsEndpoint;

  before(async () => {
    srv = await startInProcessServer();
    dir = mkdtempSync(path.join(os.tmpdir(), 'usbroam-bridge-metrics-'));
    bridge = new Bridge({ runDir: path.join(dir, 'run') });
    const m = new BridgeMetrics(newRegistry(), bridge);
    bridge.observer = allOf([m, new BridgeCapture(path.join(dir, 'captures'), silentLogger)]);
    endpoint = await serveMetrics(m.registry, '127.0.0.1:0', silentLogger);
    bridge.addVm({ name: 'vm1', qmpSocket: path.join(dir, 'no-qmp-here') });
  });
  after(async () => {
    await bridge.close();
    await endpoint.close();
    await srv.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it('counts attachments by state, usbredir packets each way and URB round trips', async () => {
    const before = parseExposition(await scrape(endpoint.address));
    expect(valueOf(before, 'usbroam_bridge_attachments', { state: 'connected' })).to.equal(0);
    // QEMU's side of a cold-plugged chardev: a unix socket server.
    const socketPath = path.join(dir, 'redir.sock');
    const server = net.createServer();
    await new Promise<void>((r) => server.listen(socketPath, r));
    const accepted = new Promise<net.Socket>((r) => server.once('connection', r));
    const serverOpts = { address: srv.address.replace('127.0.0.1', 'localhost'), ...clientTls('bridge') };
    const loopId = srv.backend.list().find((d) => d.serial === 'USBROAM-LOOP-0001')!.id;
    const serverCapture = await startPcapCapture({ server: serverOpts, target: { deviceId: loopId }, file: path.join(dir, 'server.pcap') });
    const info = await bridge.attach({ vm: 'vm1', server: { address: srv.address.replace('127.0.0.1', 'localhost'), ...clientTls('bridge') }, selector: { serial: 'USBROAM-LOOP-0001' }, coldPlugged: { socketPath } });
    const qemu = new FakeQemu(await accepted);
    server.close();
    qemu.hello();
    await qemu.waitFor('device_connect');
    qemu.send({ type: 'set_configuration', id: 1n, configuration: 1 });
    await qemu.waitFor('configuration_status', (p) => p.id === 1n);
    const N = 10;
    for (let i = 0; i < N; i++) {
      const id = 100n + BigInt(i);
      qemu.send({ type: 'bulk_packet', id, endpoint: 0x81, status: 0, length: 512, streamId: 0, data: new Uint8Array(0) });
      const p = await qemu.waitFor('bulk_packet', (x) => x.id === id);
      expect(p.status).to.equal(Status.success);
    }
    const during = await scrape(endpoint.address);
    expect(promtoolCheck(during)).to.equal('');
    const s = parseExposition(during);
    expect(s.filter((x) => !x.name.startsWith('usbroam_'))).to.deep.equal([]);
    expect(valueOf(s, 'usbroam_bridge_attachments', { state: 'connected' })).to.equal(1);
    expect(valueOf(s, 'usbroam_bridge_attachments_started_total', { origin: 'attach' })).to.equal(1);
    // hello, set_configuration and N bulk packets came from QEMU; the bridge sent everything FakeQemu parsed.
    expect(valueOf(s, 'usbroam_bridge_usbredir_packets_total', { direction: 'from_qemu' })).to.equal(2 + N);
    expect(valueOf(s, 'usbroam_bridge_usbredir_packets_total', { direction: 'to_qemu' })).to.equal(qemu.packets.length);
    expect(valueOf(s, 'usbroam_bridge_channel_round_trip_seconds_count')).to.equal(N);
    expect(valueOf(s, 'usbroam_bridge_handoffs_total', { result: 'ok' })).to.equal(0);

    await bridge.detach('vm1', info.id);
    const after = parseExposition(await scrape(endpoint.address));
    expect(valueOf(after, 'usbroam_bridge_attachments', { state: 'connected' })).to.equal(0);
    // An attachment that ended keeps its packets in the totals.
    expect(valueOf(after, 'usbroam_bridge_usbredir_packets_total', { direction: 'from_qemu' })).to.be.at.least(2 + N);

    // Both ends' captures: the same N bulk IN URBs, submit and completion, 512 bytes each.
    const captured = await serverCapture.stop();
    expect(captured.events).to.equal(2 * N);
    const files = readdirSync(path.join(dir, 'captures'));
    expect(files).to.have.length(1);
    const summary = (file: string) =>
      decodeUsbmonPcap(readFileSync(file)).records.map((r) => `${r.event.type} ${r.event.xferType} ${r.event.epnum.toString(16)} ${r.event.length} ${r.event.data.length}`);
    const want = Array.from({ length: N }, () => [`S ${UsbmonXfer.Bulk} 81 512 0`, `C ${UsbmonXfer.Bulk} 81 512 512`]).flat();
    expect(summary(path.join(dir, 'captures', files[0]))).to.deep.equal(want);
    expect(summary(path.join(dir, 'server.pcap'))).to.deep.equal(want);
  });
});
