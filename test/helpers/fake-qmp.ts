// A scriptable QMP server on a unix socket (QEMU's monitor as the bridge and QmpClient see it):
// the greeting, qmp_capabilities, then each command answered by `handler`; like QEMU it serves
// one client at a time.
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';

export type Cmd = { execute?: string; 'exec-oob'?: string; arguments?: Record<string, unknown>; id?: unknown };
export type Reply = { return: unknown } | { error: { class: string; desc: string } } | null;

export class FakeQmp {
  readonly path: string;
  server: net.Server | null = null;
  conn: net.Socket | null = null;
  received: Cmd[] = [];
  connections = 0;
  capabilities = ['oob'];
  sendGreeting = true;
  /** Return a reply to answer at once, null to hold the command (answer later with reply()). */
  handler: (cmd: Cmd) => Reply = (cmd) => ({ return: { echo: cmd.execute } });
  held: Cmd[] = [];
  private waiters: Array<() => void> = [];

  constructor(dir: string, name = 'qmp.sock') {
    this.path = path.join(dir, name);
  }

  async start(): Promise<void> {
    this.server = net.createServer({ pauseOnConnect: false }, (sock) => this.onConn(sock));
    this.server.maxConnections = 4;
    await new Promise<void>((r) => this.server!.listen(this.path, r));
  }

  private onConn(sock: net.Socket): void {
    if (this.conn) {
      // Busy: like QEMU, accept but stay silent.
      sock.on('error', () => {});
      return;
    }
    this.conn = sock;
    this.connections++;
    sock.on('error', () => {});
    sock.on('close', () => {
      if (this.conn === sock) this.conn = null;
    });
    if (this.sendGreeting) {
      this.write({ QMP: { version: { qemu: { major: 7, minor: 2, micro: 22 }, package: 'fake' }, capabilities: this.capabilities } });
    }
    let buf = '';
    sock.on('data', (d) => {
      buf += d.toString('utf8');
      let i: number;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i).trim();
        buf = buf.slice(i + 1);
        if (!line) continue;
        const cmd = JSON.parse(line) as Cmd;
        this.received.push(cmd);
        for (const w of this.waiters.splice(0)) w();
        if (cmd.execute === 'qmp_capabilities') {
          const en = (cmd.arguments?.enable as string[] | undefined) ?? [];
          const bad = en.find((c) => !this.capabilities.includes(c));
          this.write(bad ? { error: { class: 'GenericError', desc: `bad cap ${bad}` }, id: cmd.id } : { return: {}, id: cmd.id });
          continue;
        }
        const r = this.handler(cmd);
        if (r === null) this.held.push(cmd);
        else this.write({ ...r, id: cmd.id });
      }
    });
  }

  write(obj: unknown): void {
    this.conn?.write(JSON.stringify(obj) + '\r\n');
  }

  reply(cmd: Cmd, r: Exclude<Reply, null>): void {
    this.write({ ...r, id: cmd.id });
  }

  event(name: string, data?: Record<string, unknown>): void {
    this.write({ event: name, ...(data ? { data } : {}), timestamp: { seconds: 1, microseconds: 2 } });
  }

  async waitReceived(n: number): Promise<void> {
    while (this.received.length < n) await new Promise<void>((r) => this.waiters.push(r));
  }

  async waitHeld(n: number): Promise<void> {
    while (this.held.length < n) await new Promise<void>((r) => this.waiters.push(r));
  }

  drop(): void {
    this.conn?.destroy();
    this.conn = null;
  }

  async stop(): Promise<void> {
    this.drop();
    if (this.server) await new Promise<void>((r) => this.server!.close(() => r()));
    this.server = null;
    fs.rmSync(this.path, { force: true });
  }
}

/**
 * A QMP monitor for a VM whose devices are all on its command line (cold-plugged): it runs, has no
 * chardevs the bridge made, and accepts everything else (migrate-set-capabilities, say).
 */
export async function startColdPlugQmp(dir: string, name: string): Promise<FakeQmp> {
  const q = new FakeQmp(dir, name);
  q.handler = (cmd) => {
    if (cmd.execute === 'query-status') return { return: { status: 'running', running: true } };
    if (cmd.execute === 'query-chardev') return { return: [] };
    return { return: {} };
  };
  await q.start();
  return q;
}
