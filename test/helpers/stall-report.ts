// What a report of an I/O stall after a migration carries besides the hand-off (README, Live
// migration, Known issue): the tail of the destination QEMU's log, where usb-redir reports a
// completion it has no packet for ("could not find packet with id ..."), and whether it did.
import { readFileSync } from 'node:fs';
import path from 'node:path';

/** The last `lines` lines of a guest's QEMU log, and the usb-redir packet-id errors anywhere in it. */
export function qemuLogReport(guest: { dir: string }, lines = 15): string {
  let text: string;
  try {
    text = readFileSync(path.join(guest.dir, 'qemu.log'), 'utf8');
  } catch (err) {
    return `(no QEMU log: ${(err as Error).message})`;
  }
  const all = text.trimEnd().split('\n');
  const lost = all.filter((l) => /could not find packet with id/.test(l)).length;
  return `usb-redir "could not find packet" errors: ${lost}\nQEMU log (tail):\n${all.slice(-lines).join('\n')}`;
}
