// Bad input on a URB channel: a clear error for that channel, never a crash,
// and every other session carries on.
import { expect } from 'chai';
import * as grpc from '@grpc/grpc-js';
import { readFileSync } from 'node:fs';
import { UsbHostClient } from '../../src/client/sdk/client.js';
import { ClientFrame, ClientMessage, ServerMessage, TransferType, UrbStatus, type ServerFrame } from '../../src/gen/usbroam/v1/usbhost.js';
import { clientTls } from '../../src/devkit/certs.js';
import { startInProcessServer, type InProcessServer } from '../helpers/in-process.js';
import { until } from '../helpers/wait.js';

/** A URB channel at the wire level: raw protobuf bytes in and out. */
class RawChannel {
  readonly frames: ServerFrame[] = [];
  status?: grpc.StatusObject;
  private readonly call: grpc.ClientDuplexStream<Buffer, Buffer>;
  private readonly client: grpc.Client;
  private waiters: (() => void)[] = [];

  constructor(address: string, identity: string) {
    const t = clientTls(identity);
    this.client = new grpc.Client(address, grpc.credentials.createSsl(readFileSync(t.ca), readFileSync(t.key), readFileSync(t.cert)));
    this.call = this.client.makeBidiStreamRequest('/usbroam.v1.UsbHost/Connect', (b: Buffer) => b, (b: Buffer) => b);
    this.call.on('data', (b: Buffer) => {
      this.frames.push(...ServerMessage.decode(b).frames);
      this.wake();
    });
    this.call.on('status', (s) => {
      this.status = s;
      this.wake();
    });
    this.call.on('error', () => {});
  }
  private wake() {
    for (const w of this.waiters.splice(0)) w();
  }
  sendRaw(b: Uint8Array) {
    this.call.write(Buffer.from(b));
  }
  send(...frames: ClientFrame[]) {
    this.sendRaw(ClientMessage.encode({ frames }).finish());
  }
  async until<T>(pred: () => T | undefined, ms = 5000): Promise<T> {
    const end = Date.now() + ms;
    for (;;) {
      const v = pred();
      if (v) return v;
      if (Date.now() > end) throw new Error(`timed out; frames: ${JSON.stringify(this.frames.map((f) => f.kind?.$case))}, status: ${this.status?.details}`);
      await new Promise<void>((r) => {
        this.waiters.push(r);
        setTimeout(r, 50);
      });
    }
  }
  async open(serial: string) {
    // The previous test's session on this device may still be in its (short) grace period.
    const id = srv.server.registry.list().find((d) => d.serial === serial)!.id;
    await until(`${serial} free again`, () => !srv.server.registry.claimOf(id), 3000, 50).catch(() => {});
    this.send({ seq: 0, kind: { $case: 'open', value: { target: { $case: 'device', value: { id: '', vidPid: '', serial, portPath: '' } } } } });
    await this.until(() => this.frames.find((f) => f.kind?.$case === 'opened'));
    // configuration 1, so the device has endpoints
    this.send({ seq: 1, kind: { $case: 'op', value: { opId: 1, op: { $case: 'setConfiguration', value: { value: 1 } } } } });
    await this.until(() => this.frames.find((f) => f.kind?.$case === 'opResult'));
  }
  close() {
    this.call.cancel();
    this.client.close();
  }
}

const errorMessage = (f: ServerFrame) => (f.kind?.$case === 'error' ? f.kind.value.message : '');
const completeStatus = (f: ServerFrame) => (f.kind?.$case === 'complete' ? f.kind.value.status : -1);

const submit = (seq: number, urbId: number, endpoint: number, type: TransferType, data = new Uint8Array(0), length = 0): ClientFrame => ({
  seq,
  kind: { $case: 'submit', value: { urbId, endpoint, type, setup: new Uint8Array(0), data, length, streamId: 0, flags: 0, isoPackets: [], timeoutMs: 0 } },
});

let srv: InProcessServer;

