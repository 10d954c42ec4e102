// The UAS IU codec of the test kit (src/devkit/uas-client.ts): command IU layout, status-pipe
// IUs decoded (sense, response, read/write ready) and refused when short or unknown, CDBs.
import { expect } from 'chai';
import {
  decodeInquiry,
  decodeReadCapacity10,
  decodeStatusIu,
  encodeCommandIu,
  read10Cdb,
  senseKey,
  write10Cdb,
} from '../../src/devkit/uas-client.js';

describe('UAS IU codec (devkit)', () => {
  it('command IU: id 1, tag big-endian, LUN, CDB at byte 16; bad tag, CDB or LUN refused', () => {
    const iu = encodeCommandIu(0x0102, read10Cdb(0x01020304, 0x0506), 3);
    expect(iu.length).to.equal(32);
    expect([...iu.subarray(0, 16)]).to.deep.equal([1, 0, 1, 2, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0]);
    expect([...iu.subarray(16, 26)]).to.deep.equal([0x28, 0, 1, 2, 3, 4, 0, 5, 6, 0]);
    expect(() => encodeCommandIu(0, read10Cdb(0, 1))).to.throw(RangeError, /tag 0/);
    expect(() => encodeCommandIu(1, new Uint8Array(17))).to.throw(RangeError, /CDB of 17 bytes/);
    expect(() => encodeCommandIu(1, new Uint8Array(6), 256)).to.throw(RangeError, /LUN 256/);
    expect(() => write10Cdb(0, 0)).to.throw(RangeError, /0 blocks/);
  });

  it('status IUs: sense with its sense data, response, read/write ready; short or unknown refused', () => {
    const sense = Uint8Array.from([3, 0, 0, 7, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 18, 0x70, 0, 6, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x29, 0, 0, 0, 0, 0]);
    const s = decodeStatusIu(sense);
    expect(s).to.include({ kind: 'sense', tag: 7, status: 2 });
    expect(senseKey((s as { sense: Uint8Array }).sense)).to.deep.equal({ key: 6, asc: 0x29, ascq: 0 });
    expect(decodeStatusIu(Uint8Array.from([4, 0, 0, 9, 0, 0, 0, 8]))).to.deep.equal({ kind: 'response', tag: 9, additionalInfo: 0, responseCode: 8 });
    expect(decodeStatusIu(Uint8Array.from([6, 0, 0, 1]))).to.deep.equal({ kind: 'read-ready', tag: 1 });
    expect(decodeStatusIu(Uint8Array.from([7, 0, 0, 2]))).to.deep.equal({ kind: 'write-ready', tag: 2 });
    expect(() => decodeStatusIu(sense.subarray(0, 20))).to.throw(RangeError, /sense length 18 past the IU's 20 bytes/);
    expect(() => decodeStatusIu(Uint8Array.from([3, 0, 0]))).to.throw(RangeError, /3 bytes/);
    expect(() => decodeStatusIu(Uint8Array.from([9, 0, 0, 1]))).to.throw(RangeError, /unknown IU id 0x9/);
  });

  it('INQUIRY and READ CAPACITY(10) data', () => {
    const inq = new Uint8Array(36);
    inq.set(Buffer.from('QEMU    QEMU HARDDISK   2.5+'), 8);
    expect(decodeInquiry(inq)).to.deep.equal({ deviceType: 0, vendor: 'QEMU', product: 'QEMU HARDDISK', revision: '2.5+' });
    expect(decodeReadCapacity10(Uint8Array.from([0, 0, 0x1f, 0xff, 0, 0, 2, 0]))).to.deep.equal({ lastLba: 8191, blockLength: 512 });
    expect(() => decodeInquiry(new Uint8Array(5))).to.throw(RangeError);
  });
});
