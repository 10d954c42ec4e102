// Exact queue lengths of the bridge's AF_UNIX stream socket to QEMU (live-migration hand-off).
//
// On AF_UNIX, SIOCOUTQ on the sender counts skb truesize (an upper bound, not bytes). The exact
// count of bytes the peer has not read is the PEER's receive queue: sock_diag UNIX_DIAG_RQLEN,
// which `ss -x` prints as Recv-Q for an established socket. We match the two ends by inode: our
// end's inode from /proc/self/fd/<fd> -> `socket:[N]`; ss prints each socket's inode and its
// peer's. One `ss -xnH` run took 5-14 ms here (a few dozen unix sockets), up to 150 ms on a
// loaded machine: at a migration switchover that is downtime. So we ask sock_diag directly
// (netlink through koffi, an exact lookup by inode: tens of microseconds) and use `ss` only if
// that is not available.
import { execFile } from 'node:child_process';
import { readlinkSync } from 'node:fs';
import { createRequire } from 'node:module';
import type { Socket } from 'node:net';

export interface UnixQueues {
  /** Our socket's inode. */
  inode: number;
  /** Its peer's inode. */
  peerInode: number;
  /** Bytes the peer wrote that we have not read (our Recv-Q). */
  ourRecvQ: number;
  /** Bytes we wrote that the peer has not read (the peer's Recv-Q): exact. */
  peerRecvQ: number;
  /** How long the measurement took (ms). */
  tookMs: number;
}

/** The file descriptor of a connected net.Socket (libuv pipe handle). */
export function socketFd(socket: Socket): number {
  const h = (socket as unknown as { _handle?: { fd?: number } })._handle;
  const fd = h?.fd;
  if (typeof fd !== 'number' || fd < 0) throw new Error('socket has no file descriptor');
  return fd;
}

/** The inode of a socket fd of this process. */
export function socketInode(socket: Socket): number {
  const link = readlinkSync(`/proc/self/fd/${socketFd(socket)}`);
  const m = /^socket:\[(\d+)\]$/.exec(link);
  if (!m) throw new Error(`fd is not a socket: ${link}`);
  return Number(m[1]);
}

export interface SsLine {
  state: string;
  recvQ: number;
  sendQ: number;
  local: string;
  inode: number;
  peerInode: number;
}

/** Parse `ss -xnH` output (u_str lines only). */
export function parseSsUnix(out: string): SsLine[] {
  const res: SsLine[] = [];
  for (const line of out.split('\n')) {
    const f = line.trim().split(/\s+/);
    // Netid State Recv-Q Send-Q Local Inode Peer PeerInode
    if (f.length < 8 || f[0] !== 'u_str') continue;
    const n = f.length;
    res.push({ state: f[1]!, recvQ: Number(f[2]), sendQ: Number(f[3]), local: f.slice(4, n - 3).join(' '), inode: Number(f[n - 3]), peerInode: Number(f[n - 1]) });
  }
  return res;
}

function runSs(args: string[], timeoutMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile('ss', args, { timeout: timeoutMs, maxBuffer: 64 * 1024 * 1024 }, (err, stdout) => (err ? reject(new Error(`ss ${args.join(' ')} failed: ${err.message}`)) : resolve(stdout)));
  });
}

// ---- sock_diag over netlink (linux/sock_diag.h, linux/unix_diag.h) ----
const AF_NETLINK = 16;
const AF_UNIX = 1;
const SOCK_DGRAM = 2;
const SOCK_CLOEXEC = 0o2000000;
const NETLINK_SOCK_DIAG = 4;
const SOCK_DIAG_BY_FAMILY = 20;
const NLM_F_REQUEST = 1;
const NLMSG_ERROR = 2;
const MSG_DONTWAIT = 0x40;
const UDIAG_SHOW_PEER = 0x04;
const UDIAG_SHOW_RQLEN = 0x10;
const UNIX_DIAG_PEER = 2;
const UNIX_DIAG_RQLEN = 4;

interface Diag {
  fd: number;
  send: (fd: number, buf: Buffer, len: number, flags: number) => number;
  recv: (fd: number, buf: Buffer, len: number, flags: number) => number;
}
let diag: Diag | null | undefined;
let diagSeq = 0;

