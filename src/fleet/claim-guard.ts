// The server's side of fleet claims: at session open, a device whose etcd
// claim names someone else is refused. The claimant presents its claim token
// in Connect metadata; the record in etcd must name the caller's identity and
// carry that token. A device without a fleet claim opens as before (the
// server's own exclusive claim still holds). Only session open asks etcd:
// resumed and handed-over sessions go on whether etcd answers or not.
import type { Logger } from '../common/log.js';
import { readClaim } from './claims.js';
import type { EtcdConnection } from './etcd.js';
import { FleetError, Status } from './errors.js';
import type { FleetKeys } from './keys.js';
export { CLAIM_TOKEN_METADATA, claimTokenOf } from './claim-token.js';

/** What the session manager calls before it opens a device (see SessionManager.openGuard). */
export type SessionOpenGuard = (device: { id: string }, identity: string, claimToken: string | undefined) => Promise<void>;

export function fleetClaimGuard(etcd: EtcdConnection, keys: FleetKeys, host: string, log?: Logger): SessionOpenGuard {
  return async (device, identity, token) => {
    let claim;
    try {
      claim = await readClaim(etcd, keys, host, device.id);
    } catch (err) {
      log?.warn({ device: device.id, identity, err: (err as Error).message }, 'fleet claim check failed');
      throw new FleetError(Status.UNAVAILABLE, `device ${device.id}: cannot check its fleet claim: ${(err as Error).message}; try again when etcd is back`);
    }
    if (!claim) return;
    if (claim.claimant !== identity) {
      throw new FleetError(Status.FAILED_PRECONDITION, `device ${device.id} on host ${host} is claimed in the fleet by ${claim.claimant} (since ${claim.since}), not by ${identity}`);
    }
    if (!token || token !== claim.token) {
      throw new FleetError(
        Status.PERMISSION_DENIED,
        `device ${device.id} on host ${host}: ${token ? 'the claim token presented does not match' : 'no claim token presented for'} the fleet claim of ${identity}`,
      );
    }
  };
}
