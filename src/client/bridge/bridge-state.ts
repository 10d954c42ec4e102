// The bridge's own record of its attachments, on disk, so that a bridge restarted after a crash
// (kill -9, OOM) re-attaches its VMs' devices. One JSON file, rewritten whole on every change
// (attach, re-attach, detach, end; never on the URB path) and replaced atomically: written to a
// temporary file, fsynced, renamed over the old one, the directory fsynced. A reader therefore
// sees the old record or the new one, never half of one.
//
// What is kept is what a new bridge needs to take the device again and to find the usb-redir
// device QEMU still holds: the VM's QMP socket, the server and its credentials (file paths),
// the device id, the QEMU ids, bus and chardev socket, and the session the dead bridge held
// (which the new one closes at the server, so its claim does not block the re-attach for a
// grace period). URB channel positions are not kept: writing them per URB would cost the hot
// path, and QEMU starts a new usbredir connection (a replug in the guest) anyway.
import { closeSync, fsyncSync, mkdirSync, openSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import type { ConnectionOptions } from '../sdk/credentials.js';

export const BRIDGE_STATE_VERSION = 1;
/** Bound of the file a bridge reads at start (a record is well under 1 KiB). */
const MAX_STATE_BYTES = 4 * 1024 * 1024;

export interface SavedAttachment {
  id: string;
  vm: string;
  /** The VM's QMP socket, so a bridge started without this VM's flag still reaches it. */
  qmpSocket?: string;
  server: ConnectionOptions;
  deviceId: string;
  bus: string;
  filter?: string;
  chardevId: string;
  socketPath: string;
  hotPlugged: boolean;
  /** The session the bridge that wrote this held at the server. */
  sessionId: string;
  savedAt: string;
}

interface StateFile {
  version: number;
  pid: number;
  attachments: SavedAttachment[];
}

export class BridgeStateError extends Error {}

export class BridgeStateFile {
  readonly file: string;

  constructor(readonly dir: string) {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    this.file = path.join(dir, 'bridge-state.json');
  }

  /** The attachments recorded by the last writer; [] when there is no file. */
  load(): SavedAttachment[] {
    let text: string;
    try {
      text = readFileSync(this.file, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw new BridgeStateError(`bridge state ${this.file}: ${(err as Error).message}`);
    }
    if (text.length > MAX_STATE_BYTES) throw new BridgeStateError(`bridge state ${this.file} is ${text.length} bytes, more than ${MAX_STATE_BYTES}`);
    let parsed: StateFile;
    try {
      parsed = JSON.parse(text) as StateFile;
    } catch (err) {
      throw new BridgeStateError(`bridge state ${this.file} is not JSON: ${(err as Error).message}`);
    }
    if (parsed?.version !== BRIDGE_STATE_VERSION || !Array.isArray(parsed.attachments)) {
      throw new BridgeStateError(`bridge state ${this.file}: version ${parsed?.version} unknown or no attachments list (this bridge writes version ${BRIDGE_STATE_VERSION})`);
    }
    return parsed.attachments.filter((a) => validRecord(a));
  }

  /** Replace the record with `attachments`, atomically. */
  save(attachments: SavedAttachment[]): void {
    const body: StateFile = { version: BRIDGE_STATE_VERSION, pid: process.pid, attachments };
    const tmp = `${this.file}.${process.pid}.tmp`;
    writeFileSync(tmp, JSON.stringify(body, null, 1) + '\n', { mode: 0o600 });
    const fd = openSync(tmp, 'r+');
    try {
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    renameSync(tmp, this.file);
    const dfd = openSync(this.dir, 'r');
    try {
      fsyncSync(dfd);
    } finally {
      closeSync(dfd);
    }
  }
}

function validRecord(a: unknown): a is SavedAttachment {
  const r = a as Partial<SavedAttachment>;
  return (
    !!r &&
    typeof r.id === 'string' &&
    typeof r.vm === 'string' &&
    typeof r.deviceId === 'string' &&
    typeof r.bus === 'string' &&
    typeof r.chardevId === 'string' &&
    typeof r.socketPath === 'string' &&
    typeof r.hotPlugged === 'boolean' &&
    typeof r.sessionId === 'string' &&
    !!r.server &&
    typeof r.server === 'object'
  );
}
