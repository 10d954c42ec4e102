// The usbroam CLI: one file per subcommand, like usbip's tools.
import { Command } from 'commander';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { tuneGcForBulkTransfers } from '../common/gc-tuning.js';
import { REPO_ROOT } from '../common/repo-root.js';
import { attachCommand } from './attach.js';
import { attachmentsCommand } from './attachments.js';
import { bridgeCommand } from './bridge.js';
import { captureCommand } from './capture.js';
import { demoCommand } from './demo.js';
import { detachCommand } from './detach.js';
import { devicesCommand } from './devices.js';
import { libvirtHookCommand } from './libvirt-hook.js';
import { cancelIncomingCommand, prepareIncomingCommand } from './prepare-incoming.js';
import { qemuArgsCommand } from './qemu-args.js';
import { serveCommand } from './serve.js';
import { sessionsCommand } from './sessions.js';
import { watchCommand } from './watch.js';

tuneGcForBulkTransfers();

// bin/usbroam.js says which it started: the bundle (build/usbroam.mjs) or the sources through tsx.
const runsFrom = (globalThis as { usbroamRunsFrom?: string }).usbroamRunsFrom ?? 'sources';
const version = (JSON.parse(readFileSync(path.join(REPO_ROOT, 'package.json'), 'utf8')) as { version: string }).version;

const program = new Command('usbroam')
  .description('remote USB for virtual machines: a device on a USB host, used by a VM elsewhere, kept across live migration')
  .version(`${version} (${runsFrom})`)
  .addCommand(serveCommand())
  .addCommand(devicesCommand())
  .addCommand(watchCommand())
  .addCommand(sessionsCommand())
  .addCommand(captureCommand())
  .addCommand(bridgeCommand())
  .addCommand(attachCommand())
  .addCommand(detachCommand())
  .addCommand(attachmentsCommand())
  .addCommand(qemuArgsCommand())
  .addCommand(prepareIncomingCommand())
  .addCommand(cancelIncomingCommand())
  .addCommand(libvirtHookCommand())
  .addCommand(demoCommand());

program.parseAsync(process.argv).catch((err: Error) => {
  process.stderr.write(`usbroam: ${err.message}\n`);
  process.exit(1);
});
