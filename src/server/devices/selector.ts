// Device selectors: how clients name a device (Connect) and how the ACL names
// the devices an identity may use. Every field that is set must match.
import type { DeviceInfo } from '../backends/types.js';

export interface Selector {
  id?: string;
  /** "vvvv:pppp" in hex; "*" for either half matches anything. */
  vidPid?: string;
  serial?: string;
  /** "bus-port.port", e.g. "1-4.2". */
  portPath?: string;
  /** A USB class code that the device or one of its interfaces has. */
  class?: number;
}

export function formatPortPath(bus: number, portPath: number[]): string {
  return `${bus}-${portPath.join('.')}`;
}

function hex4(n: number): string {
  return n.toString(16).padStart(4, '0');
}

export function formatVidPid(d: Pick<DeviceInfo, 'vendorId' | 'productId'>): string {
  return `${hex4(d.vendorId)}:${hex4(d.productId)}`;
}

/** Throws with a message saying what is wrong; returns the normalised selector. */
export function validateSelector(s: Selector): Selector {
  const out: Selector = {};
  if (s.id) out.id = s.id;
  if (s.vidPid) {
    const m = /^([0-9a-fA-F]{1,4}|\*):([0-9a-fA-F]{1,4}|\*)$/.exec(s.vidPid);
    if (!m) throw new Error(`vid:pid "${s.vidPid}" is not of the form vvvv:pppp (hex, or * for any)`);
    out.vidPid = `${m[1] === '*' ? '*' : m[1].toLowerCase().padStart(4, '0')}:${m[2] === '*' ? '*' : m[2].toLowerCase().padStart(4, '0')}`;
  }
  if (s.serial) out.serial = s.serial;
  if (s.portPath) {
    if (!/^\d+-\d+(\.\d+)*$/.test(s.portPath)) throw new Error(`port path "${s.portPath}" is not of the form bus-port[.port...]`);
    out.portPath = s.portPath;
  }
  if (s.class !== undefined) {
    if (!Number.isInteger(s.class) || s.class < 0 || s.class > 255) throw new Error(`class ${s.class} is not a USB class code (0-255)`);
    out.class = s.class;
  }
  return out;
}

export function isEmptySelector(s: Selector): boolean {
  return !s.id && !s.vidPid && !s.serial && !s.portPath && s.class === undefined;
}

export function matchesSelector(s: Selector, d: DeviceInfo): boolean {
  if (s.id && s.id !== d.id) return false;
  if (s.vidPid) {
    const [v, p] = s.vidPid.split(':');
    if (v !== '*' && parseInt(v, 16) !== d.vendorId) return false;
    if (p !== '*' && parseInt(p, 16) !== d.productId) return false;
  }
  if (s.serial && s.serial !== d.serial) return false;
  if (s.portPath && s.portPath !== formatPortPath(d.bus, d.portPath)) return false;
  if (s.class !== undefined) {
    const classes = [d.deviceClass, ...d.configurations.flatMap((c) => c.interfaces.map((i) => i.interfaceClass))];
    if (!classes.includes(s.class)) return false;
  }
  return true;
}

export function describeSelector(s: Selector): string {
  const parts = Object.entries(s)
    .filter(([, v]) => v !== undefined && v !== '')
    .map(([k, v]) => `${k}=${v}`);
  return parts.length ? parts.join(',') : '(any)';
}
