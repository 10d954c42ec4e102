// A fake QEMU for the xHCI hand-off code (src/client/bridge/handoff/xhci-*.ts): HMP `info usb` /
// `info pci` / `xp` over a fake QMP client reading a simulated guest memory, and `gdbserver
// unix:...` starting a fake gdbstub (real unix socket, gdb remote protocol) that writes that memory.
import { expect } from 'chai';
import net from 'node:net';
import type { QmpClient } from '../../src/qemu/qmp/client.js';

export const INFO_USB = `  Device 0.0, Port 1, Speed 12 Mb/s, Product QEMU USB Tablet
  Device 0.2, Port 5, Speed 480 Mb/s, Product usb-redir, ID: usbroam-acm
  Device 0.1, Port 6, Speed 5000 Mb/s, Product usb-redir, ID: usbroam-msc
`;
export const INFO_PCI = `  Bus  0, device   0, function 0:
    Host bridge: PCI device 8086:1237
      PCI subsystem 1af4:1100
      id ""
  Bus  0, device   3, function 0:
    USB controller: PCI device 8086:24cd
      PCI subsystem 1af4:1100
      IRQ 11, pin A
      BAR0: 32 bit memory at 0xfebf1000 [0xfebf1fff].
      id "ehci"
  Bus  0, device   4, function 0:
    USB controller: PCI device 1b36:000d
      PCI subsystem 1af4:1100
      IRQ 10, pin A
      BAR0: 64 bit memory at 0xfebf0000 [0xfebf3fff].
      id "xhci"
`;

export class FakeQemu {
  readonly mem = new Map<bigint, number>(); // dword-aligned address -> value
  readonly hmpLog: string[] = [];
  gdb?: net.Server;
  gdbWrites: string[] = [];
  constructor(readonly dir: string) {}
  dw(addr: bigint): number {
    return this.mem.get(addr) ?? 0;
  }
  set(addr: bigint, ...vals: number[]): void {
    vals.forEach((v, i) => this.mem.set(addr + BigInt(4 * i), v >>> 0));
  }
  qmp(): QmpClient {
    return {
      execute: async (cmd: string, args: { 'command-line': string }) => {
        expect(cmd).to.equal('human-monitor-command');
        const line = args['command-line'];
        this.hmpLog.push(line);
        if (line === 'info usb') return INFO_USB;
        if (line === 'info pci') return INFO_PCI;
        let m = /^xp \/(\d+)wx 0x([0-9a-f]+)$/.exec(line);
        if (m) {
          const n = Number(m[1]);
          const a = BigInt(`0x${m[2]}`);
          const words = Array.from({ length: n }, (_, i) => `0x${this.dw(a + BigInt(4 * i)).toString(16).padStart(8, '0')}`);
          return `${a.toString(16).padStart(16, '0')}: ${words.join(' ')}\r\n`;
        }
        m = /^gdbserver unix:([^,]+),server=on,wait=off$/.exec(line);
        if (m) {
          await this.startGdb(m[1]!);
          return `Waiting for gdb connection on device 'unix:${m[1]},server=on,wait=off'\r\n`;
        }
        if (line === 'gdbserver none') {
          await new Promise<void>((r) => (this.gdb ? this.gdb.close(() => r()) : r()));
          this.gdb = undefined;
          return 'Disabled gdbserver\r\n';
        }
        throw new Error(`unexpected HMP ${line}`);
      },
    } as unknown as QmpClient;
  }
  private startGdb(p: string): Promise<void> {
    let phys = false;
    this.gdb = net.createServer((s) => {
      let buf = '';
      s.setEncoding('latin1');
      s.on('data', (d: string) => {
        buf += d;
        for (;;) {
          buf = buf.replace(/^\++/, '');
          const m = /^\$([^#]*)#([0-9a-f]{2})/.exec(buf);
          if (!m) return;
          buf = buf.slice(m[0].length);
          let sum = 0;
          for (const c of m[1]!) sum = (sum + c.charCodeAt(0)) & 0xff;
          expect(m[2]).to.equal(sum.toString(16).padStart(2, '0'));
          const reply = (r: string) => {
            let cs = 0;
            for (const c of r) cs = (cs + c.charCodeAt(0)) & 0xff;
            s.write(`+$${r}#${cs.toString(16).padStart(2, '0')}`);
          };
          const req = m[1]!;
          if (req === 'Qqemu.PhyMemMode:1') {
            phys = true;
            reply('OK');
          } else if (req.startsWith('M')) {
            if (!phys) return reply('E22');
            const w = /^M([0-9a-f]+),([0-9a-f]+):([0-9a-f]+)$/.exec(req)!;
            const a = BigInt(`0x${w[1]}`);
            const bytes = Buffer.from(w[3]!, 'hex');
            expect(bytes.length).to.equal(parseInt(w[2]!, 16));
            for (let i = 0; i < bytes.length; i += 4) this.mem.set(a + BigInt(i), bytes.readUInt32LE(i));
            this.gdbWrites.push(req);
            reply('OK');
          } else reply('');
        }
      });
    });
    return new Promise((r) => this.gdb!.listen(p, () => r()));
  }
}

