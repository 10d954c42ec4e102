// CLI: build or refresh the cached guest image (the e2e tests, the benches and the demo boot it).
//   npx tsx src/devkit/guest/ensure-image.ts [--force]
import { ensureGuestImage } from './image.js';

const image = await ensureGuestImage({ force: process.argv.includes('--force') });
process.stdout.write(`${image.dir}\n`);
