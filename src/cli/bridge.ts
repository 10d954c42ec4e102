// usbroam bridge: the bridge daemon next to QEMU. It knows each VM's QMP socket, attaches
// devices of USB host servers to VMs on request of its control API (a unix socket by default,
// TCP with mutual TLS as an option), and detaches everything cleanly on SIGTERM/SIGINT.
import { Command, Option } from 'commander';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { createLogger } from '../common/log.js';
import { exitOnSignals, reloadOnSighup } from './common.js';
import { Bridge } from '../client/bridge/bridge.js';
import { allOf, BridgeMetrics, type BridgeObserver } from '../client/bridge/bridge-metrics.js';
import { BridgeCapture } from '../client/bridge/bridge-capture.js';
import { newRegistry, serveMetrics, type MetricsEndpoint } from '../common/observe/prom-kit.js';
import { defaultRunDir } from '../client/bridge-control/address.js';
import { BridgeControlServer } from '../client/bridge-control/server.js';
import type { ConnectionOptions } from '../client/sdk/credentials.js';
import type { BridgeFleet } from '../fleet/bridge-fleet.js';

/** The JSON config file of `usbroam bridge --config`; flags override it. */
export interface BridgeConfig {
  /** Control API: unix socket path or host:port. */
  control?: string;
  /** Control API over TCP: mTLS material; `crl`: a CRL of the CA (re-read on SIGHUP with the rest). */
  controlTls?: { ca: string; cert: string; key: string; crl?: string };
  /** Control API over TCP: identities allowed (default: every certificate the CA signed). */
  controlAllow?: string[];
  /** Control API: plaintext TCP (loopback only). */
  insecure?: boolean;
  /** VM name -> QMP socket (or a list of {name, qmpSocket}). */
  vms?: Record<string, string> | { name: string; qmpSocket: string }[];
  /** How the bridge reaches USB host servers: default address, its client certificate, key and CA. */
  server?: ConnectionOptions;
  /** Directory of the chardev sockets. */
  runDir?: string;
  logLevel?: string;
  /** HOST:PORT: serve Prometheus metrics at /metrics there. */
  metricsListen?: string;
  /** Write a pcap per attachment of the URBs as the bridge sees them. */
  captureDir?: string;
  /** Directory of the state file: a restarted bridge re-attaches what it records. */
  stateDir?: string;
  /** Re-attach a device whose session was lost for good for this long (0: off). */
  reattachMs?: number;
  /** How long a lost URB channel tries to resume its session. */
  resumeWindowMs?: number;
  /** The fleet: claims in etcd under the bridge's lease (usbroam attach --select), claims moved with migrations. */
  fleet?: { etcd: string | string[]; prefix?: string; leaseTtlSeconds?: number };
}

interface BridgeFlags {
  config?: string;
  control?: string;
  controlCa?: string;
  controlCert?: string;
  controlKey?: string;
  controlCrl?: string;
  crl?: string;
  controlAllow?: string[];
  insecure?: boolean;
  vm: string[];
  server?: string;
  serverCa?: string;
  serverCert?: string;
  serverKey?: string;
  serverInsecure?: boolean;
  runDir?: string;
  logLevel?: string;
  metricsListen?: string;
  captureDir?: string;
  stateDir?: string;
  reattachMs?: string;
  resumeWindowMs?: string;
  etcd?: string;
  fleetPrefix?: string;
  leaseTtl?: string;
}

const KNOWN = new Set(['control', 'controlTls', 'controlAllow', 'insecure', 'vms', 'server', 'runDir', 'logLevel', 'metricsListen', 'captureDir', 'stateDir', 'reattachMs', 'resumeWindowMs', 'fleet']);

/** Default of --reattach-ms: ten minutes of retries (a server reboot). */
const DEFAULT_REATTACH_MS = 600_000;

function msFlag(name: string, v: string | number | undefined): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new Error(`${name} must be a whole number of milliseconds >= 0, not "${v}"`);
  return n;
}

/** The bridge's fleet, when --etcd or the config's fleet names etcd; its identity is its server certificate's CN. */
async function bridgeFleet(f: BridgeFlags, cfg: BridgeConfig, servers: ConnectionOptions, log: ReturnType<typeof createLogger>): Promise<BridgeFleet | undefined> {
  const etcd = f.etcd ?? cfg.fleet?.etcd;
  if (!etcd) return undefined;
  if (!servers.cert) throw new Error('--etcd: the bridge claims devices as the identity of its client certificate; give --server-cert');
  const ttl = f.leaseTtl !== undefined ? Number(f.leaseTtl) : cfg.fleet?.leaseTtlSeconds;
  if (ttl !== undefined && (!Number.isInteger(ttl) || ttl < 2 || ttl > 3600)) throw new Error(`--lease-ttl ${ttl} must be whole seconds from 2 to 3600`);
  const { BridgeFleet, certificateIdentity } = await import('../fleet/bridge-fleet.js');
  const fleet = new BridgeFleet({ etcd, identity: certificateIdentity(servers.cert), leaseTtlS: ttl, prefix: f.fleetPrefix ?? cfg.fleet?.prefix, log });
  log.info({ etcd, identity: fleet.identity }, 'bridge in the fleet');
  return fleet;
}

