import { expect } from 'chai';
import { redirEndpointType } from '../../src/client/bridge/redir-descriptors.js';
import { TransferType as PbTransferType } from '../../src/gen/usbroam/v1/usbhost.js';
import { EndpointType } from '../../src/qemu/usbredir/index.js';
import { TransferType, transferTypeOfAttributes } from '../../src/server/backends/types.js';
import { transferTypeFromProto, transferTypeToProto } from '../../src/server/convert.js';

describe('transfer types across the backends, the proto and usbredir', () => {
  const all: [TransferType, PbTransferType, number][] = [
    [TransferType.Control, PbTransferType.TRANSFER_CONTROL, EndpointType.control],
    [TransferType.Isochronous, PbTransferType.TRANSFER_ISOCHRONOUS, EndpointType.iso],
    [TransferType.Bulk, PbTransferType.TRANSFER_BULK, EndpointType.bulk],
    [TransferType.Interrupt, PbTransferType.TRANSFER_INTERRUPT, EndpointType.interrupt],
  ];

  it('maps each type to its counterpart and back', () => {
    for (const [backend, pb, redir] of all) {
      expect(transferTypeToProto(backend)).to.equal(pb);
      expect(transferTypeFromProto(pb)).to.equal(backend);
      expect(redirEndpointType(pb)).to.equal(redir);
    }
  });

  it('decodes bmAttributes (bits 1..0; the sync and usage bits do not matter)', () => {
    expect(transferTypeOfAttributes(0x02)).to.equal(TransferType.Bulk);
    expect(transferTypeOfAttributes(0x0d)).to.equal(TransferType.Isochronous);
    expect(transferTypeOfAttributes(0x33)).to.equal(TransferType.Interrupt);
  });

  it('names no type for a number no USB transfer has', () => {
    expect(transferTypeFromProto(7 as PbTransferType)).to.equal(undefined);
    expect(transferTypeFromProto(PbTransferType.UNRECOGNIZED)).to.equal(undefined);
    expect(redirEndpointType(7 as PbTransferType)).to.equal(EndpointType.invalid);
  });
});
