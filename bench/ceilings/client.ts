// Transport ceilings: what raw mutual TLS and raw grpc-js (identity serializers, no protobuf) can
// carry over loopback between two processes. Used by `npm run bench:channel` and bench/ceilings/main.ts.
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { createInterface } from 'node:readline';
import http2 from 'node:http2';
import tls from 'node:tls';
import { fileURLToPath } from 'node:url';
import * as grpc from '@grpc/grpc-js';
import {
  CEILINGS_GRPC_CHANNEL_OPTIONS,
  CEILINGS_GRPC_SERVER_OPTIONS,
  CeilingsService,
  loadCerts,
  repoRoot,
  type CertFiles,
} from './common.js';

export { CEILINGS_GRPC_CHANNEL_OPTIONS, CEILINGS_GRPC_SERVER_OPTIONS };

export interface CeilingsOptions {
  /** Directory with ca.pem, server.pem/.key and `${clientName}.pem/.key`; created with scripts/make-certs.mjs if
   * missing. Default: $USBROAM_CERTS_DIR or certs/out. */
  certsDir?: string;
  /** Client identity used for mTLS (default 'bridge'). */
  clientName?: string;
  /** Duration of each throughput phase (raw TLS up/down, gRPC up/down, small-message rate), default 2000 ms. */
  durationMs?: number;
  /** Bulk chunk / message size, default 65536. */
  chunkSize?: number;
  /** Small-message size for grpc_msgs_per_s, default 100. */
  smallMsgSize?: number;
  /** Max small messages in flight (sent, echo not yet received) for grpc_msgs_per_s, default 256. */
  smallMsgWindow?: number;
  /** Ping-pong message size, default 64. */
  pingSize?: number;
  /** Measured ping-pong round trips (after warm-up), default 5000. */
  rttCount?: number;
  /** Warm-up round trips, default 500. */
  rttWarmup?: number;
  /** Extra/overriding grpc-js channel options (merged over CEILINGS_GRPC_CHANNEL_OPTIONS). */
  grpcChannelOptions?: grpc.ChannelOptions;
  /** Extra/overriding grpc-js server options (merged over CEILINGS_GRPC_SERVER_OPTIONS). */
  grpcServerOptions?: grpc.ChannelOptions;
  /** Skip phases (e.g. for quick runs). */
  skip?: { tls?: boolean; grpcBulk?: boolean; grpcMsgs?: boolean; grpcRtt?: boolean };
  /** Progress sink; default writes to stderr. Pass () => {} to silence. */
  log?: (line: string) => void;
}

export interface Ceilings {
  /** min(raw_tls_up_MBps, raw_tls_down_MBps) */
  raw_tls_MBps: number;
  /** client->server, raw Node tls socket, chunkSize writes (MB = 1e6 bytes) */
  raw_tls_up_MBps: number;
  /** server->client */
  raw_tls_down_MBps: number;
  /** min(grpc_raw_up_MBps, grpc_raw_down_MBps) */
  grpc_raw_MBps: number;
  /** client->server, grpc-js bidi stream of chunkSize Buffers, server counting */
  grpc_raw_up_MBps: number;
  /** server->client streaming */
  grpc_raw_down_MBps: number;
  /** smallMsgSize-byte messages pipelined client->server over one bidi stream (no per-message wait), counted
   * by the server: messages/s */
  grpc_msgs_per_s: number;
  /** smallMsgSize-byte messages echoed by the server over one bidi stream, pipelined with <= smallMsgWindow in
   * flight: completed round trips/s (each is 2 messages) */
  grpc_echo_msgs_per_s: number;
  /** pingSize-byte ping-pong on one bidi stream, microseconds */
  grpc_rtt_p50_us: number;
  grpc_rtt_p99_us: number;
}

