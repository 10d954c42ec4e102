// usbroam attach: ask the bridge (its control API) to attach a USB host server's device to a VM.
import { Command } from 'commander';
import { Attachment } from '../gen/usbroam/v1/bridge.js';
import { controlClientFrom, describeAttachment, parseSelector, withControlFlags, type ControlFlags } from './control-common.js';
import { reportError } from './common.js';

interface AttachFlags extends ControlFlags {
  vm: string;
  server?: string;
  device?: string;
  etcd?: string;
  select?: string[];
  bus?: string;
  filter?: string;
  id?: string;
  qmpSocket?: string;
  coldPlugSocket?: string;
}

export function attachCommand(): Command {
  return withControlFlags(
    new Command('attach')
      .description("attach a device of a USB host server to a VM, through the bridge's control API")
      .requiredOption('--vm <name>', 'the VM, by the name the bridge knows it by')
      .option('-s, --server <address>', "USB host server host:port as the bridge reaches it (default: the bridge's default server)")
      .option('-d, --device <selector>', 'ID, vvvv:pppp, serial=S or port=1-4.2 (several joined by commas must all match)')
      .option('--select <terms...>', "the fleet: a device of any host, e.g. 'serial=ABC', 'label license=cad', '1050:0407,host=lab-2'; the bridge claims it in etcd and connects to its server")
      .option('--etcd <urls>', "with --select: etcd endpoints URL[,URL...] (default: the bridge's own --etcd)")
      .option('--bus <bus>', 'USB bus of the VM, e.g. xhci.0 or ehci.0 (default xhci.0)')
      .option('--filter <rules>', 'usbredir filter, QEMU syntax: class:vendor:product:version:allow|...')
      .option('--id <id>', 'attachment id (also the QEMU device id; default usbroam-<device id>)')
      .option('--qmp-socket <path>', 'QMP socket of a VM the bridge does not know yet')
      .option('--cold-plug-socket <path>', 'the usb-redir device is on QEMU\'s command line (see "usbroam qemu-args"): serve this chardev socket instead of hot-plugging'),
  ).action(async (f: AttachFlags) => {
    let client;
    try {
      if (!f.select?.length === !f.device) throw new Error('name the device with either --device (on one server) or --select (in the fleet)');
      if (f.select?.length && f.server) throw new Error('--select finds the device\'s server in the fleet: leave out --server');
      if (f.etcd && !f.select?.length) throw new Error('--etcd goes with --select');
      const device = f.device ? parseSelector(f.device) : {};
      client = controlClientFrom(f);
      const a = await client.attach({
        vm: f.vm,
        server: f.server ?? '',
        device: { id: device.id ?? '', vidPid: device.vidPid ?? '', serial: device.serial ?? '', portPath: device.portPath ?? '' },
        fleetSelect: f.select?.join(' ') ?? '',
        fleetEtcd: f.etcd ?? '',
        bus: f.bus ?? '',
        filter: f.filter ?? '',
        attachmentId: f.id ?? '',
        qmpSocket: f.qmpSocket ?? '',
        coldPlugSocket: f.coldPlugSocket ?? '',
      });
      if (f.json) console.log(JSON.stringify(Attachment.toJSON(a), null, 2));
      else console.log(`attached ${describeAttachment(a)}`);
    } catch (err) {
      reportError(err);
    } finally {
      client?.close();
    }
  });
}
