// The server's configuration: a JSON file, overridden by flags.
import { readFileSync } from 'node:fs';
import type { AclConfig } from './acl.js';
import type { SessionLimits } from './sessions/session.js';
import type { LibusbAllowRule } from './backends/libusb/policy.js';
import type { FleetConfigFile } from '../fleet/config.js';

export interface EmulatedConfig {
  /**
   * A mass-storage disk backed by a sparse image file (default <data dir>/disk.img). `speed`: the bus speed it enumerates at
   * (default "high"; "super" gives 1 MiB SCSI commands in a Linux guest, but only on xHCI). `latencyMs`: each READ/WRITE
   * command waits this long before its data moves (default 0), so that tests find a bulk URB in flight when they act.
   */
  disk?: { image?: string; sizeMiB?: number; speed?: 'full' | 'high' | 'super'; latencyMs?: number } | false;
  loopback?: boolean;
  /** ms the loopback device takes to answer its slow vendor request (IN 0x5d; default 0). */
  controlLatencyMs?: number;
  serial?: boolean;
  /** Extra loopback devices on bus 2 (ids emu-2-1 ... emu-2-N), e.g. for load tests. */
  count?: number;
  /** An FTDI FT232R-like echo port (0403:6001; default off). */
  ftdi?: boolean;
  /**
   * A USB Attached SCSI disk at SuperSpeed (1209:7302, bulk streams; xHCI guests bind `uas`), backed by its own image
   * (default <data dir>/uas.img, 64 MiB when created). Default off.
   */
  uas?: { image?: string; sizeMiB?: number; latencyMs?: number } | boolean;
}

export interface LibusbConfig {
  /** Export real devices through libusb (default true when the section is present). */
  enabled?: boolean;
  /**
   * Allow rules: only matching devices are listed or claimable; hubs never.
   * Strings as for --libusb-allow ("*", "vvvv:pppp", "vid=..,pid=..,serial=..,class=..,bus=..,port=1.4")
   * or objects { vendorId, productId, serial, class, bus, portPath }.
   */
  allow?: (string | LibusbAllowRule)[];
  /** Device list poll interval, ms (default 500; 0: libusb hotplug events only). */
  pollMs?: number;
}

export interface ServerConfig {
  listen: string;
  /** Mutual TLS; `crl`: a CRL (PEM) signed by the CA. All re-read on SIGHUP. */
  tls?: { ca: string; cert: string; key: string; crl?: string };
  insecure?: boolean;
  acl: AclConfig;
  admins: string[];
  limits: Partial<SessionLimits>;
  emulated?: EmulatedConfig;
  libusb?: LibusbConfig;
  logLevel?: string;
  /** Fleet registration on etcd (src/fleet/config.ts); flags --etcd, --host-name, --label, --device-label. */
  fleet?: FleetConfigFile;
  /** HOST:PORT: serve Prometheus metrics at /metrics there. */
  metricsListen?: string;
}

export const DEFAULT_LISTEN = '127.0.0.1:7470';

export function loadConfigFile(path: string): Partial<ServerConfig> {
  let raw: string;
  try {
    raw = readFileSync(path, 'utf8');
  } catch (err) {
    throw new Error(`cannot read config file ${path}: ${(err as Error).message}`);
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(raw);
  } catch (err) {
    throw new Error(`config file ${path} is not valid JSON: ${(err as Error).message}`);
  }
  if (!parsed || typeof parsed !== 'object' || Array.isArray(parsed)) throw new Error(`config file ${path} must hold a JSON object`);
  const known = new Set(['listen', 'tls', 'insecure', 'acl', 'admins', 'limits', 'emulated', 'libusb', 'logLevel', 'fleet', 'metricsListen']);
  for (const k of Object.keys(parsed)) if (!known.has(k)) throw new Error(`config file ${path}: unknown key "${k}" (known: ${[...known].join(', ')})`);
  return parsed as Partial<ServerConfig>;
}