const here = path.dirname(fileURLToPath(import.meta.url));
const MB = 1e6;
const round = (x: number, digits = 1): number => {
  const f = 10 ** digits;
  return Math.round(x * f) / f;
};
const now = (): number => performance.now();
/** MB/s of a phase's result. */
const rate = (r: { bytes: number; ms: number }): number => r.bytes / (r.ms / 1000) / MB;

/** Ensures the development certificates exist in `dir` (runs scripts/make-certs.mjs --quiet if not). */
export function ensureCerts(dir: string, clientName = 'bridge'): void {
  const need = ['ca.pem', 'server.pem', 'server.key', `${clientName}.pem`, `${clientName}.key`];
  if (need.every((f) => existsSync(path.join(dir, f)))) return;
  const args = [path.join(repoRoot, 'scripts/make-certs.mjs'), '--out', dir, '--quiet'];
  if (!['bridge', 'viewer', 'intruder'].includes(clientName)) args.push('--client', clientName);
  execFileSync(process.execPath, args, { stdio: ['ignore', 'ignore', 'inherit'] });
}

interface ServerHandle {
  child: ChildProcess;
  tlsPort: number;
  grpcPort: number;
  h2Port: number;
  stop(): Promise<void>;
}

async function startServer(certsDir: string, serverOptions: grpc.ChannelOptions): Promise<ServerHandle> {
  const tsx = import.meta.resolve('tsx');
  const child = spawn(
    process.execPath,
    ['--import', tsx, path.join(here, 'server.ts'), certsDir, JSON.stringify(serverOptions)],
    { cwd: repoRoot, stdio: ['pipe', 'pipe', 'inherit'] },
  );
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const stop = async (): Promise<void> => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      const t = setTimeout(() => child.kill('SIGKILL'), 2000);
      await exited;
      clearTimeout(t);
    }
  };
  try {
    const ports = await new Promise<{ tlsPort: number; grpcPort: number; h2Port: number }>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('ceilings server did not start within 20 s')), 20000);
      const rl = createInterface({ input: child.stdout! });
      rl.once('line', (line) => {
        clearTimeout(timer);
        try {
          resolve(JSON.parse(line) as { tlsPort: number; grpcPort: number; h2Port: number });
        } catch (e) {
          reject(new Error(`bad ceilings server output: ${line}`));
        }
      });
      child.once('exit', (code, sig) => {
        clearTimeout(timer);
        reject(new Error(`ceilings server exited early (code ${code}, signal ${sig})`));
      });
      child.once('error', reject);
    });
    return { child, ...ports, stop };
  } catch (e) {
    await stop();
    throw e;
  }
}

// ---------------------------------------------------------------- raw TLS

function tlsConnect(port: number, certs: CertFiles): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    const sock = tls.connect({ host: '127.0.0.1', port, servername: 'localhost', ...certs }, () => {
      sock.setNoDelay(true);
      resolve(sock);
    });
    sock.once('error', reject);
  });
}

function tlsHeader(mode: 'U' | 'D' | 'N' | 'A', size: number, durationMs: number): Buffer {
  const h = Buffer.alloc(9);
  h.write(mode, 0, 'latin1');
  h.writeUInt32BE(size, 1);
  h.writeUInt32BE(durationMs, 5);
  return h;
}

/** How much work a phase does: for a duration, or a fixed count of writes / messages. */
type Amount = { ms: number } | { count: number };

/** A loop condition for `amount`, started now: call it before each write. */
function until(amount: Amount): () => boolean {
  if ('count' in amount) {
    let left = amount.count;
    return () => left-- > 0;
  }
  const deadline = now() + amount.ms;
  let n = 0;
  // Check the clock every 64 writes: small-message loops would otherwise spend time in performance.now().
  return () => (n++ & 63) !== 0 || now() < deadline;
}

