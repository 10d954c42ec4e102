// The libvirt domain XML a usbroam attachment needs, and what the hook reads back from it.
//
// - The usb-redir device: a <redirdev type='unix'> on a socket QEMU listens on (cold plug; the
//   bridge connects), with a user alias so its QEMU device id is known: `ua-usbroam-<device>`.
// - The bridge's own QMP monitor, as a <qemu:commandline> -qmp: libvirt owns QEMU's monitor, and
//   the bridge needs MIGRATION / DEVICE_DELETED events and commands (device_add for hot plug, the
//   freeze at pre-switchover, xHCI context reads) at any time, also while libvirt runs a migration
//   job (libvirt refuses qemu-monitor-command then). QEMU sends events to every monitor.
// - <metadata>: which attachments a domain has (id, session, bus), so that the destination's
//   hook can prepare the hand-off from the domain XML libvirt migrates with the domain.
import { qemuArgsFor, redirIds, type RedirPlug } from '../client/bridge/qemu-attach.js';

export const QEMU_XMLNS = 'http://libvirt.org/schemas/domain/qemu/1.0';
/** Namespace of usbroam's <metadata> element (virsh metadata --uri). */
export const METADATA_URI = 'urn:usbroam:libvirt:1';
export const METADATA_KEY = 'usbroam';
/** libvirt's first USB controller (<controller type='usb' index='0'>) is QEMU's `usb`, bus `usb.0`. */
export const LIBVIRT_USB_BUS = 'usb.0';

export function xmlEscape(v: string): string {
  return v.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/'/g, '&apos;').replace(/"/g, '&quot;');
}
function xmlUnescape(v: string): string {
  return v.replace(/&(lt|gt|apos|quot|amp);/g, (_, e: string) => ({ lt: '<', gt: '>', apos: "'", quot: '"', amp: '&' })[e]!);
}

/** Ids of a device's usb-redir under libvirt: the alias (= QEMU device id and attachment id) and libvirt's chardev id. */
export function libvirtRedirIds(deviceId: string): { id: string; chardevId: string } {
  const id = `ua-${redirIds(deviceId).id}`;
  return { id, chardevId: `char${id}` };
}

export interface LibvirtPlug {
  deviceId: string;
  /** Socket QEMU listens on. */
  socketPath: string;
  filter?: string;
}

/** <redirdev> (and <redirfilter>) for `deviceId`; the QEMU device id is libvirtRedirIds(deviceId).id. */
export function redirdevXml(p: LibvirtPlug): string {
  // qemuArgsFor writes the alias as `ua-<id>`: hand it the id without libvirt's prefix.
  const plug: RedirPlug = { ...redirIds(p.deviceId), socketPath: p.socketPath, bus: LIBVIRT_USB_BUS, filter: p.filter };
  return qemuArgsFor(plug).libvirtXml;
}

/** The <qemu:commandline> that gives the bridge a QMP monitor of its own (needs xmlns:qemu on <domain>). */
export function bridgeQmpCommandlineXml(qmpSocket: string): string {
  return [`<qemu:commandline>`, `  <qemu:arg value='-qmp'/>`, `  <qemu:arg value='unix:${xmlEscape(qmpSocket)},server=on,wait=off'/>`, `</qemu:commandline>`].join('\n');
}

