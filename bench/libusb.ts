// npm run bench:libusb — a real kernel USB stack: the same QEMU usb-storage in a "USB host guest"
// exported to a VM guest (a) by usbroam (serve --libusb in the USB host guest, the Bridge on this
// host), (b) by usbredirect (Debian's usbredir tool, run in the same USB host guest, QEMU's own
// usb-redir in the VM connecting to it over plain TCP) and (c) by usbredirect behind TLS: stunnel
// on both ends of the TCP hop (in the USB host guest in front of usbredirect, on this host in
// front of QEMU's chardev), mutual certificates from the same CA as usbroam's, and the TLS
// version, cipher suite and key exchange our server negotiates with Node's defaults (TLSv1.3,
// TLS_AES_256_GCM_SHA384, X25519): the fair peer. In the VM: dd N MiB (bs=1M) from a tmpfs file
// of random data to the disk with O_DIRECT and fsync, drop caches, dd it back with O_DIRECT,
// both timed in the VM (/proc/uptime); the read-back is checksummed. Every round runs each
// target once, the order rotating; a ratio is the median of the per-round ratios, with `_min` /
// `_max`; a rate the median over the rounds.
//
//   npm run bench:libusb [-- --rounds N] [--size-mib N] [--only usbroam|usbredirect|usbredirect_tls]
//   env: USBROAM_BENCH_ROUNDS (default 5), USBROAM_BENCH_SIZE_MIB (default 16)
//   USBROAM_BENCH_PROF=DIR: the server runs with --cpu-prof; its .cpuprofile is copied to DIR at the
//   end (open it in Chrome DevTools, or summarise it with `node bench/cpuprofile-top.mjs FILE`).
//   USBROAM_BENCH_SERVER_NODE_ARGS='--flag ...': extra node flags for the server in the USB host guest;
//   USBROAM_BENCH_SERVER_ENV='K=V ...': extra environment for it.
//
// It needs usbredirect and stunnel4 (the USB host guest runs this machine's binaries through its
// 9p root): when missing they are installed with apt-get (as root), else it says what to install.
//
// Progress on stderr; the last stdout line is JSON: usbroam_write_MBps, usbroam_read_MBps,
// usbredirect_write_MBps, usbredirect_read_MBps, write_ratio, read_ratio (usbroam / usbredirect),
// usbredirect_tls_write_MBps, usbredirect_tls_read_MBps, write_vs_tls, read_vs_tls (usbroam /
// usbredirect behind TLS).
import type { ChildProcess } from 'node:child_process';
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
import { QEMU_BENCH_NEEDS, ensureCommands } from './support/need.js';
import { startHostStunnel, stunnelConf } from './support/stunnel.js';
import { median, positiveInt, putRatio, rotated } from './support/rounds.js';

const TARGETS = ['usbroam', 'usbredirect', 'usbredirect_tls'] as const;
type Target = (typeof TARGETS)[number];
const { values: flags } = parseArgs({ options: { rounds: { type: 'string' }, 'size-mib': { type: 'string' }, only: { type: 'string' } } });
const only = flags.only as Target | undefined;
if (only && !TARGETS.includes(only)) throw new Error(`--only ${TARGETS.join('|')}, not ${only}`);
const profDir = process.env.USBROAM_BENCH_PROF;
const PROF_PORT = 4001;
const rounds = positiveInt('rounds', flags.rounds ?? process.env.USBROAM_BENCH_ROUNDS, 5);
const sizeMiB = positiveInt('size-mib', flags['size-mib'] ?? process.env.USBROAM_BENCH_SIZE_MIB, 16);
/** usbredirect's port in the USB host guest (plain TCP, forwarded to this host). */
const REDIR_PORT = 4000;
/** stunnel's port in the USB host guest (forwarded), in front of usbredirect on 127.0.0.1:TLS_REDIR_PORT. */
const TLS_PORT = 4002;
const TLS_REDIR_PORT = 4003;

