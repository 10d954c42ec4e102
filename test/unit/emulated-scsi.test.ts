// The emulated disk answers every SCSI command that returns parameter data exactly as it did
// before that data moved into scsi.ts (fixtures/emulated-scsi.json, captured from the previous
// mass-storage.ts): INQUIRY and its VPD pages, MODE SENSE 6/10 with every page and flag, the
// capacities, REPORT LUNS, sense; with default and custom identity, read-only and no write cache.
import { expect } from 'chai';
import fs from 'node:fs';
import { dumpScsi } from '../helpers/scsi-dump.js';

const fixture = JSON.parse(fs.readFileSync(new URL('./fixtures/emulated-scsi.json', import.meta.url), 'utf8')) as Record<string, string>;

describe('emulated disk SCSI answers', () => {
  let now: Record<string, string>;
  before(async () => {
    now = await dumpScsi();
  });

  it('answers the same commands, with data, failures and residues as captured', () => {
    expect(Object.keys(now)).to.have.length(52);
    expect(Object.keys(now)).to.deep.equal(Object.keys(fixture));
    for (const k of Object.keys(fixture)) expect(now[k], k).to.equal(fixture[k]);
  });

  it('the capture is not empty: INQUIRY says usbroam / Emulated Disk, an unknown VPD page fails', () => {
    expect(Buffer.from(fixture['default/inquiry']!.split(' ')[0]!, 'hex').toString('latin1')).to.contain('usbroam Emulated Disk');
    expect(fixture['default/vpd-unknown']).to.match(/status=1/);
  });
});
