// usbroam serve: the USB host server daemon.
import { Command, Option } from 'commander';
import { existsSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import { createLogger, type Logger } from '../common/log.js';
import { exitOnSignals, reloadOnSighup } from './common.js';
import { createDefaultEmulatedBackend, parseEmulatedSpeed } from '../server/backends/emulated/emulated-backend.js';
import type { UsbBackend } from '../server/backends/types.js';
import { LoopbackDevice } from '../server/backends/emulated/loopback.js';
import { normalizeAllowRules } from '../server/backends/libusb/policy.js';
import { DEFAULT_LISTEN, loadConfigFile, type ServerConfig } from '../server/config.js';
import { UsbHostServer } from '../server/server.js';
import { fleetConfig, type FleetFlags } from '../fleet/config.js';
import { startServerFleet } from '../fleet/server-fleet.js';
import { parseHostPort } from '../common/observe/prom-kit.js';

export interface ServeFlags {
  config?: string;
  listen?: string;
  ca?: string;
  cert?: string;
  key?: string;
  crl?: string;
  insecure?: boolean;
  allow?: string[];
  admin?: string[];
  graceMs?: string;
  sessionBufferMib?: string;
  emulated?: boolean;
  emulatedCount?: string;
  diskImage?: string;
  diskSizeMib?: string;
  diskSpeed?: string;
  diskLatencyMs?: string;
  controlLatencyMs?: string;
  emulatedFtdi?: boolean;
  emulatedUas?: boolean | string;
  libusb?: boolean;
  libusbAllow?: string[];
  libusbPollMs?: string;
  logLevel?: string;
  // fleet
  etcd?: string;
  hostName?: string;
  advertise?: string;
  label?: string[];
  deviceLabel?: string[];
  leaseTtl?: string;
  metricsListen?: string;
}

/** Merge the config file and flags into one configuration. */
export function serveConfig(f: ServeFlags): ServerConfig {
  const file = f.config ? loadConfigFile(f.config) : {};
  const acl = { ...(file.acl ?? {}) };
  for (const a of f.allow ?? []) {
    const [identity, rule] = a.split('=');
    if (!identity || !rule) throw new Error(`--allow "${a}" must be IDENTITY=* or IDENTITY=vvvv:pppp`);
    acl[identity] = rule === '*' ? '*' : [...((acl[identity] as []) ?? []), { vidPid: rule }];
  }
  let tls = f.ca || f.cert || f.key ? { ca: f.ca!, cert: f.cert!, key: f.key!, crl: file.tls?.crl } : file.tls;
  if (tls && (!tls.ca || !tls.cert || !tls.key)) throw new Error('mutual TLS needs all of --ca, --cert and --key');
  if (tls) {
    const unknown = Object.keys(tls).filter((k) => !['ca', 'cert', 'key', 'crl'].includes(k));
    if (unknown.length) throw new Error(`config file: unknown key(s) tls.${unknown.join(', tls.')} (known: ca, cert, key, crl)`);
  }
  if (f.crl) {
    if (!tls) throw new Error('--crl needs mutual TLS (--ca, --cert, --key)');
    tls = { ...tls, crl: f.crl };
  }
  if (tls && !tls.crl) delete tls.crl;
  const limits = { ...(file.limits ?? {}) };
  if (f.graceMs) limits.graceMs = Number(f.graceMs);
  if (f.sessionBufferMib !== undefined) {
    const mib = Number(f.sessionBufferMib);
    if (!Number.isInteger(mib) || mib < 1 || mib > 4096) throw new Error(`--session-buffer-mib must be an integer from 1 to 4096, not "${f.sessionBufferMib}"`);
    limits.maxBufferedBytes = mib * 1024 * 1024;
  }
  const emulated = file.emulated ?? (f.emulated === false ? undefined : {});
  if (emulated && f.diskImage) emulated.disk = { image: f.diskImage, sizeMiB: f.diskSizeMib ? Number(f.diskSizeMib) : undefined };
  if (emulated && f.diskSpeed && emulated.disk !== false) emulated.disk = { ...emulated.disk, speed: f.diskSpeed as 'high' };
  if (f.emulatedCount !== undefined) {
    if (!emulated) throw new Error('--emulated-count needs the emulated devices (not --no-emulated)');
    emulated.count = parseEmulatedCount(f.emulatedCount);
  }
  if (emulated?.count !== undefined) parseEmulatedCount(String(emulated.count)); // fail early (config file)
  if (emulated && f.emulatedFtdi) emulated.ftdi = true;
  if (emulated && f.emulatedUas) emulated.uas = typeof f.emulatedUas === 'string' ? { image: f.emulatedUas } : (emulated.uas || true);
  if (emulated && f.controlLatencyMs !== undefined) {
    const ms = Number(f.controlLatencyMs);
    if (!Number.isInteger(ms) || ms < 0 || ms > 60_000) throw new Error(`--control-latency-ms must be an integer from 0 to 60000, not "${f.controlLatencyMs}"`);
    emulated.controlLatencyMs = ms;
  }
  if (emulated && f.diskLatencyMs !== undefined && emulated.disk !== false) emulated.disk = { ...emulated.disk, latencyMs: Number(f.diskLatencyMs) };
  if (emulated?.uas && f.diskLatencyMs !== undefined) emulated.uas = { ...(emulated.uas === true ? {} : emulated.uas), latencyMs: Number(f.diskLatencyMs) };
  if (emulated?.uas && emulated.uas !== true && emulated.uas.latencyMs !== undefined) checkDiskLatency(emulated.uas.latencyMs);
  if (emulated?.disk) parseEmulatedSpeed(emulated.disk.speed ?? 'high', 'disk speed'); // fail early
  if (emulated?.disk && emulated.disk.latencyMs !== undefined) checkDiskLatency(emulated.disk.latencyMs);
  let libusb = file.libusb ? { ...file.libusb } : undefined;
  if (f.libusb || f.libusbAllow?.length || f.libusbPollMs) libusb = { ...(libusb ?? {}), enabled: true };
  if (libusb && f.libusbAllow?.length) libusb.allow = [...(libusb.allow ?? []), ...f.libusbAllow];
  if (libusb && f.libusbPollMs) libusb.pollMs = Number(f.libusbPollMs);
  if (libusb) normalizeAllowRules(libusb.allow); // fail early on a bad rule
  const metricsListen = f.metricsListen ?? file.metricsListen;
  if (metricsListen) parseHostPort(metricsListen); // fail early on a bad address
  return {
    listen: f.listen ?? file.listen ?? DEFAULT_LISTEN,
    tls,
    insecure: f.insecure ?? file.insecure,
    acl,
    admins: [...(file.admins ?? []), ...(f.admin ?? [])],
    limits,
    emulated,
    libusb,
    logLevel: f.logLevel ?? file.logLevel,
    fleet: file.fleet, // the fleet's own flags are merged by fleetConfig() in runServer
    metricsListen,
  };
}

/** Most extra loopback devices `--emulated-count` exports. */
export const MAX_EMULATED_COUNT = 1024;

function parseEmulatedCount(v: string): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0 || n > MAX_EMULATED_COUNT) throw new Error(`--emulated-count must be an integer from 0 to ${MAX_EMULATED_COUNT}, not "${v}"`);
  return n;
}

