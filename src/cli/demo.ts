// usbroam demo (npm start): the whole path on one machine. A USB host server with an emulated
// disk, loopback and serial device over mTLS with development certificates (made if missing); a
// bridge; a real Linux guest under QEMU (TCG) that gets the disk through usb-redir, enumerates it
// (its dmesg lines are printed), writes and reads a checksummed 8 MiB; then a clean teardown.
// Ends by itself with exit 0.
//
// Without QEMU (and no way to install it: not root), or with --server-only, it shows the server
// side only: the devices as a client sees them and the commands to reach them yourself
// (--serve keeps that server running until Ctrl-C).
import { Command } from 'commander';
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { REPO_ROOT } from '../common/repo-root.js';
import type { Device } from '../gen/usbroam/v1/usbhost.js';
import { UsbHostClient } from '../client/sdk/client.js';
import { describeDevice } from './common.js';
import { runServer } from './serve.js';
import { startPcapCapture, type PcapCapture } from '../client/capture/pcap-file.js';

const root = REPO_ROOT;
const MiB = 1024 * 1024;
const DEMO_MIB = 8;

interface DemoFlags {
  listen: string;
  once?: boolean;
  serverOnly?: boolean;
  serve?: boolean;
  bus: string;
  capture?: string;
}

export function demoCommand(): Command {
  return new Command('demo')
    .description('the whole path: USB host server with emulated devices, a bridge and a QEMU guest using the disk; ends by itself')
    .option('--listen <address>', 'where the USB host server listens', '127.0.0.1:7470')
    .option('--bus <hc>', 'the guest USB host controller: xhci or ehci', 'xhci')
    .option('--server-only', 'no guest: show the server and its devices only')
    .option('--serve', 'with --server-only (or without QEMU): keep the server running until Ctrl-C')
    .option('--once', 'end by itself (the default; kept for scripts)')
    .option('--capture <file.pcap>', "capture the disk's URBs on the server to a pcap file (usbmon format: tshark -r FILE -Y usbms)")
    .action(async (f: DemoFlags) => {
      const code = await runDemo(f).catch((err) => {
        console.error(`demo failed: ${(err as Error).stack ?? err}`);
        return 1;
      });
      if (code !== undefined) process.exit(code);
    });
}

