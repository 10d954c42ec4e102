// Real etcd processes for tests: one member or a three-member cluster on
// loopback, random free ports, a temporary data directory each, torn down by
// stop() (and killed at process exit, so a failed test leaves none behind).
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

export const ETCD_BINARY = process.env.USBROAM_ETCD ?? 'etcd';

export interface EtcdMember {
  name: string;
  clientUrl: string;
  peerUrl: string;
  dataDir: string;
  child?: ChildProcess;
  logs: string[];
  /** SIGKILL the member and wait for it to exit. */
  kill(signal?: NodeJS.Signals): Promise<void>;
  /** Start it again on the same ports and data directory; resolves when it answers /health. */
  restart(): Promise<void>;
}

export interface EtcdCluster {
  members: EtcdMember[];
  /** The client URLs of all members. */
  endpoints: string[];
  stop(): Promise<void>;
}

const running = new Set<ChildProcess>();
process.once('exit', () => {
  for (const c of running) c.kill('SIGKILL');
});

/** A port that was free a moment ago (bound to 0 and released). */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

async function healthy(clientUrl: string, timeoutMs: number, member: EtcdMember): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last = '';
  while (Date.now() < deadline) {
    if (member.child?.exitCode != null) throw new Error(`etcd ${member.name} exited with ${member.child.exitCode}: ${member.logs.slice(-10).join('')}`);
    try {
      const res = await fetch(`${clientUrl}/health`, { signal: AbortSignal.timeout(1000) });
      const body = (await res.json()) as { health?: string };
      if (body.health === 'true') return;
      last = JSON.stringify(body);
    } catch (err) {
      last = (err as Error).message;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`etcd ${member.name} at ${clientUrl} not healthy after ${timeoutMs} ms (${last}): ${member.logs.slice(-10).join('')}`);
}

/** Start `size` members (1 or 3) and wait until every one is healthy. */
export async function startEtcd(size = 1, opts: { timeoutMs?: number } = {}): Promise<EtcdCluster> {
  const root = mkdtempSync(path.join(os.tmpdir(), 'usbroam-etcd-'));
  const members: EtcdMember[] = [];
  for (let i = 0; i < size; i++) {
    const name = `m${i}`;
    members.push({
      name,
      clientUrl: `http://127.0.0.1:${await freePort()}`,
      peerUrl: `http://127.0.0.1:${await freePort()}`,
      dataDir: path.join(root, name),
      logs: [],
      kill: async () => {},
      restart: async () => {},
    });
  }
  const initialCluster = members.map((m) => `${m.name}=${m.peerUrl}`).join(',');
  const timeoutMs = opts.timeoutMs ?? 20_000;
  const launch = (m: EtcdMember, state: 'new' | 'existing') => {
    const child = spawn(
      ETCD_BINARY,
      [
        `--name=${m.name}`,
        `--data-dir=${m.dataDir}`,
        `--listen-client-urls=${m.clientUrl}`,
        `--advertise-client-urls=${m.clientUrl}`,
        `--listen-peer-urls=${m.peerUrl}`,
        `--initial-advertise-peer-urls=${m.peerUrl}`,
        `--initial-cluster=${initialCluster}`,
        `--initial-cluster-state=${state}`,
        '--initial-cluster-token=usbroam-test',
        // Short heartbeats: leader loss and lease expiry are seen within seconds.
        '--heartbeat-interval=50',
        '--election-timeout=500',
        '--log-level=warn',
        '--logger=zap',
      ],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    running.add(child);
    child.on('exit', () => running.delete(child));
    const keep = (d: Buffer) => {
      m.logs.push(d.toString());
      if (m.logs.length > 200) m.logs.shift();
    };
    child.stdout!.on('data', keep);
    child.stderr!.on('data', keep);
    m.child = child;
  };
  for (const m of members) {
    m.kill = (signal = 'SIGKILL') =>
      new Promise((resolve) => {
        const c = m.child;
        if (!c || c.exitCode !== null || c.signalCode !== null) return resolve();
        c.once('exit', () => resolve());
        c.kill(signal);
      });
    m.restart = async () => {
      await m.kill();
      launch(m, 'existing');
      await healthy(m.clientUrl, timeoutMs, m);
    };
    launch(m, 'new');
  }
  const cluster: EtcdCluster = {
    members,
    endpoints: members.map((m) => m.clientUrl),
    stop: async () => {
      await Promise.all(members.map((m) => m.kill()));
      rmSync(root, { recursive: true, force: true });
    },
  };
  try {
    await Promise.all(members.map((m) => healthy(m.clientUrl, timeoutMs, m)));
  } catch (err) {
    await cluster.stop();
    throw err;
  }
  return cluster;
}
