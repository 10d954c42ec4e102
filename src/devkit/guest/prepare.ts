// Run by `npm test` before mocha: builds (or finds) the cached QEMU guest for
// the end-to-end tier, installing QEMU when running as root. Where that is
// impossible it says so loudly; under CI it fails, because CI must run the tier.
import { ensureGuestImage } from './image.js';

try {
  const t0 = Date.now();
  const image = await ensureGuestImage();
  console.log(`e2e guest ready: kernel ${image.kernelVersion} in ${image.dir} (${Date.now() - t0} ms)`);
} catch (err) {
  const line = '*'.repeat(78);
  console.error(`\n${line}\n*** THE END-TO-END TIER WILL NOT RUN: ${(err as Error).message}\n*** It needs qemu-system-x86 and a guest kernel from Debian's packages; run the\n*** tests as root (the test command then apt-get installs them) or install them.\n${line}\n`);
  if (process.env.CI === 'true') process.exit(1);
}