/** The bridge's QMP socket in a domain XML (the -qmp unix: argument of <qemu:commandline>), or undefined. */
export function bridgeQmpSocketOf(domainXml: string): string | undefined {
  const args = [...domainXml.matchAll(/<qemu:arg\s+value=(['"])(.*?)\1\s*\/>/g)].map((m) => xmlUnescape(m[2]!));
  for (let i = 0; i + 1 < args.length; i++) {
    if (args[i] !== '-qmp') continue;
    const m = /^unix:([^,]+)/.exec(args[i + 1]!);
    if (m) return m[1];
  }
  return undefined;
}

export interface AttachmentMetadata {
  /** Attachment id = QEMU device id. */
  id: string;
  /** The session the source bridge holds. */
  session: string;
  bus: string;
  /** USB host server address, if not the bridge's default. */
  server?: string;
}

/** The element for `virsh metadata DOMAIN --uri METADATA_URI --key METADATA_KEY --set '...'`. */
export function attachmentsMetadataXml(atts: AttachmentMetadata[]): string {
  const attr = (k: string, v: string | undefined) => (v ? ` ${k}="${xmlEscape(v)}"` : '');
  return `<attachments>${atts.map((a) => `<attachment${attr('id', a.id)}${attr('session', a.session)}${attr('bus', a.bus)}${attr('server', a.server)}/>`).join('')}</attachments>`;
}

/** The attachments recorded in a domain XML's usbroam metadata. */
export function attachmentsOf(domainXml: string): AttachmentMetadata[] {
  const meta = /<metadata>([\s\S]*?)<\/metadata>/.exec(domainXml)?.[1];
  if (!meta) return [];
  // The element libvirt stores under our namespace: <P:attachments xmlns:P='urn:usbroam:libvirt:1'>.
  const ns = new RegExp(`<([\\w.-]+):attachments\\s+xmlns:\\1=(['"])${METADATA_URI.replace(/[.:]/g, '\\$&')}\\2\\s*>([\\s\\S]*?)</\\1:attachments>`).exec(meta);
  if (!ns) return [];
  const out: AttachmentMetadata[] = [];
  for (const m of ns[3]!.matchAll(new RegExp(`<${ns[1]}:attachment\\b([^>]*?)/?>`, 'g'))) {
    const attrs: Record<string, string> = {};
    for (const a of m[1]!.matchAll(/([\w-]+)=(['"])(.*?)\2/g)) attrs[a[1]!] = xmlUnescape(a[3]!);
    if (!attrs.id || !attrs.session) throw new Error(`usbroam metadata: an attachment without id or session: ${m[0]}`);
    out.push({ id: attrs.id, session: attrs.session, bus: attrs.bus ?? LIBVIRT_USB_BUS, server: attrs.server });
  }
  return out;
}

export interface GuestDomainOptions {
  name: string;
  kernel: string;
  initrd: string;
  /** Kernel command line. */
  cmdline?: string;
  memoryMiB?: number;
  /** Serial console: QEMU connects to this unix socket (something must listen there first). */
  consoleSocket: string;
  /** Firmware ROM (qboot boots a -kernel guest fastest). */
  bios?: string;
  /** Extra elements inside <devices> (redirdev ...). */
  devices?: string[];
  /** A <qemu:commandline> element (bridgeQmpCommandlineXml). */
  qemuCommandline?: string;
}

/** A type='qemu' (TCG) domain booting a kernel + initramfs, with an xHCI controller and a serial console. */
export function guestDomainXml(o: GuestDomainOptions): string {
  return [
    `<domain type='qemu' xmlns:qemu='${QEMU_XMLNS}'>`,
    `  <name>${xmlEscape(o.name)}</name>`,
    `  <memory unit='MiB'>${o.memoryMiB ?? 128}</memory>`,
    `  <vcpu>1</vcpu>`,
    `  <os>`,
    `    <type arch='x86_64' machine='pc'>hvm</type>`,
    ...(o.bios ? [`    <loader type='rom' readonly='yes'>${xmlEscape(o.bios)}</loader>`] : []),
    `    <kernel>${xmlEscape(o.kernel)}</kernel>`,
    `    <initrd>${xmlEscape(o.initrd)}</initrd>`,
    `    <cmdline>${xmlEscape(o.cmdline ?? 'console=ttyS0 quiet')}</cmdline>`,
    `  </os>`,
    `  <features><acpi/><apic/></features>`,
    `  <cpu mode='maximum'/>`,
    `  <on_reboot>destroy</on_reboot>`,
    `  <devices>`,
    `    <emulator>/usr/bin/qemu-system-x86_64</emulator>`,
    `    <controller type='usb' model='qemu-xhci' index='0'/>`,
    `    <serial type='unix'><source mode='connect' path='${xmlEscape(o.consoleSocket)}'/><target port='0'/></serial>`,
    `    <memballoon model='none'/>`,
    ...(o.devices ?? []).map((d) => d.replace(/^/gm, '    ')),
    `  </devices>`,
    ...(o.qemuCommandline ? [o.qemuCommandline.replace(/^/gm, '  ')] : []),
    `</domain>`,
  ].join('\n');
}