/**
 * The i-th (1-based) extra loopback device of `--emulated-count`: bus 2, port i, id emu-2-<i>,
 * serial USBROAM-LOOP-2-<i>; many sessions at once (load tests) each get a device of their own.
 */
export function extraLoopback(i: number, log?: Logger): LoopbackDevice {
  return new LoopbackDevice({ bus: 2, portPath: [i], serial: `USBROAM-LOOP-2-${i}`, logger: log });
}

function checkDiskLatency(ms: unknown): void {
  if (typeof ms !== 'number' || !Number.isInteger(ms) || ms < 0 || ms > 60_000) throw new Error(`disk latency must be an integer 0..60000 ms, not ${String(ms)}`);
}

export async function emulatedBackends(cfg: ServerConfig, dataDir: string, log?: Logger): Promise<UsbBackend[]> {
  if (!cfg.emulated) return [];
  const disk = cfg.emulated.disk;
  const image = disk && disk.image ? disk.image : path.join(dataDir, 'disk.img');
  mkdirSync(path.dirname(image), { recursive: true });
  const backend = await createDefaultEmulatedBackend({
    massStorage: disk !== false,
    imagePath: image,
    imageSizeBytes: (disk && disk.sizeMiB ? disk.sizeMiB : 64) * 1024 * 1024,
    diskSpeed: disk && disk.speed ? parseEmulatedSpeed(disk.speed, 'disk speed') : undefined,
    diskLatencyMs: disk ? disk.latencyMs : undefined,
    logger: log,
    loopback: cfg.emulated.loopback !== false,
    controlLatencyMs: cfg.emulated.controlLatencyMs,
    ftdi: cfg.emulated.ftdi === true,
    uas: uasDisk(cfg.emulated.uas, dataDir),
    serial: cfg.emulated.serial !== false,
  });
  for (let i = 1; i <= (cfg.emulated.count ?? 0); i++) backend.add(extraLoopback(i, log));
  return [backend];
}

