// Large bulk URBs back to back through a server process: the loopback device in 'loop' mode hands
// back what was written, and several 256 KiB URBs are in flight at once each way. The server encodes
// every completion into one reused buffer (frame-codec ScratchBuffer): this proves each completion
// still reaches the client whole and in order, none overwritten by the next.
import { expect } from 'chai';
import { randomBytes } from 'node:crypto';
import { UsbHostClient } from '../../src/client/sdk/client.js';
import { UrbStatus } from '../../src/gen/usbroam/v1/usbhost.js';
import { clientTls } from '../../src/devkit/certs.js';
import { startServerProcess, type ServerProcess } from '../../src/devkit/server-process.js';

describe('large bulk URBs pipelined through a server process', function () {
  this.timeout(60_000);
  let server: ServerProcess | undefined;

  after(async () => {
    await server?.stop();
  });

  it('returns 32 different 256 KiB payloads byte for byte and in order, four OUT and four IN URBs in flight at a time', async () => {
    server = await startServerProcess(['--allow', 'bridge=*', '--disk-size-mib', '8']);
    const client = new UsbHostClient({ address: server.address.replace('127.0.0.1', 'localhost'), ...clientTls('bridge') });
    const dev = await client.openDevice({ serial: 'USBROAM-LOOP-0001' }, { maxInFlight: 64 });
    try {
      await dev.selectConfiguration(1);
      const mode = await dev.controlTransferOut({ requestType: 'vendor', recipient: 'device', request: 0x03, value: 1, index: 0 });
      expect(mode.status).to.equal(UrbStatus.URB_STATUS_SUCCESS);
      // Each round fills the 1 MiB loop FIFO with four OUT URBs in flight, then takes it back with
      // four IN URBs submitted together, whose completions the server encodes one after another.
      const size = 256 * 1024;
      for (let round = 0; round < 8; round++) {
        const payloads = Array.from({ length: 4 }, () => randomBytes(size));
        const writes = await Promise.all(payloads.map((p) => dev.transferOut(1, p)));
        for (const w of writes) expect(w.status).to.equal(UrbStatus.URB_STATUS_SUCCESS);
        const back = await Promise.all(payloads.map(() => dev.transferIn(1, size)));
        for (let i = 0; i < payloads.length; i++) {
          expect(back[i].status).to.equal(UrbStatus.URB_STATUS_SUCCESS);
          expect(Buffer.from(back[i].data).equals(payloads[i]), `round ${round}, payload ${i}`).to.equal(true);
        }
      }
    } finally {
      await dev.close();
      client.close();
    }
  });
});
