// Refused TLS handshakes. grpc-js never sees them: Node's TLS server emits 'tlsClientError' on
// the http2 server grpc-js made (kept in its private http2Servers map) and drops the socket.
import type * as http2 from 'node:http2';
import type { Socket } from 'node:net';
import type { TLSSocket } from 'node:tls';
import type * as grpc from '@grpc/grpc-js';
import type { RefusalReason } from './observer.js';

/** Why a handshake failed, from OpenSSL's verify codes and alerts. */
export function tlsRefusalReason(err: Error & { code?: string }): RefusalReason {
  const code = err.code ?? '';
  const text = `${code} ${err.message}`;
  if (/PEER_DID_NOT_RETURN_A_CERTIFICATE|did not return a certificate|CERTIFICATE_REQUIRED/i.test(text)) return 'tls_no_certificate';
  if (/CERT_HAS_EXPIRED|CERTIFICATE_EXPIRED|CERT_NOT_YET_VALID|certificate has expired/i.test(text)) return 'tls_expired';
  if (/UNABLE_TO_GET_ISSUER_CERT|UNABLE_TO_VERIFY_LEAF_SIGNATURE|SELF_SIGNED_CERT|UNKNOWN_CA|unknown ca|unable to get (local )?issuer/i.test(text)) return 'tls_unknown_ca';
  if (/CERT_REVOKED|certificate revoked/i.test(text)) return 'tls_revoked';
  if (/CERT|certificate/i.test(text)) return 'tls_bad_certificate';
  return 'tls_other';
}

/** Call `onRefused` for every handshake the server refuses. Call after bindAsync (the http2 servers exist only then). */
export function watchTlsRefusals(server: grpc.Server, onRefused: (reason: RefusalReason, peer: string, err: Error & { code?: string }) => void): void {
  const servers = (server as unknown as { http2Servers?: Map<http2.Http2SecureServer, unknown> }).http2Servers;
  for (const h of servers?.keys() ?? []) {
    const marked = h as { usbroamTlsWatch?: boolean };
    if (marked.usbroamTlsWatch) continue;
    marked.usbroamTlsWatch = true;
    // The peer's address, noted on the raw socket: a refused TLS socket is destroyed (no address) by the time we hear of it.
    h.on('connection', (raw: Socket & { usbroamPeer?: string }) => {
      raw.usbroamPeer = raw.remoteFamily === 'IPv6' ? `[${raw.remoteAddress}]:${raw.remotePort}` : `${raw.remoteAddress}:${raw.remotePort}`;
    });
    h.on('tlsClientError', (err: Error & { code?: string }, socket: TLSSocket & { _parent?: { usbroamPeer?: string } }) => {
      const peer = socket._parent?.usbroamPeer ?? (socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort}` : 'unknown');
      // A client certificate that fails verification: Node destroys the socket after the handshake
      // ('socket hang up'); why is in authorizationError (an OpenSSL verify code).
      const verify = (socket as { authorizationError?: string | Error }).authorizationError;
      if (verify) {
        const code = typeof verify === 'string' ? verify : ((verify as { code?: string }).code ?? verify.message);
        const e = Object.assign(new Error(`client certificate refused: ${code}`), { code });
        onRefused(tlsRefusalReason(e), peer, e);
      } else onRefused(tlsRefusalReason(err), peer, err);
    });
  }
}
