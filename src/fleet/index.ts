// The fleet SDK: a device directory and exclusive claims across USB hosts, on etcd.
//
//   const etcd = await connectEtcd('http://10.0.0.5:2379');
//   const dir = new FleetDirectory(etcd);
//   for (const d of await dir.list(parseFleetSelector('label license=cad'))) ...
//   for await (const ev of dir.watch({ signal })) ...
//   const me = await FleetClaimant.create(etcd, { claimant: 'vm-builder' });
//   const claim = await me.claim(parseFleetSelector('serial=ABC'));
//   new UsbHostClient({ address: claim.device.address, claimToken: claim.record.token, ...tls }).openDevice({ id: claim.device.id })
export { connectEtcd, parseEndpoints, type EtcdConnection } from './etcd.js';
export { FleetDirectory, type FleetDevice, type FleetEvent } from './directory.js';
export { FleetClaimant, moveClaim, readClaim, type FleetClaim } from './claims.js';
export { FleetPublisher, type DeviceSource } from './publisher.js';
export { FleetKeys, DEFAULT_PREFIX, type ClaimRecord, type DeviceRecord, type HostRecord } from './keys.js';
export { parseFleetSelector, matchesFleetSelector, describeFleetSelector, type FleetSelector } from './selector.js';
export { FleetError, isEtcdUnreachable } from './errors.js';
export { CLAIM_TOKEN_METADATA } from './claim-token.js';
