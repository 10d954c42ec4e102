// A "USB host guest": a QEMU guest whose xHCI holds QEMU-emulated USB devices
// (usb-storage on an image file, usb-kbd, optionally usb-serial on a ringbuf
// chardev). The host's root is mounted read-only over 9p and the guest chroots
// into it to run `usbroam serve --libusb` with the host's node and this
// checkout: a real kernel USB stack (xhci-hcd, usbfs) under the libusb backend.
// The server's port is forwarded to 127.0.0.1:<hostPort> (QEMU user network).
//
//   const h = await startUsbHostGuest({ image, storage: { image: img, serial: 'STICK0001' }, keyboard: true });
//   // h.address: 'localhost:PORT' (mTLS with the test certs; the server cert names localhost)
//   await h.guest.qmp.execute('device_del', { id: 'stick0' });
//   await h.stop();
import net from 'node:net';
import { REPO_ROOT } from '../../common/repo-root.js';
import { testCerts } from '../certs.js';
import { startGuest, type Guest, type GuestImage } from './guest.js';

export { REPO_ROOT };

export interface UsbHostGuestOptions {
  image?: GuestImage;
  name?: string;
  /** usb-storage on a raw image (QMP id "stick0"). */
  storage?: { image: string; serial: string };
  /** usb-kbd (QMP id "kbd0"). */
  keyboard?: boolean;
  /** usb-serial on a ringbuf chardev (QMP id "serial0"). */
  usbSerial?: boolean;
  /** --libusb-allow rules (default "*"). */
  allow?: string[];
  /** ACL entries for `--allow` (default bridge=*). */
  acl?: string[];
  memoryMb?: number;
  extraServeArgs?: string[];
  /** How long `usbroam serve` may take to listen (node under TCG: about 40 s from the bundle, 60-110 s from the sources). Default 300 s. */
  startTimeoutMs?: number;
  /** node flags for the server (e.g. ["--cpu-prof", "--cpu-prof-dir=/run/prof"]). */
  nodeArgs?: string[];
  /** Environment for `usbroam serve` (e.g. { USBROAM_LIBUSB_ISO: 'koffi' }). */
  serveEnv?: Record<string, string>;
  /** More QEMU arguments (other emulated devices, e.g. usb-audio). */
  extraQemuArgs?: string[];
  /** More guest TCP ports to forward to free host ports (see `forwards`). */
  forwardPorts?: number[];
  log?: (line: string) => void;
}

export interface UsbHostGuest {
  guest: Guest;
  hostPort: number;
  /** guest port -> host port, for `forwardPorts`. */
  forwards: Record<number, number>;
  /** For clients: localhost:<hostPort>. */
  address: string;
  /** The server's log so far (JSON lines). */
  serverLog(): Promise<string>;
  /** Stop the server (SIGTERM) and the guest. */
  stop(): Promise<void>;
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const p = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(p));
    });
  });
}

function q(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

export async function startUsbHostGuest(opts: UsbHostGuestOptions = {}): Promise<UsbHostGuest> {
  const certs = testCerts();
  const hostPort = await freePort();
  const forwards: Record<number, number> = {};
  for (const p of opts.forwardPorts ?? []) forwards[p] = await freePort();
  const args: string[] = ['-device', 'qemu-xhci,id=xhci'];
  if (opts.storage) {
    args.push(
      '-drive', `if=none,id=stick,file=${opts.storage.image},format=raw,cache=writeback`,
      '-device', `usb-storage,id=stick0,drive=stick,bus=xhci.0,serial=${opts.storage.serial}`,
    );
  }
  if (opts.keyboard) args.push('-device', 'usb-kbd,id=kbd0,bus=xhci.0');
  if (opts.extraQemuArgs) args.push(...opts.extraQemuArgs);
  if (opts.usbSerial) args.push('-chardev', 'ringbuf,id=rb0,size=65536', '-device', 'usb-serial,id=serial0,chardev=rb0,bus=xhci.0');
  args.push(
    '-virtfs', 'local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap',
    '-netdev', `user,id=n0,hostfwd=tcp:127.0.0.1:${hostPort}-:7470${Object.entries(forwards).map(([g, h]) => `,hostfwd=tcp:127.0.0.1:${h}-:${g}`).join('')}`,
    '-device', 'virtio-net-pci,netdev=n0',
  );
  const guest = await startGuest({ name: opts.name ?? 'usbhost', image: opts.image, memoryMb: opts.memoryMb ?? 768, extraArgs: args, log: opts.log });
  try {
    await guest.sh(
      [
        'mkdir -p /host',
        'mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 hostroot /host',
        'mount -t devtmpfs devtmpfs /host/dev',
        'mount -t proc proc /host/proc',
        'mount -t sysfs sysfs /host/sys',
        'mount -t tmpfs tmpfs /host/run',
        'mkdir -p /host/run/tmp /host/run/home',
        'ifconfig lo 127.0.0.1 up',
        'ifconfig eth0 10.0.2.15 netmask 255.255.255.0 up',
        'route add default gw 10.0.2.2',
      ].join(' && '),
      { timeoutMs: 60_000 },
    );
    const serve = [
      `${process.execPath}`, ...(opts.nodeArgs ?? []), `${REPO_ROOT}/bin/usbroam.js`, 'serve',
      '--listen', '0.0.0.0:7470',
      '--ca', certs.file('ca.pem'), '--cert', certs.file('server.pem'), '--key', certs.file('server.key'),
      '--no-emulated',
      ...(opts.allow ?? ['*']).flatMap((r) => ['--libusb-allow', r]),
      ...(opts.acl ?? ['bridge=*']).flatMap((a) => ['--allow', a]),
      ...(opts.extraServeArgs ?? []),
    ].map(q).join(' ');
    // The certs live in the host's /tmp: readable through 9p. The guest's writable places are /run (tmpfs).
    await guest.sh(
      `chroot /host /bin/sh -c ${q(`cd /run && export TMPDIR=/run/tmp HOME=/run/home${Object.entries(opts.serveEnv ?? {}).map(([k, v]) => ` ${k}=${q(v)}`).join('')}; exec ${serve} >/run/serve.log 2>&1`)} </dev/null >/dev/null 2>&1 &`,
    );
    const deadline = Date.now() + (opts.startTimeoutMs ?? 300_000);
    for (;;) {
      const r = await guest.run('grep -c "USB host server listening" /host/run/serve.log');
      if (r.exitCode === 0) break;
      if (Date.now() > deadline) throw new Error(`usbroam serve did not start in the USB host guest:\n${(await guest.run('cat /host/run/serve.log')).output}`);
      await new Promise((r2) => setTimeout(r2, 500));
    }
  } catch (err) {
    await guest.stop();
    throw err;
  }
  return {
    guest,
    hostPort,
    forwards,
    address: `localhost:${hostPort}`,
    serverLog: async () => (await guest.run('cat /host/run/serve.log', { timeoutMs: 30_000 })).output,
    stop: async () => {
      await guest.run('kill $(pidof node) 2>/dev/null; sleep 1', { timeoutMs: 10_000 }).catch(() => {});
      await guest.stop();
    },
  };
}
