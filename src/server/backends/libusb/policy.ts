// Export policy of the libusb backend: only devices that match an allow rule are
// listed or claimable; hubs never are (whatever the rules say).
import type { DeviceInfo } from '../types.js';

/** One allow rule: every field given must match (an empty rule matches everything but hubs). */
export interface LibusbAllowRule {
  vendorId?: number;
  productId?: number;
  serial?: string;
  /** The device class, or the class of any interface of the active configuration. */
  class?: number;
  bus?: number;
  /** Port path, e.g. [1] or [1, 4]. */
  portPath?: number[];
}

export const USB_CLASS_HUB = 0x09;

function hex16(s: string, what: string, rule: string): number {
  if (!/^[0-9a-fA-F]{1,4}$/.test(s)) throw new Error(`libusb allow rule "${rule}": ${what} "${s}" must be 1-4 hex digits`);
  return parseInt(s, 16);
}

/**
 * Parse an allow rule from its flag form:
 *   "*"                          every device (but hubs)
 *   "vvvv:pppp" / "vvvv:*"       vendor and product id (hex)
 *   "key=value,key=value"        keys vid, pid (hex), serial, class (hex), bus, port ("1.4" or "1-1.4": bus-ports)
 * Combinations: "46f4:0001,serial=X".
 */
export function parseAllowRule(text: string): LibusbAllowRule {
  const rule: LibusbAllowRule = {};
  const t = text.trim();
  if (t === '' ) throw new Error('libusb allow rule is empty (use "*" for every device)');
  if (t === '*') return rule;
  for (const part of t.split(',').map((p) => p.trim()).filter(Boolean)) {
    const vp = /^([0-9a-fA-F]{1,4}):([0-9a-fA-F]{1,4}|\*)$/.exec(part);
    if (vp) {
      rule.vendorId = hex16(vp[1]!, 'vendor id', text);
      if (vp[2] !== '*') rule.productId = hex16(vp[2]!, 'product id', text);
      continue;
    }
    const eq = part.indexOf('=');
    if (eq <= 0) throw new Error(`libusb allow rule "${text}": cannot parse "${part}" (expected vvvv:pppp or key=value)`);
    const key = part.slice(0, eq).trim().toLowerCase();
    const value = part.slice(eq + 1).trim();
    switch (key) {
      case 'vid':
      case 'vendor':
        rule.vendorId = hex16(value, 'vendor id', text);
        break;
      case 'pid':
      case 'product':
        rule.productId = hex16(value, 'product id', text);
        break;
      case 'serial':
        rule.serial = value;
        break;
      case 'class':
        if (!/^[0-9a-fA-F]{1,2}$/.test(value)) throw new Error(`libusb allow rule "${text}": class "${value}" must be 1-2 hex digits`);
        rule.class = parseInt(value, 16);
        break;
      case 'bus':
        if (!/^\d+$/.test(value)) throw new Error(`libusb allow rule "${text}": bus "${value}" must be a number`);
        rule.bus = Number(value);
        break;
      case 'port': {
        const m = /^(?:(\d+)-)?(\d+(?:\.\d+)*)$/.exec(value);
        if (!m) throw new Error(`libusb allow rule "${text}": port "${value}" must look like 1.4 or 1-1.4 (bus-ports)`);
        if (m[1]) rule.bus = Number(m[1]);
        rule.portPath = m[2]!.split('.').map(Number);
        break;
      }
      default:
        throw new Error(`libusb allow rule "${text}": unknown key "${key}" (known: vid, pid, serial, class, bus, port)`);
    }
  }
  return rule;
}

/** Normalise rules from a JSON config: strings are parsed, objects are checked. */
export function normalizeAllowRules(rules: unknown): LibusbAllowRule[] {
  if (rules === undefined) return [];
  if (!Array.isArray(rules)) throw new Error('libusb.allow must be an array of rules');
  return rules.map((r) => {
    if (typeof r === 'string') return parseAllowRule(r);
    if (!r || typeof r !== 'object') throw new Error(`libusb.allow: bad rule ${JSON.stringify(r)}`);
    const known = new Set(['vendorId', 'productId', 'serial', 'class', 'bus', 'portPath']);
    for (const k of Object.keys(r)) if (!known.has(k)) throw new Error(`libusb.allow: unknown key "${k}" in ${JSON.stringify(r)} (known: ${[...known].join(', ')})`);
    return r as LibusbAllowRule;
  });
}

export function isHub(info: Pick<DeviceInfo, 'deviceClass' | 'configurations'>): boolean {
  if (info.deviceClass === USB_CLASS_HUB) return true;
  return info.configurations.some((c) => c.interfaces.some((i) => i.interfaceClass === USB_CLASS_HUB));
}

export function ruleMatches(rule: LibusbAllowRule, info: DeviceInfo): boolean {
  if (rule.vendorId !== undefined && rule.vendorId !== info.vendorId) return false;
  if (rule.productId !== undefined && rule.productId !== info.productId) return false;
  if (rule.serial !== undefined && rule.serial !== info.serial) return false;
  if (rule.bus !== undefined && rule.bus !== info.bus) return false;
  if (rule.portPath !== undefined) {
    if (rule.portPath.length !== info.portPath.length || rule.portPath.some((p, i) => p !== info.portPath[i])) return false;
  }
  if (rule.class !== undefined) {
    const classes = new Set([info.deviceClass, ...info.interfaces.map((i) => i.interfaceClass)]);
    if (!classes.has(rule.class)) return false;
  }
  return true;
}

/** The export decision: not a hub, and at least one rule matches. */
export function isExported(rules: LibusbAllowRule[], info: DeviceInfo): boolean {
  if (isHub(info)) return false;
  return rules.some((r) => ruleMatches(r, info));
}
