// The emulated disk's bus speed: chosen per device (createDefaultEmulatedBackend diskSpeed,
// usbroam serve --disk-speed, config emulated.disk.speed); what a host sees at SuperSpeed
// (descriptors over the wire) vs high speed; 1 MiB BOT commands at SuperSpeed.
import { expect } from 'chai';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Speed, UrbStatus } from '../../src/server/backends/types.js';
import { createDefaultEmulatedBackend, parseEmulatedSpeed, type EmulatedBackend } from '../../src/server/backends/emulated/emulated-backend.js';
import { MSC_BULK_IN, MSC_BULK_OUT, type MassStorageDevice } from '../../src/server/backends/emulated/mass-storage.js';
import { bulkIn, bulkOut, control, getDescriptor } from '../../src/server/backends/emulated/urb-helpers.js';
import { emulatedBackends, serveConfig } from '../../src/cli/serve.js';
import type { EmulatedDevice } from '../../src/server/backends/emulated/emulated-device.js';

const u16 = (d: Uint8Array, o: number) => d[o]! | (d[o + 1]! << 8);
const u32 = (d: Uint8Array, o: number) => (d[o]! | (d[o + 1]! << 8) | (d[o + 2]! << 16) | (d[o + 3]! << 24)) >>> 0;

function cbw(tag: number, length: number, dirIn: boolean, cdb: number[]): Uint8Array {
  const b = new Uint8Array(31);
  const v = new DataView(b.buffer);
  v.setUint32(0, 0x43425355, true);
  v.setUint32(4, tag, true);
  v.setUint32(8, length, true);
  b[12] = dirIn ? 0x80 : 0;
  b[13] = 0;
  b[14] = cdb.length;
  b.set(cdb, 15);
  return b;
}
const be32 = (x: number) => [(x >>> 24) & 0xff, (x >>> 16) & 0xff, (x >>> 8) & 0xff, x & 0xff];
const be16 = (x: number) => [(x >> 8) & 0xff, x & 0xff];

/** Descriptors that follow each endpoint descriptor in a configuration: [endpoint, companion?]. */
function endpointsWithCompanions(cfg: Uint8Array): { ep: Uint8Array; companion?: Uint8Array }[] {
  const out: { ep: Uint8Array; companion?: Uint8Array }[] = [];
  for (let off = 0; off < cfg.length; off += cfg[off]!) {
    const d = cfg.subarray(off, off + cfg[off]!);
    if (d[1] === 0x05) out.push({ ep: d });
    else if (d[1] === 0x30) {
      const last = out[out.length - 1];
      expect(last, 'companion right after an endpoint').to.not.equal(undefined);
      expect(last!.companion, 'one companion per endpoint').to.equal(undefined);
      last!.companion = d;
    }
  }
  return out;
}

