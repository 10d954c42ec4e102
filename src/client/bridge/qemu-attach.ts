// QEMU plumbing for a usb-redir attachment: hot-plug / unplug through QMP, and the command-line
// arguments / libvirt XML for a cold-plugged one.
//
// Chardev mode: QEMU is the unix-socket SERVER (server=on, wait=off) and the bridge connects to
// it. That works for hot-plug (chardev-add creates the listening socket at once), for a
// cold-plugged device (QEMU listens from start-up; libvirt's <redirdev type='unix'> with
// <source mode='bind'>), and for a migration destination (its bridge connects before the
// device state loads, as QEMU requires). QEMU sends its usbredir hello only once the VM runs.
import net from 'node:net';
import { setTimeout as delay } from 'node:timers/promises';
import { QmpError, type QmpClient } from '../../qemu/qmp/client.js';

export interface RedirPlug {
  /** QEMU device id of the usb-redir device (stable: `usbroam-<deviceId>`). */
  id: string;
  /** QEMU chardev id. */
  chardevId: string;
  /** Path of the unix socket QEMU listens on. */
  socketPath: string;
  /** USB bus, e.g. `xhci.0` or `ehci.0`. */
  bus: string;
  /** Optional usb-redir filter (QEMU syntax, `:` between fields, `|` between rules). */
  filter?: string;
  /** Optional USB port on the bus. */
  port?: string;
}

/** A QEMU-safe id from an arbitrary device id. */
export function qemuSafeId(s: string): string {
  return s.replace(/[^A-Za-z0-9_.-]/g, '-');
}

/** Stable ids for a device: `usbroam-<deviceId>` and `usbroam-<deviceId>-chr`. */
export function redirIds(deviceId: string): { id: string; chardevId: string } {
  const id = `usbroam-${qemuSafeId(deviceId)}`;
  return { id, chardevId: `${id}-chr` };
}

/** chardev-add a listening unix socket, then device_add usb-redir on it. */
export async function hotplugRedir(qmp: QmpClient, plug: RedirPlug): Promise<void> {
  await qmp.execute('chardev-add', {
    id: plug.chardevId,
    backend: { type: 'socket', data: { addr: { type: 'unix', data: { path: plug.socketPath } }, server: true, wait: false } },
  });
  try {
    const args: Record<string, unknown> = { driver: 'usb-redir', id: plug.id, chardev: plug.chardevId, bus: plug.bus };
    if (plug.filter) args.filter = plug.filter;
    if (plug.port) args.port = plug.port;
    // usb-redir's own debug output (0-5) on QEMU's stderr; for diagnosis only.
    const debug = Number(process.env.USBROAM_REDIR_DEBUG ?? '');
    if (Number.isInteger(debug) && debug > 0) args.debug = debug;
    await qmp.execute('device_add', args);
  } catch (err) {
    await qmp.execute('chardev-remove', { id: plug.chardevId }).catch(() => {});
    throw err;
  }
}

/**
 * device_del, wait for DEVICE_DELETED, then chardev-remove (QEMU may already have dropped the
 * chardev with the device: that error is ignored). A device that is already gone is fine.
 */
export async function unplugRedir(qmp: QmpClient, ids: { id: string; chardevId: string }, opts: { timeoutMs?: number } = {}): Promise<void> {
  const timeoutMs = opts.timeoutMs ?? 30_000;
  const deleted = qmp.waitForEvent<{ device?: string }>('DEVICE_DELETED', (ev) => ev.data?.device === ids.id, { timeoutMs });
  deleted.catch(() => {});
  let present = true;
  try {
    await qmp.execute('device_del', { id: ids.id });
  } catch (err) {
    if (err instanceof QmpError && err.errorClass === 'DeviceNotFound') present = false;
    else throw err;
  }
  if (present) await deleted;
  await qmp.execute('chardev-remove', { id: ids.chardevId }).catch(() => {});
}

/**
 * The usb-redir device `id` if QEMU has it already (on its command line, e.g. a libvirt
 * <redirdev>): its chardev and the unix socket that chardev listens on. Undefined if there is
 * no such device.
 */
