// A USB host server in its own process (`usbroam serve`), as a client meets it.
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { REPO_ROOT } from '../common/repo-root.js';
import { testCerts } from './certs.js';

export interface ServerProcess {
  address: string;
  child: ChildProcess;
  logs: string[];
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

export async function startServerProcess(args: string[] = []): Promise<ServerProcess> {
  const c = testCerts();
  const child = spawn(
    process.execPath,
    [
      // e.g. USBROAM_SERVER_NODE_ARGS='--cpu-prof --cpu-prof-dir=/tmp/prof' to profile the server
      ...(process.env.USBROAM_SERVER_NODE_ARGS?.split(' ').filter(Boolean) ?? []),
      path.join(REPO_ROOT, 'bin/usbroam.js'),
      'serve',
      '--listen',
      '127.0.0.1:0',
      '--ca',
      c.file('ca.pem'),
      '--cert',
      c.file('server.pem'),
      '--key',
      c.file('server.key'),
      ...args,
    ],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  const logs: string[] = [];
  const address = await new Promise<string>((resolve, reject) => {
    let buf = '';
    const timer = setTimeout(() => reject(new Error(`server did not start: ${logs.join('\n')}`)), 20_000);
    child.stdout!.on('data', (d: Buffer) => {
      buf += d.toString();
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        logs.push(line);
        try {
          const j = JSON.parse(line);
          if (j.msg === 'USB host server listening') {
            clearTimeout(timer);
            resolve(j.address);
          }
        } catch {
          /* not JSON */
        }
      }
    });
    child.stderr!.on('data', (d: Buffer) => logs.push(d.toString()));
    child.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`server exited with ${code}: ${logs.join('\n')}`));
    });
  });
  return {
    address,
    child,
    logs,
    stop: (signal = 'SIGTERM') =>
      new Promise((resolve) => {
        if (child.exitCode !== null || child.signalCode !== null) return resolve(child.exitCode);
        child.once('exit', (code) => resolve(code));
        child.kill(signal);
      }),
  };
}
