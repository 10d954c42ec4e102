// A TCP proxy the test controls: forwards to a target, and can cut every
// connection (a network failure as a client sees it), refuse new ones,
// blackhole the network (nothing passes either way, nobody is told), or
// forward new connections to another port (a restarted server).
import net from 'node:net';

interface Pair {
  client: net.Socket;
  upstream?: net.Socket;
  /** One side closed during a blackhole: the other learns when it ends. */
  closedInHole: boolean;
}

export class TcpProxy {
  private server?: net.Server;
  private readonly sockets = new Set<net.Socket>();
  private readonly pairs = new Set<Pair>();
  private refusing = false;
  private holed = false;
  port = 0;

  constructor(
    private readonly targetHost: string,
    private targetPort: number,
  ) {}

  async start(): Promise<string> {
    this.server = net.createServer((client) => {
      if (this.refusing) return client.destroy();
      const pair: Pair = { client, closedInHole: false };
      this.pairs.add(pair);
      this.track(client);
      client.on('close', () => this.sideClosed(pair));
      if (this.holed) client.pause(); // connected, but nothing gets through until the hole ends
      else this.connectUpstream(pair);
    });
    await new Promise<void>((r) => this.server!.listen(0, '127.0.0.1', r));
    this.port = (this.server.address() as net.AddressInfo).port;
    return `127.0.0.1:${this.port}`;
  }

  private track(s: net.Socket): void {
    this.sockets.add(s);
    s.on('close', () => this.sockets.delete(s));
    s.on('error', () => {});
  }

  private connectUpstream(pair: Pair): void {
    const upstream = net.connect(this.targetPort, this.targetHost);
    pair.upstream = upstream;
    this.track(upstream);
    upstream.on('close', () => this.sideClosed(pair));
    this.forward(pair);
  }

  private forward(pair: Pair): void {
    const { client, upstream } = pair;
    client.pipe(upstream!);
    upstream!.pipe(client);
    client.resume();
    upstream!.resume();
  }

  /** A side closed: the other follows, unless the network is blackholed (then it cannot know yet). */
  private sideClosed(pair: Pair): void {
    if (this.holed) {
      pair.closedInHole = true;
      return;
    }
    pair.client.destroy();
    pair.upstream?.destroy();
    this.pairs.delete(pair);
  }

  /** Reset every open connection. */
  cut(): void {
    for (const s of this.sockets) s.resetAndDestroy();
    this.sockets.clear();
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

  /**
   * A network cut for `ms`: no byte passes either way and no side hears of the other closing;
   * new connections are accepted but get nowhere. Bytes already sent wait in the socket buffers
   * (TCP would retransmit them), so a connection both ends keep through the cut carries on after it.
   */
  blackhole(ms: number): Promise<void> {
    this.holed = true;
    for (const { client, upstream } of this.pairs) {
      if (!upstream) continue;
      client.unpipe(upstream);
      upstream.unpipe(client);
      client.pause();
      upstream.pause();
    }
    return new Promise((r) =>
      setTimeout(() => {
        this.holed = false;
        for (const pair of [...this.pairs]) {
          if (pair.closedInHole || pair.client.destroyed || pair.upstream?.destroyed) this.sideClosed(pair);
          else if (!pair.upstream) this.connectUpstream(pair);
          else this.forward(pair);
        }
        r();
      }, ms),
    );
  }

  /** Forward new connections to `port` (e.g. a server restarted on another port). */
  retarget(port: number): void {
    this.targetPort = port;
  }

  get connections(): number {
    return this.sockets.size;
  }

  async stop(): Promise<void> {
    this.holed = false;
    this.cut();
    await new Promise<void>((r) => (this.server ? this.server.close(() => r()) : r()));
  }
}