export function loadBridgeConfig(file: string): BridgeConfig {
  let parsed: unknown;
  try {
    parsed = JSON.parse(readFileSync(file, 'utf8'));
  } catch (err) {
    throw new Error(`config file ${file}: ${(err as Error).message}`);
  }
  if (!parsed || typeof parsed !== 'object' || Array.isArray(parsed)) throw new Error(`config file ${file} must hold a JSON object`);
  const unknown = Object.keys(parsed).filter((k) => !KNOWN.has(k));
  if (unknown.length) throw new Error(`config file ${file}: unknown key(s) ${unknown.join(', ')} (known: ${[...KNOWN].join(', ')})`);
  const base = path.dirname(path.resolve(file));
  const rel = (p: string | undefined) => (p ? path.resolve(base, p) : p);
  const cfg = parsed as BridgeConfig;
  if (cfg.controlTls) {
    const unknownTls = Object.keys(cfg.controlTls).filter((k) => !['ca', 'cert', 'key', 'crl'].includes(k));
    if (unknownTls.length) throw new Error(`config file ${file}: unknown key(s) controlTls.${unknownTls.join(', controlTls.')} (known: ca, cert, key, crl)`);
    cfg.controlTls = { ca: rel(cfg.controlTls.ca)!, cert: rel(cfg.controlTls.cert)!, key: rel(cfg.controlTls.key)!, ...(cfg.controlTls.crl ? { crl: rel(cfg.controlTls.crl) } : {}) };
  }
  if (cfg.server) cfg.server = { ...cfg.server, ca: rel(cfg.server.ca), cert: rel(cfg.server.cert), key: rel(cfg.server.key) };
  if (cfg.stateDir) cfg.stateDir = rel(cfg.stateDir);
  return cfg;
}

/** name=path pairs from --vm flags and the config file (flags win). */
export function vmList(cfg: BridgeConfig, flags: string[]): { name: string; qmpSocket: string }[] {
  const out = new Map<string, string>();
  const fromFile = Array.isArray(cfg.vms) ? cfg.vms : Object.entries(cfg.vms ?? {}).map(([name, qmpSocket]) => ({ name, qmpSocket }));
  for (const v of fromFile) out.set(v.name, v.qmpSocket);
  for (const f of flags) {
    const eq = f.indexOf('=');
    if (eq <= 0 || eq === f.length - 1) throw new Error(`--vm "${f}" must be NAME=QMP_SOCKET`);
    out.set(f.slice(0, eq), f.slice(eq + 1).replace(/^unix:/, ''));
  }
  return [...out].map(([name, qmpSocket]) => ({ name, qmpSocket: path.resolve(qmpSocket) }));
}

/** The control listener's TLS files from the flags (which win) and the config file. */
function controlTlsOf(f: BridgeFlags, cfg: BridgeConfig): BridgeConfig['controlTls'] {
  let tls = f.controlCa || f.controlCert || f.controlKey ? { ca: f.controlCa!, cert: f.controlCert!, key: f.controlKey!, crl: cfg.controlTls?.crl } : cfg.controlTls;
  if (tls && (!tls.ca || !tls.cert || !tls.key)) throw new Error('control mutual TLS needs all of --control-ca, --control-cert and --control-key');
  const crl = f.controlCrl ?? f.crl;
  if (crl) {
    if (!tls) throw new Error('--control-crl needs control mutual TLS (--control-ca, --control-cert, --control-key)');
    tls = { ...tls, crl };
  }
  if (tls && !tls.crl) delete tls.crl;
  return tls;
}

const collect = (v: string, prev: string[]) => [...prev, v];

