// A USB host server in this process, so a test can look at the emulated
// devices' own counters (how many times each URB executed).
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { silentLogger, createLogger } from '../../src/common/log.js';
import type { AclConfig } from '../../src/server/acl.js';
import { createDefaultEmulatedBackend, type EmulatedBackend } from '../../src/server/backends/emulated/emulated-backend.js';
import { UsbHostServer } from '../../src/server/server.js';
import type { SessionLimits } from '../../src/server/sessions/session.js';
import { testCerts } from '../../src/devkit/certs.js';

export interface InProcessServer {
  server: UsbHostServer;
  backend: EmulatedBackend;
  address: string;
  port: number;
  imagePath: string;
  stop(): Promise<void>;
}

export async function startInProcessServer(opts: { acl?: AclConfig; limits?: Partial<SessionLimits>; admins?: string[] } = {}): Promise<InProcessServer> {
  const c = testCerts();
  const dir = mkdtempSync(path.join(os.tmpdir(), 'usbroam-srv-'));
  const imagePath = path.join(dir, 'disk.img');
  const backend = await createDefaultEmulatedBackend({ imagePath, imageSizeBytes: 16 * 1024 * 1024 });
  const server = new UsbHostServer({
    listen: '127.0.0.1:0',
    tls: { ca: c.file('ca.pem'), cert: c.file('server.pem'), key: c.file('server.key') },
    backends: [backend],
    acl: opts.acl ?? { bridge: '*', viewer: [{ class: 2 }] },
    admins: opts.admins ?? ['bridge'],
    limits: opts.limits,
    log: process.env.USBROAM_TEST_LOG ? createLogger({ level: process.env.USBROAM_TEST_LOG }) : silentLogger,
  });
  const address = await server.start();
  return {
    server,
    backend,
    address,
    port: Number(address.split(':').pop()),
    imagePath,
    stop: async () => {
      await server.stop('test over');
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