/** client -> server: `size`-byte writes; the bytes the server counted and the ms until it had them all. */
async function tlsUp(port: number, certs: CertFiles, size: number, amount: Amount): Promise<{ bytes: number; ms: number }> {
  const sock = await tlsConnect(port, certs);
  const chunk = Buffer.alloc(size, 0x3c);
  const reply: Buffer[] = [];
  const done = new Promise<void>((resolve, reject) => {
    sock.on('data', (d: Buffer) => reply.push(d));
    sock.once('end', () => resolve());
    sock.once('error', reject);
  });
  sock.write(tlsHeader('U', size, 0));
  const t0 = now();
  for (const more = until(amount); more(); ) {
    if (!sock.write(chunk)) await new Promise((r) => sock.once('drain', r));
  }
  sock.end();
  await done;
  const ms = now() - t0;
  sock.destroy();
  return { bytes: Number(Buffer.concat(reply).readBigUInt64BE(0)), ms };
}

/** server -> client: `size`-byte chunks; the bytes received and the ms until the last. */
async function tlsDown(port: number, certs: CertFiles, size: number, amount: Amount): Promise<{ bytes: number; ms: number }> {
  const sock = await tlsConnect(port, certs);
  let bytes = 0;
  const done = new Promise<void>((resolve, reject) => {
    sock.on('data', (d: Buffer) => {
      bytes += d.length;
    });
    sock.once('end', () => resolve());
    sock.once('error', reject);
  });
  const t0 = now();
  sock.write('count' in amount ? tlsHeader('N', size, amount.count) : tlsHeader('D', size, amount.ms));
  await done;
  const ms = now() - t0;
  sock.end();
  sock.destroy();
  return { bytes, ms };
}

// ---------------------------------------------------------------- gRPC

type ClientDuplex = grpc.ClientDuplexStream<Buffer, Buffer>;
type CeilingsClient = grpc.Client & Record<'Up' | 'Down' | 'Echo' | 'Ask', (options?: grpc.CallOptions) => ClientDuplex>;
const CeilingsClientCtor = grpc.makeGenericClientConstructor(CeilingsService, 'Ceilings') as unknown as new (
  address: string,
  creds: grpc.ChannelCredentials,
  options?: grpc.ChannelOptions,
) => CeilingsClient;

function waitReady(client: grpc.Client): Promise<void> {
  return new Promise((resolve, reject) =>
    client.waitForReady(Date.now() + 10000, (err) => (err ? reject(err) : resolve())),
  );
}

function callDone(call: ClientDuplex): Promise<void> {
  return new Promise((resolve, reject) => {
    call.once('error', reject);
    call.once('status', (s: grpc.StatusObject) => (s.code === grpc.status.OK ? resolve() : reject(new Error(s.details))));
  });
}

/** Client streams `size`-byte messages; bytes and messages as counted by the server, ms until it had them all. */
async function grpcUp(client: CeilingsClient, size: number, amount: Amount): Promise<{ bytes: number; msgs: number; ms: number }> {
  const call = client.Up();
  const replies: Buffer[] = [];
  call.on('data', (b: Buffer) => replies.push(b));
  const done = callDone(call);
  const msg = Buffer.alloc(size, 0x7e);
  const t0 = now();
  for (const more = until(amount); more(); ) {
    if (!call.write(msg)) await new Promise((r) => call.once('drain', r));
  }
  call.end();
  await done;
  const ms = now() - t0;
  const r = Buffer.concat(replies);
  return { bytes: Number(r.readBigUInt64BE(0)), msgs: Number(r.readBigUInt64BE(8)), ms };
}

/** Server streams `size`-byte messages; messages received and ms until the last. */
async function grpcDown(client: CeilingsClient, size: number, amount: Amount): Promise<{ bytes: number; msgs: number; ms: number }> {
  const call = client.Down();
  let bytes = 0;
  let msgs = 0;
  call.on('data', (b: Buffer) => {
    bytes += b.length;
    msgs++;
  });
  const done = callDone(call);
  const ctl = Buffer.alloc('count' in amount ? 12 : 8);
  ctl.writeUInt32BE(size, 0);
  ctl.writeUInt32BE('count' in amount ? 0 : amount.ms, 4);
  if ('count' in amount) ctl.writeUInt32BE(amount.count, 8);
  const t0 = now();
  call.write(ctl);
  call.end();
  await done;
  return { bytes, msgs, ms: now() - t0 };
}

