// Kernel messages recovered from a guest memory dump (the e2e harness's diagnostics for a guest
// whose console went silent).
import { expect } from 'chai';
import { kernelLinesInMemoryDump } from '../../src/devkit/guest/memory-dump-log.js';

describe('e2e harness: kernel messages in a guest memory dump', () => {
  const bin = (n: number) => Buffer.from(Array.from({ length: n }, (_, i) => (i * 37) % 32));

  it('finds printk texts between binary data, each once and in order; skips format strings and ordinary text', () => {
    const dump = Buffer.concat([
      bin(4096),
      Buffer.from('usb 1-1: reset high-speed USB device number 2 using xhci_hcd'),
      bin(64),
      Buffer.from('BUG: unable to handle page fault for address: 0000000000001234'),
      bin(64),
      Buffer.from('usb 1-1: reset high-speed USB device number 2 using xhci_hcd'),
      bin(64),
      Buffer.from('usb %d-%s: new device found, idVendor=%04x'), // rodata, not a message
      bin(64),
      Buffer.from('some unrelated page of text in the page cache'),
      bin(64),
      Buffer.from('INFO: task kworker/0:1:12 blocked for more than 120 seconds.'),
      bin(4096),
    ]);
    expect(kernelLinesInMemoryDump(dump)).to.deep.equal([
      'usb 1-1: reset high-speed USB device number 2 using xhci_hcd',
      'BUG: unable to handle page fault for address: 0000000000001234',
      'INFO: task kworker/0:1:12 blocked for more than 120 seconds.',
    ]);
  });

  it('stops at max lines', () => {
    const dump = Buffer.concat(Array.from({ length: 10 }, (_, i) => Buffer.concat([bin(16), Buffer.from(`xhci_hcd 0000:00:02.0: event ${i} ring full`)])));
    expect(kernelLinesInMemoryDump(dump, 4)).to.have.length(4);
  });
});