/** Returns the exit code, or undefined to keep running (the server-only demo with --serve). */
async function runDemo(f: DemoFlags): Promise<number | undefined> {
  const t0 = Date.now();
  const phase = (line: string) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1).padStart(5)} s] ${line}`);
  const certs = process.env.USBROAM_CERTS_DIR ?? path.join(root, 'certs/out');
  execFileSync(process.execPath, [path.join(root, 'scripts/make-certs.mjs'), '--out', certs, '--quiet'], { stdio: 'inherit' });
  const c = (n: string) => path.join(certs, n);
  const dataDir = path.join(root, '.cache/demo');
  const diskImage = path.join(dataDir, 'disk.img');
  // The disk at SuperSpeed on xHCI (Linux then sends 1 MiB SCSI commands, not 120 KiB: far fewer
  // URB round trips); high speed on EHCI, which has no USB 3 ports (a SuperSpeed usb-redir
  // device does not enumerate there).
  const diskSpeed = f.bus.toLowerCase() === 'ehci' ? 'high' : 'super';
  const server = await runServer(
    {
      listen: f.listen,
      tls: { ca: c('ca.pem'), cert: c('server.pem'), key: c('server.key') },
      acl: { bridge: '*', viewer: [{ class: 2 }] },
      admins: ['bridge'],
      limits: {},
      emulated: { disk: { image: diskImage, sizeMiB: 64, speed: diskSpeed }, loopback: true, serial: true },
      logLevel: process.env.USBROAM_LOG_LEVEL ?? 'warn',
    },
    dataDir,
  );
  const serverOpts = { address: server.address, ca: c('ca.pem'), cert: c('bridge.pem'), key: c('bridge.key') };
  const client = new UsbHostClient(serverOpts);
  const devices = await client.listDevices();
  client.close();
  const rel = path.relative(process.cwd(), certs) || '.';
  phase(`usbroam USB host server on ${server.address} (mutual TLS, certificates in ${rel}/)`);
  console.log(`        exports ${devices.length} emulated devices; as the identity "bridge" sees them:`);
  for (const d of devices) console.log(`          ${describeDevice(d)}`);

  const serverOnly = async (why?: string): Promise<number | undefined> => {
    if (why) console.log(`\nno QEMU guest in this demo: ${why}\nshowing the USB host server only.`);
    console.log('\nlist them yourself:');
    console.log(`  node bin/usbroam.js devices --server ${server.address} --ca ${rel}/ca.pem --cert ${rel}/bridge.pem --key ${rel}/bridge.key`);
    console.log(`  node bin/usbroam.js watch   --server ${server.address} --ca ${rel}/ca.pem --cert ${rel}/viewer.pem --key ${rel}/viewer.key   # "viewer" sees only the serial device`);
    if (f.serve) {
      console.log('\nCtrl-C stops the server.');
      return undefined;
    }
    console.log('(`usbroam demo --server-only --serve` keeps the server running.)');
    await server.stop('demo over');
    return 0;
  };

  if (f.serverOnly || process.env.USBROAM_DEMO_GUEST === '0') return serverOnly();
  const disk = devices.find((d) => d.serial === 'USBROAM-MSC-0001');
  if (!disk) return serverOnly('the server does not export the emulated disk');
  const hc = f.bus.toLowerCase();
  if (hc !== 'xhci' && hc !== 'ehci') throw new Error(`--bus must be xhci or ehci, not ${f.bus}`);

  // The guest comes from the end-to-end test harness (kernel + busybox initramfs built from
  // Debian packages and cached; QEMU installed with apt-get when running as root).
  const harness = await import('../devkit/guest/guest.js');
  const helpers = await import('../devkit/bridge-guest.js');
  const { Bridge } = await import('../client/bridge/bridge.js');
  phase('guest image: kernel and initramfs (built and cached on first use, a few minutes)');
  let image: Awaited<ReturnType<typeof harness.ensureGuestImage>>;
  try {
    image = await harness.ensureGuestImage({ log: (l) => console.log(`        ${l}`) });
  } catch (err) {
    const avail = harness.guestAvailability();
    const why = !avail.qemu
      ? `${harness.QEMU_BINARY} is not installed and cannot be installed from here (${process.getuid?.() === 0 ? 'apt-get failed' : 'not root'}): ${(err as Error).message.split('\n')[0]}`
      : `the guest image could not be built: ${(err as Error).message.split('\n')[0]}`;
    return serverOnly(why);
  }
  const avail = harness.guestAvailability();
  if (!avail.qemu) return serverOnly(avail.reason ?? `${harness.QEMU_BINARY} not found`);
  phase(`guest image ready: Linux ${image.kernelVersion}`);

  // The capture runs from before the attach (the guest's enumeration is in it) to after the detach.
  let capture: PcapCapture | undefined;
  if (f.capture) {
    capture = await startPcapCapture({ server: serverOpts, target: { deviceId: disk.id }, file: f.capture });
    phase(`capturing the disk's URBs (device ${disk.id}) to ${f.capture}`);
  }
  let guest: import('../devkit/guest/guest.js').Guest | undefined;
  let bridge: InstanceType<typeof Bridge> | undefined;
  let ticker: NodeJS.Timeout | undefined;
  try {
    phase(`starting QEMU (TCG, no KVM needed) with a ${hc === 'xhci' ? 'qemu-xhci' : 'usb-ehci'} USB controller; the guest boots`);
    const tb = Date.now();
    ticker = setInterval(() => phase(`  ... guest booting (${((Date.now() - tb) / 1000).toFixed(0)} s)`), 2000);
    const bg = await helpers.startBridgeGuest({
      name: 'demo',
      image,
      dir: dataDir,
      hc,
      log: (l) => phase(l.trim().replace(/^\[demo\] /, 'guest: ')),
    });
    clearInterval(ticker);
    ticker = undefined;
    guest = bg.guest;
    const g = guest;
    phase(`guest ready: ${(await g.sh('uname -sr')).trim()}, shell on its serial console`);

    bridge = new Bridge({ runDir: path.join(dataDir, 'bridge') });
    bridge.addVm({ name: 'demo-vm', qmpSocket: bg.bridgeQmp });
    const dmesgBefore = (await helpers.dmesgLines(g)).length;
    phase(`bridge: attaching ${disk.id} (${describeShort(disk)}) to the VM: URB channel session + QMP chardev-add/device_add usb-redir on ${bg.bus}`);
    const info = await bridge.attach({ vm: 'demo-vm', server: serverOpts, selector: { serial: disk.serial }, bus: bg.bus });
    phase(`attached as QEMU device ${info.id} (session ${info.sessionId}); waiting for the guest to enumerate it`);
    await helpers.waitForDisk(g);
    const maxKb = (await g.sh('cat /sys/block/sda/queue/max_sectors_kb')).trim();
    phase(`the guest sees /dev/sda (${Number((await g.sh('cat /sys/block/sda/size')).trim()) / 2048} MiB, ${diskSpeed === 'super' ? 'SuperSpeed' : 'high speed'}, SCSI commands up to ${maxKb} KiB). Its kernel log:`);
    const newLines = (await helpers.dmesgLines(g)).slice(dmesgBefore);
    const interesting = newLines.filter((l) => /usb \d+-[\d.]+:|usb-storage|scsi|sd \d|sda/.test(l));
    for (const l of interesting) console.log(`          ${l}`);

    phase(`in the guest: ${DEMO_MIB} MiB of random data, written to the disk with O_DIRECT and fsync`);
    await g.sh(`dd if=/dev/urandom of=/tmp/demo bs=1M count=${DEMO_MIB} 2>/dev/null`);
    const want = await helpers.guestSha256(g, 'cat /tmp/demo');
    const w = await helpers.timedDd(g, `dd if=/tmp/demo of=/dev/sda bs=1M oflag=direct conv=fsync`, DEMO_MIB * MiB);
    await g.sh('sync; echo 3 > /proc/sys/vm/drop_caches');
    const r = await helpers.timedDd(g, `dd if=/dev/sda of=/tmp/back bs=1M count=${DEMO_MIB} iflag=direct`, DEMO_MIB * MiB);
    const got = await helpers.guestSha256(g, 'cat /tmp/back');
    const onServer = helpers.sha256OfFileRange(diskImage, 0, DEMO_MIB * MiB);
    console.log(`          written by the guest         sha256 ${want}  ${w.toFixed(1)} MB/s`);
    console.log(`          read back (O_DIRECT)         sha256 ${got}  ${r.toFixed(1)} MB/s`);
    console.log(`          the server's image file      sha256 ${onServer}`);
    const ok = want === got && got === onServer;
    phase(ok ? 'checksums match: the guest wrote to and read from the remote disk' : 'CHECKSUM MISMATCH');

    phase('teardown: detach (device_del; the guest sees an unplug), close the session');
    const before = (await helpers.dmesgLines(g)).length;
    await bridge.detach('demo-vm', info.id);
    await helpers.waitGoneInGuest(g, '/sys/block/sda', 60_000);
    for (const l of (await helpers.dmesgLines(g)).slice(before).filter((x) => /USB disconnect/.test(x))) console.log(`          ${l}`);
    await bridge.close();
    bridge = undefined;
    if (capture) {
      const c = await capture.stop();
      capture = undefined;
      phase(`capture: ${c.events} URB events${c.dropped ? ` (${c.dropped} dropped)` : ''} in ${f.capture}; see them with: tshark -r ${f.capture} -Y usbms`);
    }
    phase('stopping the guest');
    await g.stop();
    guest = undefined;
    phase('stopping the USB host server');
    await server.stop('demo over');
    phase(ok ? 'done' : 'done, with a checksum mismatch');
    return ok ? 0 : 1;
  } finally {
    await capture?.stop().catch(() => {});
    if (ticker) clearInterval(ticker);
    await bridge?.close().catch(() => {});
    await guest?.stop().catch(() => {});
  }
}

function describeShort(d: Device): string {
  return `${d.product}, serial ${d.serial}`;
}
