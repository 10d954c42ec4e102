// The data the emulated disk answers to every SCSI command that returns parameter data (INQUIRY
// and its VPD pages, MODE SENSE, capacities, sense), with the CSW status, as hex: what
// test/unit/emulated-scsi.test.ts compares with the answers captured before the SCSI data moved
// into scsi.ts.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { UrbStatus } from '../../src/server/backends/types.js';
import type { EmulatedDevice } from '../../src/server/backends/emulated/emulated-device.js';
import { MassStorageDevice, MSC_BULK_IN, MSC_BULK_OUT, type MassStorageOptions } from '../../src/server/backends/emulated/mass-storage.js';
import { bulkIn, bulkOut } from '../../src/server/backends/emulated/urb-helpers.js';

type Make = (o: MassStorageOptions) => EmulatedDevice & { init(): Promise<void>; dispose(): Promise<void> };

const CDBS: Record<string, number[]> = {
  inquiry: [0x12, 0, 0, 0, 96, 0],
  'inquiry-short-alloc': [0x12, 0, 0, 0, 5, 0],
  'vpd-00': [0x12, 1, 0x00, 0, 255, 0],
  'vpd-80': [0x12, 1, 0x80, 0, 255, 0],
  'vpd-83': [0x12, 1, 0x83, 0, 255, 0],
  'vpd-b0': [0x12, 1, 0xb0, 0, 255, 0],
  'vpd-b1': [0x12, 1, 0xb1, 0, 255, 0],
  'vpd-b2': [0x12, 1, 0xb2, 0, 255, 0],
  'vpd-unknown': [0x12, 1, 0x99, 0, 255, 0],
  'sense-after-unknown-vpd': [0x03, 0, 0, 0, 18, 0],
  'mode-sense6-all': [0x1a, 0, 0x3f, 0, 255, 0],
  'mode-sense6-all-dbd': [0x1a, 0x08, 0x3f, 0, 255, 0],
  'mode-sense6-caching': [0x1a, 0, 0x08, 0, 255, 0],
  'mode-sense6-caching-changeable': [0x1a, 0, 0x48, 0, 255, 0],
  'mode-sense6-control': [0x1a, 0, 0x0a, 0, 255, 0],
  'mode-sense6-iec': [0x1a, 0, 0x1c, 0, 255, 0],
  'mode-sense6-unknown': [0x1a, 0, 0x01, 0, 255, 0],
  'mode-sense6-saved': [0x1a, 0, 0xff, 0, 255, 0],
  'mode-sense10-all': [0x5a, 0, 0x3f, 0, 0, 0, 0, 1, 0, 0],
  'mode-sense10-all-llbaa': [0x5a, 0x10, 0x3f, 0, 0, 0, 0, 1, 0, 0],
  'mode-sense10-all-subpages': [0x5a, 0, 0x3f, 0xff, 0, 0, 0, 1, 0, 0],
  'read-capacity10': [0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0],
  'read-capacity16': [0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
  'read-format-capacities': [0x23, 0, 0, 0, 0, 0, 0, 0, 252, 0],
  'report-luns': [0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
  'request-sense': [0x03, 0, 0, 0, 18, 0],
};

const OPTION_SETS: Record<string, Partial<MassStorageOptions>> = {
  default: {},
  custom: { vendor: 'ACME', productName: 'Disk With A Long Name!', revision: '9z', serial: 'SER-42', removable: true, writeCache: false, readOnly: true },
};

function cbw(tag: number, length: number, cdb: number[]): Uint8Array {
  const b = new Uint8Array(31);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, 0x43425355, true);
  dv.setUint32(4, tag, true);
  dv.setUint32(8, length, true);
  b[12] = 0x80;
  b[14] = cdb.length;
  b.set(cdb, 15);
  return b;
}

export async function dumpScsi(make: Make = (o) => new MassStorageDevice(o)): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  const dir = await mkdtemp(join(tmpdir(), 'usbroam-scsi-'));
  try {
    for (const [setName, extra] of Object.entries(OPTION_SETS)) {
      const imagePath = join(dir, `${setName}.img`);
      if (extra.readOnly) {
        // A read-only disk needs its image to exist.
        const creator = make({ imagePath, sizeBytes: 3 * 1024 * 1024 });
        await creator.init();
        await creator.dispose();
      }
      const dev = make({ imagePath, sizeBytes: 3 * 1024 * 1024, ...extra });
      await dev.init();
      dev.markOpened();
      await dev.setConfiguration(1);
      let tag = 1;
      for (const [name, cdb] of Object.entries(CDBS)) {
        const r = await bulkOut(dev, MSC_BULK_OUT, cbw(tag, 512, cdb));
        if (r.status !== UrbStatus.Success) throw new Error(`${name}: CBW ${r.status}`);
        const data = await bulkIn(dev, MSC_BULK_IN, 512);
        let csw = data;
        let payload = '';
        if (data.actualLength !== 13 || Buffer.from(data.data!.subarray(0, 4)).toString('latin1') !== 'USBS') {
          payload = Buffer.from(data.data ?? []).toString('hex');
          csw = await bulkIn(dev, MSC_BULK_IN, 13);
        }
        out[`${setName}/${name}`] = `${payload} status=${csw.data![12]} residue=${Buffer.from(csw.data!).readUInt32LE(8)}`;
        tag++;
      }
      await dev.dispose();
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
  return out;
}
