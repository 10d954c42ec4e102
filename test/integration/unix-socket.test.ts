// A server on a unix socket (plaintext is allowed there, with --insecure),
// reached by the SDK with a unix: address.
import { expect } from 'chai';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { UsbHostClient } from '../../src/client/sdk/client.js';
import { silentLogger } from '../../src/common/log.js';
import { createDefaultEmulatedBackend } from '../../src/server/backends/emulated/emulated-backend.js';
import { UsbHostServer } from '../../src/server/server.js';

describe('unix socket transport', () => {
  it('serves an insecure client on unix:/path, whose identity is "anonymous" for the ACL', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'usbroam-unix-'));
    const backend = await createDefaultEmulatedBackend({ imagePath: path.join(dir, 'disk.img'), imageSizeBytes: 1 << 20 });
    const server = new UsbHostServer({ listen: `unix:${dir}/s.sock`, insecure: true, backends: [backend], acl: { anonymous: [{ serial: 'USBROAM-ACM-0001' }] }, log: silentLogger });
    await server.start();
    const client = new UsbHostClient({ address: `unix:${dir}/s.sock`, insecure: true });
    try {
      const devices = await client.listDevices();
      expect(devices.map((d) => d.serial)).to.deep.equal(['USBROAM-ACM-0001']);
      const dev = await client.openDevice({ serial: 'USBROAM-ACM-0001' });
      expect(srvClaim()).to.equal('anonymous');
      await dev.close();
    } finally {
      client.close();
      await server.stop();
      rmSync(dir, { recursive: true, force: true });
    }
    function srvClaim() {
      return server.registry.claimOf('emu-1-3')?.identity;
    }
  });
});
