import { expect } from 'chai';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Speed, TransferType, UrbStatus, UsbError, URB_SHORT_NOT_OK, type DeviceInfo } from '../../src/server/backends/types.js';
import { EmulatedBackend, createDefaultEmulatedBackend } from '../../src/server/backends/emulated/emulated-backend.js';
import { LoopbackDevice, LOOP_BULK_IN, LOOP_BULK_OUT } from '../../src/server/backends/emulated/loopback.js';
import { SerialDevice, ACM_BULK_IN, ACM_BULK_OUT } from '../../src/server/backends/emulated/serial.js';
import { bulkIn, bulkOut, control, getDescriptor, makeUrb, submit } from '../../src/server/backends/emulated/urb-helpers.js';
import type { EmulatedDevice } from '../../src/server/backends/emulated/emulated-device.js';

/** Independent descriptor walker (does not use descriptors.ts). */
function walkConfig(d: Uint8Array) {
  expect(d[1]).to.equal(2);
  expect(d[2]! | (d[3]! << 8)).to.equal(d.length);
  const interfaces: { number: number; alt: number; cls: number; numEp: number }[] = [];
  const endpoints: { address: number; attrs: number; mps: number }[] = [];
  let off = 0;
  while (off < d.length) {
    const len = d[off]!;
    expect(len).to.be.greaterThan(1);
    expect(off + len).to.be.at.most(d.length);
    if (d[off + 1] === 4) interfaces.push({ number: d[off + 2]!, alt: d[off + 3]!, numEp: d[off + 4]!, cls: d[off + 5]! });
    if (d[off + 1] === 5) endpoints.push({ address: d[off + 2]!, attrs: d[off + 3]!, mps: d[off + 4]! | (d[off + 5]! << 8) });
    off += len;
  }
  expect(new Set(interfaces.map((i) => i.number)).size).to.equal(d[4]);
  expect(interfaces.reduce((a, i) => a + i.numEp, 0)).to.equal(endpoints.length);
  return { interfaces, endpoints };
}

function stringOf(d: Uint8Array): string {
  expect(d[0]).to.equal(d.length);
  expect(d[1]).to.equal(3);
  let s = '';
  for (let i = 2; i < d.length; i += 2) s += String.fromCharCode(d[i]! | (d[i + 1]! << 8));
  return s;
}

async function openLoopback(opts: ConstructorParameters<typeof LoopbackDevice>[0] = {}) {
  const backend = new EmulatedBackend();
  const dev = new LoopbackDevice({ portPath: [2], ...opts });
  backend.add(dev);
  await backend.open(dev.id);
  return { backend, dev };
}

