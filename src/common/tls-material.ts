// A server's mutual-TLS material read from its files and checked as a whole: CA, certificate,
// key and an optional CRL. OpenSSL (Node's tls `crl` option) enforces the CRL at the handshake;
// the CRL is also read here so that peers already connected can be checked against it after a
// reload, and so that a CRL that would lock every client out (not signed by the CA, expired) is
// refused before it is used.
import { AsnConvert } from '@peculiar/asn1-schema';
import { CertificateList } from '@peculiar/asn1-x509';
import { verify as verifySignature, X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createSecureContext, type SecureContextOptions } from 'node:tls';

export interface TlsFiles {
  ca: string;
  cert: string;
  key: string;
  /** A CRL (PEM) signed by the CA: certificates it lists are refused. */
  crl?: string;
}

export interface RevocationList {
  file: string;
  /** Subject of the CA that signed it. */
  issuer: string;
  nextUpdate?: Date;
  /** Revoked serials (normalizeSerial) per signing CA's fingerprint256. */
  revoked: Map<string, Set<string>>;
  count: number;
}

export interface TlsMaterial {
  files: TlsFiles;
  /** What Node's TLS server is given (grpc-js passes it to setSecureContext). */
  context: SecureContextOptions;
  cas: X509Certificate[];
  certificate: X509Certificate;
  crl?: RevocationList;
}

/** Serials as hex, upper case, without leading zeros: Node and the CRL spell them differently. */
export function normalizeSerial(hex: string): string {
  return hex.replace(/[^0-9a-fA-F]/g, '').replace(/^0+(?=.)/, '').toUpperCase();
}

function readMaterialFile(what: string, file: string): Buffer {
  try {
    return readFileSync(file);
  } catch (err) {
    throw new Error(`cannot read the ${what} ${file}: ${(err as Error).message}`);
  }
}

function pemBlocks(text: string, label: string): Buffer[] {
  const re = new RegExp(`-----BEGIN ${label}-----([A-Za-z0-9+/=\\s]+?)-----END ${label}-----`, 'g');
  return [...text.matchAll(re)].map((m) => Buffer.from(m[1]!.replace(/\s+/g, ''), 'base64'));
}

/** Signature algorithm OID of a CRL -> the digest crypto.verify wants (null: the key decides, Ed25519/Ed448). */
const SIGNATURE_DIGESTS: Record<string, string | null> = {
  '1.2.840.10045.4.3.2': 'sha256', // ecdsa-with-SHA256
  '1.2.840.10045.4.3.3': 'sha384',
  '1.2.840.10045.4.3.4': 'sha512',
  '1.2.840.113549.1.1.11': 'sha256', // sha256WithRSAEncryption
  '1.2.840.113549.1.1.12': 'sha384',
  '1.2.840.113549.1.1.13': 'sha512',
  '1.3.101.112': null, // Ed25519
  '1.3.101.113': null, // Ed448
};

