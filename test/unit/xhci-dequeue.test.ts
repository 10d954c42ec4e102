// The xHCI endpoint-context rewind at pre-switchover (src/client/bridge/handoff/xhci-dequeue.ts) against
// a fake QEMU: HMP `info usb` / `info pci` / `xp` over a fake QMP client reading a simulated
// guest memory, and `gdbserver unix:...` starting a fake gdbstub (real unix socket, gdb remote
// protocol) that writes that memory.
import { expect } from 'chai';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { silentLogger } from '../../src/common/log.js';
import { bar0Of, endpointDci, GdbWriter, rewindXhciDequeues, usbAddressOf } from '../../src/client/bridge/handoff/xhci-dequeue.js';
import { FakeQemu, INFO_PCI, INFO_USB } from '../helpers/fake-qemu-memory.js';

// A guest layout: xHCI BAR at 0xfebf0000 (CAPLENGTH 0x40, 32-byte contexts), DCBAA at
// 0x7000000, slot 2's device context at 0x7001000, a bulk IN ring (ep 0x81, DCI 3) at
// 0x7002000 and a bulk OUT ring (ep 0x02, DCI 4) at 0x7003000.
const BAR = 0xfebf0000n;
const DCBAA = 0x7000000n;
const DEVCTX = 0x7001000n;
function layout(q: FakeQemu): void {
  q.set(BAR, 0x01000040, 0, 0, 0, 0x0); // CAPLENGTH 0x40, HCCPARAMS1 CSZ=0
  q.set(BAR + 0x40n + 0x30n, Number(DCBAA), 0);
  q.set(DCBAA + 16n, Number(DEVCTX), 0);
  // ep 0x81: running, bulk IN (type 6), dequeue at the 16th TRB, cycle 1
  q.set(DEVCTX + 32n * 3n, 1, 6 << 3, 0x7002000 + 16 * 15 + 1, 0);
  // ep 0x02: running, bulk OUT (type 2), dequeue at TRB 4, cycle 0
  q.set(DEVCTX + 32n * 4n, 1, 2 << 3, 0x7003000 + 16 * 4, 0);
  // Normal TRBs (type 1) with cycle 1 in the IN ring, cycle 0 in the OUT ring.
  for (let i = 0; i < 32; i++) q.set(0x7002000n + BigInt(16 * i), 0, 0, 64, (1 << 10) | 1);
  for (let i = 0; i < 32; i++) q.set(0x7003000n + BigInt(16 * i), 0, 0, 512, 1 << 10);
}

