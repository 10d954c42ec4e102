// The emulated devices' descriptors are byte for byte what they were before the devices declared
// them through the descriptor builder (fixtures/emulated-descriptors.json, captured from the
// hand-assembled versions), at every speed, with default and overridden names.
import { expect } from 'chai';
import fs from 'node:fs';
import { Speed, TransferType } from '../../src/server/backends/types.js';
import {
  bulkEndpoint,
  bulkMaxPacketSize,
  cdcFunctional,
  configuration,
  interruptEndpoint,
  isochronousEndpoint,
  usbDevice,
  usbInterface,
} from '../../src/server/backends/emulated/descriptor-builder.js';
import { buildDescriptors, parseConfigDescriptor } from '../../src/server/backends/emulated/descriptors.js';
import { dumpAll } from '../helpers/descriptor-dump.js';

const fixture = JSON.parse(fs.readFileSync(new URL('./fixtures/emulated-descriptors.json', import.meta.url), 'utf8')) as Record<string, unknown>;

describe('emulated device descriptors', () => {
  const now = JSON.parse(JSON.stringify(dumpAll())) as Record<string, unknown>;

  it('covers the same devices and speeds as the captured bytes', () => {
    expect(Object.keys(now)).to.deep.equal(Object.keys(fixture));
    expect(Object.keys(now)).to.have.length(18);
  });

  for (const key of Object.keys(fixture)) {
    it(`${key}: every descriptor is unchanged`, () => {
      expect(now[key]).to.deep.equal(fixture[key]);
    });
  }
});

describe('descriptor builder', () => {
  it('lays out CDC functional descriptors as CDC 1.2 / PSTN 1.2 define them', () => {
    expect([...cdcFunctional.header(0x0120)]).to.deep.equal([5, 0x24, 0x00, 0x20, 0x01]);
    expect([...cdcFunctional.callManagement(0x03, 2)]).to.deep.equal([5, 0x24, 0x01, 0x03, 2]);
    expect([...cdcFunctional.acm(0x02)]).to.deep.equal([4, 0x24, 0x02, 0x02]);
    expect([...cdcFunctional.union(0, 1, 2)]).to.deep.equal([5 + 1, 0x24, 0x06, 0, 1, 2]);
  });

  it('builds a configuration whose bytes parse back to what was declared', () => {
    const spec = usbDevice({ vendorId: 0x1209, productId: 0x0001, manufacturer: 'm', product: 'p', serial: 's' }, [
      configuration({ value: 1, maxPowerMa: 100, selfPowered: true }, [
        usbInterface({ number: 0, class: 0xff, classDescriptors: [Uint8Array.of(3, 0x21, 7)] }, [
          bulkEndpoint(0x81, bulkMaxPacketSize(Speed.High)),
          interruptEndpoint(0x82, 8, 4),
          isochronousEndpoint(0x03, 1024, 1),
        ]),
      ]),
    ]);
    const ds = buildDescriptors(spec, Speed.High);
    const cfg = ds.configs[0]!;
    // configuration (9) + interface (9) + class-specific (3) + 3 endpoints (7 each)
    expect(cfg.length).to.equal(9 + 9 + 3 + 21);
    expect([...cfg.subarray(18, 21)]).to.deep.equal([3, 0x21, 7]);
    const summary = parseConfigDescriptor(cfg, Speed.High);
    expect(summary.selfPowered).to.equal(true);
    expect(summary.endpoints.map((e) => [e.address, e.type, e.maxPacketSize, e.interval])).to.deep.equal([
      [0x81, TransferType.Bulk, 512, 0],
      [0x82, TransferType.Interrupt, 8, 4],
      [0x03, TransferType.Isochronous, 1024, 1],
    ]);
    expect([...ds.device.subarray(0, 8)]).to.deep.equal([18, 1, 0x00, 0x02, 0, 0, 0, 64]);
  });
});
