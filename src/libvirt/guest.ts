// A devkit guest run by libvirt: the project's kernel + initramfs in a type='qemu' domain, its
// serial console on a unix socket this process listens on (QEMU connects), driven like the raw
// QEMU guests of src/devkit/guest (GuestConsole).
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { GuestConsole, type RunOptions } from '../devkit/guest/console.js';
import { QBOOT_ROM, type GuestImage } from '../devkit/guest/image.js';
import type { LibvirtDaemon } from './daemon.js';
import { guestDomainXml, type GuestDomainOptions } from './domain-xml.js';

export interface LibvirtGuestConsole {
  readonly console: GuestConsole;
  readonly socketPath: string;
  /** Resolves once QEMU connected. */
  readonly connected: Promise<void>;
  sh(command: string, options?: RunOptions): Promise<string>;
  waitForPath(p: string, timeoutMs?: number): Promise<void>;
  dmesg(): Promise<string>;
  close(): void;
}

/** Listen on `socketPath` for the serial console of a domain (before the domain starts). */
export async function listenConsole(socketPath: string, label: string, log: (l: string) => void = () => {}): Promise<LibvirtGuestConsole> {
  fs.rmSync(socketPath, { force: true });
  const cons = new GuestConsole(`${socketPath}.log`, (l) => log(`[${label}] ${l}`));
  const server = net.createServer();
  const connected = new Promise<void>((resolve) =>
    server.once('connection', (s) => {
      cons.attach(s);
      server.close();
      resolve();
    }),
  );
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(socketPath, () => resolve());
  });
  const sh = async (command: string, o?: RunOptions) => {
    const r = await cons.run(command, o);
    if (r.exitCode !== 0) throw new Error(`[${label}] guest command failed (exit ${r.exitCode}): ${command}\n${r.output}`);
    return r.output;
  };
  return {
    console: cons,
    socketPath,
    connected,
    sh,
    async waitForPath(p, timeoutMs = 60_000) {
      const tries = Math.ceil(timeoutMs / 100);
      await sh(`i=0; while [ ! -e '${p}' ] && [ $i -lt ${tries} ]; do usleep 100000; i=$((i+1)); done; [ -e '${p}' ]`, { timeoutMs: timeoutMs + 30_000 });
    },
    dmesg: () => sh('dmesg'),
    close() {
      server.close();
      cons.close();
    },
  };
}

/** Define and start a devkit guest domain on `daemon`; resolves when its shell answers. */
export async function startLibvirtGuest(
  daemon: LibvirtDaemon,
  o: { name: string; image: GuestImage; dir: string; devices?: string[]; qemuCommandline?: string; memoryMiB?: number; bootTimeoutMs?: number; log?: (l: string) => void },
): Promise<{ console: LibvirtGuestConsole; xml: string }> {
  const con = await listenConsole(path.join(o.dir, `${o.name}-con.sock`), o.name, o.log);
  const opts: GuestDomainOptions = {
    name: o.name,
    kernel: o.image.kernel,
    initrd: o.image.initrd,
    consoleSocket: con.socketPath,
    bios: fs.existsSync(QBOOT_ROM) ? QBOOT_ROM : undefined,
    devices: o.devices,
    qemuCommandline: o.qemuCommandline,
    memoryMiB: o.memoryMiB,
  };
  const xml = guestDomainXml(opts);
  const file = path.join(o.dir, `${o.name}.xml`);
  fs.writeFileSync(file, xml);
  await daemon.virsh(['define', file]);
  try {
    await daemon.virsh(['start', o.name]);
    await con.connected;
    await con.console.waitFor(/USBROAM-GUEST-READY/, { timeoutMs: o.bootTimeoutMs ?? 180_000, fromStart: true });
    const r = await con.console.run('echo ok', { timeoutMs: 30_000 });
    if (r.output.trim() !== 'ok') throw new Error(`[${o.name}] guest shell not answering: ${JSON.stringify(r.output)}`);
  } catch (err) {
    (err as Error).message += `\nQEMU log:\n${daemon.qemuLog(o.name)}\nconsole:\n${con.console.transcript().slice(-2000)}`;
    con.close();
    throw err;
  }
  return { console: con, xml };
}