export function bridgeCommand(): Command {
  return new Command('bridge')
    .description('run the bridge daemon: attaches devices of USB host servers to QEMU VMs, driven by its control API')
    .option('-c, --config <file>', 'JSON config: control, controlTls, controlAllow, insecure, vms, server {address, ca, cert, key}, runDir, logLevel, metricsListen, captureDir')
    .addOption(new Option('--control <address>', 'control API: unix socket path or host:port (default: /run/usbroam/bridge.sock as root, else $XDG_RUNTIME_DIR/usbroam/bridge.sock)').env('USBROAM_CONTROL'))
    .option('--control-ca <file>', 'control API over TCP: CA that signs orchestrator certificates')
    .option('--control-cert <file>', "control API over TCP: the bridge's certificate")
    .option('--control-key <file>', "control API over TCP: the bridge's private key")
    .option('--control-crl <file>', 'control API over TCP: CRL (PEM) of the control CA; listed certificates are refused (re-read on SIGHUP)')
    .addOption(new Option('--crl <file>', 'same as --control-crl').hideHelp())
    .option('--control-allow <identity>', 'control API over TCP: an identity allowed to call (repeatable; default every certificate the CA signed)', collect, [])
    .option('--insecure', 'control API over plaintext TCP (loopback only)')
    .option('--vm <name=qmp-socket>', 'a VM and its QMP socket (repeatable)', collect, [])
    .addOption(new Option('-s, --server <address>', 'default USB host server, host:port').env('USBROAM_SERVER'))
    .addOption(new Option('--server-ca <file>', 'CA that signed the USB host servers’ certificates').env('USBROAM_CA'))
    .addOption(new Option('--server-cert <file>', "the bridge's client certificate for USB host servers (its CN is the bridge's identity)").env('USBROAM_CERT'))
    .addOption(new Option('--server-key <file>', "the bridge's client private key").env('USBROAM_KEY'))
    .option('--server-insecure', 'reach USB host servers in plaintext (servers started with --insecure)')
    .option('--run-dir <dir>', `directory of the chardev sockets (default ${defaultRunDir()})`)
    .option('--log-level <level>', 'pino level (default info)')
    .option('--metrics-listen <host:port>', 'serve Prometheus metrics at http://HOST:PORT/metrics (plain HTTP)')
    .option('--etcd <urls>', 'the fleet: etcd endpoints URL[,URL...]; attach --select claims devices under this bridge\'s lease, and migrations move claims')
    .option('--fleet-prefix <prefix>', 'with --etcd: the fleet key prefix (default /usbroam/v1/)')
    .option('--lease-ttl <s>', "with --etcd: TTL of the bridge's lease: how long the claims of a dead bridge last (default 10)")
    .option('--capture-dir <dir>', "write a pcap (usbmon format) per attachment of the URBs as the bridge sees them, to compare with the server's `usbroam capture`")
    .option('--state-dir <dir>', 'keep a record of the attachments here (bridge-state.json, written atomically); a bridge restarted after a crash re-attaches them')
    .option('--reattach-ms <ms>', `after a session is lost for good (server restarted, network cut longer than its grace period), keep trying to re-attach the device for this long; 0: unplug it for good (default ${DEFAULT_REATTACH_MS})`)
    .option('--resume-window-ms <ms>', 'how long a lost URB channel tries to resume its session before it counts as lost; keep it at or under the server grace period (default 25000)')
    .action(async (f: BridgeFlags) => {
      const cfg = f.config ? loadBridgeConfig(f.config) : {};
      const log = createLogger({ name: 'usbroam-bridge', level: f.logLevel ?? cfg.logLevel });
      const controlTls = controlTlsOf(f, cfg);
      const servers: ConnectionOptions = {
        ...(cfg.server ?? {}),
        ...(f.server ? { address: f.server } : {}),
        ...(f.serverCa ? { ca: f.serverCa } : {}),
        ...(f.serverCert ? { cert: f.serverCert } : {}),
        ...(f.serverKey ? { key: f.serverKey } : {}),
        ...(f.serverInsecure ? { insecure: true } : {}),
      };
      const fleet = await bridgeFleet(f, cfg, servers, log);
      const stateDir = f.stateDir ?? cfg.stateDir;
      const bridge = new Bridge({
        log,
        runDir: f.runDir ?? cfg.runDir ?? defaultRunDir(),
        stateDir: stateDir ? path.resolve(stateDir) : undefined,
        reattachWindowMs: msFlag('--reattach-ms', f.reattachMs ?? cfg.reattachMs) ?? DEFAULT_REATTACH_MS,
        resumeWindowMs: msFlag('--resume-window-ms', f.resumeWindowMs ?? cfg.resumeWindowMs),
        incomingClaims: fleet,
      });
      const control = new BridgeControlServer({
        bridge,
        listen: f.control ?? cfg.control,
        tls: controlTls,
        insecure: f.insecure ?? cfg.insecure,
        allow: [...(cfg.controlAllow ?? []), ...(f.controlAllow ?? [])],
        servers,
        fleet,
        log,
      });
      for (const v of vmList(cfg, f.vm)) control.addVm(v.name, v.qmpSocket);
      const metricsListen = f.metricsListen ?? cfg.metricsListen;
      let metrics: MetricsEndpoint | undefined;
      const observers: BridgeObserver[] = [];
      if (metricsListen) {
        const m = new BridgeMetrics(newRegistry(), bridge);
        observers.push(m);
        metrics = await serveMetrics(m.registry, metricsListen, log);
      }
      const captureDir = f.captureDir ?? cfg.captureDir;
      if (captureDir) observers.push(new BridgeCapture(path.resolve(captureDir), log));
      if (observers.length) bridge.observer = allOf(observers);
      await control.start();
      // After the VMs are known: take back what a previous bridge had attached (it runs on in the background).
      void bridge.restore().then(
        (r) => r.length && log.info({ restored: r }, 'attachments of the previous bridge restored'),
        (err: Error) => log.error({ err: err.message }, 'cannot restore the attachments of the previous bridge'),
      );
      // SIGHUP: the control listener's certificate, key, CA and CRL again (config file re-read).
      reloadOnSighup(log, 'reloading the control API TLS material', async () => {
        control.reloadTls(controlTlsOf(f, f.config ? loadBridgeConfig(f.config) : {}));
      });
      exitOnSignals(log, 'stopping: detaching every device', (sig) => Promise.all([control.stop(sig).then(() => fleet?.close()), metrics?.close()]), () => ({ attachments: bridge.list().length }));
    });
}