function uasDisk(uas: NonNullable<ServerConfig['emulated']>['uas'], dataDir: string): { imagePath: string; sizeBytes: number; latencyMs?: number } | undefined {
  if (!uas) return undefined;
  const o = uas === true ? {} : uas;
  const imagePath = o.image ?? path.join(dataDir, 'uas.img');
  mkdirSync(path.dirname(imagePath), { recursive: true });
  return { imagePath, sizeBytes: (o.sizeMiB ?? 64) * 1024 * 1024, latencyMs: o.latencyMs };
}

/** The libusb backend when configured (enabled unless `enabled: false`). */
export async function libusbBackends(cfg: ServerConfig, log?: Logger): Promise<UsbBackend[]> {
  if (!cfg.libusb || cfg.libusb.enabled === false) return [];
  const allow = normalizeAllowRules(cfg.libusb.allow);
  if (!allow.length) log?.warn('libusb backend enabled without allow rules: no device is exported (add --libusb-allow)');
  const { LibusbBackend } = await import('../server/backends/libusb/libusb-backend.js');
  return [await LibusbBackend.create({ allow, pollMs: cfg.libusb.pollMs, logger: log })];
}

/** Start a server from a configuration; SIGTERM/SIGINT stop it cleanly (exit 0). */
export async function runServer(cfg: ServerConfig, dataDir: string, fleetFlags: FleetFlags = {}, reread?: () => ServerConfig): Promise<UsbHostServer> {
  const log = createLogger({ name: 'usbroam-server', level: cfg.logLevel });
  const server = new UsbHostServer({
    listen: cfg.listen,
    tls: cfg.tls,
    insecure: cfg.insecure,
    backends: [...(await emulatedBackends(cfg, dataDir, log)), ...(await libusbBackends(cfg, log))],
    acl: cfg.acl,
    admins: cfg.admins,
    limits: cfg.limits,
    log,
    metricsListen: cfg.metricsListen,
  });
  // Fleet: the session-open claim check is set before the server listens, registration starts once it does.
  const fleetCfg = fleetConfig(fleetFlags, cfg.fleet);
  const fleet = fleetCfg ? await startServerFleet(fleetCfg, log) : undefined;
  if (fleet) {
    server.sessions.openGuard = fleet.guard;
    fleet.watchSessions(server.sessions);
  }
  await server.start();
  fleet?.publish(server.address, server.registry);
  exitOnSignals(log, 'stopping: no new streams; ending sessions', (sig) => Promise.all([fleet?.stop(), server.stop(sig)]));
  // SIGHUP: the config file (and the same flags) again; TLS files and CRL re-read, ACL replaced.
  reloadOnSighup(log, 'reloading TLS material and ACL', async () => {
    const next = (reread ?? (() => cfg))();
    await server.reload({ tls: next.tls, acl: next.acl });
  });
  return server;
}

