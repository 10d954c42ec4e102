// A fake QEMU usb-redir peer for bridge tests: a UsbredirParser in role 'host' (usbredir's
// usb-guest) on one end of a unix socket; the other end goes to an Attachment.
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { UsbredirParser, type Packet, type PacketOf, type PacketTypeName } from '../../src/qemu/usbredir/index.js';

export class FakeQemu {
  readonly parser = new UsbredirParser({ role: 'host', version: 'fake qemu' });
  readonly packets: Packet[] = [];
  error?: Error;
  ended = false;
  private waiters: (() => void)[] = [];

  /** ackDisconnect: answer device_disconnect with device_disconnect_ack, as QEMU does. */
  constructor(readonly socket: net.Socket, opts: { ackDisconnect?: boolean } = {}) {
    socket.on('data', (b: Buffer) => {
      try {
        for (const p of this.parser.push(b)) {
          this.packets.push(p);
          if (opts.ackDisconnect && p.type === 'device_disconnect') this.send({ type: 'device_disconnect_ack', id: p.id });
        }
      } catch (err) {
        this.error = err as Error;
      }
      this.wake();
    });
    socket.on('close', () => {
      this.ended = true;
      this.wake();
    });
    socket.on('error', () => {});
  }

  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  send(p: Packet): void {
    this.socket.write(this.parser.encode(p));
  }
  hello(): void {
    this.send(this.parser.helloPacket());
  }
  sendRaw(b: Uint8Array): void {
    this.socket.write(b);
  }

  /** Wait until a received packet matches; returns it (searching from `from`). */
  async waitFor<T extends PacketTypeName>(type: T, pred: (p: PacketOf<T>) => boolean = () => true, timeoutMs = 10_000, from = 0): Promise<PacketOf<T>> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      for (let i = from; i < this.packets.length; i++) {
        const p = this.packets[i]!;
        if (p.type === type && pred(p as PacketOf<T>)) return p as PacketOf<T>;
      }
      if (this.error) throw this.error;
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timeout waiting for ${type}; got ${this.packets.map((p) => p.type).join(',')}`);
      await new Promise<void>((r) => {
        const t = setTimeout(r, left);
        this.waiters.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
  }

  async waitClosed(timeoutMs = 10_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!this.ended) {
      if (Date.now() > deadline) throw new Error('timeout waiting for the bridge to close the socket');
      await new Promise<void>((r) => {
        const t = setTimeout(r, 50);
        this.waiters.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
  }
}

/** A connected pair of unix sockets: [bridge side, fake QEMU]. */
export async function socketPair(): Promise<{ bridge: net.Socket; qemu: FakeQemu; cleanup: () => void }> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'usbroam-bridge-'));
  const sock = path.join(dir, 'redir.sock');
  const server = net.createServer();
  await new Promise<void>((r) => server.listen(sock, r));
  const accepted = new Promise<net.Socket>((r) => server.once('connection', r));
  const bridge = net.connect(sock);
  await new Promise<void>((r, j) => {
    bridge.once('connect', r);
    bridge.once('error', j);
  });
  const q = await accepted;
  server.close();
  return {
    bridge,
    qemu: new FakeQemu(q),
    cleanup: () => {
      bridge.destroy();
      q.destroy();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
