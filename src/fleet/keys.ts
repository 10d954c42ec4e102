// The fleet's etcd key schema and the JSON records stored under it.
//
//   <prefix>hosts/<host>                 HostRecord    under the server's lease
//   <prefix>devices/<host>/<device id>   DeviceRecord  under the server's lease
//   <prefix>claims/<host>/<device id>    ClaimRecord   under the claimant's (bridge's) lease
//   <prefix>offers/<session id>          ClaimOffer    under a migration destination's lease
//
// Host names and device ids are percent-encoded, so a '/' in either cannot
// reach another key. Records are JSON: small, readable with etcdctl.
import type { DeviceInfo } from '../server/backends/types.js';
import { formatPortPath, formatVidPid } from '../server/devices/selector.js';

export const DEFAULT_PREFIX = '/usbroam/v1/';
/** Records larger than this are refused on write and on read (a bound for a shared store). */
export const MAX_RECORD_BYTES = 64 * 1024;

export interface HostRecord {
  host: string;
  /** Where bridges connect (host:port), with the same mutual TLS as always. */
  address: string;
  labels: Record<string, string>;
  startedAt: string;
}

export interface DeviceRecord {
  host: string;
  address: string;
  id: string;
  vidPid: string;
  vendorId: number;
  productId: number;
  deviceClass: number;
  interfaceClasses: number[];
  speed: number;
  manufacturer: string;
  product: string;
  serial: string;
  portPath: string;
  backend: string;
  labels: Record<string, string>;
  /** The server's own claim: the identity and session that have the device open, if any. */
  session: { identity: string; sessionId: string } | null;
}

export interface ClaimRecord {
  host: string;
  deviceId: string;
  /** The claimant's identity: the CN of the client certificate it connects with. */
  claimant: string;
  /** A secret the claimant presents to the server at session open (metadata usbroam-fleet-claim). */
  token: string;
  /** The etcd lease (decimal id) the claim lives under. */
  lease: string;
  since: string;
}

/** A migration destination standing by on a session offers to hold its claim: the record it will have there. */
export interface ClaimOffer {
  sessionId: string;
  claimant: string;
  token: string;
  lease: string;
  since: string;
}

export class FleetKeys {
  constructor(readonly prefix = DEFAULT_PREFIX) {
    if (!prefix.endsWith('/')) throw new Error(`fleet key prefix "${prefix}" must end with "/"`);
  }
  get hosts(): string {
    return `${this.prefix}hosts/`;
  }
  get devices(): string {
    return `${this.prefix}devices/`;
  }
  get claims(): string {
    return `${this.prefix}claims/`;
  }
  host(host: string): string {
    return this.hosts + enc(host);
  }
  hostDevices(host: string): string {
    return `${this.devices}${enc(host)}/`;
  }
  device(host: string, id: string): string {
    return this.hostDevices(host) + enc(id);
  }
  hostClaims(host: string): string {
    return `${this.claims}${enc(host)}/`;
  }
  claim(host: string, id: string): string {
    return this.hostClaims(host) + enc(id);
  }
  get offers(): string {
    return `${this.prefix}offers/`;
  }
  offer(sessionId: string): string {
    return this.offers + enc(sessionId);
  }
  /** What a key under the prefix names, or undefined for a foreign key. */
  parse(key: string): { kind: 'host'; host: string } | { kind: 'device' | 'claim'; host: string; id: string } | undefined {
    if (!key.startsWith(this.prefix)) return undefined;
    const parts = key.slice(this.prefix.length).split('/');
    try {
      if (parts[0] === 'hosts' && parts.length === 2) return { kind: 'host', host: dec(parts[1]) };
      if ((parts[0] === 'devices' || parts[0] === 'claims') && parts.length === 3) {
        return { kind: parts[0] === 'devices' ? 'device' : 'claim', host: dec(parts[1]), id: dec(parts[2]) };
      }
    } catch {
      /* not percent-encoded by us */
    }
    return undefined;
  }
}

const enc = (s: string) => encodeURIComponent(s);
const dec = (s: string) => decodeURIComponent(s);

export function encodeRecord(r: HostRecord | DeviceRecord | ClaimRecord | ClaimOffer): string {
  const s = JSON.stringify(r);
  if (Buffer.byteLength(s) > MAX_RECORD_BYTES) throw new Error(`fleet record is ${Buffer.byteLength(s)} bytes, over the ${MAX_RECORD_BYTES}-byte bound`);
  return s;
}

/** Parse a record read from etcd; undefined (and the reason in `why`) for one that is not ours. */
export function decodeRecord<T>(key: string, value: Buffer | string, why?: (msg: string) => void): T | undefined {
  const len = typeof value === 'string' ? Buffer.byteLength(value) : value.length;
  if (len > MAX_RECORD_BYTES) {
    why?.(`fleet record ${key} is ${len} bytes, over the ${MAX_RECORD_BYTES}-byte bound`);
    return undefined;
  }
  try {
    const v = JSON.parse(value.toString()) as unknown;
    if (!v || typeof v !== 'object' || Array.isArray(v)) throw new Error('not a JSON object');
    return v as T;
  } catch (err) {
    why?.(`fleet record ${key} is not valid JSON: ${(err as Error).message}`);
    return undefined;
  }
}

export function deviceRecord(
  host: string,
  address: string,
  d: DeviceInfo,
  labels: Record<string, string>,
  session: { identity: string; sessionId: string } | undefined,
): DeviceRecord {
  return {
    host,
    address,
    id: d.id,
    vidPid: formatVidPid(d),
    vendorId: d.vendorId,
    productId: d.productId,
    deviceClass: d.deviceClass,
    interfaceClasses: [...new Set(d.configurations.flatMap((c) => c.interfaces.map((i) => i.interfaceClass)))],
    speed: d.speed,
    manufacturer: d.manufacturer,
    product: d.product,
    serial: d.serial,
    portPath: formatPortPath(d.bus, d.portPath),
    backend: d.backend,
    labels,
    session: session ? { identity: session.identity, sessionId: session.sessionId } : null,
  };
}
