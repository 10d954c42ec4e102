// The emulated devices' descriptors are byte for byte what they were before the devices declared
// them through the descriptor builder (fixtures/emulated-descriptors.json, captured from the
// hand-assembled versions), at every speed, with default and overridden names.
import { expect } from 'chai';
import fs from 'node:fs';
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