function diagSocket(): Diag | null {
  if (diag !== undefined) return diag;
  try {
    const require = createRequire(import.meta.url);
    const koffi = require('koffi') as typeof import('koffi');
    const libc = koffi.load('libc.so.6');
    const socketFn = libc.func('int socket(int, int, int)') as (a: number, b: number, c: number) => number;
    const send = libc.func('long send(int, void *, unsigned long, int)') as Diag['send'];
    const recv = libc.func('long recv(int, _Out_ void *, unsigned long, int)') as Diag['recv'];
    const fd = socketFn(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
    diag = fd >= 0 ? { fd, send, recv } : null;
  } catch {
    diag = null;
  }
  return diag;
}

/** Load koffi and open the sock_diag socket now (not in a migration's downtime). */
export function warmUpUnixQueues(): void {
  diagSocket();
}

/** sock_diag for one unix socket by inode: its receive queue (bytes) and its peer's inode. */
function diagUnix(d: Diag, inode: number): { rqueue: number; peerInode: number } {
  const req = Buffer.alloc(40);
  const seq = ++diagSeq;
  req.writeUInt32LE(40, 0); // nlmsg_len
  req.writeUInt16LE(SOCK_DIAG_BY_FAMILY, 4);
  req.writeUInt16LE(NLM_F_REQUEST, 6); // no NLM_F_DUMP: unix_diag_get_exact
  req.writeUInt32LE(seq, 8);
  req.writeUInt32LE(0, 12);
  req.writeUInt8(AF_UNIX, 16); // sdiag_family
  req.writeUInt32LE(0xffffffff, 20); // udiag_states
  req.writeUInt32LE(inode >>> 0, 24); // udiag_ino
  req.writeUInt32LE(UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN, 28);
  req.writeUInt32LE(0xffffffff, 32); // udiag_cookie: INET_DIAG_NOCOOKIE
  req.writeUInt32LE(0xffffffff, 36);
  if (Number(d.send(d.fd, req, 40, 0)) !== 40) throw new Error('sock_diag send failed');
  const buf = Buffer.alloc(8192);
  for (;;) {
    const n = Number(d.recv(d.fd, buf, buf.length, MSG_DONTWAIT));
    if (n < 16) throw new Error('sock_diag: no answer');
    const len = buf.readUInt32LE(0);
    const type = buf.readUInt16LE(4);
    if (buf.readUInt32LE(8) !== seq) continue; // a stale answer
    if (type === NLMSG_ERROR) throw new Error(`sock_diag error ${buf.readInt32LE(16)}`);
    if (type !== SOCK_DIAG_BY_FAMILY || buf.readUInt32LE(16 + 4) !== inode >>> 0) throw new Error('sock_diag: unexpected answer');
    let rqueue = -1;
    let peerInode = -1;
    for (let o = 32; o + 4 <= Math.min(len, n); ) {
      const alen = buf.readUInt16LE(o);
      const atype = buf.readUInt16LE(o + 2);
      if (alen < 4) break;
      if (atype === UNIX_DIAG_PEER) peerInode = buf.readUInt32LE(o + 4);
      else if (atype === UNIX_DIAG_RQLEN) rqueue = buf.readUInt32LE(o + 4);
      o += (alen + 3) & ~3;
    }
    if (rqueue < 0) throw new Error('sock_diag: no UNIX_DIAG_RQLEN');
    return { rqueue, peerInode };
  }
}

/** unixQueues through sock_diag; undefined when netlink/koffi is not available. */
export function unixQueuesNetlink(socket: Socket): UnixQueues | undefined {
  const d = diagSocket();
  if (!d) return undefined;
  const t0 = performance.now();
  const inode = socketInode(socket);
  const ours = diagUnix(d, inode);
  if (ours.peerInode <= 0) throw new Error(`socket inode ${inode} has no peer`);
  const peer = diagUnix(d, ours.peerInode);
  return { inode, peerInode: ours.peerInode, ourRecvQ: ours.rqueue, peerRecvQ: peer.rqueue, tookMs: performance.now() - t0 };
}

/**
 * Both ends' receive queues of a connected unix stream socket of ours: sock_diag, or `ss`
 * (useSs, or when sock_diag is not available).
 */
export async function unixQueues(socket: Socket, opts: { timeoutMs?: number; useSs?: boolean } = {}): Promise<UnixQueues> {
  if (!opts.useSs) {
    try {
      const q = unixQueuesNetlink(socket);
      if (q) return q;
    } catch {
      /* fall back to ss */
    }
  }
  return unixQueuesSs(socket, opts);
}

/** unixQueues through `ss -xnH`. */
export async function unixQueuesSs(socket: Socket, opts: { timeoutMs?: number } = {}): Promise<UnixQueues> {
  const t0 = performance.now();
  const inode = socketInode(socket);
  const out = await runSs(['-xnH'], opts.timeoutMs ?? 2000);
  const lines = parseSsUnix(out);
  const ours = lines.find((l) => l.inode === inode);
  if (!ours) throw new Error(`socket inode ${inode} not found by ss`);
  const peer = lines.find((l) => l.inode === ours.peerInode) ?? lines.find((l) => l.peerInode === inode);
  if (!peer) throw new Error(`peer of socket inode ${inode} (inode ${ours.peerInode}) not found by ss`);
  return { inode, peerInode: peer.inode, ourRecvQ: ours.recvQ, peerRecvQ: peer.recvQ, tookMs: performance.now() - t0 };
}

/**
 * Bytes handed to the socket that libuv has not written into the kernel yet: Node's buffered
 * chunks plus the unwritten rest of the write in progress (libuv's write queue size). Node's
 * writableLength counts the whole write in progress even when part of it reached the kernel.
 */
export function notInKernel(socket: Socket): number {
  const ws = (socket as unknown as { _writableState?: { writing?: boolean; writelen?: number } })._writableState;
  const inProgress = ws?.writing ? ws.writelen ?? 0 : 0;
  const h = (socket as unknown as { _handle?: { writeQueueSize?: number } })._handle;
  return socket.writableLength - inProgress + (h?.writeQueueSize ?? 0);
}

/**
 * The bytes we wrote that the peer has not read yet, exactly: the peer's Recv-Q plus what has
 * not reached the kernel (notInKernel). Measured until the Node side did not change during the
 * ss run (libuv may move bytes into the kernel meanwhile; the sum stays, the split does not).
 * Also our own unread input: our Recv-Q plus Node's readable buffer.
 */
export async function unreadByPeer(
  socket: Socket,
  opts: { timeoutMs?: number; attempts?: number; useSs?: boolean } = {},
): Promise<UnixQueues & { nodeBuffered: number; unread: number; ourUnread: number }> {
  const attempts = opts.attempts ?? 5;
  for (let i = 0; i < attempts; i++) {
    const w0 = notInKernel(socket);
    const q = await unixQueues(socket, opts);
    const w1 = notInKernel(socket);
    if (w0 === w1) return { ...q, nodeBuffered: w1, unread: q.peerRecvQ + w1, ourUnread: q.ourRecvQ + socket.readableLength };
  }
  throw new Error('the unread byte count of the socket did not settle');
}