/** Pipelined echo of small messages with at most `window` in flight; returns round trips/s. */
async function grpcEchoRate(client: CeilingsClient, size: number, window: number, durationMs: number): Promise<number> {
  const call = client.Echo();
  const done = callDone(call);
  const msg = Buffer.alloc(size, 0x11);
  let sent = 0;
  let received = 0;
  let t0 = 0;
  let stopping = false;
  const finished = new Promise<void>((resolve) => {
    let blocked = false;
    const pump = (): void => {
      blocked = false;
      while (!stopping && sent - received < window) {
        sent++;
        if (!call.write(msg)) {
          blocked = true;
          call.once('drain', pump);
          return;
        }
      }
    };
    call.on('data', () => {
      received++;
      if ((received & 255) === 0 && now() - t0 >= durationMs) stopping = true;
      if (stopping) {
        if (received === sent) resolve();
      } else if (!blocked) {
        pump();
      }
    });
    t0 = now();
    pump();
  });
  await finished;
  const elapsed = (now() - t0) / 1000;
  call.end();
  await done;
  return received / elapsed;
}

/** `count` ping-pongs of `size` bytes on one bidi stream, one at a time: each round trip in microseconds. */
async function grpcPingPong(client: CeilingsClient, size: number, count: number): Promise<number[]> {
  const call = client.Echo();
  const done = callDone(call);
  const msg = Buffer.alloc(size, 0x22);
  const samples: number[] = [];
  let t = 0;
  await new Promise<void>((resolve) => {
    call.on('data', () => {
      samples.push((now() - t) * 1000);
      if (samples.length >= count) return resolve();
      t = now();
      call.write(msg);
    });
    t = now();
    call.write(msg);
  });
  call.end();
  await done;
  return samples;
}

// ---------------------------------------------------------------- driver

