// A claimant process: claims one device and holds its lease until killed.
// argv: ENDPOINTS CLAIMANT SELECTOR TTL_S KEY_PREFIX
import { FleetClaimant } from '../fleet/claims.js';
import { connectEtcd } from '../fleet/etcd.js';
import { FleetKeys } from '../fleet/keys.js';
import { parseFleetSelector } from '../fleet/selector.js';

const [endpoints, claimant, selector, ttl, prefix] = process.argv.slice(2);
const etcd = await connectEtcd(endpoints);
const me = await FleetClaimant.create(etcd, { claimant, leaseTtlS: Number(ttl), keys: new FleetKeys(prefix) });
const claim = await me.claim(parseFleetSelector(selector));
process.stdout.write(JSON.stringify({ key: claim.key, lease: claim.record.lease }) + '\n');
setInterval(() => {}, 1 << 30);
