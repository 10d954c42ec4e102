// usbroam qemu-args: the QEMU arguments and the libvirt XML for a device that is on QEMU's
// command line from the start (cold plug). QEMU listens on the chardev socket; the bridge serves
// it after `usbroam attach --cold-plug-socket <that path>`. No daemon needed.
import { Command } from 'commander';
import { Bridge } from '../client/bridge/bridge.js';
import { defaultRunDir } from '../client/bridge-control/address.js';
import { reportError } from './common.js';

interface QemuArgsFlags {
  vm: string;
  deviceId: string;
  bus?: string;
  filter?: string;
  socket?: string;
  runDir?: string;
  json?: boolean;
}

/** Quote an argument for a POSIX shell when it needs it. */
export function shellQuote(a: string): string {
  return /^[A-Za-z0-9_=,./:@%+-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`;
}

export function qemuArgsCommand(): Command {
  return new Command('qemu-args')
    .description('print the QEMU -chardev/-device arguments and the libvirt <redirdev> XML for a cold-plugged attachment')
    .requiredOption('--vm <name>', 'the VM (part of the default socket name)')
    .requiredOption('--device-id <id>', 'the device id on the USB host server (see "usbroam devices")')
    .option('--bus <bus>', 'USB bus, e.g. xhci.0 or ehci.0 (default xhci.0)')
    .option('--filter <rules>', 'usbredir filter, QEMU syntax: class:vendor:product:version:allow|...')
    .option('--socket <path>', 'chardev unix socket QEMU listens on (default <run dir>/<vm>.<id>.sock)')
    .option('--run-dir <dir>', `directory of the chardev sockets (default ${defaultRunDir()})`)
    .option('--json', 'machine-readable output')
    .action((f: QemuArgsFlags) => {
      try {
        const bridge = new Bridge({ runDir: f.runDir ?? defaultRunDir() });
        const q = bridge.qemuArgs(f.vm, f.deviceId, { bus: f.bus, filter: f.filter, socketPath: f.socket });
        if (f.json) {
          console.log(JSON.stringify({ id: q.id, chardevId: q.chardevId, socketPath: q.socketPath, bus: q.bus, filter: q.filter, args: q.args, libvirtXml: q.libvirtXml }, null, 2));
          return;
        }
        console.log('# QEMU arguments:');
        const pairs: string[] = [];
        for (let i = 0; i < q.args.length; i += 2) pairs.push(q.args.slice(i, i + 2).map(shellQuote).join(' '));
        console.log(pairs.join(' \\\n'));
        console.log('');
        console.log('# libvirt domain XML (inside <devices>):');
        console.log(q.libvirtXml);
        console.log('');
        console.log(`# then: usbroam attach --vm ${shellQuote(f.vm)} --device id=${shellQuote(f.deviceId)} --cold-plug-socket ${shellQuote(q.socketPath)}${f.bus ? ` --bus ${shellQuote(f.bus)}` : ''}`);
      } catch (err) {
        reportError(err);
      }
    });
}
