// A client's identity comes from its TLS certificate only (CN, else the first
// SAN), never from anything it sends.

export function identityOf(call: { getAuthContext(): { sslPeerCertificate?: import("node:tls").PeerCertificate } }, insecureIdentity?: string): string | undefined {
  const cert = call.getAuthContext?.().sslPeerCertificate;
  if (cert && Object.keys(cert).length > 0) {
    const cn = cert.subject?.CN;
    if (typeof cn === 'string' && cn) return cn;
    const san = cert.subjectaltname?.split(',')[0]?.trim();
    if (san) return san.replace(/^(DNS|URI|IP Address):/, '');
  }
  return insecureIdentity;
}
