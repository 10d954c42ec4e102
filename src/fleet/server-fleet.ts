// A server in the fleet: one etcd connection for its registration (publisher)
// and its session-open check (claim guard). serve.ts sets the guard before the
// server listens and publishes once the address is known.
import type { Logger } from '../common/log.js';
import { fleetClaimGuard, type SessionOpenGuard } from './claim-guard.js';
import type { FleetConfig } from './config.js';
import { connectEtcd, type EtcdConnection } from './etcd.js';
import { FleetKeys } from './keys.js';
import { FleetPublisher, type DeviceSource } from './publisher.js';
import { SessionClaimWatch, type WatchedSessions } from './session-watch.js';

export interface ServerFleet {
  etcd: EtcdConnection;
  guard: SessionOpenGuard;
  publisher?: FleetPublisher;
  /** Start publishing `address` (or the configured advertise address) and the devices of `source`. */
  publish(address: string, source: DeviceSource): FleetPublisher;
  /** End open sessions whose claim vanishes or moves to another identity (see session-watch.ts). */
  watchSessions(sessions: WatchedSessions): SessionClaimWatch;
  /** Leave the fleet (revoke the lease) and close the connection. */
  stop(): Promise<void>;
}

export async function startServerFleet(cfg: FleetConfig, log: Logger): Promise<ServerFleet> {
  const etcd = await connectEtcd(cfg.etcd);
  const keys = new FleetKeys(cfg.prefix);
  const flog = log.child({ fleetHost: cfg.hostName });
  let watch: SessionClaimWatch | undefined;
  const fleet: ServerFleet = {
    etcd,
    guard: fleetClaimGuard(etcd, keys, cfg.hostName, flog),
    publish(address, source) {
      const advertised = cfg.advertise ?? address;
      if (/^(0\.0\.0\.0|\[?::\]?)(:|$)/.test(advertised)) {
        flog.warn({ address: advertised }, 'publishing an unspecified address that bridges cannot connect to: set --advertise host:port');
      }
      fleet.publisher = new FleetPublisher(etcd, source, {
        host: cfg.hostName,
        address: advertised,
        hostLabels: cfg.labels,
        deviceLabels: cfg.deviceLabels,
        leaseTtlS: cfg.leaseTtlS,
        keys,
        log: flog,
      });
      fleet.publisher.start();
      flog.info({ etcd: cfg.etcd, address: advertised, ttlS: cfg.leaseTtlS }, 'joining the fleet');
      return fleet.publisher;
    },
    watchSessions(sessions) {
      watch = new SessionClaimWatch(etcd, keys, cfg.hostName, sessions, flog);
      watch.start();
      return watch;
    },
    async stop() {
      await watch?.stop();
      await fleet.publisher?.stop();
      etcd.close();
    },
  };
  return fleet;
}
