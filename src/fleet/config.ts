// The server's fleet settings: `usbroam serve --etcd URL[,URL...] --host-name NAME --label k=v
// --device-label 'SELECTOR k=v'`, or the config file's "fleet" object (flags win).
import os from 'node:os';
import { parseEndpoints } from './etcd.js';
import { DEFAULT_PREFIX } from './keys.js';
import { DEFAULT_LEASE_TTL_S } from './kept-lease.js';
import type { DeviceLabelRule } from './publisher.js';
import { parseFleetSelector } from './selector.js';

export interface FleetConfigFile {
  etcd?: string | string[];
  hostName?: string;
  /** The address bridges connect to (default: the address the server bound). */
  advertise?: string;
  labels?: Record<string, string>;
  /** Per-device labels: `select` is a fleet selector, e.g. "serial=ABC" or "1209:0001". */
  devices?: { select: string; labels: Record<string, string> }[];
  leaseTtlSeconds?: number;
  prefix?: string;
}

export interface FleetFlags {
  etcd?: string;
  hostName?: string;
  advertise?: string;
  label?: string[];
  deviceLabel?: string[];
  leaseTtl?: string;
  fleetPrefix?: string;
}

export interface FleetConfig {
  etcd: string[];
  hostName: string;
  advertise?: string;
  labels: Record<string, string>;
  deviceLabels: DeviceLabelRule[];
  leaseTtlS: number;
  prefix: string;
}

function parseLabel(kv: string, where: string): [string, string] {
  const eq = kv.indexOf('=');
  if (eq <= 0 || !/^[A-Za-z0-9._/-]+$/.test(kv.slice(0, eq))) throw new Error(`${where} "${kv}" is not of the form key=value`);
  return [kv.slice(0, eq), kv.slice(eq + 1)];
}

/** The fleet settings, or undefined when neither flags nor file name an etcd. Throws saying what is wrong. */
export function fleetConfig(f: FleetFlags, file: FleetConfigFile | undefined): FleetConfig | undefined {
  const etcd = f.etcd ?? file?.etcd;
  if (!etcd) {
    if (f.hostName || f.label?.length || f.deviceLabel?.length) throw new Error('--host-name, --label and --device-label need --etcd');
    return undefined;
  }
  const labels: Record<string, string> = { ...(file?.labels ?? {}) };
  for (const l of f.label ?? []) {
    const [k, v] = parseLabel(l, '--label');
    labels[k] = v;
  }
  const deviceLabels: DeviceLabelRule[] = [];
  for (const d of file?.devices ?? []) {
    if (!d || typeof d.select !== 'string') throw new Error('config file fleet.devices[] entries need "select" (a selector) and "labels"');
    deviceLabels.push({ select: parseFleetSelector(d.select), labels: { ...(d.labels ?? {}) } });
  }
  for (const spec of f.deviceLabel ?? []) {
    // 'SELECTOR k=v...': the first word is the selector (terms joined by commas), the rest are labels.
    const [select, ...kvs] = spec.trim().split(/\s+/);
    if (!select || !kvs.length) throw new Error(`--device-label "${spec}" must be 'SELECTOR k=v...', e.g. 'serial=ABC license=cad'`);
    deviceLabels.push({ select: parseFleetSelector(select), labels: Object.fromEntries(kvs.map((kv) => parseLabel(kv, '--device-label'))) });
  }
  const ttl = f.leaseTtl !== undefined ? Number(f.leaseTtl) : (file?.leaseTtlSeconds ?? DEFAULT_LEASE_TTL_S);
  if (!Number.isInteger(ttl) || ttl < 2 || ttl > 3600) throw new Error(`fleet lease TTL ${ttl} must be whole seconds from 2 to 3600`);
  const hostName = f.hostName ?? file?.hostName ?? os.hostname();
  if (!hostName || /\s/.test(hostName)) throw new Error(`--host-name "${hostName}" must be non-empty without spaces`);
  const prefix = f.fleetPrefix ?? file?.prefix ?? DEFAULT_PREFIX;
  return { etcd: parseEndpoints(etcd), hostName, advertise: f.advertise ?? file?.advertise, labels, deviceLabels, leaseTtlS: ttl, prefix };
}