export function serveCommand(): Command {
  return new Command('serve')
    .description('run the USB host server')
    .option('-c, --config <file>', 'JSON config file (flags override it)')
    .addOption(new Option('-l, --listen <address>', `host:port or unix:/path (default ${DEFAULT_LISTEN})`).env('USBROAM_LISTEN'))
    .addOption(new Option('--ca <file>', 'CA that signs client certificates').env('USBROAM_CA'))
    .addOption(new Option('--cert <file>', 'server certificate').env('USBROAM_CERT'))
    .addOption(new Option('--key <file>', 'server private key').env('USBROAM_KEY'))
    .addOption(new Option('--crl <file>', 'CRL (PEM) signed by the CA: certificates it lists are refused; re-read on SIGHUP with the certificate, key, CA and ACL').env('USBROAM_CRL'))
    .option('--insecure', 'plaintext without client authentication (loopback or unix socket only)')
    .option('--allow <identity=rule...>', 'ACL entry: IDENTITY=* or IDENTITY=vvvv:pppp (repeatable)')
    .option('--admin <identity...>', 'identities that may list and close every session')
    .option('--grace-ms <ms>', 'how long a session without a stream keeps its device (default 30000)')
    .option('--session-buffer-mib <n>', 'MiB a session holds for a client that has not acknowledged them (completions, in-flight URB data); at the bound it takes no new URB, and a client that does not read for the grace period loses the session (default 32)')
    .option('--no-emulated', 'do not export the emulated devices')
    .option('--emulated-count <n>', `also export N loopback devices (bus 2, ids emu-2-1 ... emu-2-N; up to ${MAX_EMULATED_COUNT})`)
    .option('--disk-image <file>', 'image file of the emulated disk (sparse; created if missing)')
    .option('--disk-size-mib <n>', 'size of a new disk image (default 64)')
    .option('--disk-speed <speed>', 'bus speed of the emulated disk: high (default), super (1 MiB SCSI commands; xHCI only) or full')
    .option('--disk-latency-ms <ms>', 'each READ/WRITE command of the emulated disks (mass storage and UAS) waits this long before its data moves (default 0; for tests: a bulk URB surely in flight)')
    .option('--control-latency-ms <ms>', 'how long the emulated loopback device takes to answer its slow vendor request (IN 0x5d), to keep control transfers in flight (default 0)')
    .option('--emulated-ftdi', 'also export an emulated FTDI FT232R-like echo port (0403:6001, serial USBROAM-FTDI-0001)')
    .option('--emulated-uas [image]', 'also export an emulated USB Attached SCSI disk at SuperSpeed (1209:7302, id emu-1-5, bulk streams; default image <data dir>/uas.img)')
    .option('--libusb', 'export real USB devices through libusb (only those matching --libusb-allow; hubs never)')
    .option('--libusb-allow <rule...>', 'libusb export rule (repeatable; implies --libusb): "*", vvvv:pppp, or vid=,pid=,serial=,class=,bus=,port=1.4 joined by commas')
    .option('--libusb-poll-ms <ms>', 'libusb device list poll interval (default 500; 0: libusb hotplug events only)')
    .option('--log-level <level>', 'pino level (default info)')
    .option('--etcd <urls>', 'join the fleet: etcd endpoints, URL[,URL...] (e.g. http://10.0.0.5:2379)')
    .option('--host-name <name>', 'this host\'s name in the fleet (default: the machine\'s host name)')
    .option('--advertise <host:port>', 'address published for bridges to connect to (default: the bound address)')
    .option('--label <k=v...>', 'fleet label of this host and its devices (repeatable)')
    .option('--device-label <spec...>', "fleet labels for matching devices: 'SELECTOR k=v...', e.g. 'serial=ABC license=cad' (repeatable)")
    .option('--lease-ttl <s>', 'fleet lease TTL in seconds: how long a dead server stays listed (default 10)')
    .option('--metrics-listen <host:port>', 'serve Prometheus metrics at http://HOST:PORT/metrics (plain HTTP)')
    .action(async (f: ServeFlags) => {
      const cfg = serveConfig(f);
      fleetConfig(f, cfg.fleet); // fail early on bad fleet flags
      const dataDir = path.resolve('.cache/server');
      if (!existsSync(dataDir)) mkdirSync(dataDir, { recursive: true });
      await runServer(cfg, dataDir, f, () => serveConfig(f));
    });
}
