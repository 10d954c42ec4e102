// usbroam detach: ask the bridge to unplug an attachment from its VM and end its session.
import { Command } from 'commander';
import { controlClientFrom, withControlFlags, type ControlFlags } from './control-common.js';
import { reportError } from './common.js';

export function detachCommand(): Command {
  return withControlFlags(
    new Command('detach')
      .description('detach a device from a VM (the guest sees an unplug; the session on the USB host server ends)')
      .requiredOption('--vm <name>', 'the VM')
      .argument('<attachment-id>', 'as "usbroam attachments" shows it'),
  ).action(async (id: string, f: ControlFlags & { vm: string }) => {
    let client;
    try {
      client = controlClientFrom(f);
      await client.detach(f.vm, id);
      if (f.json) console.log(JSON.stringify({ detached: id, vm: f.vm }));
      else console.log(`detached ${id} from ${f.vm}`);
    } catch (err) {
      reportError(err);
    } finally {
      client?.close();
    }
  });
}