describe('emulated device base', () => {
  it('descriptors parse back and agree with DeviceInfo (every demo device)', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'usbroam-emu-'));
    const backend = await createDefaultEmulatedBackend({ imagePath: join(dir, 'd.img'), imageSizeBytes: 1 << 20 });
    try {
      const infos = backend.list();
      expect(infos.map((i) => i.id)).to.deep.equal(['emu-1-1', 'emu-1-2', 'emu-1-3']);
      expect(infos.map((i) => i.portPath)).to.deep.equal([[1], [2], [3]]);
      expect(new Set(infos.map((i) => i.serial)).size).to.equal(3);
      for (const info of infos) {
        const h = await backend.open(info.id);
        const dev = await getDescriptor(h, 1, 0, 18);
        expect(dev.status).to.equal(UrbStatus.Success);
        const d = dev.data!;
        expect(d.length).to.equal(18);
        expect(d[0] | 0).to.equal(18);
        expect(d[8]! | (d[9]! << 8)).to.equal(info.vendorId);
        expect(d[10]! | (d[11]! << 8)).to.equal(info.productId);
        expect(d[2]! | (d[3]! << 8)).to.equal(info.bcdUsb);
        expect(d[7]).to.equal(info.maxPacketSize0);
        expect(d[17]).to.equal(info.configurations.length);
        // Strings
        const langs = await getDescriptor(h, 3, 0, 255);
        expect([...langs.data!]).to.deep.equal([4, 3, 0x09, 0x04]);
        expect(stringOf((await getDescriptor(h, 3, d[14]!, 255)).data!)).to.equal(info.manufacturer);
        expect(stringOf((await getDescriptor(h, 3, d[15]!, 255)).data!)).to.equal(info.product);
        expect(stringOf((await getDescriptor(h, 3, d[16]!, 255)).data!)).to.equal(info.serial);
        // Configuration: header first (9 bytes), then the full length.
        const head = await getDescriptor(h, 2, 0, 9);
        expect(head.actualLength).to.equal(9);
        const total = head.data![2]! | (head.data![3]! << 8);
        const full = await getDescriptor(h, 2, 0, total);
        expect(full.actualLength).to.equal(total);
        const parsed = walkConfig(full.data!);
        const cfg = info.configurations[0]!;
        expect(parsed.interfaces.length).to.equal(cfg.interfaces.length);
        expect(parsed.endpoints.map((e) => e.address)).to.deep.equal(cfg.endpoints.map((e) => e.address));
        expect(parsed.endpoints.map((e) => e.attrs & 3)).to.deep.equal(cfg.endpoints.map((e) => e.type));
        expect(parsed.endpoints.map((e) => e.mps)).to.deep.equal(cfg.endpoints.map((e) => e.maxPacketSize));
        expect(full.data![5]).to.equal(cfg.value);
        // High speed: qualifier and other-speed config exist; no BOS.
        const q = await getDescriptor(h, 6, 0, 10);
        expect(q.status).to.equal(UrbStatus.Success);
        expect(q.data![1]).to.equal(6);
        const other = await getDescriptor(h, 7, 0, 4096);
        expect(other.data![1]).to.equal(7);
        expect((await getDescriptor(h, 0x0f, 0, 5)).status).to.equal(UrbStatus.Stall);
        expect((await getDescriptor(h, 3, 99, 255)).status).to.equal(UrbStatus.Stall);
        await h.close();
      }
    } finally {
      await backend.close();
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('SET/GET_CONFIGURATION and SET/GET_INTERFACE via control requests and handle API', async () => {
    const { backend, dev } = await openLoopback();
    try {
      expect(dev.info.activeConfiguration).to.equal(0);
      expect(dev.info.endpoints).to.have.length(0);
      const set = await control(dev, { bmRequestType: 0x00, bRequest: 0x09, wValue: 1, wIndex: 0, wLength: 0 });
      expect(set.status).to.equal(UrbStatus.Success);
      const get = await control(dev, { bmRequestType: 0x80, bRequest: 0x08, wValue: 0, wIndex: 0, wLength: 1 });
      expect([...get.data!]).to.deep.equal([1]);
      expect(dev.info.activeConfiguration).to.equal(1);
      expect(dev.info.endpoints.map((e) => e.address)).to.deep.equal([0x01, 0x81, 0x82]);
      expect((await control(dev, { bmRequestType: 0x00, bRequest: 0x09, wValue: 7, wIndex: 0, wLength: 0 })).status).to.equal(
        UrbStatus.Stall,
      );
      const si = await control(dev, { bmRequestType: 0x01, bRequest: 0x0b, wValue: 1, wIndex: 0, wLength: 0 });
      expect(si.status).to.equal(UrbStatus.Success);
      expect(await dev.getInterface(0)).to.equal(1);
      expect(dev.info.endpoints.map((e) => e.address)).to.deep.equal([0x01, 0x81, 0x82, 0x83, 0x03]);
      await dev.setInterface(0, 0);
      const gi = await control(dev, { bmRequestType: 0x81, bRequest: 0x0a, wValue: 0, wIndex: 0, wLength: 1 });
      expect([...gi.data!]).to.deep.equal([0]);
      let err: unknown;
      try {
        await dev.setInterface(0, 5);
      } catch (e) {
        err = e;
      }
      expect(err).to.be.instanceOf(UsbError);
      const st = await control(dev, { bmRequestType: 0x80, bRequest: 0x00, wValue: 0, wIndex: 0, wLength: 2 });
      expect([...st.data!]).to.deep.equal([1, 0]); // self powered
      expect((await control(dev, { bmRequestType: 0x00, bRequest: 0x05, wValue: 3, wIndex: 0, wLength: 0 })).status).to.equal(
        UrbStatus.Success,
      );
    } finally {
      await backend.close();
    }
  });

  it('completions are asynchronous, never inside submit()', async () => {
    const { backend, dev } = await openLoopback();
    try {
      await dev.setConfiguration(1);
      let inside = true;
      let calledInside = false;
      const p = new Promise<void>((resolve) => {
        dev.submit(makeUrb({ endpoint: LOOP_BULK_OUT, type: TransferType.Bulk, data: new Uint8Array(4) }), () => {
          calledInside = inside;
          resolve();
        });
        dev.submit(makeUrb({ endpoint: 0x8f, type: TransferType.Bulk, length: 4 }), () => {
          calledInside ||= inside;
        });
      });
      inside = false;
      await p;
      expect(calledInside).to.equal(false);
    } finally {
      await backend.close();
    }
  });

  it('counts executed URBs; URBs cancelled before executing are not counted', async () => {
    const backend = new EmulatedBackend();
    const dev = new SerialDevice({ portPath: [3] });
    backend.add(dev);
    await backend.open(dev.id);
    try {
      await dev.setConfiguration(1);
      const base = dev.stats.executed;
      const seen: number[] = [];
      dev.on('executed', (u) => seen.push(u.id));
      // First IN blocks (no data); the second queues behind it without executing.
      const first = bulkIn(dev, ACM_BULK_IN, 64, 1001);
      const second = bulkIn(dev, ACM_BULK_IN, 64, 1002);
      await new Promise((r) => setImmediate(r));
      expect(dev.stats.executed).to.equal(base + 1);
      expect(dev.cancel(1002)).to.equal(true);
      expect((await second).status).to.equal(UrbStatus.Cancelled);
      expect(dev.cancel(1002)).to.equal(false);
      // Cancel the executing one too: it completes Cancelled but was executed.
      expect(dev.cancel(1001)).to.equal(true);
      expect((await first).status).to.equal(UrbStatus.Cancelled);
      expect(dev.stats.executed).to.equal(base + 1);
      expect(seen).to.deep.equal([1001]);
      // Normal traffic: each URB exactly once.
      await bulkOut(dev, ACM_BULK_OUT, new Uint8Array([1, 2, 3]), 1003);
      const r = await bulkIn(dev, ACM_BULK_IN, 64, 1004);
      expect([...r.data!]).to.deep.equal([1, 2, 3]);
      expect(dev.stats.executed).to.equal(base + 3);
      expect(dev.stats.byEndpoint.get(ACM_BULK_IN)).to.equal(2);
      expect(dev.stats.byEndpoint.get(ACM_BULK_OUT)).to.equal(1);
      expect(seen).to.deep.equal([1001, 1003, 1004]);
      // Invalid URBs are not executed.
      await submit(dev, makeUrb({ endpoint: 0x8e, type: TransferType.Bulk, length: 1 }));
      expect(dev.stats.executed).to.equal(base + 3);
    } finally {
      await backend.close();
    }
  });

  it('unplug: emits gone, pending and later URBs complete IoError, operations reject', async () => {
    const backend = new EmulatedBackend();
    const dev = new SerialDevice({ portPath: [3] });
    backend.add(dev);
    const removed: string[] = [];
    backend.on('removed', (id: string) => removed.push(id));
    const h = await backend.open(dev.id);
    await h.setConfiguration(1);
    const gone = new Promise<string>((resolve) => h.once('gone', resolve));
    const pending = [bulkIn(h, ACM_BULK_IN, 64), bulkIn(h, ACM_BULK_IN, 64)];
    await new Promise((r) => setImmediate(r));
    expect(await backend.remove(dev.id)).to.equal(true);
    expect(await gone).to.be.a('string');
    for (const r of await Promise.all(pending)) expect(r.status).to.equal(UrbStatus.IoError);
    expect((await bulkOut(h, ACM_BULK_OUT, new Uint8Array(1))).status).to.equal(UrbStatus.IoError);
    let err: unknown;
    try {
      await h.setConfiguration(1);
    } catch (e) {
      err = e;
    }
    expect(err).to.be.instanceOf(UsbError);
    expect((err as UsbError).status).to.equal(UrbStatus.IoError);
    expect(removed).to.deep.equal([dev.id]);
    expect(backend.list()).to.have.length(0);
    await backend.close();
  });

  it('backend: added event, open twice refused, reopen after close', async () => {
    const backend = new EmulatedBackend();
    const added: DeviceInfo[] = [];
    backend.on('added', (i: DeviceInfo) => added.push(i));
    const dev = new LoopbackDevice({ portPath: [4], speed: Speed.Full });
    backend.add(dev);
    expect(added.map((a) => a.id)).to.deep.equal(['emu-1-4']);
    expect(added[0]!.speed).to.equal(Speed.Full);
    const h = await backend.open('emu-1-4');
    let err: unknown;
    try {
      await backend.open('emu-1-4');
    } catch (e) {
      err = e;
    }
    expect(err).to.be.instanceOf(UsbError);
    await h.close();
    expect((await bulkIn(h, LOOP_BULK_IN, 8)).status).to.equal(UrbStatus.IoError);
    const h2 = await backend.open('emu-1-4');
    expect(h2).to.equal(h);
    let err2: unknown;
    try {
      await backend.open('nope');
    } catch (e) {
      err2 = e;
    }
    expect(err2).to.be.instanceOf(UsbError);
    await backend.close();
  });

  it('SHORT_NOT_OK turns a short IN into IoError; oversize URBs are Inval', async () => {
    const backend = new EmulatedBackend();
    const dev: EmulatedDevice = new SerialDevice({ portPath: [3] });
    backend.add(dev);
    await backend.open(dev.id);
    try {
      await dev.setConfiguration(1);
      await bulkOut(dev, ACM_BULK_OUT, new Uint8Array([9, 9]));
      const r = await bulkIn(dev, ACM_BULK_IN, 64, undefined, URB_SHORT_NOT_OK);
      expect(r.status).to.equal(UrbStatus.IoError);
      expect(r.actualLength).to.equal(2);
      const big = await bulkIn(dev, ACM_BULK_IN, 17 * 1024 * 1024);
      expect(big.status).to.equal(UrbStatus.Inval);
    } finally {
      await backend.close();
    }
  });

  it('URB timeout completes with Timeout', async () => {
    const backend = new EmulatedBackend();
    const dev = new SerialDevice({ portPath: [3] });
    backend.add(dev);
    await backend.open(dev.id);
    try {
      await dev.setConfiguration(1);
      const r = await submit(dev, makeUrb({ endpoint: ACM_BULK_IN, type: TransferType.Bulk, length: 8, timeoutMs: 20 }));
      expect(r.status).to.equal(UrbStatus.Timeout);
    } finally {
      await backend.close();
    }
  });

  it('re-plug: a device removed without dispose can be added and opened again', async () => {
    const backend = new EmulatedBackend();
    const dev = new SerialDevice({ portPath: [3] });
    backend.add(dev);
    const h = await backend.open(dev.id);
    await h.setConfiguration(1);
    await backend.remove(dev.id, { dispose: false });
    expect(dev.isGone).to.equal(true);
    const added: string[] = [];
    backend.on('added', (i: DeviceInfo) => added.push(i.id));
    backend.add(dev);
    expect(added).to.deep.equal([dev.id]);
    expect(dev.isGone).to.equal(false);
    const h2 = await backend.open(dev.id);
    expect(await h2.getConfiguration()).to.equal(0);
    await h2.setConfiguration(1);
    await bulkOut(h2, ACM_BULK_OUT, Uint8Array.of(7));
    expect([...(await bulkIn(h2, ACM_BULK_IN, 8)).data!]).to.deep.equal([7]);
    await backend.close();
  });
});
