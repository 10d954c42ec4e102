// The libvirt qemu hook (/etc/libvirt/hooks/qemu) on a migration destination: what to do for a
// hook call. libvirt runs the hook as `qemu <domain> <operation> <sub-operation> <extra>` with
// the domain XML on stdin.
//
// Phases on the destination of an incoming migration (libvirt 9): `migrate begin` (before
// anything starts; stdout would replace the domain XML, so the hook prints nothing),
// `prepare begin`, `start begin`, then QEMU starts with -incoming, libvirt runs
// migrate-incoming, and `started begin` — all inside libvirt's Prepare step, which returns to
// the source only afterwards. QEMU (and the bridge's QMP socket) does not exist before
// `started begin`, and the source sends nothing before it returns: that is the one point where
// `prepare-incoming` can plug/connect the usb-redir and be done before any device state
// arrives. `migrate begin` marks the domain as incoming (a plain start has `started begin` too);
// `restore begin` likewise (virsh restore also starts QEMU with -incoming).
import fs from 'node:fs';
import path from 'node:path';
import { attachmentsOf, bridgeQmpSocketOf, type AttachmentMetadata } from './domain-xml.js';

export type HookAction =
  | { kind: 'none'; why: string }
  | { kind: 'mark-incoming'; domain: string }
  | { kind: 'prepare'; domain: string; qmpSocket: string; attachments: AttachmentMetadata[] };

/** What a hook call asks for. `incoming`: the domain was marked at `migrate begin` / `restore begin`. */
export function hookAction(args: string[], domainXml: string, incoming: boolean): HookAction {
  const [domain, op, subop] = args;
  if (!domain || !op) throw new Error('usage: <domain> <operation> <sub-operation> [extra] (the domain XML on stdin)');
  if ((op === 'migrate' || op === 'restore') && subop === 'begin') {
    return attachmentsOf(domainXml).length ? { kind: 'mark-incoming', domain } : { kind: 'none', why: 'no usbroam attachments in the domain metadata' };
  }
  if (op === 'started' && subop === 'begin') {
    if (!incoming) return { kind: 'none', why: 'not an incoming migration' };
    const attachments = attachmentsOf(domainXml);
    if (!attachments.length) return { kind: 'none', why: 'no usbroam attachments in the domain metadata' };
    const qmpSocket = bridgeQmpSocketOf(domainXml);
    if (!qmpSocket) throw new Error(`domain ${domain} has usbroam attachments but no bridge QMP socket (<qemu:commandline> -qmp unix:...)`);
    return { kind: 'prepare', domain, qmpSocket, attachments };
  }
  return { kind: 'none', why: `${op} ${subop ?? ''}`.trim() };
}

/** Marks (one file per domain) from `migrate begin` to `started begin`. */
export class IncomingMarks {
  constructor(private readonly dir: string) {}
  private file(domain: string): string {
    return path.join(this.dir, `${domain.replace(/[^A-Za-z0-9_.-]/g, '_')}.incoming`);
  }
  mark(domain: string): void {
    fs.mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    fs.writeFileSync(this.file(domain), `${Date.now()}\n`);
  }
  /** Whether the domain was marked; the mark is consumed. */
  take(domain: string): boolean {
    try {
      fs.unlinkSync(this.file(domain));
      return true;
    } catch {
      return false;
    }
  }
}

/** The /etc/libvirt/hooks/qemu script: hand every call to `usbroam libvirt-hook`. */
export function hookScript(opts: { usbroam: string[]; control?: string; stateDir?: string; logFile?: string }): string {
  const q = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;
  const flags = [...(opts.control ? ['--control', opts.control] : []), ...(opts.stateDir ? ['--state-dir', opts.stateDir] : [])];
  const log = opts.logFile ? ` 2>>${q(opts.logFile)}` : '';
  return [
    '#!/bin/sh',
    '# usbroam: prepare the hand-off of USB attachments on an incoming migration (see README, "libvirt").',
    '# Only these phases concern usbroam; the rest return at once.',
    'case "$2 $3" in',
    '  "migrate begin"|"restore begin"|"started begin") ;;',
    '  *) exit 0 ;;',
    'esac',
    `exec ${[...opts.usbroam, 'libvirt-hook', ...flags].map(q).join(' ')} "$@"${log}`,
    '',
  ].join('\n');
}