describe('emulated disk speed', () => {
  let dir: string;
  const backends: EmulatedBackend[] = [];
  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'usbroam-speed-'));
  });
  after(async () => {
    for (const b of backends) await b.close();
    await rm(dir, { recursive: true, force: true });
  });
  async function backend(opts: Parameters<typeof createDefaultEmulatedBackend>[0]): Promise<EmulatedBackend> {
    const b = await createDefaultEmulatedBackend({ imagePath: join(dir, `d${backends.length}.img`), imageSizeBytes: 4 << 20, ...opts });
    backends.push(b);
    return b;
  }

  it('parseEmulatedSpeed: full/high/super (any case); anything else throws', () => {
    expect(parseEmulatedSpeed('super')).to.equal(Speed.Super);
    expect(parseEmulatedSpeed('HIGH')).to.equal(Speed.High);
    expect(parseEmulatedSpeed(' full ')).to.equal(Speed.Full);
    expect(() => parseEmulatedSpeed('superplus', 'disk speed')).to.throw(/disk speed must be one of full, high, super/);
    expect(() => parseEmulatedSpeed('')).to.throw();
  });

  it('diskSpeed sets the disk only; the loopback and serial devices stay at high speed', async () => {
    const b = await backend({ diskSpeed: Speed.Super });
    expect(b.list().map((i) => [i.id, i.speed])).to.deep.equal([
      ['emu-1-1', Speed.Super],
      ['emu-1-2', Speed.High],
      ['emu-1-3', Speed.High],
    ]);
    const plain = await backend({});
    expect(plain.list().map((i) => i.speed)).to.deep.equal([Speed.High, Speed.High, Speed.High]);
    const all = await backend({ speed: Speed.Full, diskSpeed: Speed.High });
    expect(all.list().map((i) => i.speed)).to.deep.equal([Speed.High, Speed.Full, Speed.Full]);
  });

  it('SuperSpeed disk on the wire: bcdUSB 3.x, ep0 exponent 9, 1024-byte bulk with companions, BOS; no qualifier', async () => {
    const b = await backend({ diskSpeed: Speed.Super });
    const h = await b.open('emu-1-1');
    const dev = (await getDescriptor(h, 1, 0, 18)).data!;
    expect(u16(dev, 2)).to.be.at.least(0x0300);
    expect(dev[7]).to.equal(9);
    const head = (await getDescriptor(h, 2, 0, 9)).data!;
    const cfg = (await getDescriptor(h, 2, 0, u16(head, 2))).data!;
    expect(cfg[8]).to.equal(13); // bMaxPower: 100 mA in 8 mA units at SuperSpeed
    const eps = endpointsWithCompanions(cfg);
    expect(eps.map((e) => e.ep[2])).to.have.members([MSC_BULK_IN, MSC_BULK_OUT]);
    for (const { ep, companion } of eps) {
      expect(ep[3]! & 3).to.equal(2);
      expect(u16(ep, 4)).to.equal(1024);
      expect(companion, 'SS endpoint companion').to.not.equal(undefined);
      expect(companion![0]).to.equal(6);
      expect(companion![2]).to.equal(15); // bMaxBurst
      expect(companion![3]).to.equal(0); // no streams (BOT, not UAS)
      expect(u16(companion!, 4)).to.equal(0);
    }
    const bosHead = (await getDescriptor(h, 0x0f, 0, 5)).data!;
    expect(bosHead[1]).to.equal(0x0f);
    const bos = (await getDescriptor(h, 0x0f, 0, u16(bosHead, 2))).data!;
    expect(bos.length).to.equal(u16(bosHead, 2));
    const caps: number[] = [];
    for (let off = 5; off < bos.length; off += bos[off]!) {
      expect(bos[off + 1]).to.equal(0x10);
      caps.push(bos[off + 2]!);
      if (bos[off + 2] === 0x03) expect(u16(bos, off + 4) & 0x08, 'SuperSpeed supported').to.equal(0x08);
      if (bos[off + 2] === 0x02) expect(u32(bos, off + 3) & 0x02).to.equal(0x02);
    }
    expect(caps).to.include(0x03);
    expect(caps.length).to.equal(bos[4]);
    // A SuperSpeed device has no device qualifier or other-speed configuration.
    expect((await getDescriptor(h, 0x06, 0, 10)).status).to.equal(UrbStatus.Stall);
    expect((await getDescriptor(h, 0x07, 0, 9)).status).to.equal(UrbStatus.Stall);
    // SET_SEL and SET_ISOCH_DELAY (sent by Linux to SuperSpeed devices) are accepted.
    expect((await control(h, { bmRequestType: 0x00, bRequest: 0x30, wValue: 0, wIndex: 0, wLength: 6 }, new Uint8Array(6))).status).to.equal(UrbStatus.Success);
    expect((await control(h, { bmRequestType: 0x00, bRequest: 0x31, wValue: 40, wIndex: 0, wLength: 0 })).status).to.equal(UrbStatus.Success);
  });

  it('high-speed disk on the wire: bcdUSB 2.00, 64-byte ep0, 512-byte bulk, a qualifier, no companions', async () => {
    const b = await backend({});
    const h = await b.open('emu-1-1');
    const dev = (await getDescriptor(h, 1, 0, 18)).data!;
    expect(u16(dev, 2)).to.equal(0x0200);
    expect(dev[7]).to.equal(64);
    const head = (await getDescriptor(h, 2, 0, 9)).data!;
    const cfg = (await getDescriptor(h, 2, 0, u16(head, 2))).data!;
    for (const { ep, companion } of endpointsWithCompanions(cfg)) {
      expect(u16(ep, 4)).to.equal(512);
      expect(companion).to.equal(undefined);
    }
    expect((await getDescriptor(h, 0x06, 0, 10)).status).to.equal(UrbStatus.Success);
  });

  it('a 1 MiB WRITE(10) and READ(10) (what Linux sends a SuperSpeed disk) in single bulk URBs', async () => {
    const b = await backend({ diskSpeed: Speed.Super });
    const h = (await b.open('emu-1-1')) as EmulatedDevice as MassStorageDevice;
    expect((await control(h, { bmRequestType: 0x00, bRequest: 0x09, wValue: 1, wIndex: 0, wLength: 0 })).status).to.equal(UrbStatus.Success);
    const MiB = 1 << 20;
    const data = new Uint8Array(MiB);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7 + (i >> 10)) & 0xff;
    expect((await bulkOut(h, MSC_BULK_OUT, cbw(1, MiB, false, [0x2a, 0, ...be32(8), 0, ...be16(2048), 0]))).status).to.equal(UrbStatus.Success);
    const w = await bulkOut(h, MSC_BULK_OUT, data);
    expect(w.status).to.equal(UrbStatus.Success);
    expect(w.actualLength).to.equal(MiB);
    const csw1 = (await bulkIn(h, MSC_BULK_IN, 13)).data!;
    expect([u32(csw1, 8), csw1[12]]).to.deep.equal([0, 0]);
    expect((await bulkOut(h, MSC_BULK_OUT, cbw(2, MiB, true, [0x28, 0, ...be32(8), 0, ...be16(2048), 0]))).status).to.equal(UrbStatus.Success);
    const r = await bulkIn(h, MSC_BULK_IN, MiB);
    expect(r.status).to.equal(UrbStatus.Success);
    expect(Buffer.from(r.data!).equals(Buffer.from(data))).to.equal(true);
    const csw2 = (await bulkIn(h, MSC_BULK_IN, 13)).data!;
    expect([u32(csw2, 8), csw2[12]]).to.deep.equal([0, 0]);
    expect(h.scsiStats.bytesWritten).to.equal(MiB);
  });

  it('usbroam serve: --disk-speed and the config file disk.speed reach the disk; a bad value fails early', async () => {
    const image = join(dir, 'serve.img');
    const cfg = serveConfig({ diskImage: image, diskSizeMib: '4', diskSpeed: 'super' });
    expect(cfg.emulated?.disk).to.deep.equal({ image, sizeMiB: 4, speed: 'super' });
    const [b] = (await emulatedBackends(cfg, dir)) as EmulatedBackend[];
    backends.push(b!);
    expect(b!.list().map((i) => i.speed)).to.deep.equal([Speed.Super, Speed.High, Speed.High]);
    // Without --disk-image the default image (in the data dir) is used.
    const noImage = serveConfig({ diskSpeed: 'high' });
    expect(noImage.emulated?.disk).to.deep.equal({ speed: 'high' });
    expect(() => serveConfig({ diskSpeed: 'warp' })).to.throw(/disk speed must be one of/);
    const file = join(dir, 'config.json');
    await writeFile(file, JSON.stringify({ emulated: { disk: { image: join(dir, 'cfg.img'), sizeMiB: 4, speed: 'super' } } }));
    const fromFile = serveConfig({ config: file });
    expect(fromFile.emulated?.disk).to.deep.include({ speed: 'super' });
    const [b2] = (await emulatedBackends(fromFile, dir)) as EmulatedBackend[];
    backends.push(b2!);
    expect(b2!.get('emu-1-1')!.speed).to.equal(Speed.Super);
    // The flag overrides the file.
    expect(serveConfig({ config: file, diskSpeed: 'high' }).emulated?.disk).to.deep.include({ speed: 'high' });
    // --no-emulated / disk: false: nothing to set.
    await writeFile(file, JSON.stringify({ emulated: { disk: false } }));
    expect(serveConfig({ config: file, diskSpeed: 'super' }).emulated?.disk).to.equal(false);
  });

  it('usbroam serve: --disk-latency-ms and the config file disk.latencyMs reach the disk; a bad value fails early', async () => {
    const cfg = serveConfig({ diskImage: join(dir, 'lat.img'), diskSizeMib: '4', diskLatencyMs: '250' });
    expect(cfg.emulated?.disk).to.deep.include({ latencyMs: 250 });
    const [b] = (await emulatedBackends(cfg, dir)) as EmulatedBackend[];
    backends.push(b!);
    expect((b!.get('emu-1-1') as MassStorageDevice).latencyMs).to.equal(250);
    expect(() => serveConfig({ diskLatencyMs: 'soon' })).to.throw(/disk latency must be an integer/);
    expect(() => serveConfig({ diskLatencyMs: '-5' })).to.throw(/disk latency must be an integer/);
    const file = join(dir, 'lat.json');
    await writeFile(file, JSON.stringify({ emulated: { disk: { image: join(dir, 'lat2.img'), sizeMiB: 4, latencyMs: 40 } } }));
    expect(serveConfig({ config: file }).emulated?.disk).to.deep.include({ latencyMs: 40 });
    expect(serveConfig({ config: file, diskLatencyMs: '7' }).emulated?.disk).to.deep.include({ latencyMs: 7 });
    await writeFile(file, JSON.stringify({ emulated: { disk: { latencyMs: 'x' } } }));
    expect(() => serveConfig({ config: file })).to.throw(/disk latency must be an integer/);
  });
});
