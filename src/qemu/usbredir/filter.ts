// usbredir device filter rules: string parsing / formatting and the device check.
// Mirrors spice-usbredir `usbredirparser/usbredirfilter.c`.
//
// A rule is `class<sep>vendor<sep>product<sep>version<sep>allow`; rules are separated by any of
// the rule separator characters. Numbers are C strtol(base 0) numbers: decimal, 0x hex or
// leading-0 octal, optional sign and leading whitespace; -1 is the wildcard. The usbredir
// filter_filter packet uses "," between fields and "|" between rules; QEMU's usb-redir `filter`
// property uses ":" between fields and "|" between rules. Separators behave like strtok
// separators: runs of separators are one separator and empty rules / fields are skipped.

export interface FilterRule {
  /** 0-255, -1 = any */
  deviceClass: number;
  /** 0-65535, -1 = any */
  vendorId: number;
  /** 0-65535, -1 = any */
  productId: number;
  /** 0-65535 (BCD), -1 = any */
  deviceVersionBcd: number;
  allow: boolean;
}

export interface FilterInterface {
  class: number;
  subclass: number;
  protocol: number;
}

export interface FilterDeviceInfo {
  class: number;
  subclass: number;
  protocol: number;
  vendorId: number;
  productId: number;
  bcdDevice: number;
  interfaces: readonly FilterInterface[];
}

export interface FilterCheckOptions {
  /** usbredirfilter_fl_default_allow: a pass where no rule matches allows instead of denying. */
  defaultAllow?: boolean;
  /** usbredirfilter_fl_dont_skip_non_boot_hid: also check HID (3/0/0) interfaces of multi-interface devices. */
  dontSkipNonBootHid?: boolean;
}

/** Result of checkDevice, like usbredirfilter_check: 0, -EPERM, -ENOENT (-EINVAL -> throws). */
export type FilterVerdict =
  | { allowed: true }
  | { allowed: false; reason: 'denied'; rule: FilterRule } // -EPERM: a matching rule denies
  | { allowed: false; reason: 'no_match'; classChecked: number }; // -ENOENT: no rule matched a pass

export const FILTER_FLAG_DEFAULT_ALLOW = 0x01;
export const FILTER_FLAG_DONT_SKIP_NON_BOOT_HID = 0x02;

export class UsbredirFilterError extends Error {
  override readonly name = 'UsbredirFilterError';
}

/** Separators used in the filter_filter packet. */
export const PACKET_TOKEN_SEP = ',';
export const PACKET_RULE_SEP = '|';
/** Separators used by QEMU's usb-redir `filter` property. */
export const QEMU_TOKEN_SEP = ':';
export const QEMU_RULE_SEP = '|';

function splitBy(s: string, seps: string): string[] {
  const out: string[] = [];
  let cur = '';
  for (const ch of s) {
    if (seps.includes(ch)) {
      if (cur.length > 0) out.push(cur);
      cur = '';
    } else {
      cur += ch;
    }
  }
  if (cur.length > 0) out.push(cur);
  return out;
}

