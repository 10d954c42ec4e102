// npm run bench:libusb — a real kernel USB stack: the same QEMU usb-storage in a "USB host guest"
// exported to a VM guest (a) by usbroam (serve --libusb in the USB host guest, the Bridge on this
// host) and (b) by usbredirect (Debian's usbredir tool, run in the same USB host guest, QEMU's own
// usb-redir in the VM connecting to it). In the VM: dd N MiB (bs=1M) from a tmpfs file of random
// data to the disk with O_DIRECT and fsync, drop caches, dd it back with O_DIRECT, both timed in
// the VM (/proc/uptime); the read-back is checksummed. Rounds alternate the order; medians.
//
//   npm run bench:libusb [-- --rounds N] [--size-mib N] [--only usbroam|usbredirect]
//   env: USBROAM_BENCH_ROUNDS (default 1), USBROAM_BENCH_SIZE_MIB (default 16)
//   USBROAM_BENCH_PROF=DIR: the server runs with --cpu-prof; its .cpuprofile is copied to DIR at the
//   end (open it in Chrome DevTools, or summarise it with `node bench/cpuprofile-top.mjs FILE`).
//   USBROAM_BENCH_SERVER_NODE_ARGS='--flag ...': extra node flags for the server in the USB host guest;
//   USBROAM_BENCH_SERVER_ENV='K=V ...': extra environment for it.
//
// Progress on stderr; the last stdout line is JSON: usbroam_write_MBps, usbroam_read_MBps,
// usbredirect_write_MBps, usbredirect_read_MBps, write_ratio, read_ratio (usbroam / usbredirect).
import { closeSync, mkdirSync, mkdtempSync, openSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { Bridge } from '../src/client/bridge/bridge.js';
import { clientTls } from '../src/devkit/certs.js';
import { MiB, guestSha256, testLog, timedDd, waitForDisk, waitGoneInGuest } from '../src/devkit/bridge-guest.js';
import { ensureGuestImage, startGuest, type Guest } from '../src/devkit/guest/guest.js';
import { startUsbHostGuest, type UsbHostGuest } from '../src/devkit/guest/usbhost-guest.js';


const { values: flags } = parseArgs({ options: { rounds: { type: 'string' }, 'size-mib': { type: 'string' }, only: { type: 'string' } } });
const only = flags.only as 'usbroam' | 'usbredirect' | undefined;
if (only && only !== 'usbroam' && only !== 'usbredirect') throw new Error(`--only usbroam|usbredirect, not ${only}`);
const profDir = process.env.USBROAM_BENCH_PROF;
const PROF_PORT = 4001;
const rounds = Number(flags.rounds ?? process.env.USBROAM_BENCH_ROUNDS ?? 1);
const sizeMiB = Number(flags['size-mib'] ?? process.env.USBROAM_BENCH_SIZE_MIB ?? 16);
const REDIR_PORT = 4000;

const t0 = Date.now();
const progress = (line: string) => process.stderr.write(`[${((Date.now() - t0) / 1000).toFixed(1).padStart(6)} s] ${line}\n`);
const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};
const r2 = (x: number) => Math.round(x * 100) / 100;

/** env USBROAM_BENCH_TOP=1: sample `top` in the USB host guest during the write (where does its CPU go). */
async function sampleTop(host: Guest | undefined, label: string): Promise<void> {
  if (!host || process.env.USBROAM_BENCH_TOP !== '1') return;
  await new Promise((r) => setTimeout(r, 3000));
  const out = (await host.run('top -bn1 | head -12', { timeoutMs: 30_000 })).output;
  progress(`USB host guest during the ${label} write:\n${out}`);
}

async function ddRound(vm: Guest, want: string, host?: Guest, label = ''): Promise<{ w: number; r: number }> {
  await waitForDisk(vm, 'sda', 300_000);
  const top = sampleTop(host, label);
  const w = await timedDd(vm, 'dd if=/tmp/x of=/dev/sda bs=1M oflag=direct conv=fsync', sizeMiB * MiB);
  await top;
  await vm.sh('sync; echo 3 > /proc/sys/vm/drop_caches');
  const r = await timedDd(vm, `dd if=/dev/sda of=/tmp/y bs=1M count=${sizeMiB} iflag=direct`, sizeMiB * MiB);
  const got = await guestSha256(vm, 'cat /tmp/y');
  await vm.sh('rm -f /tmp/y');
  if (got !== want) throw new Error(`read-back checksum mismatch: ${got} != ${want}`);
  return { w, r };
}