function readCrl(file: string, caFile: string, cas: X509Certificate[], now: Date): RevocationList {
  const blocks = pemBlocks(readMaterialFile('CRL', file).toString('latin1'), 'X509 CRL');
  if (!blocks.length) throw new Error(`CRL ${file} holds no PEM "X509 CRL" block`);
  const revoked = new Map<string, Set<string>>();
  let count = 0;
  let issuer = '';
  let nextUpdate: Date | undefined;
  for (const der of blocks) {
    let list: CertificateList;
    try {
      list = AsnConvert.parse(der, CertificateList);
    } catch (err) {
      throw new Error(`CRL ${file} is not a valid X.509 CRL: ${(err as Error).message}`);
    }
    const oid = list.signatureAlgorithm.algorithm;
    const digest = SIGNATURE_DIGESTS[oid];
    if (digest === undefined) throw new Error(`CRL ${file} is signed with algorithm ${oid}, which usbroam cannot check`);
    const tbs = Buffer.from(list.tbsCertListRaw ?? AsnConvert.serialize(list.tbsCertList));
    const signature = Buffer.from(list.signature);
    const signer = cas.find((ca) => {
      try {
        return verifySignature(digest, tbs, ca.publicKey, signature);
      } catch {
        return false; // a key of another type
      }
    });
    // OpenSSL would refuse every client certificate of the CA ("unable to get certificate CRL").
    if (!signer) throw new Error(`CRL ${file} is not signed by the CA in ${caFile}: it would refuse every client`);
    const next = list.tbsCertList.nextUpdate?.getTime();
    if (next && next.getTime() < now.getTime()) {
      throw new Error(`CRL ${file} expired at ${next.toISOString()} (its nextUpdate): it would refuse every client; write a fresh one (make-certs crl)`);
    }
    if (next && (!nextUpdate || next < nextUpdate)) nextUpdate = next;
    const set = revoked.get(signer.fingerprint256) ?? new Set<string>();
    for (const r of list.tbsCertList.revokedCertificates ?? []) {
      set.add(normalizeSerial(Buffer.from(r.userCertificate).toString('hex')));
      count++;
    }
    revoked.set(signer.fingerprint256, set);
    issuer ||= signer.subject.replace(/\n/g, ', ');
  }
  return { file, issuer, nextUpdate, revoked, count };
}

/** Read and check every file; throws an Error naming the file and what is wrong with it. */
export function loadTlsMaterial(files: TlsFiles, now = new Date()): TlsMaterial {
  const ca = readMaterialFile('CA certificate', files.ca);
  const cert = readMaterialFile('certificate', files.cert);
  const key = readMaterialFile('private key', files.key);
  const cas = pemBlocks(ca.toString('latin1'), 'CERTIFICATE').map((der, i) => {
    try {
      return new X509Certificate(der);
    } catch (err) {
      throw new Error(`CA file ${files.ca}: certificate ${i + 1} does not parse: ${(err as Error).message}`);
    }
  });
  if (!cas.length) throw new Error(`CA file ${files.ca} holds no PEM certificate`);
  let certificate: X509Certificate;
  try {
    certificate = new X509Certificate(cert);
  } catch (err) {
    throw new Error(`certificate ${files.cert} does not parse: ${(err as Error).message}`);
  }
  const crl = files.crl ? readCrl(files.crl, files.ca, cas, now) : undefined;
  const context: SecureContextOptions = { ca, cert, key, ...(files.crl ? { crl: readMaterialFile('CRL', files.crl) } : {}) };
  try {
    createSecureContext(context); // what the TLS server will do with it: a key that does not match, a bad PEM
  } catch (err) {
    throw new Error(`TLS material refused (certificate ${files.cert}, key ${files.key}, CA ${files.ca}${files.crl ? `, CRL ${files.crl}` : ''}): ${(err as Error).message}`);
  }
  return { files, context, cas, certificate, crl };
}

/** Why `material` would refuse this peer certificate (DER) at a handshake now, or undefined. */
export function peerRefusal(material: TlsMaterial, raw: Buffer): { reason: 'revoked' | 'untrusted'; serial: string; message: string } | undefined {
  let cert: X509Certificate;
  try {
    cert = new X509Certificate(raw);
  } catch {
    return { reason: 'untrusted', serial: '', message: 'its certificate does not parse' };
  }
  const serial = normalizeSerial(cert.serialNumber);
  const issuer = material.cas.find((ca) => cert.checkIssued(ca) && cert.verify(ca.publicKey));
  if (!issuer) return { reason: 'untrusted', serial, message: `certificate serial ${serial} is not signed by the CA in ${material.files.ca}` };
  if (material.crl?.revoked.get(issuer.fingerprint256)?.has(serial)) {
    return { reason: 'revoked', serial, message: `certificate serial ${serial} is revoked by the CRL ${material.crl.file}` };
  }
  return undefined;
}
