// A USB host server in its own process (`usbroam serve`), as a client meets it.
import type { ChildProcess } from 'node:child_process';
import path from 'node:path';
import { REPO_ROOT } from '../common/repo-root.js';
import { testCerts, type CertDir } from './certs.js';
import { spawnUntilReady } from './child-process-lines.js';

export interface ServerProcess {
  address: string;
  child: ChildProcess;
  logs: string[];
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

/** `usbroam serve` with `args`, certificates of `opts.certs` (default: the shared test certificates); `opts.nodeArgs` go to node. */
export async function startServerProcess(args: string[] = [], opts: { certs?: CertDir; nodeArgs?: string[] } = {}): Promise<ServerProcess> {
  const c = opts.certs ?? testCerts();
  const { child, logs, ready: address } = await spawnUntilReady(
    process.execPath,
    [
      // e.g. USBROAM_SERVER_NODE_ARGS='--cpu-prof --cpu-prof-dir=/tmp/prof' to profile the server
      ...(process.env.USBROAM_SERVER_NODE_ARGS?.split(' ').filter(Boolean) ?? []),
      ...(opts.nodeArgs ?? []),
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
    { name: 'server', ready: (j) => (j.msg === 'USB host server listening' ? String(j.address) : undefined) },
  );
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
