// A hostile client in its own process, for the bench:soak bystander case: undecodable and
// mutated messages on every USB host server method plus model-based Connect fuzz runs, paced at
// `rate` calls per second, until SIGTERM. A hostile client does not share its victim's process,
// so the bystander measures what the server does under attack, not its own event loop.
// Prints {"ready":true} after its first round and {"calls":N,"internal_count":M} when stopped.
//   npx tsx bench/soak/hostile-traffic.ts ADDRESS CERT_DIR SERIAL FUZZ_SERIAL SEED RATE
import fc from 'fast-check';
import path from 'node:path';
import { connectProperty, newTally } from '../../src/devkit/hostile/connect-model.js';
import { usbHostMethods } from '../../src/devkit/hostile/methods.js';
import { rawClient } from '../../src/devkit/hostile/raw-calls.js';
import { fuzzMethods, newWireTally } from '../../src/devkit/hostile/wire-fuzz.js';

const [address, certDir, serial, fuzzSerial, seedArg, rateArg] = process.argv.slice(2);
if (!address || !certDir || !serial || !fuzzSerial) {
  process.stderr.write('usage: hostile-traffic.ts ADDRESS CERT_DIR SERIAL FUZZ_SERIAL [SEED] [RATE]\n');
  process.exit(2);
}
const seed = Number(seedArg ?? 1);
const rate = Number(rateArg ?? 50);
const tls = (id: string) => ({ ca: path.join(certDir, 'ca.pem'), cert: path.join(certDir, `${id}.pem`), key: path.join(certDir, `${id}.key`) });
const target = { address, tls, owner: 'bridge', other: 'viewer', serial: fuzzSerial, maxUrbBytes: 8 * 1024 * 1024 };

let stop = false;
const wire = newWireTally();
const connect = newTally();
process.on('SIGTERM', () => {
  stop = true;
});

const client = rawClient(address, tls('bridge'));
const t0 = Date.now();
let round = 0;
while (!stop) {
  round++;
  await fuzzMethods(client, usbHostMethods(serial), 1, wire, { seed: seed + round });
  await fc.check(connectProperty(target, connect, 10), { numRuns: 1, seed: seed + round });
  // Pace: sleep until the calls so far fit the rate.
  const calls = wire.cases + connect.commands;
  const ahead = (calls / rate) * 1000 - (Date.now() - t0);
  if (round === 1) process.stdout.write(`${JSON.stringify({ ready: true })}\n`);
  if (ahead > 0 && !stop) await new Promise((r) => setTimeout(r, ahead));
}
client.close();
process.stdout.write(`${JSON.stringify({ calls: wire.cases + connect.commands, internal_count: wire.internal_count + connect.internal_count, violations: wire.violations.slice(0, 5) })}\n`);
process.exit(0);
