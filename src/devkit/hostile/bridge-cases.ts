// Hostile input on the bridge: its control API (random and mutated requests, streams abandoned,
// process descriptors and memory before and after) and a misbehaving "QEMU" that sends random
// or mutated usbredir over a real unix socket. The attachment must close with a logged reason
// (or go on serving); the bridge's other attachments must not notice.
import fc from 'fast-check';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Attachment, type AttachmentCloseInfo } from '../../client/bridge/attachment.js';
import { Bridge } from '../../client/bridge/bridge.js';
import { BridgeControlServer } from '../../client/bridge-control/server.js';
import { UsbHostClient } from '../../client/sdk/client.js';
import type { Logger } from '../../common/log.js';
import { UsbredirParser, type Packet } from '../../qemu/usbredir/index.js';
import { abandonStreams, grpcFrame, processUsage, targetOf } from './abandon.js';
import { bridgeControlMethods } from './methods.js';
import { rawClient } from './raw-calls.js';
import type { Outcome } from './server-cases.js';
import { fuzzMethods, newWireTally, oversizedCase } from './wire-fuzz.js';

export interface BridgeCaseOptions {
  /** A USB host server (mutual TLS) for the bridge's sessions. */
  server: { address: string; tls: { ca: string; cert: string; key: string } };
  log: Logger;
}

/** The control API on a unix socket: random and mutated requests, an oversized one, `abandon` abandoned streams. */
export async function controlApiCase(opts: BridgeCaseOptions, runsPerMethod: number, abandon: number, seed?: number): Promise<Outcome> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'usbroam-hostile-ctl-'));
  const bridge = new Bridge({ log: opts.log, runDir: path.join(dir, 'run') });
  const control = new BridgeControlServer({ bridge, listen: path.join(dir, 'control.sock'), servers: { address: opts.server.address, ...opts.server.tls }, log: opts.log });
  control.addVm('vm1', path.join(dir, 'no-qemu-here.qmp'));
  const address = await control.start();
  const client = rawClient(address);
  const tally = newWireTally();
  try {
    // A request for vm1 waits up to the bridge's QMP connect timeout (10 s: no QEMU listens
    // there) before its answer; a deadline of the same 10 s raced it on a busy machine.
    await fuzzMethods(client, bridgeControlMethods(), runsPerMethod, tally, { seed, deadlineMs: 25_000 });
    await oversizedCase(client, '/usbroam.v1.Bridge/ListAttachments', 5 * 1024 * 1024, tally);
    const bodies = [undefined, grpcFrame(Uint8Array.of(0x0a, 0x03, 0x76, 0x6d, 0x31)), grpcFrame(Uint8Array.of(0x0a), 1000), grpcFrame(Uint8Array.of(0xff, 0xff))];
    const t = targetOf(address);
    await abandonStreams(t, '/usbroam.v1.Bridge/ListAttachments', Math.max(50, Math.floor(abandon / 10)), bodies);
    await new Promise((r) => setTimeout(r, 200));
    const before = { ...processUsage(), handles: process.getActiveResourcesInfo().length };
    const a = await abandonStreams(t, '/usbroam.v1.Bridge/ListAttachments', abandon, bodies);
    const end = Date.now() + 5000;
    let after = { ...processUsage(), handles: process.getActiveResourcesInfo().length };
    while ((after.fds > before.fds || after.handles > before.handles) && Date.now() < end) {
      await new Promise((r) => setTimeout(r, 100));
      after = { ...processUsage(), handles: process.getActiveResourcesInfo().length };
    }
    const attachments = bridge.list().length;
    const fdDelta = after.fds - before.fds;
    const handleDelta = after.handles - before.handles;
    const ok = tally.internal_count === 0 && tally.violations.length === 0 && attachments === 0 && fdDelta <= 2 && handleDelta <= 2;
    return {
      ok,
      detail: `${tally.cases} requests (${tally.undecodable} undecodable, ${tally.skipped} skipped: would dial off this host), ${a.streams} streams abandoned; fd ${before.fds} -> ${after.fds}, handles ${before.handles} -> ${after.handles}, RSS ${before.rss_kib} -> ${after.rss_kib} KiB; ${attachments} attachments left${tally.violations.length ? `; ${tally.violations.join(' | ')}` : ''}`,
      cases: tally.cases + a.streams,
      requests: tally.cases,
      undecodable: tally.undecodable,
      statuses: tally.statuses,
      internal_count: tally.internal_count,
      abandoned_streams: a.streams,
      fd_delta: fdDelta,
      handle_delta: handleDelta,
      rss_delta_kib: after.rss_kib - before.rss_kib,
      violations: tally.violations,
    };
  } finally {
    client.close();
    await control.stop('hostile case over');
    rmSync(dir, { recursive: true, force: true });
  }
}

