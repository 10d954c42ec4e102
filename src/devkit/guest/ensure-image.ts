// CLI: build/refresh the cached e2e guest image before running e2e tests.
//   npx tsx src/devkit/guest/ensure-image.ts [--force]
import { ensureGuestImage } from './image.js';

const image = await ensureGuestImage({ force: process.argv.includes('--force') });
process.stdout.write(`${image.dir}\n`);
