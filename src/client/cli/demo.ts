// usbroam demo (npm start): the main job on its built-in default. A USB host
// server with an emulated disk, loopback and serial device over mTLS with
// development certificates (made if missing), then the device list as a
// client sees it and how to reach it yourself.
import { Command } from 'commander';
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { UsbHostClient } from '../sdk/client.js';
import { describeDevice } from './common.js';
import { runServer } from './serve.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

export function demoCommand(): Command {
  return new Command('demo')
    .description('run a USB host server with emulated devices on development certificates')
    .option('--listen <address>', 'where to listen', '127.0.0.1:7470')
    .option('--once', 'list the devices, then stop (for a quick check)')
    .action(async (f: { listen: string; once?: boolean }) => {
      const certs = process.env.USBROAM_CERTS_DIR ?? path.join(root, 'certs/out');
      execFileSync(process.execPath, [path.join(root, 'scripts/make-certs.mjs'), '--out', certs, '--quiet'], { stdio: 'inherit' });
      const c = (n: string) => path.join(certs, n);
      const server = await runServer(
        {
          listen: f.listen,
          tls: { ca: c('ca.pem'), cert: c('server.pem'), key: c('server.key') },
          acl: { bridge: '*', viewer: [{ class: 2 }] },
          admins: ['bridge'],
          limits: {},
          emulated: { disk: { image: path.join(root, '.cache/demo/disk.img'), sizeMiB: 64 }, loopback: true, serial: true },
          logLevel: process.env.USBROAM_LOG_LEVEL ?? 'warn',
        },
        path.join(root, '.cache/demo'),
      );
      const client = new UsbHostClient({ address: server.address, ca: c('ca.pem'), cert: c('bridge.pem'), key: c('bridge.key') });
      const devices = await client.listDevices();
      client.close();
      const rel = path.relative(process.cwd(), certs) || '.';
      console.log(`usbroam USB host server on ${server.address} (mutual TLS, certificates in ${rel}/)`);
      console.log(`exports ${devices.length} emulated devices; as the identity "bridge" sees them:`);
      for (const d of devices) console.log(`  ${describeDevice(d)}`);
      console.log('\nlist them yourself:');
      console.log(`  node bin/usbroam.js devices --server ${server.address} --ca ${rel}/ca.pem --cert ${rel}/bridge.pem --key ${rel}/bridge.key`);
      console.log(`  node bin/usbroam.js watch   --server ${server.address} --ca ${rel}/ca.pem --cert ${rel}/viewer.pem --key ${rel}/viewer.key   # "viewer" sees only the serial device`);
      if (f.once) {
        await server.stop('demo --once');
        process.exit(0);
      }
      console.log('\nCtrl-C stops the server.');
    });
}