/** A connected pair of unix sockets in a fresh directory: [bridge side, QEMU side]. */
async function unixPair(): Promise<{ bridge: net.Socket; qemu: net.Socket; cleanup: () => void }> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'usbroam-hostile-redir-'));
  const sock = path.join(dir, 'redir.sock');
  const server = net.createServer();
  await new Promise<void>((r) => server.listen(sock, r));
  const accepted = new Promise<net.Socket>((r) => server.once('connection', r));
  const bridge = net.connect(sock);
  await new Promise<void>((r, j) => bridge.once('connect', r).once('error', j));
  const qemu = await accepted;
  server.close();
  qemu.on('error', () => {});
  bridge.on('error', () => {});
  return { bridge, qemu, cleanup: () => (bridge.destroy(), qemu.destroy(), rmSync(dir, { recursive: true, force: true })) };
}

/** usbredir's side of QEMU on a socket: hello, then what the case sends; packets from the bridge decoded. */
class RedirPeer {
  readonly parser = new UsbredirParser({ role: 'host', version: 'hostile qemu' });
  readonly packets: Packet[] = [];
  closed = false;
  constructor(readonly socket: net.Socket) {
    socket.on('data', (b: Buffer) => {
      try {
        this.packets.push(...this.parser.push(b));
      } catch {
        /* the bridge's bytes are not under test here */
      }
    });
    socket.on('close', () => (this.closed = true));
  }
  send(p: Packet): void {
    this.socket.write(this.parser.encode(p));
  }
  async until<T>(what: string, f: () => T | undefined, ms = 10_000): Promise<T> {
    const end = Date.now() + ms;
    for (;;) {
      const v = f();
      if (v) return v;
      if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
      await new Promise((r) => setTimeout(r, 5));
    }
  }
  /** A GET_DESCRIPTOR(device) answered with 18 bytes: the attachment serves. */
  async probe(id: bigint, ms = 10_000): Promise<boolean> {
    this.send({ type: 'control_packet', id, endpoint: 0x80, request: 6, requesttype: 0x80, status: 0, value: 0x100, index: 0, length: 18, data: new Uint8Array(0) });
    const p = await this.until('a control answer', () => this.packets.find((x) => x.type === 'control_packet' && x.id === id), ms).catch(() => undefined);
    return p?.type === 'control_packet' && p.data.length === 18;
  }
}

async function attach(client: UsbHostClient, serial: string, log: Logger) {
  const dev = await client.openDevice({ serial });
  const pair = await unixPair();
  const att = new Attachment({ device: dev, socket: pair.bridge, log: log.child({ vm: 'hostile-vm', device: dev.device.id }) }).start();
  const closed = new Promise<AttachmentCloseInfo>((r) => att.once('closed', r));
  const peer = new RedirPeer(pair.qemu);
  peer.send(peer.parser.helloPacket());
  await peer.until('device_connect', () => peer.packets.find((p) => p.type === 'device_connect'));
  return { dev, att, peer, closed, cleanup: pair.cleanup };
}