/** C strtol(token, &ep, 0) requiring the whole token be consumed; undefined if not a number. */
function parseCInt(tok: string): number | undefined {
  const m = /^[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$/.exec(tok);
  if (!m) return undefined;
  const digits = m[2]!;
  let v: number;
  if (/^0[xX]/.test(digits)) v = parseInt(digits.slice(2), 16);
  else if (digits.length > 1 && digits[0] === '0') v = parseInt(digits.slice(1), 8);
  else v = parseInt(digits, 10);
  return m[1] === '-' ? -v : v;
}

/** usbredirfilter_verify for one rule: values within range (-1 = any). */
export function verifyRule(r: FilterRule): boolean {
  const ok = (v: number, max: number) => Number.isInteger(v) && v >= -1 && v <= max;
  return ok(r.deviceClass, 0xff) && ok(r.vendorId, 0xffff) && ok(r.productId, 0xffff) && ok(r.deviceVersionBcd, 0xffff);
}

/**
 * usbredirfilter_string_to_rules. `tokenSep` / `ruleSep` are sets of separator characters.
 * Throws UsbredirFilterError (the C -EINVAL) on a malformed rule or out-of-range value.
 * Difference: values that overflow a C int are rejected instead of wrapping.
 */
export function parseFilterRules(
  str: string,
  tokenSep: string = PACKET_TOKEN_SEP,
  ruleSep: string = PACKET_RULE_SEP,
): FilterRule[] {
  if (tokenSep.length === 0 || ruleSep.length === 0) throw new UsbredirFilterError('empty separator');
  const rules: FilterRule[] = [];
  for (const ruleStr of splitBy(str, ruleSep)) {
    const toks = splitBy(ruleStr, tokenSep);
    if (toks.length !== 5) {
      throw new UsbredirFilterError(`filter rule "${ruleStr}" has ${toks.length} fields, expected 5`);
    }
    const v = toks.map(parseCInt);
    v.forEach((x, i) => {
      if (x === undefined) throw new UsbredirFilterError(`filter rule "${ruleStr}": "${toks[i]}" is not a number`);
    });
    const [deviceClass, vendorId, productId, deviceVersionBcd, allow] = v as number[];
    const rule: FilterRule = {
      deviceClass: deviceClass!,
      vendorId: vendorId!,
      productId: productId!,
      deviceVersionBcd: deviceVersionBcd!,
      allow: allow !== 0,
    };
    if (!verifyRule(rule)) throw new UsbredirFilterError(`filter rule "${ruleStr}" has a value out of range`);
    rules.push(rule);
  }
  return rules;
}

/** usbredirfilter_rules_to_string: uses the first char of each separator set. */
export function formatFilterRules(
  rules: readonly FilterRule[],
  tokenSep: string = PACKET_TOKEN_SEP,
  ruleSep: string = PACKET_RULE_SEP,
): string {
  if (tokenSep.length === 0 || ruleSep.length === 0) throw new UsbredirFilterError('empty separator');
  const t = tokenSep[0]!;
  const fmt = (v: number, w: number) => (v === -1 ? '-1' : '0x' + v.toString(16).padStart(w, '0'));
  return rules
    .map((r) => {
      if (!verifyRule(r)) throw new UsbredirFilterError('filter rule has a value out of range');
      return [fmt(r.deviceClass, 2), fmt(r.vendorId, 4), fmt(r.productId, 4), fmt(r.deviceVersionBcd, 4), r.allow ? '1' : '0'].join(t);
    })
    .join(ruleSep[0]!);
}

type Pass = { allowed: true } | { allowed: false; reason: 'denied'; rule: FilterRule } | { allowed: false; reason: 'no_match'; classChecked: number };

function check1(rules: readonly FilterRule[], cls: number, dev: FilterDeviceInfo, defaultAllow: boolean): Pass {
  for (const r of rules) {
    if (
      (r.deviceClass === -1 || r.deviceClass === cls) &&
      (r.vendorId === -1 || r.vendorId === dev.vendorId) &&
      (r.productId === -1 || r.productId === dev.productId) &&
      (r.deviceVersionBcd === -1 || r.deviceVersionBcd === dev.bcdDevice)
    ) {
      return r.allow ? { allowed: true } : { allowed: false, reason: 'denied', rule: r };
    }
  }
  return defaultAllow ? { allowed: true } : { allowed: false, reason: 'no_match', classChecked: cls };
}

/**
 * usbredirfilter_check: is redirecting this device allowed by the rules?
 *  - the device class pass is skipped for class 0x00 and 0xef (per-interface / misc devices);
 *  - then one pass per interface class; unless dontSkipNonBootHid, HID interfaces with subclass
 *    0 and protocol 0 are skipped on devices with more than one interface; if that skips every
 *    interface, the check is redone without skipping;
 *  - the first matching rule of a pass decides it; a denying match stops with 'denied'; a pass
 *    without a match stops with 'no_match' unless defaultAllow.
 * Throws UsbredirFilterError for invalid rules (the C -EINVAL).
 */
export function checkDevice(
  rules: readonly FilterRule[],
  dev: FilterDeviceInfo,
  opts: FilterCheckOptions = {},
): FilterVerdict {
  for (const r of rules) if (!verifyRule(r)) throw new UsbredirFilterError('invalid filter rule');
  const defaultAllow = opts.defaultAllow ?? false;
  const dontSkip = opts.dontSkipNonBootHid ?? false;

  if (dev.class !== 0x00 && dev.class !== 0xef) {
    const rc = check1(rules, dev.class, dev, defaultAllow);
    if (!rc.allowed) return rc;
  }
  const n = dev.interfaces.length;
  let skipped = 0;
  for (const intf of dev.interfaces) {
    if (!dontSkip && n > 1 && intf.class === 0x03 && intf.subclass === 0x00 && intf.protocol === 0x00) {
      skipped++;
      continue;
    }
    const rc = check1(rules, intf.class, dev, defaultAllow);
    if (!rc.allowed) return rc;
  }
  if (n > 0 && skipped === n) {
    return checkDevice(rules, dev, { defaultAllow, dontSkipNonBootHid: true });
  }
  return { allowed: true };
}
