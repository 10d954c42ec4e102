// Exact queue lengths of the bridge's AF_UNIX stream socket to QEMU (live-migration hand-off).
//
// On AF_UNIX, SIOCOUTQ on the sender counts skb truesize (an upper bound, not bytes). The exact
// count of bytes the peer has not read is the PEER's receive queue: sock_diag UNIX_DIAG_RQLEN,
// which `ss -x` prints as Recv-Q for an established socket. We match the two ends by inode: our
// end's inode from /proc/self/fd/<fd> -> `socket:[N]`; ss prints each socket's inode and its
// peer's. One `ss -xnH` run took 5-14 ms here (a few dozen unix sockets).
import { execFile } from 'node:child_process';
import { readlinkSync } from 'node:fs';
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

/**
 * Both ends' receive queues of a connected unix stream socket of ours. `peerPath`, when
 * given, narrows the listing (the peer is the listening side bound to that path) but then our
 * own Recv-Q is not known (reported as -1).
 */
export async function unixQueues(socket: Socket, opts: { timeoutMs?: number } = {}): Promise<UnixQueues> {
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
export async function unreadByPeer(socket: Socket, opts: { timeoutMs?: number; attempts?: number } = {}): Promise<UnixQueues & { nodeBuffered: number; unread: number; ourUnread: number }> {
  const attempts = opts.attempts ?? 5;
  for (let i = 0; i < attempts; i++) {
    const w0 = notInKernel(socket);
    const q = await unixQueues(socket, opts);
    const w1 = notInKernel(socket);
    if (w0 === w1) return { ...q, nodeBuffered: w1, unread: q.peerRecvQ + w1, ourUnread: q.ourRecvQ + socket.readableLength };
  }
  throw new Error('the unread byte count of the socket did not settle');
}