export async function measureCeilings(opts: CeilingsOptions = {}): Promise<Ceilings> {
  const log = opts.log ?? ((line: string) => process.stderr.write(`[ceilings] ${line}\n`));
  const certsDir = path.resolve(opts.certsDir ?? process.env.USBROAM_CERTS_DIR ?? path.join(repoRoot, 'certs/out'));
  const clientName = opts.clientName ?? 'bridge';
  const durationMs = opts.durationMs ?? 2000;
  const chunk = opts.chunkSize ?? 64 * 1024;
  const small = opts.smallMsgSize ?? 100;
  const window = opts.smallMsgWindow ?? 256;
  const pingSize = opts.pingSize ?? 64;
  const rttCount = opts.rttCount ?? 5000;
  const rttWarmup = opts.rttWarmup ?? 500;
  const skip = opts.skip ?? {};
  const channelOptions = { ...CEILINGS_GRPC_CHANNEL_OPTIONS, ...opts.grpcChannelOptions };
  const serverOptions = { ...CEILINGS_GRPC_SERVER_OPTIONS, ...opts.grpcServerOptions };

  ensureCerts(certsDir, clientName);
  const certs = loadCerts(certsDir, clientName);
  const res: Ceilings = {
    raw_tls_MBps: NaN,
    raw_tls_up_MBps: NaN,
    raw_tls_down_MBps: NaN,
    grpc_raw_MBps: NaN,
    grpc_raw_up_MBps: NaN,
    grpc_raw_down_MBps: NaN,
    grpc_msgs_per_s: NaN,
    grpc_echo_msgs_per_s: NaN,
    grpc_rtt_p50_us: NaN,
    grpc_rtt_p99_us: NaN,
  };

  log(`starting server (certs ${certsDir}, client identity ${clientName})`);
  const server = await startServer(certsDir, serverOptions);
  let client: CeilingsClient | undefined;
  try {
    if (!skip.tls) {
      // Short warm-up so the first measured phase does not pay for JIT and TLS session setup.
      await tlsUp(server.tlsPort, certs, chunk, { ms: 150 });
      res.raw_tls_up_MBps = round(rate(await tlsUp(server.tlsPort, certs, chunk, { ms: durationMs })));
      log(`raw tls up   ${res.raw_tls_up_MBps} MB/s (${chunk} B writes, ${durationMs} ms)`);
      res.raw_tls_down_MBps = round(rate(await tlsDown(server.tlsPort, certs, chunk, { ms: durationMs })));
      log(`raw tls down ${res.raw_tls_down_MBps} MB/s`);
      res.raw_tls_MBps = Math.min(res.raw_tls_up_MBps, res.raw_tls_down_MBps);
    }

    const creds = grpc.credentials.createSsl(certs.ca, certs.key, certs.cert);
    client = new CeilingsClientCtor(`127.0.0.1:${server.grpcPort}`, creds, channelOptions);
    await waitReady(client);
    log(`grpc channel options ${JSON.stringify(channelOptions)}`);
    log(`grpc server options  ${JSON.stringify(serverOptions)}`);

    if (!skip.grpcBulk) {
      await grpcUp(client, chunk, { ms: 150 });
      res.grpc_raw_up_MBps = round(rate(await grpcUp(client, chunk, { ms: durationMs })));
      log(`grpc up      ${res.grpc_raw_up_MBps} MB/s (${chunk} B messages)`);
      await grpcDown(client, chunk, { ms: 150 });
      res.grpc_raw_down_MBps = round(rate(await grpcDown(client, chunk, { ms: durationMs })));
      log(`grpc down    ${res.grpc_raw_down_MBps} MB/s`);
      res.grpc_raw_MBps = Math.min(res.grpc_raw_up_MBps, res.grpc_raw_down_MBps);
    }
    if (!skip.grpcMsgs) {
      await grpcUp(client, small, { ms: 150 });
      const up = await grpcUp(client, small, { ms: durationMs });
      res.grpc_msgs_per_s = Math.round(up.msgs / (up.ms / 1000));
      log(`grpc msgs    ${res.grpc_msgs_per_s} msgs/s (${small} B, pipelined client->server)`);
      const echoMs = Math.min(durationMs, 1000);
      res.grpc_echo_msgs_per_s = Math.round(await grpcEchoRate(client, small, window, echoMs));
      log(`grpc echo    ${res.grpc_echo_msgs_per_s} round trips/s (${small} B, <= ${window} in flight, ${echoMs} ms)`);
    }
    if (!skip.grpcRtt) {
      const sorted = (await grpcPingPong(client, pingSize, rttWarmup + rttCount)).slice(rttWarmup).sort((a, b) => a - b);
      const pct = (p: number): number => sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
      const [p50, p99] = [pct(50), pct(99)];
      res.grpc_rtt_p50_us = round(p50!);
      res.grpc_rtt_p99_us = round(p99!);
      log(`grpc rtt     p50 ${res.grpc_rtt_p50_us} us, p99 ${res.grpc_rtt_p99_us} us (${pingSize} B, ${rttCount} round trips)`);
    }
  } finally {
    client?.close();
    await server.stop();
  }
  return res;
}

// ---------------------------------------------------------------- fixed amounts of work

/**
 * The ceilings server kept running for interleaved rounds: every phase does a fixed amount of
 * work (bytes, messages, round trips), so its CPU cost can be compared with the URB channel
 * doing the same. `pid` is the server process (for /proc/PID/stat); the client side runs in this
 * process.
 */
