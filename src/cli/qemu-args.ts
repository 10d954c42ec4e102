// usbroam qemu-args: the QEMU arguments and the libvirt XML for a device that is on QEMU's
// command line from the start (cold plug). QEMU listens on the chardev socket; the bridge serves
// it after `usbroam attach --cold-plug-socket <that path>`. No daemon needed.
import { Command } from 'commander';
import path from 'node:path';
import { Bridge } from '../client/bridge/bridge.js';
import { defaultRunDir } from '../client/bridge-control/address.js';
import { reportError } from './common.js';
import { attachmentsMetadataXml, bridgeQmpCommandlineXml, libvirtRedirIds, LIBVIRT_USB_BUS, METADATA_KEY, METADATA_URI, QEMU_XMLNS, redirdevXml } from '../libvirt/domain-xml.js';

interface QemuArgsFlags {
  vm: string;
  deviceId: string;
  bus?: string;
  filter?: string;
  socket?: string;
  runDir?: string;
  json?: boolean;
  libvirt?: boolean;
  qmpSocket?: string;
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
    .option('--libvirt', 'print the libvirt domain XML (<redirdev>, the bridge\'s QMP monitor as <qemu:commandline>) and the commands for attach, metadata and hook')
    .option('--qmp-socket <path>', 'with --libvirt: the QMP socket QEMU opens for the bridge (default <run dir>/<vm>.qmp.sock)')
    .action((f: QemuArgsFlags) => {
      try {
        if (f.libvirt) return printLibvirt(f);
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

/** `qemu-args --libvirt`: the domain XML pieces and the commands around them. */
function printLibvirt(f: QemuArgsFlags): void {
  if (f.bus && f.bus !== LIBVIRT_USB_BUS) throw new Error(`--libvirt: the bus is libvirt's first USB controller, ${LIBVIRT_USB_BUS} (got ${f.bus})`);
  const runDir = f.runDir ?? defaultRunDir();
  const { id } = libvirtRedirIds(f.deviceId);
  const socketPath = f.socket ?? path.join(runDir, `${f.vm}.${id}.sock`.replace(/[^A-Za-z0-9_.-]/g, '-'));
  const qmpSocket = f.qmpSocket ?? path.join(runDir, `${f.vm}.qmp.sock`.replace(/[^A-Za-z0-9_.-]/g, '-'));
  const redirdev = redirdevXml({ deviceId: f.deviceId, socketPath, filter: f.filter });
  const controller = `<controller type='usb' model='qemu-xhci' index='0'/>`;
  const commandline = bridgeQmpCommandlineXml(qmpSocket);
  const attach = ['usbroam', 'attach', '--vm', f.vm, '--device', `id=${f.deviceId}`, '--id', id, '--bus', LIBVIRT_USB_BUS, '--qmp-socket', qmpSocket, '--cold-plug-socket', socketPath];
  const metadata = ['virsh', 'metadata', f.vm, '--uri', METADATA_URI, '--key', METADATA_KEY, '--live', '--set', attachmentsMetadataXml([{ id, session: 'SESSION', bus: LIBVIRT_USB_BUS }])];
  if (f.json) {
    console.log(JSON.stringify({ id, socketPath, qmpSocket, bus: LIBVIRT_USB_BUS, domainAttributes: { 'xmlns:qemu': QEMU_XMLNS }, controller, redirdev, qemuCommandline: commandline, attach, metadata }, null, 2));
    return;
  }
  console.log(`<!-- on <domain>: type='qemu' (or 'kvm') xmlns:qemu='${QEMU_XMLNS}' -->`);
  console.log('<!-- inside <devices> -->');
  console.log(controller);
  console.log(redirdev);
  console.log("<!-- after </devices>: the bridge's own QMP monitor (events, hot plug, the freeze at the switchover) -->");
  console.log(commandline);
  console.log('');
  console.log('# once the domain runs:');
  console.log(attach.map(shellQuote).join(' '));
  console.log("# record the attachment in the domain, for the destination's hook (SESSION: the session id attach printed):");
  console.log(metadata.map(shellQuote).join(' '));
}
