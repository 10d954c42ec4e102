// usbroam attachments: what the bridge has attached, to one VM or all.
import { Command } from 'commander';
import { Attachment } from '../gen/usbroam/v1/bridge.js';
import { controlClientFrom, describeAttachment, withControlFlags, type ControlFlags } from './control-common.js';
import { reportError } from './common.js';

export function attachmentsCommand(): Command {
  return withControlFlags(new Command('attachments').description("list the bridge's attachments").option('--vm <name>', 'only this VM')).action(
    async (f: ControlFlags & { vm?: string }) => {
      let client;
      try {
        client = controlClientFrom(f);
        const list = await client.list(f.vm);
        if (f.json) console.log(JSON.stringify(list.map((a) => Attachment.toJSON(a)), null, 2));
        else if (!list.length) console.log('no attachments');
        else for (const a of list) console.log(describeAttachment(a));
      } catch (err) {
        reportError(err);
      } finally {
        client?.close();
      }
    },
  );
}