export interface CeilingsPeer {
  pid: number;
  /** client -> server over raw mutual TLS, `count` writes of `size` bytes; ms until the server counted them all. */
  tlsUp(size: number, count: number): Promise<number>;
  /** server -> client over raw mutual TLS, `count` chunks of `size` bytes; ms until the last arrived. */
  tlsDown(size: number, count: number): Promise<number>;
  /** client -> server on a grpc-js bidi stream of Buffers; ms until the server counted them all. */
  grpcUp(size: number, count: number): Promise<number>;
  /** server -> client on a grpc-js bidi stream; ms until the last arrived. */
  grpcDown(size: number, count: number): Promise<number>;
  /** `count` ping-pongs of `size` bytes on one grpc-js bidi stream, one at a time: each round trip in microseconds. */
  grpcPingPong(size: number, count: number): Promise<number[]>;
  /** One grpc-js bidi stream of Ask round trips (several may be outstanding; answered in order). */
  asker(): Asker;
  /** The same over a raw mutual-TLS connection of its own. */
  tlsAsker(): Promise<Asker>;
  /** The same on one raw node:http2 stream (mutual TLS, no grpc-js) of a session of its own. */
  h2Asker(): Promise<Asker>;
  close(): Promise<void>;
}

/** Round trips on one Ask stream: `up` bytes to the server, `down` bytes back. */
export interface Asker {
  ask(up: number, down: number): Promise<void>;
  close(): void;
}

/** Replies counted off a byte stream: each ask waits for its `down` bytes, in order. */
function byteAsker(write: (b: Buffer) => void, close: () => void): { asker: Asker; onData: (d: Buffer) => void; fail: (e: Error) => void } {
  const waiting: { resolve: () => void; reject: (e: Error) => void; left: number }[] = [];
  let failed: Error | undefined;
  const fail = (e: Error) => {
    failed ??= e;
    for (const w of waiting.splice(0)) w.reject(failed);
  };
  const onData = (d: Buffer) => {
    let n = d.length;
    while (n > 0) {
      const w = waiting[0];
      if (!w) return fail(new Error('ask: bytes nobody asked for'));
      const k = Math.min(n, w.left);
      w.left -= k;
      n -= k;
      while (waiting.length && waiting[0]!.left === 0) waiting.shift()!.resolve();
    }
  };
  const asker: Asker = {
    ask(up, down) {
      if (failed) return Promise.reject(failed);
      if (down < 1) return Promise.reject(new Error('ask: a round trip needs at least one byte back'));
      const msg = Buffer.allocUnsafe(8 + up);
      msg.writeUInt32BE(up, 0);
      msg.writeUInt32BE(down, 4);
      return new Promise<void>((resolve, reject) => {
        waiting.push({ resolve, reject, left: down });
        write(msg);
      });
    },
    close,
  };
  return { asker, onData, fail };
}

async function openH2Asker(port: number, certs: CertFiles): Promise<Asker> {
  const session = http2.connect(`https://localhost:${port}`, { ...certs, settings: { initialWindowSize: 16 * 1024 * 1024 } });
  await new Promise<void>((resolve, reject) => {
    session.once('connect', () => resolve());
    session.once('error', reject);
  });
  session.setLocalWindowSize(16 * 1024 * 1024);
  const stream = session.request({ ':method': 'POST', ':path': '/ask' }, { endStream: false });
  const b = byteAsker(
    (m) => stream.write(m),
    () => {
      stream.close();
      session.close();
    },
  );
  stream.on('data', b.onData);
  stream.on('error', (e: Error) => b.fail(e));
  stream.on('close', () => b.fail(new Error('h2 ask stream closed')));
  session.on('error', (e: Error) => b.fail(e));
  return b.asker;
}

async function openTlsAsker(port: number, certs: CertFiles): Promise<Asker> {
  const sock = await tlsConnect(port, certs);
  const b = byteAsker(
    (m) => sock.write(m),
    () => sock.destroy(),
  );
  sock.on('data', b.onData);
  sock.on('error', (e: Error) => b.fail(e));
  sock.on('close', () => b.fail(new Error('tls ask connection closed')));
  sock.write(tlsHeader('A', 0, 0));
  return b.asker;
}