export async function coldPluggedRedir(qmp: QmpClient, id: string): Promise<{ chardevId: string; socketPath: string } | undefined> {
  let chardevId: string;
  try {
    chardevId = await qmp.execute<string>('qom-get', { path: `/machine/peripheral/${id}`, property: 'chardev' });
  } catch (err) {
    // DeviceNotFound: no such device; GenericError: one without a chardev property.
    if (err instanceof QmpError) return undefined;
    throw err;
  }
  const chardevs = await qmp.execute<{ label: string; filename: string }[]>('query-chardev');
  const c = chardevs.find((x) => x.label === chardevId);
  // "unix:/path,server=on", or "disconnected:unix:/path,server=on" while no peer is connected.
  const m = c && /unix:([^,]+)/.exec(c.filename);
  if (!m) throw new Error(`usb-redir ${id}: its chardev ${chardevId} is not a unix socket (${c?.filename ?? 'not found'})`);
  return { chardevId, socketPath: m[1]! };
}

/** Connect to QEMU's listening chardev socket (retrying while it appears). */
export async function connectChardev(socketPath: string, opts: { timeoutMs?: number } = {}): Promise<net.Socket> {
  const deadline = Date.now() + (opts.timeoutMs ?? 10_000);
  for (;;) {
    try {
      return await new Promise<net.Socket>((resolve, reject) => {
        const s = net.connect(socketPath);
        s.once('connect', () => {
          s.removeListener('error', reject);
          resolve(s);
        });
        s.once('error', reject);
      });
    } catch (err) {
      if (Date.now() > deadline) throw new Error(`cannot connect to QEMU chardev ${socketPath}: ${(err as Error).message}`);
      await delay(50);
    }
  }
}

export interface ColdPlugArgs {
  /** `-chardev ... -device ...` as an argv fragment. */
  args: string[];
  /** The same as a libvirt `<redirdev>` element. */
  libvirtXml: string;
}

function qemuOptEscape(v: string): string {
  return v.replace(/,/g, ',,');
}
function xmlEscape(v: string): string {
  return v.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/'/g, '&apos;').replace(/"/g, '&quot;');
}

/**
 * QEMU arguments and libvirt XML for a cold-plugged attachment: QEMU listens on `socketPath`
 * and the bridge connects to it (serve it with Bridge.attach({ coldPlugged: true, ... })).
 */
export function qemuArgsFor(plug: RedirPlug): ColdPlugArgs {
  const dev = [`usb-redir`, `chardev=${plug.chardevId}`, `id=${plug.id}`, `bus=${plug.bus}`];
  if (plug.port) dev.push(`port=${plug.port}`);
  if (plug.filter) dev.push(`filter=${qemuOptEscape(plug.filter)}`);
  const args = ['-chardev', `socket,id=${plug.chardevId},path=${qemuOptEscape(plug.socketPath)},server=on,wait=off`, '-device', dev.join(',')];
  // libvirt: bus='usb' and the controller is chosen by <address>; the filter is a <redirfilter>.
  const lines = [`<redirdev bus='usb' type='unix'>`, `  <source mode='bind' path='${xmlEscape(plug.socketPath)}'/>`, `  <alias name='ua-${xmlEscape(plug.id)}'/>`, `</redirdev>`];
  if (plug.filter) {
    lines.push('<redirfilter>');
    for (const rule of plug.filter.split('|').filter(Boolean)) {
      const [cls, vendor, product, version, allow] = rule.split(':');
      const attr = (name: string, v: string | undefined) => (v === undefined || v === '-1' ? '' : ` ${name}='${xmlEscape(v)}'`);
      lines.push(`  <usbdev${attr('class', cls)}${attr('vendor', vendor)}${attr('product', product)}${attr('version', version)} allow='${allow === '0' ? 'no' : 'yes'}'/>`);
    }
    lines.push('</redirfilter>');
  }
  return { args, libvirtXml: lines.join('\n') };
}