const t0 = Date.now();
const progress = (line: string) => process.stderr.write(`[${((Date.now() - t0) / 1000).toFixed(1).padStart(6)} s] ${line}\n`);
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
  const stunnel = ensureCommands([...QEMU_BENCH_NEEDS, { command: 'usbredirect', apt: 'usbredirect' }, { command: ['stunnel4', 'stunnel'], apt: 'stunnel4' }], progress).at(-1)!;
  const image = await ensureGuestImage();
  const dir = mkdtempSync(path.join(os.tmpdir(), 'ubr-bench-libusb-'));
  const stick = path.join(dir, 'stick.img');
  closeSync(openSync(stick, 'w'));
  truncateSync(stick, Math.max(64, sizeMiB * 2) * MiB);
  const vmQmp = path.join(dir, 'vm-qmp.sock');
  let host: UsbHostGuest | undefined;
  let vm: Guest | undefined;
  let bridge: Bridge | undefined;
  let hostStunnel: { port: number; child: ChildProcess } | undefined;
  const quiet = () => {};
  try {
    progress('starting the USB host guest (usbroam serve --libusb) and the VM guest');
    [host, vm] = await Promise.all([
      startUsbHostGuest({
        image,
        storage: { image: stick, serial: 'BENCH0001' },
        forwardPorts: [REDIR_PORT, PROF_PORT, TLS_PORT],
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
    const res = Object.fromEntries(TARGETS.map((t) => [t, { w: [] as number[], r: [] as number[] }])) as Record<Target, { w: number[]; r: number[] }>;

    const viaUsbroam = async () => {
      const info = await bridge!.attach({ vm: 'vm', server, selector: { serial: 'BENCH0001' }, bus: 'xhci.0' });
      const x = await ddRound(vm!, want, host!.guest, 'usbroam');
      await bridge!.detach('vm', info.id);
      await waitGoneInGuest(vm!, '/sys/block/sda', 120_000);
      return x;
    };
    /** usbredirect in the USB host guest on `listen`; QEMU's usb-redir in the VM on a chardev to 127.0.0.1:`chardevPort`. */
    const viaUsbredirect = async (listen: string, chardevPort: number) => {
      const h = host!.guest;
      const port = listen.split(':').pop()!;
      // The usbroam server released the device (and re-attached usb-storage in the USB host guest); usbredirect detaches it again.
      await h.sh(`chroot /host /bin/sh -c 'exec usbredirect --device 46f4:0001 --as ${listen}' </dev/null >/host/run/usbredirect.log 2>&1 &`);
      const deadline = Date.now() + 60_000;
      while ((await h.run(`netstat -ltn 2>/dev/null | grep -q ':${port} '`)).exitCode !== 0) {
        if (Date.now() > deadline) throw new Error(`usbredirect did not listen: ${(await h.run('cat /host/run/usbredirect.log')).output}`);
        await new Promise((r) => setTimeout(r, 250));
      }
      await vm!.qmp.execute('chardev-add', {
        id: 'redirchr',
        backend: { type: 'socket', data: { addr: { type: 'inet', data: { host: '127.0.0.1', port: String(chardevPort) } }, server: false } },
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
    /** stunnel in the USB host guest (once): TLS on TLS_PORT in front of usbredirect on 127.0.0.1:TLS_REDIR_PORT; and its peer on this host. */
    const startStunnels = async () => {
      const h = host!.guest;
      await h.sh(`cat > /host/run/stunnel-server.conf <<'EOS'\n${stunnelConf('server', `0.0.0.0:${TLS_PORT}`, `127.0.0.1:${TLS_REDIR_PORT}`)}EOS`);
      await h.sh(`chroot /host /bin/sh -c 'exec ${stunnel} /run/stunnel-server.conf' </dev/null >/host/run/stunnel.log 2>&1 &`);
      const deadline = Date.now() + 60_000;
      while ((await h.run(`netstat -ltn 2>/dev/null | grep -q ':${TLS_PORT} '`)).exitCode !== 0) {
        if (Date.now() > deadline) throw new Error(`stunnel did not listen in the USB host guest: ${(await h.run('cat /host/run/stunnel.log')).output}`);
        await new Promise((r) => setTimeout(r, 250));
      }
      hostStunnel = await startHostStunnel(stunnel, dir, host!.forwards[TLS_PORT]!);
      progress(`stunnel: this host 127.0.0.1:${hostStunnel.port} -> USB host guest :${TLS_PORT} -> usbredirect 127.0.0.1:${TLS_REDIR_PORT} (TLSv1.3 TLS_AES_256_GCM_SHA384 X25519, mutual certificates)`);
    };
    const run = async (t: Target) => {
      if (t === 'usbroam') return viaUsbroam();
      if (t === 'usbredirect') return viaUsbredirect(`0.0.0.0:${REDIR_PORT}`, host!.forwards[REDIR_PORT]!);
      if (!hostStunnel) await startStunnels();
      return viaUsbredirect(`127.0.0.1:${TLS_REDIR_PORT}`, hostStunnel!.port);
    };

    const targets = TARGETS.filter((t) => !only || t === only);
    for (let i = 0; i < rounds; i++) {
      for (const t of rotated(targets, i)) {
        const x = await run(t);
        res[t].w.push(x.w);
        res[t].r.push(x.r);
        progress(`round ${i + 1}/${rounds} ${t.padEnd(15)}: write ${x.w.toFixed(2)} MB/s, read ${x.r.toFixed(2)} MB/s`);
      }
    }
    if (profDir) await fetchProfile(host, profDir);
    const out: Record<string, unknown> = { bench: 'libusb', size_mib: sizeMiB, rounds };
    for (const t of TARGETS) {
      out[`${t}_write_MBps`] = r2(median(res[t].w));
      out[`${t}_read_MBps`] = r2(median(res[t].r));
    }
    // Every target ran once per round: a ratio pairs two targets' figures of the same round.
    const ratio = (name: string, base: Target, k: 'w' | 'r') => {
      if (res.usbroam[k].length && res[base][k].length) putRatio(out, name, res.usbroam[k], res[base][k]);
    };
    ratio('write_ratio', 'usbredirect', 'w');
    ratio('read_ratio', 'usbredirect', 'r');
    ratio('write_vs_tls', 'usbredirect_tls', 'w');
    ratio('read_vs_tls', 'usbredirect_tls', 'r');
    out.samples = Object.fromEntries(TARGETS.map((t) => [t, { write: res[t].w.map(r2), read: res[t].r.map(r2) }]));
    console.log(JSON.stringify(out));
  } finally {
    hostStunnel?.child.kill('SIGTERM');
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
