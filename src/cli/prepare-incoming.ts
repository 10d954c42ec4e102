// usbroam prepare-incoming: on the destination host of a live migration, make
// the destination VM (started with -incoming defer) ready to take over an
// attachment; usbroam cancel-incoming drops it if the migration is abandoned.
import { Command } from 'commander';
import { controlClientFrom, withControlFlags, type ControlFlags } from './control-common.js';
import { reportError } from './common.js';

interface PrepareFlags extends ControlFlags {
  vm: string;
  session: string;
  id: string;
  server?: string;
  qmpSocket?: string;
  bus?: string;
  port?: string;
  filter?: string;
}

export function prepareIncomingCommand(): Command {
  return withControlFlags(
    new Command('prepare-incoming')
      .description('before migrate-incoming: plug the same usb-redir into the destination VM and stand by on the session')
      .requiredOption('--vm <name>', 'the destination VM (QEMU started with -incoming defer)')
      .requiredOption('--session <id>', "the source attachment's session id (usbroam attachments on the source)")
      .requiredOption('--id <attachment-id>', "the source attachment's id (also its QEMU device id)")
      .option('--server <address>', "USB host server holding the session (default: the bridge's)")
      .option('--qmp-socket <path>', 'QMP socket of a VM the bridge does not know yet')
      .option('--bus <bus>', 'same USB bus as on the source', 'xhci.0')
      .option('--port <port>', 'same USB port as on the source')
      .option('--filter <rules>', 'usbredir filter (QEMU syntax)'),
  ).action(async (f: PrepareFlags) => {
    let client;
    try {
      client = controlClientFrom(f);
      const r = await client.rpc.prepareIncoming({
        vm: f.vm,
        sessionId: f.session,
        attachmentId: f.id,
        server: f.server ?? '',
        qmpSocket: f.qmpSocket ?? '',
        bus: f.bus ?? '',
        port: f.port ?? '',
        filter: f.filter ?? '',
      });
      if (f.json) console.log(JSON.stringify(r));
      else console.log(`prepared ${r.attachmentId} on ${r.vm}: standing by on session ${r.sessionId}; now run migrate-incoming, then migrate on the source`);
    } catch (err) {
      reportError(err);
    } finally {
      client?.close();
    }
  });
}

export function cancelIncomingCommand(): Command {
  return withControlFlags(
    new Command('cancel-incoming')
      .description('drop an attachment prepared with prepare-incoming (the migration was cancelled)')
      .requiredOption('--vm <name>', 'the destination VM')
      .argument('<attachment-id>'),
  ).action(async (id: string, f: ControlFlags & { vm: string }) => {
    let client;
    try {
      client = controlClientFrom(f);
      await client.rpc.cancelIncoming({ vm: f.vm, attachmentId: id });
      if (f.json) console.log(JSON.stringify({ cancelled: id, vm: f.vm }));
      else console.log(`cancelled incoming ${id} on ${f.vm}`);
    } catch (err) {
      reportError(err);
    } finally {
      client?.close();
    }
  });
}