describe('malformed URB-channel input', function () {
  this.timeout(30_000);
  let bystander: UsbHostClient;
  let traffic: Promise<number>;
  let stopTraffic = false;

  before(async () => {
    // A short grace period: each test's refused channel leaves its session to expire quickly.
    srv = await startInProcessServer({ limits: { maxUrbBytes: 64 * 1024, graceMs: 100 } });
    // Another client keeps a session busy on another device the whole time.
    bystander = new UsbHostClient({ address: srv.address, ...clientTls('bridge') });
    const dev = await bystander.openDevice({ serial: 'USBROAM-LOOP-0001' });
    await dev.selectConfiguration(1);
    traffic = (async () => {
      let ok = 0;
      while (!stopTraffic) {
        const r = await dev.transferOut(1, new Uint8Array(4096).fill(ok & 0xff));
        if (r.status !== UrbStatus.URB_STATUS_SUCCESS) throw new Error(`bystander URB failed: ${UrbStatus[r.status]}`);
        ok++;
      }
      await dev.close();
      return ok;
    })();
  });
  after(async () => {
    stopTraffic = true;
    const ok = await traffic;
    bystander.close();
    await srv.stop();
    expect(ok).to.be.greaterThan(10);
  });

  it('answers an unknown frame kind with INVALID_ARGUMENT', async () => {
    const ch = new RawChannel(srv.address, 'bridge');
    await ch.open('USBROAM-MSC-0001');
    // ClientMessage{frames: [ClientFrame{seq: 2, <field 15 varint 5>}]}: a kind this server does not know.
    const frame = Uint8Array.of(0x08, 0x02, 0x78, 0x05);
    ch.sendRaw(Uint8Array.of(0x0a, frame.length, ...frame));
    await ch.until(() => ch.status);
    expect(ch.status!.code).to.equal(grpc.status.INVALID_ARGUMENT);
    expect(ch.status!.details).to.match(/client frame seq 2 has no known kind/);
    ch.close();
  });

  it('fails a URB whose transfer type is no USB transfer type, naming the number', async () => {
    const ch = new RawChannel(srv.address, 'bridge');
    await ch.open('USBROAM-ACM-0001');
    ch.send(submit(2, 9, 0x01, 7 as TransferType, Uint8Array.of(1, 2, 3)));
    const err = await ch.until(() => ch.frames.find((f) => f.kind?.$case === 'error'));
    expect(errorMessage(err)).to.match(/URB 9 has transfer type 7, which is none of control, isochronous, bulk and interrupt/);
    const c = await ch.until(() => ch.frames.find((f) => f.kind?.$case === 'complete' && f.kind.value.urbId === 9));
    expect(completeStatus(c)).to.equal(UrbStatus.URB_STATUS_INVAL);
    ch.close();
  });

  it('fails a URB for an endpoint the device lacks, and the session carries on', async () => {
    const ch = new RawChannel(srv.address, 'bridge');
    await ch.open('USBROAM-ACM-0001');
    ch.send(submit(2, 7, 0x05, TransferType.TRANSFER_BULK, Uint8Array.of(1, 2, 3)));
    const err = await ch.until(() => ch.frames.find((f) => f.kind?.$case === 'error'));
    expect(errorMessage(err)).to.match(/has no endpoint 0x5/);
    const c = await ch.until(() => ch.frames.find((f) => f.kind?.$case === 'complete' && f.kind.value.urbId === 7));
    expect(completeStatus(c)).to.equal(UrbStatus.URB_STATUS_INVAL);
    // The same channel still works: the echo device's bulk OUT takes data.
    ch.send(submit(3, 8, 0x01, TransferType.TRANSFER_BULK, Uint8Array.of(1, 2, 3)));
    const ok = await ch.until(() => ch.frames.find((f) => f.kind?.$case === 'complete' && f.kind.value.urbId === 8));
    expect(completeStatus(ok)).to.equal(UrbStatus.URB_STATUS_SUCCESS);
    expect(ch.status).to.equal(undefined);
    ch.close();
  });

  it('fails an oversize URB with a message naming the limit', async () => {
    const ch = new RawChannel(srv.address, 'bridge');
    await ch.open('USBROAM-ACM-0001');
    ch.send(submit(2, 9, 0x01, TransferType.TRANSFER_BULK, new Uint8Array(65 * 1024)));
    const err = await ch.until(() => ch.frames.find((f) => f.kind?.$case === 'error'));
    expect(errorMessage(err)).to.match(/66560 bytes exceeds the limit of 65536/);
    const c = await ch.until(() => ch.frames.find((f) => f.kind?.$case === 'complete' && f.kind.value.urbId === 9));
    expect(completeStatus(c)).to.equal(UrbStatus.URB_STATUS_INVAL);
    ch.close();
  });

  it('ends the stream on an ack for a seq never sent', async () => {
    const ch = new RawChannel(srv.address, 'bridge');
    await ch.open('USBROAM-ACM-0001');
    ch.send({ seq: 1, kind: { $case: 'ack', value: { seq: 999 } } });
    await ch.until(() => ch.status);
    expect(ch.status!.code).to.equal(grpc.status.INVALID_ARGUMENT);
    expect(ch.status!.details).to.match(/ack for seq 999, but the highest seq ever sent is \d/);
    ch.close();
  });

  it('refuses frames before open, and a gap in sequence numbers', async () => {
    const a = new RawChannel(srv.address, 'bridge');
    a.send(submit(1, 1, 0x01, TransferType.TRANSFER_BULK));
    await a.until(() => a.status);
    expect(a.status!.code).to.equal(grpc.status.INVALID_ARGUMENT);
    expect(a.status!.details).to.match(/first frame of a URB channel must be open/);
    a.close();
    const b = new RawChannel(srv.address, 'bridge');
    await b.open('USBROAM-ACM-0001');
    b.send(submit(5, 1, 0x01, TransferType.TRANSFER_BULK));
    await b.until(() => b.status);
    expect(b.status!.details).to.match(/seq 5 skips ahead: expected 2/);
    b.close();
  });

  it('refuses garbage that is not protobuf', async () => {
    const ch = new RawChannel(srv.address, 'bridge');
    ch.sendRaw(Uint8Array.of(0xff, 0xff, 0xff, 0xff, 0x0f));
    await ch.until(() => ch.status);
    expect(ch.status!.code).to.equal(grpc.status.INVALID_ARGUMENT);
    expect(ch.status!.details).to.match(/\/usbroam.v1.UsbHost\/Connect \(5 bytes\) is not a valid protobuf message/);
    ch.close();
  });
});
