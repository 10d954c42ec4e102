// The server's configuration: a JSON file, overridden by flags.
import { readFileSync } from 'node:fs';
import type { AclConfig } from './acl.js';
import type { SessionLimits } from './sessions/session.js';

export interface EmulatedConfig {
  /** A mass-storage disk backed by a sparse image file. */
  disk?: { image: string; sizeMiB?: number } | false;
  loopback?: boolean;
  serial?: boolean;
}

export interface ServerConfig {
  listen: string;
  tls?: { ca: string; cert: string; key: string };
  insecure?: boolean;
  acl: AclConfig;
  admins: string[];
  limits: Partial<SessionLimits>;
  emulated?: EmulatedConfig;
  logLevel?: string;
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
  const known = new Set(['listen', 'tls', 'insecure', 'acl', 'admins', 'limits', 'emulated', 'logLevel']);
  for (const k of Object.keys(parsed)) if (!known.has(k)) throw new Error(`config file ${path}: unknown key "${k}" (known: ${[...known].join(', ')})`);
  return parsed as Partial<ServerConfig>;
}
