// The cached guest image (kernel + initramfs) built by scripts/guest/build-guest.sh.
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { REPO_ROOT } from '../../common/repo-root.js';

export { REPO_ROOT };
export const BUILD_SCRIPT = path.join(REPO_ROOT, 'scripts/guest/build-guest.sh');
export const QEMU_BINARY = process.env.USBROAM_QEMU ?? 'qemu-system-x86_64';
export const QBOOT_ROM = '/usr/share/qemu/qboot.rom';

export interface GuestImage {
  /** Directory holding vmlinuz, initramfs.gz, manifest.json. */
  dir: string;
  /**
   * What -kernel gets: the uncompressed PVH ELF `vmlinux` when the image has
   * one (boots ~3.5 s faster under TCG), else the bzImage. Env
   * USBROAM_GUEST_BOOT=bzimage forces the bzImage.
   */
  kernel: string;
  /** The bzImage. */
  bzImage: string;
  /** The PVH ELF kernel, when extracted. */
  vmlinux: string | null;
  initrd: string;
  kernelVersion: string;
  /** Kernel modules in the initramfs, in load order. */
  modules: string[];
}

/** Where images are cached: $USBROAM_GUEST_CACHE or <repo>/.cache/guest. */
export function guestCacheDir(): string {
  return process.env.USBROAM_GUEST_CACHE ?? path.join(REPO_ROOT, '.cache/guest');
}

function imageFromDir(dir: string): GuestImage | null {
  try {
    const manifest = JSON.parse(fs.readFileSync(path.join(dir, 'manifest.json'), 'utf8')) as { kernelVersion: string; modules: string[]; pvh?: boolean };
    const bzImage = path.join(dir, 'vmlinuz');
    const initrd = path.join(dir, 'initramfs.gz');
    if (!fs.existsSync(bzImage) || !fs.existsSync(initrd)) return null;
    const elf = path.join(dir, 'vmlinux');
    const vmlinux = manifest.pvh && fs.existsSync(elf) ? elf : null;
    const kernel = vmlinux && process.env.USBROAM_GUEST_BOOT !== 'bzimage' ? vmlinux : bzImage;
    return { dir, kernel, bzImage, vmlinux, initrd, kernelVersion: manifest.kernelVersion, modules: manifest.modules };
  } catch {
    return null;
  }
}

/** The image last built into the cache (the `current` link), or null. Does not build. */
export function findGuestImage(): GuestImage | null {
  const cur = path.join(guestCacheDir(), 'current');
  try {
    return imageFromDir(fs.realpathSync(cur));
  } catch {
    return null;
  }
}

function onPath(bin: string): string | null {
  const r = spawnSync('sh', ['-c', `command -v "$1"`, 'sh', bin], { encoding: 'utf8' });
  return r.status === 0 ? r.stdout.trim() : null;
}

export interface GuestAvailability {
  ok: boolean;
  /** Why not, when !ok. */
  reason?: string;
  qemu: string | null;
  image: GuestImage | null;
}

/** Is QEMU installed and a guest image cached? (Cheap; builds nothing.) */
export function guestAvailability(): GuestAvailability {
  const qemu = onPath(QEMU_BINARY);
  const image = findGuestImage();
  if (!qemu) return { ok: false, reason: `${QEMU_BINARY} not found (apt-get install qemu-system-x86)`, qemu, image };
  if (!image) return { ok: false, reason: `no guest image in ${guestCacheDir()} (run scripts/guest/build-guest.sh)`, qemu, image };
  return { ok: true, qemu, image };
}

export interface EnsureGuestImageOptions {
  /** Rebuild even when cached. */
  force?: boolean;
  /** Progress lines (the build script's stderr). Default: to process.stderr. */
  log?: (line: string) => void;
}

/**
 * Build the guest image if it is missing or stale (kernel version or build
 * script changed), installing apt prerequisites when root. Fast when cached.
 */
export async function ensureGuestImage(options: EnsureGuestImageOptions = {}): Promise<GuestImage> {
  const log = options.log ?? ((l: string) => process.stderr.write(`${l}\n`));
  const t0 = Date.now();
  const args = [BUILD_SCRIPT, ...(options.force ? ['--force'] : [])];
  const child = spawn('bash', args, { stdio: ['ignore', 'pipe', 'pipe'], env: process.env });
  let stdout = '';
  let stderrTail = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  let partial = '';
  child.stderr.setEncoding('utf8').on('data', (d: string) => {
    stderrTail = (stderrTail + d).slice(-4000);
    partial += d;
    const lines = partial.split('\n');
    partial = lines.pop()!;
    for (const l of lines) if (l.trim()) log(l);
  });
  const code = await new Promise<number | null>((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (c) => resolve(c));
  });
  if (partial.trim()) log(partial);
  if (code !== 0) throw new Error(`build-guest.sh failed (exit ${code}):\n${stderrTail}`);
  const dir = stdout.trim().split('\n').pop() ?? '';
  const image = imageFromDir(dir);
  if (!image) throw new Error(`build-guest.sh printed ${JSON.stringify(dir)}, which holds no image`);
  const ms = Date.now() - t0;
  if (ms > 2000) log(`[guest] image ready in ${(ms / 1000).toFixed(1)} s: ${image.dir}`);
  return image;
}
