// usbroam libvirt-hook: the body of /etc/libvirt/hooks/qemu on a migration destination. At
// `migrate begin` it marks the domain as incoming; at `started begin` (QEMU up with -incoming,
// before libvirt lets the source send anything) it asks the local bridge to prepare-incoming
// every attachment in the domain's usbroam metadata, on the bridge's own QMP socket from the
// domain's <qemu:commandline>. Prints nothing on stdout (libvirt would take it for a new domain
// XML at `migrate begin`); a failed prepare exits 1, so libvirt fails the migration and the
// source keeps the device.
import { Command } from 'commander';
import os from 'node:os';
import path from 'node:path';
import { hookAction, IncomingMarks } from '../libvirt/hook.js';
import { controlClientFrom, withControlFlags, type ControlFlags } from './control-common.js';

interface HookFlags extends ControlFlags {
  stateDir?: string;
}

async function readStdin(): Promise<string> {
  if (process.stdin.isTTY) return '';
  const chunks: Buffer[] = [];
  for await (const c of process.stdin) chunks.push(c as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

export function defaultHookStateDir(): string {
  return process.getuid?.() === 0 ? '/run/usbroam/libvirt-hook' : path.join(os.tmpdir(), 'usbroam-libvirt-hook');
}

export function libvirtHookCommand(): Command {
  return withControlFlags(
    new Command('libvirt-hook')
      .description('libvirt qemu hook (/etc/libvirt/hooks/qemu): on an incoming migration, prepare-incoming the attachments in the domain metadata')
      .option('--state-dir <dir>', `where incoming domains are marked between "migrate begin" and "started begin" (default ${defaultHookStateDir()})`)
      .argument('<domain>')
      .argument('<operation>')
      .argument('[sub-operation]')
      .argument('[extra]'),
  ).action(async (domain: string, op: string, subop: string | undefined, extra: string | undefined, f: HookFlags) => {
    const say = (msg: string) => process.stderr.write(`usbroam libvirt-hook ${domain} ${op} ${subop ?? ''}: ${msg}\n`);
    let client;
    try {
      const xml = await readStdin();
      const marks = new IncomingMarks(f.stateDir ?? defaultHookStateDir());
      const incoming = op === 'started' && subop === 'begin' ? marks.take(domain) : false;
      const a = hookAction([domain, op, subop ?? '', extra ?? ''], xml, incoming);
      if (a.kind === 'none') return;
      if (a.kind === 'mark-incoming') {
        marks.mark(domain);
        say('incoming migration with usbroam attachments; prepared at "started begin"');
        return;
      }
      client = controlClientFrom(f);
      for (const att of a.attachments) {
        const r = await client.rpc.prepareIncoming({ vm: a.domain, sessionId: att.session, attachmentId: att.id, server: att.server ?? '', qmpSocket: a.qmpSocket, bus: att.bus, port: '', filter: '' });
        say(`prepared ${r.attachmentId}: standing by on session ${r.sessionId}`);
      }
    } catch (err) {
      say(`failed: ${(err as Error).message}`);
      process.exitCode = 1;
    } finally {
      client?.close();
    }
  });
}
