// URB capture: `usbroam capture` writes a pcap of the emulated disk's BOT traffic that tshark
// dissects down to USB mass storage and SCSI READ(10)/WRITE(10) with their LBAs; who may capture
// what; and a capture that is not read drops events (and says how many) without holding up I/O.
import { expect } from 'chai';
import * as grpc from '@grpc/grpc-js';
import { execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ClientError, Status } from 'nice-grpc';
import { UsbHostClient } from '../../src/client/sdk/client.js';
import { decodeUsbmonPcap } from '../../src/common/capture/usbmon-pcap.js';
import { grpcJsServiceDefinition } from '../../src/common/grpc-definition.js';
import { UrbEvent_Kind, UrbStatus, UsbHostDefinition, type CaptureEvent, type CaptureRequest } from '../../src/gen/usbroam/v1/usbhost.js';
import { cdb10, READ10, scsi, WRITE10 } from '../helpers/bot.js';
import { clientTls } from '../../src/devkit/certs.js';
import { startInProcessServer, type InProcessServer } from '../helpers/in-process.js';

const DISK = 'USBROAM-MSC-0001';

/** Runs `usbroam capture ...`; resolves `started` once it reports the capture running. */
function runCaptureCli(args: string[]): { started: Promise<void>; exit: Promise<{ code: number | null; stderr: string }> } {
  const child = spawn(process.execPath, ['bin/usbroam.js', 'capture', ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  let onStarted!: () => void;
  const started = new Promise<void>((resolve) => (onStarted = resolve));
  child.stderr!.on('data', (d: Buffer) => {
    stderr += d.toString();
    if (/^capturing /m.test(stderr)) onStarted();
  });
  const exit = new Promise<{ code: number | null; stderr: string }>((resolve) => child.on('exit', (code) => resolve({ code, stderr })));
  void exit.then((r) => onStarted()); // a failure ends the wait too; the exit code tells
  return { started, exit };
}

async function refusal(events: AsyncIterable<CaptureEvent>): Promise<{ code: Status; message: string }> {
  try {
    for await (const _ of events) break;
  } catch (err) {
    if (err instanceof ClientError) return { code: err.code, message: err.details };
    throw err;
  }
  throw new Error('expected the capture to be refused');
}

describe('URB capture (Capture RPC, `usbroam capture`, pcap for Wireshark)', function () {
  this.timeout(90_000);
  let srv: InProcessServer;
  let dir: string;

  before(async () => {
    srv = await startInProcessServer({ acl: { bridge: '*', viewer: [{ class: 2 }] }, admins: ['bridge'] });
    dir = mkdtempSync(path.join(os.tmpdir(), 'usbroam-capture-'));
  });
  after(async () => {
    await srv.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it('captures BOT traffic of the emulated disk that tshark dissects as usbms: CBWs, SCSI WRITE(10)/READ(10) with the right LBAs', async () => {
    const tls = clientTls('bridge');
    const client = new UsbHostClient({ address: srv.address, ...tls });
    const dev = await client.openDevice({ serial: DISK });
    await dev.selectConfiguration(1);
    const file = path.join(dir, 'disk.pcap');
    const cli = runCaptureCli(['--session', dev.sessionId, '-w', file, '--server', srv.address, '--ca', tls.ca, '--cert', tls.cert, '--key', tls.key]);
    await cli.started;
    const data = randomBytes(8 * 512);
    expect((await scsi(dev, cdb10(WRITE10, 100, 8), 'out', data)).status).to.equal(0);
    const back = await scsi(dev, cdb10(READ10, 100, 8), 'in', 8 * 512);
    expect(Buffer.compare(back.data, data)).to.equal(0);
    expect((await scsi(dev, cdb10(READ10, 777, 16), 'in', 16 * 512)).status).to.equal(0);
    await dev.close(); // the session ends: so does its capture
    client.close();
    const r = await cli.exit;
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stderr).to.match(/^\d+ URB events/m);

    // Our own decoder: 3 commands x (CBW, data, CSW), each a submit and a completion.
    const pcap = decodeUsbmonPcap(readFileSync(file));
    expect(pcap.records.length).to.equal(3 * 3 * 2);
    expect(pcap.records.map((x) => x.event.type).join('')).to.equal('SC'.repeat(9));
    expect(new Set(pcap.records.map((x) => `${x.event.busnum}.${x.event.devnum}`)).size).to.equal(1);

    const tshark = (filter: string, fields: string[]) =>
      execFileSync('tshark', ['-r', file, '-Y', filter, '-T', 'fields', ...fields.flatMap((f) => ['-e', f])], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] })
        .trim()
        .split('\n')
        .filter(Boolean);
    const cbws = tshark('usbms.dCBWSignature', ['usbms.dCBWDataTransferLength', 'scsi_sbc.opcode', 'scsi_sbc.rdwr10.lba', 'scsi_sbc.rdwr10.xferlen']);
    expect(cbws).to.deep.equal([`4096\t0x2a\t100\t8`, `4096\t0x28\t100\t8`, `8192\t0x28\t777\t16`]);
    // And the CSWs, matched to their commands: status good.
    expect(tshark('usbms.dCSWSignature', ['usbms.dCSWStatus'])).to.deep.equal(['0x00', '0x00', '0x00']);
  });

  it('refuses captures to identities that are neither admin nor the session owner (PERMISSION_DENIED); lets an owner capture its own session', async () => {
    const bridge = new UsbHostClient({ address: srv.address, ...clientTls('bridge') });
    const viewer = new UsbHostClient({ address: srv.address, ...clientTls('viewer') });
    const disk = await bridge.openDevice({ serial: DISK });
    try {
      const bySession = await refusal(viewer.capture({ sessionId: disk.sessionId }));
      expect(bySession.code).to.equal(Status.PERMISSION_DENIED);
      expect(bySession.message).to.match(/identity "viewer" may not capture session/);
      const byDevice = await refusal(viewer.capture({ deviceId: disk.device.id }));
      expect(byDevice.code).to.equal(Status.PERMISSION_DENIED);
      expect((await refusal(bridge.capture({ sessionId: 'no-such-session' }))).code).to.equal(Status.NOT_FOUND);
      expect((await refusal(bridge.capture({ deviceId: 'no-such-device' }))).code).to.equal(Status.NOT_FOUND);
      expect((await refusal(bridge.capture({ sessionId: disk.sessionId }, { snaplen: 2 * 1024 * 1024 }))).code).to.equal(Status.INVALID_ARGUMENT);

      // viewer owns a session on the serial device: it may capture that one.
      const serial = await viewer.openDevice({ serial: 'USBROAM-ACM-0001' });
      const ac = new AbortController();
      const it = viewer.capture({ sessionId: serial.sessionId }, { signal: ac.signal })[Symbol.asyncIterator]();
      const first = await it.next();
      expect(first.value?.kind?.$case).to.equal('started');
      const getStatus = serial.controlTransferIn({ requestType: 'standard', recipient: 'device', request: 0x00, value: 0, index: 0 }, 2);
      const submit = await it.next();
      expect(submit.value?.kind?.$case === 'urb' && submit.value.kind.value.kind).to.equal(UrbEvent_Kind.KIND_SUBMIT);
      expect((await getStatus).status).to.equal(UrbStatus.URB_STATUS_SUCCESS);
      ac.abort();
      await serial.close();
    } finally {
      await disk.close();
      bridge.close();
      viewer.close();
    }
  });

  it('captures the URBs of a receiving stream (usbredir interrupt receiving) like the session\'s own', async () => {
    const bridge = new UsbHostClient({ address: srv.address, ...clientTls('bridge') });
    const loop = await bridge.openDevice({ serial: 'USBROAM-LOOP-0001' });
    const ac = new AbortController();
    try {
      const it = bridge.capture({ sessionId: loop.sessionId }, { signal: ac.signal })[Symbol.asyncIterator]();
      expect((await it.next()).value?.kind?.$case).to.equal('started');
      await loop.selectConfiguration(1);
      await loop.startReceiving({ endpoint: 0x82, transferLength: 64, transfers: 2 });
      // The interrupt endpoint's counter packets: 8 bytes each. Collect until two completions on 0x82 came.
      const onEp: { kind: UrbEvent_Kind; length: number }[] = [];
      while (onEp.filter((e) => e.kind === UrbEvent_Kind.KIND_COMPLETE).length < 2) {
        const ev = (await it.next()).value as CaptureEvent;
        if (ev.kind?.$case === 'urb' && ev.kind.value.endpoint === 0x82) onEp.push({ kind: ev.kind.value.kind, length: ev.kind.value.length });
      }
      expect(onEp.filter((e) => e.kind === UrbEvent_Kind.KIND_SUBMIT).length).to.be.greaterThanOrEqual(2);
      expect(onEp.filter((e) => e.kind === UrbEvent_Kind.KIND_SUBMIT).every((e) => e.length === 64)).to.equal(true);
      expect(onEp.filter((e) => e.kind === UrbEvent_Kind.KIND_COMPLETE).every((e) => e.length === 8)).to.equal(true);
    } finally {
      ac.abort();
      await loop.close();
      bridge.close();
    }
  });

  it('drops what a capture client does not read, counts it, and every event is either delivered or counted as dropped', async () => {
    const tls = clientTls('bridge');
    const client = new UsbHostClient({ address: srv.address, ...tls });
    const dev = await client.openDevice({ serial: 'USBROAM-LOOP-0001' });
    await dev.selectConfiguration(1);
    // A raw grpc-js call that we pause after the first message: HTTP/2 flow control then stops the server's writes.
    const def = grpcJsServiceDefinition(UsbHostDefinition).Capture;
    const creds = grpc.credentials.createSsl(readFileSync(tls.ca), readFileSync(tls.key), readFileSync(tls.cert));
    const raw = new grpc.Client(srv.address, creds);
    const request: CaptureRequest = { target: { $case: 'sessionId', value: dev.sessionId }, snaplen: 0 };
    const call = raw.makeServerStreamRequest(def.path, def.requestSerialize, def.responseDeserialize as (b: Buffer) => CaptureEvent, request);
    const events: CaptureEvent[] = [];
    const ended = new Promise<void>((resolve) => {
      call.on('end', resolve);
      call.on('error', () => resolve());
    });
    await new Promise<void>((resolve) =>
      call.on('data', (e: CaptureEvent) => {
        events.push(e);
        if (events.length === 1) {
          call.pause();
          resolve();
        }
      }),
    );
    const droppedBefore = srv.server.observe.capture.droppedTotal;
    const URBS = 400;
    const LEN = 64 * 1024;
    for (let i = 0; i < URBS; i += 16) {
      const batch = Array.from({ length: 16 }, () => dev.transferIn(0x81, LEN));
      for (const r of await Promise.all(batch)) expect(r.actualLength).to.equal(LEN);
    }
    const dropped = srv.server.observe.capture.droppedTotal - droppedBefore;
    expect(dropped, 'the paused capture dropped events').to.be.greaterThan(0);
    call.resume();
    await dev.close();
    await ended;
    raw.close();
    client.close();
    const urbEvents = events.filter((e) => e.kind?.$case === 'urb').length;
    const reported = events.reduce((n, e) => n + (e.kind?.$case === 'dropped' ? e.kind.value.events : 0), 0);
    expect(reported).to.equal(dropped);
    expect(urbEvents + reported).to.equal(2 * URBS);
  });
});