function openAsker(client: CeilingsClient): Asker {
  const call = client.Ask();
  const waiting: { resolve: () => void; reject: (e: Error) => void; down: number }[] = [];
  let failed: Error | undefined;
  const fail = (e: Error) => {
    failed ??= e;
    for (const w of waiting.splice(0)) w.reject(failed);
  };
  call.on('data', (m: Buffer) => {
    const w = waiting.shift();
    if (!w) return fail(new Error('Ask: a reply nobody asked for'));
    if (m.length !== w.down) return fail(new Error(`Ask: ${m.length} bytes back, ${w.down} asked`));
    w.resolve();
  });
  call.on('error', (e: Error) => fail(e));
  call.on('end', () => fail(new Error('Ask stream ended')));
  return {
    ask(up, down) {
      if (failed) return Promise.reject(failed);
      // A buffer of its own: grpc-js may hold a message until the stream is up.
      const msg = Buffer.allocUnsafe(Math.max(4, up));
      msg.writeUInt32BE(down, 0);
      return new Promise<void>((resolve, reject) => {
        waiting.push({ resolve, reject, down });
        call.write(msg);
      });
    },
    close() {
      call.end();
    },
  };
}

export async function startCeilingsPeer(opts: { certsDir?: string; clientName?: string; grpcChannelOptions?: grpc.ChannelOptions; grpcServerOptions?: grpc.ChannelOptions } = {}): Promise<CeilingsPeer> {
  const certsDir = path.resolve(opts.certsDir ?? process.env.USBROAM_CERTS_DIR ?? path.join(repoRoot, 'certs/out'));
  const clientName = opts.clientName ?? 'bridge';
  ensureCerts(certsDir, clientName);
  const certs = loadCerts(certsDir, clientName);
  const server = await startServer(certsDir, { ...CEILINGS_GRPC_SERVER_OPTIONS, ...opts.grpcServerOptions });
  const creds = grpc.credentials.createSsl(certs.ca, certs.key, certs.cert);
  const client = new CeilingsClientCtor(`127.0.0.1:${server.grpcPort}`, creds, { ...CEILINGS_GRPC_CHANNEL_OPTIONS, ...opts.grpcChannelOptions });
  try {
    await waitReady(client);
  } catch (e) {
    client.close();
    await server.stop();
    throw e;
  }
  return {
    pid: server.child.pid!,
    async tlsUp(size, count) {
      const r = await tlsUp(server.tlsPort, certs, size, { count });
      if (r.bytes !== size * count) throw new Error(`raw TLS up: the server counted ${r.bytes} of ${size * count} bytes`);
      return r.ms;
    },
    async tlsDown(size, count) {
      const r = await tlsDown(server.tlsPort, certs, size, { count });
      if (r.bytes !== size * count) throw new Error(`raw TLS down: ${r.bytes} of ${size * count} bytes`);
      return r.ms;
    },
    async grpcUp(size, count) {
      const r = await grpcUp(client, size, { count });
      if (r.msgs !== count) throw new Error(`grpc up: the server counted ${r.msgs} of ${count} messages`);
      return r.ms;
    },
    async grpcDown(size, count) {
      const r = await grpcDown(client, size, { count });
      if (r.msgs !== count) throw new Error(`grpc down: ${r.msgs} of ${count} messages`);
      return r.ms;
    },
    grpcPingPong: (size, count) => grpcPingPong(client, size, count),
    asker: () => openAsker(client),
    tlsAsker: () => openTlsAsker(server.tlsPort, certs),
    h2Asker: () => openH2Asker(server.h2Port, certs),
    async close() {
      client.close();
      await server.stop();
    },
  };
}
