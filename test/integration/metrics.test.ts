// Prometheus metrics of a real server process: promtool accepts a scrape taken during I/O, and
// the counters move by exactly what known I/O through the SDK implies.
import { expect } from 'chai';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ClientError, Status } from 'nice-grpc';
import { UsbHostClient } from '../../src/client/sdk/client.js';
import { ChannelClosedError } from '../../src/client/sdk/remote-device.js';
import { UrbStatus } from '../../src/gen/usbroam/v1/usbhost.js';
import { clientTls } from '../../src/devkit/certs.js';
import { parseExposition, promtoolCheck, scrape, valueOf, type Sample } from '../helpers/prometheus.js';
import { startServerProcess, type ServerProcess } from '../../src/devkit/server-process.js';

const URBS = 24;
const URB_BYTES = 4096;
const GET_COUNTERS = { requestType: 'vendor', recipient: 'device', request: 0x01, value: 0, index: 0 } as const;

describe('Prometheus metrics of `usbroam serve --metrics-listen` (server in its own process)', function () {
  this.timeout(60_000);
  let srv: ServerProcess;
  let dir: string;
  let metrics: string;

  before(async () => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'usbroam-metrics-'));
    srv = await startServerProcess(['--allow', 'bridge=*', '--allow', 'viewer=0000:0000', '--disk-image', path.join(dir, 'disk.img'), '--disk-size-mib', '8', '--metrics-listen', '127.0.0.1:0']);
    const line = srv.logs.map((l) => (l.startsWith('{') ? JSON.parse(l) : {})).find((j) => j.msg === 'serving Prometheus metrics');
    expect(line, 'the server logs where it serves metrics').to.not.equal(undefined);
    metrics = new URL(line.metrics).host;
  });
  after(async () => {
    expect(await srv.stop()).to.equal(0);
    rmSync(dir, { recursive: true, force: true });
  });

  it('serves an exposition promtool accepts, every metric named usbroam_..., with process metrics', async () => {
    const text = await scrape(metrics);
    expect(promtoolCheck(text)).to.equal('');
    const samples = parseExposition(text);
    expect(samples.length).to.be.greaterThan(20);
    expect(samples.filter((s) => !s.name.startsWith('usbroam_')).map((s) => s.name)).to.deep.equal([]);
    expect(valueOf(samples, 'usbroam_process_cpu_seconds_total')).to.be.greaterThan(0);
    const notFound = await fetch(`http://${metrics}/other`);
    expect(notFound.status).to.equal(404);
  });

  it('counts URBs by type and status, bytes each way, service times and session events exactly; promtool accepts a scrape taken during I/O', async () => {
    const client = new UsbHostClient({ address: srv.address, ...clientTls('bridge') });
    const loop = (await client.listDevices()).find((d) => d.serial === 'USBROAM-LOOP-0001')!;
    const device = loop.id;
    const before = parseExposition(await scrape(metrics));
    const dev = await client.openDevice({ id: device });
    try {
      await dev.selectConfiguration(1);
      const payload = new Uint8Array(URB_BYTES).fill(0x5a);
      const outs = Array.from({ length: URBS }, () => dev.transferOut(0x01, payload));
      const ins = Array.from({ length: URBS }, () => dev.transferIn(0x81, URB_BYTES));
      // A scrape while those URBs are on their way.
      const during = await scrape(metrics);
      expect(promtoolCheck(during)).to.equal('');
      for (const r of await Promise.all([...outs, ...ins])) {
        expect(r.status).to.equal(UrbStatus.URB_STATUS_SUCCESS);
        expect(r.actualLength).to.equal(URB_BYTES);
      }
      const counters = await dev.controlTransferIn(GET_COUNTERS, 36);
      expect(counters.status).to.equal(UrbStatus.URB_STATUS_SUCCESS);
      expect(counters.data.length).to.equal(36);
      // A vendor request the device does not know: STALL.
      const stalled = await dev.controlTransferIn({ ...GET_COUNTERS, request: 0x7e }, 4);
      expect(stalled.status).to.equal(UrbStatus.URB_STATUS_STALL);

      const open = parseExposition(await scrape(metrics));
      const delta = (name: string, labels: Record<string, string>, a: Sample[] = open) => valueOf(a, name, labels) - valueOf(before, name, labels);
      expect(delta('usbroam_urbs_completed_total', { device, type: 'bulk', status: 'success' })).to.equal(2 * URBS);
      expect(delta('usbroam_urbs_completed_total', { device, type: 'control', status: 'success' })).to.equal(1);
      expect(delta('usbroam_urbs_completed_total', { device, type: 'control', status: 'stall' })).to.equal(1);
      expect(delta('usbroam_urb_bytes_total', { device, direction: 'out' })).to.equal(URBS * URB_BYTES);
      expect(delta('usbroam_urb_bytes_total', { device, direction: 'in' })).to.equal(URBS * URB_BYTES + 36);
      expect(valueOf(open, 'usbroam_urbs_in_flight', { device })).to.equal(0);
      expect(delta('usbroam_urb_service_seconds_count', { device, type: 'bulk' })).to.equal(2 * URBS);
      expect(valueOf(open, 'usbroam_urb_service_seconds_bucket', { device, type: 'bulk', le: '+Inf' })).to.equal(valueOf(open, 'usbroam_urb_service_seconds_count', { device, type: 'bulk' }));
      expect(valueOf(open, 'usbroam_urb_service_seconds_sum', { device, type: 'bulk' })).to.be.greaterThan(0);
      expect(delta('usbroam_session_events_total', { device, event: 'opened' })).to.equal(1);
      expect(valueOf(open, 'usbroam_sessions', { state: 'attached' })).to.equal(1);
      expect(valueOf(open, 'usbroam_journal_bytes', { device })).to.be.at.least(0);
      expect(open.some((s) => s.name === 'usbroam_journal_bytes' && s.labels.device === device)).to.equal(true);
    } finally {
      await dev.close();
    }
    const after = parseExposition(await scrape(metrics));
    expect(valueOf(after, 'usbroam_session_events_total', { device, event: 'closed' }) - valueOf(before, 'usbroam_session_events_total', { device, event: 'closed' })).to.equal(1);
    expect(valueOf(after, 'usbroam_sessions', { state: 'attached' })).to.equal(0);
    client.close();
  });

  it('counts a URB channel the ACL refuses under reason permission_denied', async () => {
    const before = valueOf(parseExposition(await scrape(metrics)), 'usbroam_connections_refused_total', { reason: 'permission_denied' });
    const viewer = new UsbHostClient({ address: srv.address, ...clientTls('viewer') });
    const err = await viewer.openDevice({ serial: 'USBROAM-LOOP-0001' }).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect((err as ChannelClosedError | ClientError | undefined)?.code).to.equal(Status.PERMISSION_DENIED);
    viewer.close();
    const after = valueOf(parseExposition(await scrape(metrics)), 'usbroam_connections_refused_total', { reason: 'permission_denied' });
    expect(after - before).to.equal(1);
  });
});
