// What the bridge end-to-end tests, bench/e2e.ts and the demo share: guest image or skip, a guest
// with a USB host controller and a spare QMP socket for the bridge, timed dd in the guest,
// dmesg checks, file checksums.
import { createHash } from 'node:crypto';
import { closeSync, openSync, readSync } from 'node:fs';
import path from 'node:path';
import { createLogger, silentLogger, type Logger } from '../common/log.js';
import { ensureGuestImage, guestAvailability, startGuest, type Guest, type GuestImage, type StartGuestOptions } from './guest/guest.js';

export const MiB = 1024 * 1024;

export const testLog: Logger = process.env.USBROAM_TEST_LOG ? createLogger({ level: process.env.USBROAM_TEST_LOG }) : silentLogger;

export type HcName = 'xhci' | 'ehci';
export const HOST_CONTROLLERS: Record<HcName, { name: string; args: string[]; bus: string }> = {
  xhci: { name: 'xHCI', args: ['-device', 'qemu-xhci,id=xhci'], bus: 'xhci.0' },
  ehci: { name: 'EHCI', args: ['-device', 'usb-ehci,id=ehci'], bus: 'ehci.0' },
};

/**
 * The cached guest image, built if needed. In a mocha hook: skips the suite (saying why) when
 * USBROAM_E2E=0 or QEMU cannot be had (not root, not installed); otherwise failures throw.
 */
export async function e2eImageOrSkip(ctx: Mocha.Context): Promise<GuestImage> {
  if (process.env.USBROAM_E2E === '0') ctx.skip();
  try {
    return await ensureGuestImage();
  } catch (err) {
    if (process.getuid?.() !== 0 && !guestAvailability().ok) {
      console.warn(`skipping e2e: ${(err as Error).message}`);
      ctx.skip();
    }
    throw err;
  }
}

export interface BridgeGuest {
  guest: Guest;
  /** A QMP socket of this guest reserved for the Bridge (QMP serves one client per socket). */
  bridgeQmp: string;
  bus: string;
}

/** A guest with a USB host controller and a third QMP socket for the bridge. */
export async function startBridgeGuest(opts: {
  name: string;
  image: GuestImage;
  hc?: HcName;
  dir: string;
  extraArgs?: string[];
  memoryMb?: number;
  log?: StartGuestOptions['log'];
}): Promise<BridgeGuest> {
  const hc = HOST_CONTROLLERS[opts.hc ?? 'xhci'];
  const bridgeQmp = path.join(opts.dir, `${opts.name}-bridge-qmp.sock`);
  const guest = await startGuest({
    name: opts.name,
    image: opts.image,
    memoryMb: opts.memoryMb ?? 256,
    extraArgs: [...hc.args, '-qmp', `unix:${bridgeQmp},server=on,wait=off`, ...(opts.extraArgs ?? [])],
    log: opts.log,
  });
  return { guest, bridgeQmp, bus: hc.bus };
}

export function sha256OfFileRange(file: string, offset: number, length: number): string {
  const fd = openSync(file, 'r');
  try {
    const h = createHash('sha256');
    const buf = Buffer.alloc(MiB);
    let pos = offset;
    const end = offset + length;
    while (pos < end) {
      const n = readSync(fd, buf, 0, Math.min(buf.length, end - pos), pos);
      if (n <= 0) throw new Error(`short read of ${file} at ${pos}`);
      h.update(buf.subarray(0, n));
      pos += n;
    }
    return h.digest('hex');
  } finally {
    closeSync(fd);
  }
}

/** Run a command in the guest timed by the guest's /proc/uptime; returns seconds. */
export async function timedInGuest(g: Guest, cmd: string, timeoutMs = 300_000): Promise<number> {
  const out = await g.sh(`a=$(cut -d' ' -f1 /proc/uptime); ${cmd} 2>&1; r=$?; b=$(cut -d' ' -f1 /proc/uptime); echo "T $a $b"; [ $r -eq 0 ]`, { timeoutMs });
  const m = /T ([\d.]+) ([\d.]+)/.exec(out);
  if (!m) throw new Error(`no timing in: ${out}`);
  return Math.max(Number(m[2]) - Number(m[1]), 0.01);
}

/** A dd in the guest, timed in the guest; MB/s (1e6 bytes). */
export async function timedDd(g: Guest, cmd: string, bytes: number, timeoutMs?: number): Promise<number> {
  return bytes / 1e6 / (await timedInGuest(g, cmd, timeoutMs));
}

/** The guest's sha256 of a file or device range. */
export async function guestSha256(g: Guest, cmd: string): Promise<string> {
  const out = await g.sh(`${cmd} | sha256sum`, { timeoutMs: 300_000 });
  const m = /\b([0-9a-f]{64})\b/.exec(out);
  if (!m) throw new Error(`no sha256 in: ${out}`);
  return m[1]!;
}

/** Poll in the guest until `p` is gone. */
export async function waitGoneInGuest(g: Guest, p: string, timeoutMs = 60_000): Promise<void> {
  const tries = Math.ceil(timeoutMs / 100);
  const r = await g.run(`i=0; while [ -e '${p}' ] && [ $i -lt ${tries} ]; do usleep 100000; i=$((i+1)); done; [ ! -e '${p}' ]`, { timeoutMs: timeoutMs + 30_000 });
  if (r.exitCode !== 0) throw new Error(`${p} still present in the guest after ${timeoutMs} ms`);
}

/** Wait for the block device node (sysfs, then /dev). */
export async function waitForDisk(g: Guest, name = 'sda', timeoutMs = 120_000): Promise<void> {
  await g.waitForPath(`/sys/block/${name}`, { timeoutMs });
  await g.waitForPath(`/dev/${name}`, { timeoutMs: 30_000 });
}

export async function dmesgLines(g: Guest): Promise<string[]> {
  return (await g.dmesg()).split('\n').filter((l) => l.trim() !== '');
}

/** Kernel lines that must never appear: timeouts, resets, oopses, I/O errors. */
export const BAD_KERNEL_LINE = /error -110|reset (high|super|full|low)[^\n]*USB device|DID_NO_CONNECT|Oops|BUG:|Call Trace|general protection|I\/O error|device descriptor read|unable to enumerate/;

/**
 * Bad lines, except the one a surprise removal legitimately causes: sd's final SYNCHRONIZE
 * CACHE failing with DID_NO_CONNECT (and the "Synchronize Cache" result lines around it).
 */
export function badKernelLines(lines: string[], opts: { allowRemovalSync?: boolean } = {}): string[] {
  return lines.filter((l) => BAD_KERNEL_LINE.test(l) && !(opts.allowRemovalSync && /Synchronize Cache|DID_NO_CONNECT/.test(l)));
}