async function main(): Promise<void> {
  const image = await ensureGuestImage();
  const dir = mkdtempSync(path.join(os.tmpdir(), 'ubr-bench-libusb-'));
  const stick = path.join(dir, 'stick.img');
  closeSync(openSync(stick, 'w'));
  truncateSync(stick, Math.max(64, sizeMiB * 2) * MiB);
  const vmQmp = path.join(dir, 'vm-qmp.sock');
  let host: UsbHostGuest | undefined;
  let vm: Guest | undefined;
  let bridge: Bridge | undefined;
  const quiet = () => {};
  try {
    progress('starting the USB host guest (usbroam serve --libusb) and the VM guest');
    [host, vm] = await Promise.all([
      startUsbHostGuest({
        image,
        storage: { image: stick, serial: 'BENCH0001' },
        forwardPorts: [REDIR_PORT, PROF_PORT],
        nodeArgs: [...(profDir ? ['--cpu-prof', '--cpu-prof-dir=/run/prof'] : []), ...(process.env.USBROAM_BENCH_SERVER_NODE_ARGS ?? '').split(' ').filter(Boolean)],
        serveEnv: Object.fromEntries((process.env.USBROAM_BENCH_SERVER_ENV ?? '').split(' ').filter(Boolean).map((kv) => [kv.slice(0, kv.indexOf('=')), kv.slice(kv.indexOf('=') + 1)])),
        log: quiet,
      }),
      startGuest({ name: 'bench-vm', image, memoryMb: 256, extraArgs: ['-device', 'qemu-xhci,id=xhci', '-qmp', `unix:${vmQmp},server=on,wait=off`], log: quiet }),
    ]);
    progress(`USB host guest serving on ${host.address}`);
    bridge = new Bridge({ log: testLog, runDir: dir });
    bridge.addVm({ name: 'vm', qmpSocket: vmQmp });
    await vm.sh(`dd if=/dev/urandom of=/tmp/x bs=1M count=${sizeMiB} 2>/dev/null`);
    const want = await guestSha256(vm, 'cat /tmp/x');
    const server = { address: host.address, ...clientTls('bridge') };
    const res = { usbroam: { w: [] as number[], r: [] as number[] }, usbredirect: { w: [] as number[], r: [] as number[] } };

    const viaUsbroam = async () => {
      const info = await bridge!.attach({ vm: 'vm', server, selector: { serial: 'BENCH0001' }, bus: 'xhci.0' });
      const x = await ddRound(vm!, want, host!.guest, 'usbroam');
      await bridge!.detach('vm', info.id);
      await waitGoneInGuest(vm!, '/sys/block/sda', 120_000);
      return x;
    };
    const viaUsbredirect = async () => {
      const h = host!.guest;
      // The usbroam server released the device (and re-attached usb-storage in the USB host guest); usbredirect detaches it again.
      await h.sh(`chroot /host /bin/sh -c 'exec usbredirect --device 46f4:0001 --as 0.0.0.0:${REDIR_PORT}' </dev/null >/host/run/usbredirect.log 2>&1 &`);
      const deadline = Date.now() + 60_000;
      while ((await h.run(`netstat -ltn 2>/dev/null | grep -q ':${REDIR_PORT} '`)).exitCode !== 0) {
        if (Date.now() > deadline) throw new Error(`usbredirect did not listen: ${(await h.run('cat /host/run/usbredirect.log')).output}`);
        await new Promise((r) => setTimeout(r, 250));
      }
      await vm!.qmp.execute('chardev-add', {
        id: 'redirchr',
        backend: { type: 'socket', data: { addr: { type: 'inet', data: { host: '127.0.0.1', port: String(host!.forwards[REDIR_PORT]) } }, server: false } },
      });
      await vm!.qmp.execute('device_add', { driver: 'usb-redir', id: 'redir0', chardev: 'redirchr', bus: 'xhci.0' });
      const x = await ddRound(vm!, want, host!.guest, 'usbredirect');
      const gone = vm!.qmp.waitForEvent('DEVICE_DELETED', (e) => e.data?.device === 'redir0', { timeoutMs: 30_000 });
      await vm!.qmp.execute('device_del', { id: 'redir0' });
      await gone;
      await vm!.qmp.execute('chardev-remove', { id: 'redirchr' }).catch(() => {});
      await waitGoneInGuest(vm!, '/sys/block/sda', 120_000);
      await h.run('kill $(pidof usbredirect) 2>/dev/null; sleep 1');
      return x;
    };

    for (let i = 0; i < rounds; i++) {
      const order: Array<'usbroam' | 'usbredirect'> = i % 2 ? ['usbredirect', 'usbroam'] : ['usbroam', 'usbredirect'];
      for (const t of order) {
        if (only && t !== only) continue;
        const x = t === 'usbroam' ? await viaUsbroam() : await viaUsbredirect();
        res[t].w.push(x.w);
        res[t].r.push(x.r);
        progress(`round ${i + 1} ${t}: write ${x.w.toFixed(2)} MB/s, read ${x.r.toFixed(2)} MB/s`);
      }
    }
    if (profDir) await fetchProfile(host, profDir);
    const uw = median(res.usbroam.w), ur = median(res.usbroam.r), rw = median(res.usbredirect.w), rr = median(res.usbredirect.r);
    console.log(JSON.stringify({
      bench: 'libusb', size_mib: sizeMiB, rounds,
      usbroam_write_MBps: r2(uw), usbroam_read_MBps: r2(ur),
      usbredirect_write_MBps: r2(rw), usbredirect_read_MBps: r2(rr),
      write_ratio: r2(uw / rw), read_ratio: r2(ur / rr),
    }));
  } finally {
    await bridge?.close().catch(() => {});
    await vm?.stop().catch(() => {});
    await host?.stop().catch(() => {});
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Stop the server in the USB host guest (its --cpu-prof profile is written at exit) and copy the profile out over a forwarded port. */
async function fetchProfile(host: UsbHostGuest, dir: string): Promise<void> {
  const g = host.guest;
  await g.run('kill -INT $(pidof node) 2>/dev/null; true');
  let file = '';
  const deadline = Date.now() + 120_000;
  while (!file) {
    const out = (await g.run('pidof node >/dev/null || ls /host/run/prof/*.cpuprofile 2>/dev/null')).output.trim();
    file = out.split('\n').find((l) => l.endsWith('.cpuprofile')) ?? '';
    if (!file) {
      if (Date.now() > deadline) throw new Error('no .cpuprofile from the server');
      await new Promise((r) => setTimeout(r, 1000));
    }
  }
  const size = Number((await g.sh(`stat -c %s ${file}`)).trim());
  await g.sh(`(nc -l -p ${PROF_PORT} < ${file} > /dev/null 2>&1 &) ; sleep 1`);
  const chunks: Buffer[] = [];
  let got = 0;
  await new Promise<void>((resolve, reject) => {
    const s = net.connect(host.forwards[PROF_PORT]!, '127.0.0.1');
    const t = setTimeout(() => (s.destroy(), reject(new Error(`profile: ${got} of ${size} bytes`))), 300_000);
    s.on('data', (d: Buffer) => {
      chunks.push(d);
      got += d.length;
      if (got >= size) {
        clearTimeout(t);
        s.destroy();
        resolve();
      }
    });
    s.on('error', (e) => (clearTimeout(t), reject(e)));
  });
  mkdirSync(dir, { recursive: true });
  const out = path.join(dir, `usbroam-serve-${Date.now()}.cpuprofile`);
  writeFileSync(out, Buffer.concat(chunks).subarray(0, size));
  progress(`server CPU profile: ${out} (${size} bytes)`);
}

main().then(
  () => process.exit(0),
  (err) => {
    progress(`failed: ${(err as Error).stack ?? err}`);
    process.exit(1);
  },
);
