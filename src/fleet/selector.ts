// Fleet selectors: how a person names a device among every host's devices.
// Terms, joined by commas or spaces, must all match:
//   vvvv:pppp (hex, * for either half)   serial=S   host=NAME   port=1-4.2
//   id=ID   class=N   label k=v | label:k=v | k=v (any other key is a label)
import { validateSelector } from '../server/devices/selector.js';
import type { DeviceRecord } from './keys.js';

export interface FleetSelector {
  vidPid?: string;
  serial?: string;
  host?: string;
  portPath?: string;
  id?: string;
  class?: number;
  labels: Record<string, string>;
}

const FIELDS = new Set(['serial', 'host', 'port', 'id', 'class', 'vidpid']);
const MAX_SELECTOR_CHARS = 4096;

/** Parse selector text (or several texts, e.g. repeated flags); throws saying which term is wrong. */
export function parseFleetSelector(text: string | string[]): FleetSelector {
  const joined = Array.isArray(text) ? text.join(' ') : text;
  if (joined.length > MAX_SELECTOR_CHARS) throw new Error(`selector is ${joined.length} characters, over ${MAX_SELECTOR_CHARS}`);
  const words = joined.split(/[\s,]+/).filter(Boolean);
  const s: FleetSelector = { labels: {} };
  for (let i = 0; i < words.length; i++) {
    let w = words[i];
    if (w === 'label') {
      w = words[++i] ?? '';
      if (!w.includes('=')) throw new Error(`"label" must be followed by k=v, not "${w}"`);
      addLabel(s, w);
      continue;
    }
    if (w.startsWith('label:')) {
      addLabel(s, w.slice(6));
      continue;
    }
    const eq = w.indexOf('=');
    if (eq < 0) {
      if (!w.includes(':')) throw new Error(`selector term "${w}" is none of vvvv:pppp, serial=, host=, port=, id=, class=, label k=v`);
      setOnce(s, 'vidPid', validateSelector({ vidPid: w }).vidPid!);
      continue;
    }
    const k = w.slice(0, eq).toLowerCase();
    const v = w.slice(eq + 1);
    if (!FIELDS.has(k)) {
      addLabel(s, w);
      continue;
    }
    if (!v) throw new Error(`selector term "${w}" has no value`);
    if (k === 'vidpid') setOnce(s, 'vidPid', validateSelector({ vidPid: v }).vidPid!);
    else if (k === 'port') setOnce(s, 'portPath', validateSelector({ portPath: v }).portPath!);
    else if (k === 'class') {
      const n = Number(v);
      validateSelector({ class: n });
      setOnce(s, 'class', n);
    } else setOnce(s, k as 'serial' | 'host' | 'id', v);
  }
  return s;
}

function setOnce<K extends keyof FleetSelector>(s: FleetSelector, k: K, v: FleetSelector[K]): void {
  if (s[k] !== undefined && s[k] !== v) throw new Error(`selector names ${k} twice ("${String(s[k])}" and "${String(v)}")`);
  s[k] = v;
}

function addLabel(s: FleetSelector, kv: string): void {
  const eq = kv.indexOf('=');
  const k = kv.slice(0, eq);
  if (eq <= 0 || !/^[A-Za-z0-9._/-]+$/.test(k)) throw new Error(`label "${kv}" is not of the form key=value (key: letters, digits, . _ / -)`);
  const v = kv.slice(eq + 1);
  if (s.labels[k] !== undefined && s.labels[k] !== v) throw new Error(`selector asks label ${k} to be both "${s.labels[k]}" and "${v}"`);
  s.labels[k] = v;
}

export function isEmptyFleetSelector(s: FleetSelector): boolean {
  return !s.vidPid && !s.serial && !s.host && !s.portPath && !s.id && s.class === undefined && !Object.keys(s.labels).length;
}

export function matchesFleetSelector(s: FleetSelector, d: DeviceRecord): boolean {
  if (s.host !== undefined && s.host !== d.host) return false;
  if (s.id !== undefined && s.id !== d.id) return false;
  if (s.serial !== undefined && s.serial !== d.serial) return false;
  if (s.portPath !== undefined && s.portPath !== d.portPath) return false;
  if (s.vidPid) {
    const [v, p] = s.vidPid.split(':');
    if (v !== '*' && parseInt(v, 16) !== d.vendorId) return false;
    if (p !== '*' && parseInt(p, 16) !== d.productId) return false;
  }
  if (s.class !== undefined && d.deviceClass !== s.class && !(d.interfaceClasses ?? []).includes(s.class)) return false;
  const labels = d.labels ?? {};
  for (const [k, v] of Object.entries(s.labels)) if (labels[k] !== v) return false;
  return true;
}

export function describeFleetSelector(s: FleetSelector): string {
  const parts: string[] = [];
  if (s.vidPid) parts.push(s.vidPid);
  for (const k of ['serial', 'host', 'portPath', 'id', 'class'] as const) if (s[k] !== undefined) parts.push(`${k === 'portPath' ? 'port' : k}=${s[k]}`);
  for (const [k, v] of Object.entries(s.labels)) parts.push(`label ${k}=${v}`);
  return parts.length ? parts.join(',') : '(any)';
}