describe('xHCI dequeue rewind (pre-switchover work-around for QEMU xHCI migration)', () => {
  let dir: string;
  beforeEach(() => (dir = mkdtempSync(path.join(os.tmpdir(), 'uxd-'))));
  afterEach(() => rmSync(dir, { recursive: true, force: true }));

  it('finds the slot of a usb device by its qdev id in `info usb`', () => {
    expect(usbAddressOf(INFO_USB, 'usbroam-acm')).to.equal(2);
    expect(usbAddressOf(INFO_USB, 'usbroam-msc')).to.equal(1);
    expect(usbAddressOf(INFO_USB, 'usbroam')).to.equal(undefined);
  });

  it('finds BAR0 of a controller by its qdev id in `info pci`, and whether it is xHCI', () => {
    expect(bar0Of(INFO_PCI, 'xhci')).to.deep.equal({ bar: 0xfebf0000n, xhci: true });
    expect(bar0Of(INFO_PCI, 'ehci')).to.deep.equal({ bar: 0xfebf1000n, xhci: false });
    expect(bar0Of(INFO_PCI, 'xhc')).to.equal(undefined);
  });

  it('one gdbstub shared by concurrent writers (several attachments of one VM): every write gets its own reply', async () => {
    const q = new FakeQemu(dir);
    const g = await GdbWriter.open(q.qmp(), dir);
    try {
      const addrs = [0x7004000n, 0x7004020n, 0x7004040n];
      await Promise.all(addrs.map((a, i) => g.write(a, Buffer.from([i + 1, 0, 0, 0]))));
      expect(addrs.map((a) => q.dw(a))).to.deep.equal([1, 2, 3]);
      expect(q.gdbWrites).to.have.length(3);
    } finally {
      await g.close();
    }
  });

  it('points each endpoint context at the oldest TD in flight (address | its cycle bit), through the gdbstub, and stops the gdbstub', async () => {
    const q = new FakeQemu(dir);
    layout(q);
    const res = await rewindXhciDequeues(q.qmp(), {
      controllerId: 'xhci',
      deviceId: 'usbroam-acm',
      endpoints: [
        { endpoint: 0x81, oldestId: 0x7002000n + 16n * 2n, count: 14 },
        { endpoint: 0x02, oldestId: 0x7003000n + 16n * 3n, count: 1 },
      ],
      runDir: dir,
      log: silentLogger,
    });
    expect(res.skipped).to.deep.equal([]);
    expect(res.patched.map((p) => p.endpoint)).to.deep.equal([0x81, 0x02]);
    expect(q.dw(DEVCTX + 32n * 3n + 8n)).to.equal(0x7002000 + 32 + 1);
    expect(q.dw(DEVCTX + 32n * 3n + 12n)).to.equal(0);
    expect(q.dw(DEVCTX + 32n * 4n + 8n)).to.equal(0x7003000 + 48);
    // Dwords 0, 1 and 4 untouched.
    expect(q.dw(DEVCTX + 32n * 3n)).to.equal(1);
    expect(q.dw(DEVCTX + 32n * 3n + 4n)).to.equal(6 << 3);
    expect(q.gdbWrites).to.have.length(2);
    expect(q.hmpLog.at(-1)).to.match(/^xp /); // read back after the write
    expect(q.hmpLog).to.include('gdbserver none');
    expect(q.gdb).to.equal(undefined);
  });

  it('leaves a context that already points at the oldest TD alone (no gdbstub at all)', async () => {
    const q = new FakeQemu(dir);
    layout(q);
    const res = await rewindXhciDequeues(q.qmp(), {
      controllerId: 'xhci',
      deviceId: 'usbroam-acm',
      endpoints: [{ endpoint: 0x81, oldestId: 0x7002000n + 16n * 15n, count: 1 }],
      runDir: dir,
      log: silentLogger,
    });
    expect(res.unchanged).to.deep.equal([0x81]);
    expect(res.patched).to.deep.equal([]);
    expect(q.hmpLog.some((l) => l.startsWith('gdbserver'))).to.equal(false);
  });

  it('skips (and says why) an endpoint that is not running, of another type, or whose TD is not a Normal TRB; refuses a non-xHCI controller', async () => {
    const q = new FakeQemu(dir);
    layout(q);
    q.set(DEVCTX + 32n * 4n, 2); // ep 0x02 halted
    q.set(0x7002000n + 16n * 5n + 12n, (6 << 10) | 1); // a Status TRB
    const res = await rewindXhciDequeues(q.qmp(), {
      controllerId: 'xhci',
      deviceId: 'usbroam-acm',
      endpoints: [
        { endpoint: 0x81, oldestId: 0x7002000n + 16n * 5n, count: 3 },
        { endpoint: 0x02, oldestId: 0x7003000n, count: 1 },
        { endpoint: 0x83, oldestId: 0x7002000n, count: 1 },
      ],
      runDir: dir,
      log: silentLogger,
    });
    expect(res.patched).to.deep.equal([]);
    expect(res.skipped.map((s) => s.endpoint)).to.deep.equal([0x81, 0x02, 0x83]);
    expect(res.skipped[0]!.why).to.match(/not Normal/);
    expect(res.skipped[1]!.why).to.match(/state 2/);
    expect(res.skipped[2]!.why).to.match(/state 0/);
    let err: Error | undefined;
    await rewindXhciDequeues(q.qmp(), { controllerId: 'ehci', deviceId: 'usbroam-acm', endpoints: [{ endpoint: 0x81, oldestId: 0x7002000n, count: 1 }], runDir: dir, log: silentLogger }).catch((e: Error) => (err = e));
    expect(err?.message).to.match(/not an xHCI controller/);
  });

  it('points the control endpoint context (DCI 1) at the Setup Stage TRB of the oldest control TD in flight', async () => {
    const q = new FakeQemu(dir);
    layout(q);
    expect([endpointDci(0), endpointDci(0x80), endpointDci(0x81), endpointDci(0x02)]).to.deep.equal([1, 1, 3, 4]);
    // ep0: running, control (type 4), dequeue past 3 TDs (Setup, Data, Status each) at 0x7004000, cycle 1.
    q.set(DEVCTX + 32n, 1, 4 << 3, 0x7004000 + 16 * 9 + 1, 0);
    for (let td = 0; td < 4; td++) {
      const a = 0x7004000n + BigInt(16 * 3 * td);
      q.set(a, 0x5dc0, 0x400000, 8, (2 << 10) | (1 << 6) | 1); // Setup Stage, IDT, cycle 1
      q.set(a + 16n, 0x7100000, 0, 64, (3 << 10) | (1 << 16) | 1); // Data Stage IN
      q.set(a + 32n, 0, 0, 0, (4 << 10) | 1); // Status Stage
    }
    const res = await rewindXhciDequeues(q.qmp(), {
      controllerId: 'xhci',
      deviceId: 'usbroam-acm',
      endpoints: [{ endpoint: 0, oldestId: 0x7004000n + 48n, count: 2 }],
      runDir: dir,
      log: silentLogger,
    });
    expect(res.skipped).to.deep.equal([]);
    expect(res.patched.map((p) => p.endpoint)).to.deep.equal([0]);
    expect(q.dw(DEVCTX + 32n + 8n)).to.equal(0x7004000 + 48 + 1);
    expect(q.dw(DEVCTX + 32n)).to.equal(1);
    expect(q.dw(DEVCTX + 32n + 4n)).to.equal(4 << 3);
    // An id that is a Data Stage TRB (not the start of a control TD) is refused.
    const bad = await rewindXhciDequeues(q.qmp(), { controllerId: 'xhci', deviceId: 'usbroam-acm', endpoints: [{ endpoint: 0, oldestId: 0x7004000n + 16n, count: 1 }], runDir: dir, log: silentLogger });
    expect(bad.patched).to.deep.equal([]);
    expect(bad.skipped[0]!.why).to.match(/not Setup Stage/);
  });
});
