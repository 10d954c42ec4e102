// stunnel for bench:libusb's fair peer: usbredirect behind TLS like usbroam's. The USB host guest
// runs stunnel in server mode in front of usbredirect; this host runs it in client mode in front of
// QEMU's chardev.
import { spawn, type ChildProcess } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { testCerts } from '../../src/devkit/certs.js';

/**
 * TLS like usbroam's between QEMU's chardev and usbredirect, done by stunnel: the same CA and
 * mutual certificates (server.pem for the USB host side, bridge.pem for the VM side), TLSv1.3
 * only, the cipher suite and group our gRPC server negotiates with Node's defaults, TCP_NODELAY
 * on every socket (our server and grpc-js set it).
 */
export function stunnelConf(side: 'server' | 'client', accept: string, connect: string): string {
  const c = testCerts();
  const id = side === 'server' ? 'server' : 'bridge';
  return [
    'foreground = yes',
    'pid =',
    'debug = 4',
    'syslog = no',
    'socket = l:TCP_NODELAY=1',
    'socket = r:TCP_NODELAY=1',
    '[usbredir]',
    ...(side === 'client' ? ['client = yes', 'checkHost = localhost'] : ['requireCert = yes']),
    `accept = ${accept}`,
    `connect = ${connect}`,
    `cert = ${c.file(`${id}.pem`)}`,
    `key = ${c.file(`${id}.key`)}`,
    `CAfile = ${c.file('ca.pem')}`,
    'verifyChain = yes',
    'sslVersionMin = TLSv1.3',
    'ciphersuites = TLS_AES_256_GCM_SHA384',
    'curves = X25519',
    '',
  ].join('\n');
}

async function freeLocalPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const p = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(p));
    });
  });
}

/** stunnel on this host: accepts QEMU's chardev on 127.0.0.1:<port>, TLS to the USB host guest's stunnel. */
export async function startHostStunnel(cmd: string, dir: string, remotePort: number): Promise<{ port: number; child: ChildProcess }> {
  const port = await freeLocalPort();
  const conf = path.join(dir, 'stunnel-client.conf');
  writeFileSync(conf, stunnelConf('client', `127.0.0.1:${port}`, `127.0.0.1:${remotePort}`));
  const child = spawn(cmd, [conf], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err = (err + d.toString()).slice(-4000)));
  const deadline = Date.now() + 20_000;
  for (;;) {
    const up = await new Promise<boolean>((resolve) => {
      const s = net.connect(port, '127.0.0.1', () => (s.destroy(), resolve(true)));
      s.once('error', () => resolve(false));
    });
    if (up) break;
    if (child.exitCode !== null || Date.now() > deadline) throw new Error(`stunnel on this host did not listen on ${port}: ${err}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  return { port, child };
}