/**
 * `cases` attachments of `serial`, each fed random bytes or a valid packet stream with bytes
 * mutated, after a correct hello. Each must close with a reason (logged by the attachment) or
 * still answer a control transfer; a bystander attachment of `bystanderSerial` answers one
 * after every case.
 */
export async function usbredirCase(opts: BridgeCaseOptions, cases: number, serial: string, bystanderSerial: string, seed?: number): Promise<Outcome> {
  const client = new UsbHostClient({ address: opts.server.address.replace('127.0.0.1', 'localhost'), ...opts.server.tls });
  const bystander = await attach(client, bystanderSerial, opts.log);
  const reasons: Record<string, number> = {};
  let closedCount = 0;
  let served = 0;
  let bystanderOk = 0;
  let nextId = 1n;
  const failures: string[] = [];
  // A valid packet stream, encoded by the case's own peer (its header layout is the one negotiated with the bridge).
  const valid = (p: UsbredirParser, id: bigint): Uint8Array =>
    Buffer.concat([
      p.encode({ type: 'control_packet', id, endpoint: 0x80, request: 6, requesttype: 0x80, status: 0, value: 0x100, index: 0, length: 18, data: new Uint8Array(0) }),
      p.encode({ type: 'set_configuration', id: id + 1n, configuration: 1 }),
      p.encode({ type: 'bulk_packet', id: id + 2n, endpoint: 0x01, status: 0, length: 4, streamId: 0, data: Uint8Array.of(1, 2, 3, 4) }),
      p.encode({ type: 'cancel_data_packet', id: 999_999n }),
    ]);
  const inputs = fc.sample(
    fc.oneof(
      fc.uint8Array({ minLength: 1, maxLength: 2048 }).map((bytes) => ({ bytes, edits: [] as [number, number][] })),
      fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 8 }).map((edits) => ({ bytes: undefined, edits })),
    ),
    { numRuns: cases, seed },
  );
  try {
    for (const input of inputs) {
      const a = await attach(client, serial, opts.log);
      let bytes = input.bytes;
      if (!bytes) {
        bytes = Uint8Array.from(valid(a.peer.parser, 0x100n));
        for (const [at, v] of input.edits) bytes[at % bytes.length] = v;
      }
      a.peer.socket.write(bytes);
      const id = 0x10000n + nextId++ * 0x10n;
      const outcome = await Promise.race([a.closed, a.peer.probe(id, 3000)]);
      if (typeof outcome === 'object') {
        closedCount++;
        const key = outcome.reason.replace(/:.*/, '');
        reasons[key] = (reasons[key] ?? 0) + 1;
        if (!outcome.reason) failures.push('closed without a reason');
      } else if (outcome) served++;
      else {
        // Neither closed nor serving: a stuck attachment unless it closes now.
        const late = await Promise.race([a.closed, new Promise<undefined>((r) => setTimeout(r, 3000, undefined))]);
        if (late) {
          closedCount++;
          const key = late.reason.replace(/:.*/, '');
          reasons[key] = (reasons[key] ?? 0) + 1;
        } else failures.push(`attachment neither closed nor served after ${Buffer.from(bytes).toString('hex').slice(0, 48)}`);
      }
      await a.att.close('case over');
      a.cleanup();
      if (await bystander.peer.probe(0x1000000n + nextId++)) bystanderOk++;
      else failures.push('bystander attachment did not answer');
    }
  } finally {
    await bystander.att.close('case over');
    bystander.cleanup();
    client.close();
  }
  const ok = failures.length === 0 && bystanderOk === inputs.length;
  return {
    ok,
    detail: `${inputs.length} hostile usbredir streams: ${closedCount} attachments closed (${JSON.stringify(reasons)}), ${served} still served; bystander answered ${bystanderOk}/${inputs.length}${failures.length ? `; ${failures.slice(0, 5).join(' | ')}` : ''}`,
    cases: inputs.length,
    closed: closedCount,
    served,
    reasons,
    bystander_answers: bystanderOk,
    internal_count: 0,
  };
}
