// Mutual-TLS credentials that can be replaced while the server runs, and the TLS peers connected
// to it. grpc-js watches its ServerCredentials: updateSecureContextOptions() hands new options
// to Node's setSecureContext() on every listener, so new handshakes use the new material and
// connections already up keep theirs. Those are checked here against the new material instead.
import * as grpc from '@grpc/grpc-js';
import type * as http2 from 'node:http2';
import type { TLSSocket } from 'node:tls';
import { peerRefusal, type TlsMaterial } from './tls-material.js';

/**
 * ServerCredentials.createSsl(ca, [{cert, key}], true) with replaceable material (Node's
 * `crl` option included). `replace` takes only material loadTlsMaterial() accepted: grpc-js
 * drops every new connection when setSecureContext throws.
 */
export class ReloadableServerCredentials extends grpc.ServerCredentials {
  constructor(private material: TlsMaterial) {
    super({ requestCert: true, rejectUnauthorized: true, ciphers: process.env.GRPC_SSL_CIPHER_SUITES }, material.context);
  }

  get current(): TlsMaterial {
    return this.material;
  }

  replace(material: TlsMaterial): void {
    this.material = material;
    this.updateSecureContextOptions(material.context);
  }

  _equals(other: grpc.ServerCredentials): boolean {
    return other === this;
  }
}

export interface TlsPeer {
  /** host:port as grpc-js's call.getPeer() spells it. */
  peer: string;
  session: http2.ServerHttp2Session;
  /** The client certificate, DER. */
  raw?: Buffer;
  identity?: string;
}

/** The HTTP/2 sessions of a bound grpc-js server's TLS listeners, by peer address. */
export class TlsPeers {
  private readonly byPeer = new Map<string, TlsPeer>();

  /** Call after bindAsync (grpc-js creates its http2 servers, kept in a private map, only then). */
  constructor(server: grpc.Server) {
    const servers = (server as unknown as { http2Servers?: Map<http2.Http2SecureServer, unknown> }).http2Servers;
    for (const h of servers?.keys() ?? []) {
      h.on('session', (session: http2.ServerHttp2Session) => {
        const socket = session.socket as TLSSocket;
        if (!socket?.remoteAddress) return;
        const peer = socket.remotePort ? `${socket.remoteAddress}:${socket.remotePort}` : socket.remoteAddress;
        const cert = typeof socket.getPeerCertificate === 'function' ? socket.getPeerCertificate() : undefined;
        const identity = cert?.subject?.CN ?? cert?.subjectaltname?.split(',')[0]?.trim();
        this.byPeer.set(peer, { peer, session, raw: cert?.raw, identity: typeof identity === 'string' ? identity : undefined });
        session.once('close', () => {
          if (this.byPeer.get(peer)?.session === session) this.byPeer.delete(peer);
        });
      });
    }
  }

  get(peer: string): TlsPeer | undefined {
    return this.byPeer.get(peer);
  }

  list(): TlsPeer[] {
    return [...this.byPeer.values()];
  }

  /** The peers `material` would refuse now, with why. */
  refusedBy(material: TlsMaterial): (TlsPeer & { serial: string; message: string; reason: 'revoked' | 'untrusted' })[] {
    const out = [];
    for (const p of this.list()) {
      if (!p.raw) continue;
      const r = peerRefusal(material, p.raw);
      if (r) out.push({ ...p, ...r });
    }
    return out;
  }

  /** GOAWAY to a peer's connection (its calls in progress may finish), then cut it after `graceMs`. */
  static close(p: TlsPeer, graceMs = 1000): void {
    const { session } = p;
    if (session.closed || session.destroyed) return;
    session.close();
    const t = setTimeout(() => {
      if (!session.destroyed) session.destroy();
    }, graceMs);
    t.unref();
    session.once('close', () => clearTimeout(t));
  }
}
