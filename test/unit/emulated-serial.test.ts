import { expect } from 'chai';
import { randomBytes } from 'node:crypto';
import { TransferType, UrbStatus, type UrbResult } from '../../src/server/backends/types.js';
import { EmulatedBackend } from '../../src/server/backends/emulated/emulated-backend.js';
import { SerialDevice, ACM_BULK_IN, ACM_BULK_OUT, ACM_NOTIFY_IN } from '../../src/server/backends/emulated/serial.js';
import { bulkIn, bulkOut, control, getDescriptor, makeUrb, submit } from '../../src/server/backends/emulated/urb-helpers.js';
import { sleep } from '../helpers/wait.js';

describe('emulated CDC-ACM serial echo', () => {
  let backend: EmulatedBackend;
  let dev: SerialDevice;

  beforeEach(async () => {
    backend = new EmulatedBackend();
    dev = new SerialDevice({ portPath: [3], bufferBytes: 4096 });
    backend.add(dev);
    await backend.open(dev.id);
    await dev.setConfiguration(1);
  });
  afterEach(async () => {
    await backend.close();
  });

  it('has the CDC-ACM interfaces and functional descriptors cdc_acm needs', async () => {
    const info = dev.info;
    expect(info.deviceClass).to.equal(2);
    expect(info.interfaces.map((i) => [i.interfaceClass, i.interfaceSubclass, i.interfaceProtocol])).to.deep.equal([
      [2, 2, 1],
      [0x0a, 0, 0],
    ]);
    const cfg = (await getDescriptor(dev, 2, 0, 512)).data!;
    const subtypes: number[] = [];
    for (let off = 0; off < cfg.length; off += cfg[off]!) if (cfg[off + 1] === 0x24) subtypes.push(cfg[off + 2]!);
    expect(subtypes).to.deep.equal([0x00, 0x01, 0x02, 0x06]);
    expect(info.endpoints.find((e) => e.address === ACM_NOTIFY_IN)!.type).to.equal(TransferType.Interrupt);
  });

  it('line coding and control line state', async () => {
    const lc = Buffer.alloc(7);
    lc.writeUInt32LE(9600, 0);
    lc[6] = 7;
    const set = await control(dev, { bmRequestType: 0x21, bRequest: 0x20, wValue: 0, wIndex: 0, wLength: 7 }, lc);
    expect(set.status).to.equal(UrbStatus.Success);
    const get = await control(dev, { bmRequestType: 0xa1, bRequest: 0x21, wValue: 0, wIndex: 0, wLength: 7 });
    expect(Buffer.from(get.data!).readUInt32LE(0)).to.equal(9600);
    expect(get.data![6]).to.equal(7);
    await control(dev, { bmRequestType: 0x21, bRequest: 0x22, wValue: 3, wIndex: 0, wLength: 0 });
    expect(dev.controlLineState).to.equal(3);
  });

  it('echo with IN submitted before OUT', async () => {
    const pin = bulkIn(dev, ACM_BULK_IN, 512);
    await new Promise((r) => setImmediate(r));
    const w = await bulkOut(dev, ACM_BULK_OUT, Buffer.from('hello'));
    expect(w.actualLength).to.equal(5);
    const r = await pin;
    expect(Buffer.from(r.data!).toString()).to.equal('hello');
  });

  it('a full buffer makes OUT wait (no drop) until IN drains it', async () => {
    const data = randomBytes(10000); // > 4096 buffer
    let outDone = false;
    const pout = bulkOut(dev, ACM_BULK_OUT, data).then((r) => {
      outDone = true;
      return r;
    });
    await sleep(10); // proves the OUT does not complete within 10 ms while the buffer is full
    expect(outDone).to.equal(false);
    const got: Buffer[] = [];
    let n = 0;
    while (n < data.length) {
      const r = await bulkIn(dev, ACM_BULK_IN, 1500);
      got.push(Buffer.from(r.data!));
      n += r.actualLength;
    }
    expect((await pout).actualLength).to.equal(10000);
    expect(Buffer.compare(Buffer.concat(got), data)).to.equal(0);
  });

  it('notification URBs stay pending until cancelled', async () => {
    const p = submit(dev, makeUrb({ endpoint: ACM_NOTIFY_IN, type: TransferType.Interrupt, length: 16, id: 77 }));
    let settled: UrbResult | undefined;
    void p.then((r) => (settled = r));
    await sleep(5); // proves the notification URB does not complete within 5 ms
    expect(settled).to.equal(undefined);
    dev.cancel(77);
    expect((await p).status).to.equal(UrbStatus.Cancelled);
  });
});
