// Reloading a running USB host server (SIGHUP): its TLS material (certificate, key, CA, CRL) and
// the per-device ACL, without dropping sessions. Everything is read and checked before anything
// is applied: a broken file keeps the old material and ACL. New handshakes then use the new
// material; sessions whose client certificate is now revoked (or no longer signed by the CA),
// or whose identity the ACL no longer allows on their device, end with PERMISSION_DENIED; the
// connections of refused certificates are closed; every other session goes on untouched.
import { status as Status } from '@grpc/grpc-js';
import type { Logger } from '../common/log.js';
import { loadTlsMaterial, type TlsFiles, type TlsMaterial } from '../common/tls-material.js';
import { TlsPeers, type ReloadableServerCredentials } from '../common/tls-reload.js';
import { Acl, type AclConfig } from './acl.js';
import type { SessionManager } from './sessions/manager.js';

export interface ServerReload {
  /** The TLS files to read (the same paths, or new ones); undefined for a plaintext server. */
  tls?: TlsFiles;
  acl: AclConfig;
}

export interface ReloadTargets {
  log: Logger;
  acl: Acl;
  sessions: SessionManager;
  creds?: ReloadableServerCredentials;
  peers?: TlsPeers;
}

export interface ReloadOutcome {
  ok: boolean;
  /** Why the reload was refused (nothing changed). */
  error?: string;
  /** Sessions ended, with why. */
  sessionsEnded: { session: string; device: string; identity: string; reason: string }[];
  /** Peers whose connection was closed. */
  connectionsClosed: string[];
}

export function tlsSummary(m: TlsMaterial): Record<string, unknown> {
  return {
    cert: m.files.cert,
    serverSerial: m.certificate.serialNumber,
    certValidTo: m.certificate.validTo,
    ca: m.files.ca,
    ...(m.crl ? { crl: m.crl.file, revoked: m.crl.count, crlNextUpdate: m.crl.nextUpdate?.toISOString() } : {}),
  };
}

export async function reloadServer(t: ReloadTargets, next: ServerReload): Promise<ReloadOutcome> {
  const { log } = t;
  let material: TlsMaterial | undefined;
  try {
    if (!!next.tls !== !!t.creds) {
      throw new Error(t.creds ? 'the new configuration has no TLS material: a running server does not switch to plaintext (restart it)' : 'this server runs without TLS: it does not switch to TLS on reload (restart it)');
    }
    material = next.tls ? loadTlsMaterial(next.tls) : undefined;
    new Acl(next.acl); // throws on a bad entry before anything is applied
  } catch (err) {
    const error = (err as Error).message;
    log.error({ reload: 'refused', err: error, ...(next.tls ? { files: next.tls } : {}) }, 'reload refused: keeping the previous TLS material and ACL');
    return { ok: false, error, sessionsEnded: [], connectionsClosed: [] };
  }
  if (material) t.creds!.replace(material);
  t.acl.replace(next.acl);

  const refused = new Map((material && t.peers ? t.peers.refusedBy(material) : []).map((p) => [p.peer, p]));
  const sessionsEnded: ReloadOutcome['sessionsEnded'] = [];
  const closing: Promise<void>[] = [];
  for (const s of t.sessions.list()) {
    if (s.state === 'closed') continue;
    const device = s.device.id;
    const byTls = s.peer ? refused.get(s.peer) : undefined;
    const why = byTls
      ? `the client certificate of "${s.identity}" is no longer accepted: ${byTls.message}`
      : !t.acl.allows(s.identity, s.device)
        ? `the ACL no longer allows identity "${s.identity}" on device ${device}`
        : undefined;
    if (!why) continue;
    const message = `session ${s.id} on device ${device} ended by a configuration reload: ${why}`;
    s.log.warn({ reload: 'session_ended', reason: byTls ? `tls_${byTls.reason}` : 'acl', serial: byTls?.serial, err: message }, 'session ended by reload');
    sessionsEnded.push({ session: s.id, device, identity: s.identity, reason: why });
    closing.push(s.close(`reload: ${why}`, { reset: true, code: Status.PERMISSION_DENIED, message }));
  }
  await Promise.all(closing);
  // The PERMISSION_DENIED statuses go out first; then no more calls on those connections.
  for (const p of refused.values()) {
    log.warn({ reload: 'connection_closed', peer: p.peer, identity: p.identity, serial: p.serial, reason: `tls_${p.reason}`, err: p.message }, 'connection closed by reload: its client certificate is no longer accepted');
    TlsPeers.close(p);
  }
  log.info(
    { reload: 'done', ...(material ? tlsSummary(material) : {}), aclIdentities: t.acl.identities.length, sessionsEnded: sessionsEnded.length, connectionsClosed: refused.size },
    'reloaded TLS material and ACL',
  );
  return { ok: true, sessionsEnded, connectionsClosed: [...refused.keys()] };
}
