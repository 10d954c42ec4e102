// `usbroam demo --capture FILE`: the demo's guest writes and reads its remote disk, and the pcap
// the server captured meanwhile is USB mass storage to tshark: CBWs and SCSI READ(10)/WRITE(10).
import { expect } from 'chai';
import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

describe('usbroam demo --capture (QEMU guest)', function () {
  this.timeout(15 * 60_000);
  let dir: string;
  before(() => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'usbroam-demo-capture-'));
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('leaves a pcap in which tshark finds the guest\'s SCSI commands to the disk', async () => {
    const file = path.join(dir, 'demo.pcap');
    const child = spawn(process.execPath, ['bin/usbroam.js', 'demo', '--listen', '127.0.0.1:0', '--capture', file], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr!.on('data', (d: Buffer) => (out += d.toString()));
    const code = await new Promise<number | null>((resolve) => child.on('exit', resolve));
    expect(code, out).to.equal(0);
    expect(out).to.match(/capture: \d+ URB events/);
    expect(out, 'the demo ran with a guest').to.match(/checksums match/);
    const fields = execFileSync('tshark', ['-r', file, '-Y', 'usbms.dCBWSignature', '-T', 'fields', '-e', 'scsi_sbc.opcode', '-e', 'scsi_sbc.rdwr10.lba', '-e', 'scsi_sbc.rdwr10.xferlen'], {
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'ignore'],
      maxBuffer: 64 * 1024 * 1024,
    })
      .trim()
      .split('\n')
      .map((l) => l.split('\t'));
    const writes = fields.filter(([op]) => op === '0x2a');
    const reads = fields.filter(([op]) => op === '0x28');
    // The guest writes 8 MiB at LBA 0 and reads it back (O_DIRECT): every block of it, each way.
    const blocks = (rows: string[][]) => {
      const seen = new Set<number>();
      for (const [, lba, n] of rows) for (let b = Number(lba); b < Number(lba) + Number(n); b++) if (b < 16384) seen.add(b);
      return seen.size;
    };
    expect(blocks(writes), 'blocks 0..16383 written').to.equal(16384);
    expect(blocks(reads), 'blocks 0..16383 read').to.equal(16384);
  });
});
