// A TCP proxy the test controls: forwards to a target, and can cut every
// connection (a network failure as a client sees it), refuse new ones, or hold
// every byte for a while (a blackhole: a link that goes silent without a reset,
// then heals; TCP's retransmits deliver what was held).
import net from 'node:net';

export class TcpProxy {
  private server?: net.Server;
  private readonly sockets = new Set<net.Socket>();
  private refusing = false;
  /** While set (blackhole): connections forward nothing; new ones wait here. */
  private held?: { pairs: Array<[net.Socket, net.Socket]>; waiting: net.Socket[] };
  private readonly pairs = new Set<[net.Socket, net.Socket]>();
  port = 0;

  constructor(
    private readonly targetHost: string,
    private readonly targetPort: number,
  ) {}

  async start(): Promise<string> {
    this.server = net.createServer((client) => {
      if (this.refusing) return client.destroy();
      if (this.held) {
        client.pause();
        client.on('error', () => {});
        this.sockets.add(client);
        client.on('close', () => this.sockets.delete(client));
        this.held.waiting.push(client);
        return;
      }
      this.forward(client);
    });
    await new Promise<void>((r) => this.server!.listen(0, '127.0.0.1', r));
    this.port = (this.server.address() as net.AddressInfo).port;
    return `127.0.0.1:${this.port}`;
  }

  private forward(client: net.Socket): void {
    const upstream = net.connect(this.targetPort, this.targetHost);
    for (const s of [client, upstream]) {
      this.sockets.add(s);
      s.on('close', () => this.sockets.delete(s));
      s.on('error', () => {});
    }
    const pair: [net.Socket, net.Socket] = [client, upstream];
    this.pairs.add(pair);
    client.pipe(upstream);
    upstream.pipe(client);
    client.resume();
    client.on('close', () => {
      this.pairs.delete(pair);
      upstream.destroy();
    });
    upstream.on('close', () => client.destroy());
  }

  /**
   * Blackhole for `ms`: nothing is forwarded either way and new connections are accepted but not
   * forwarded (no reset: the peers notice only by their own timeouts); then everything held
   * flows again.
   */
  async blackhole(ms: number): Promise<void> {
    const held = { pairs: [...this.pairs], waiting: [] as net.Socket[] };
    this.held = held;
    for (const [c, u] of held.pairs) {
      c.unpipe(u);
      u.unpipe(c);
      c.pause();
      u.pause();
    }
    await new Promise((r) => setTimeout(r, ms));
    this.held = undefined;
    for (const [c, u] of held.pairs) {
      if (c.destroyed || u.destroyed) continue;
      c.pipe(u);
      u.pipe(c);
    }
    for (const c of held.waiting) if (!c.destroyed) this.forward(c);
  }

  /** Reset every open connection. */
  cut(): void {
    for (const s of this.sockets) s.resetAndDestroy();
    this.sockets.clear();
    this.pairs.clear();
  }

  /** Cut, and refuse new connections for `ms`. */
  outage(ms: number): Promise<void> {
    this.refusing = true;
    this.cut();
    return new Promise((r) =>
      setTimeout(() => {
        this.refusing = false;
        r();
      }, ms),
    );
  }

  get connections(): number {
    return this.sockets.size;
  }

  async stop(): Promise<void> {
    this.cut();
    await new Promise<void>((r) => (this.server ? this.server.close(() => r()) : r()));
  }
}
