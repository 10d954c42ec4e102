// Exact unread-byte counts on an AF_UNIX stream socket (for the live-migration hand-off).
import { expect } from 'chai';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { parseSsUnix, socketInode, unixQueues, unixQueuesNetlink, unixQueuesSs, unreadByPeer } from '../../src/client/bridge/handoff/unix-socket-queue.js';

describe('bridge: unix socket queue lengths', () => {
  let dir: string;
  let server: net.Server;
  let peer: net.Socket;
  let ours: net.Socket;

  beforeEach(async () => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'usq-'));
    const p = path.join(dir, 's.sock');
    // A peer that never reads (like QEMU while the VM is stopped).
    const accepted = new Promise<net.Socket>((resolve) => {
      server = net.createServer({ pauseOnConnect: true }, resolve);
    });
    await new Promise<void>((r) => server.listen(p, r));
    ours = net.connect(p);
    await new Promise((r) => ours.once('connect', r));
    peer = await accepted;
  });
  afterEach(() => {
    ours.destroy();
    peer.destroy();
    server.close();
    rmSync(dir, { recursive: true, force: true });
  });

  it('parses ss -xnH lines', () => {
    const l = parseSsUnix('u_str ESTAB 1000   2304   /tmp/s s.sock 45761 * 45760\nu_str ESTAB 0 0 * 1 * 2\nnl x\n');
    expect(l).to.deep.equal([
      { state: 'ESTAB', recvQ: 1000, sendQ: 2304, local: '/tmp/s s.sock', inode: 45761, peerInode: 45760 },
      { state: 'ESTAB', recvQ: 0, sendQ: 0, local: '*', inode: 1, peerInode: 2 },
    ]);
  });

  it('sock_diag (netlink) and ss agree, and sock_diag is fast', async () => {
    ours.write(Buffer.alloc(4321));
    ours.pause();
    peer.write(Buffer.alloc(99));
    await new Promise((r) => setTimeout(r, 30)); // lets Node finish reading the 99 bytes: no event says it is done, and ss must see the same queues
    const n = unixQueuesNetlink(ours);
    expect(n, 'sock_diag available').to.not.equal(undefined);
    const s = await unixQueuesSs(ours);
    expect({ ...n!, tookMs: 0 }).to.deep.equal({ ...s, tookMs: 0 });
    expect(n!.peerRecvQ).to.equal(4321);
    expect(n!.ourRecvQ + ours.readableLength).to.equal(99);
    expect(n!.tookMs).to.be.below(20);
  });

  it('reports exactly the bytes the peer has not read, and our own unread input', async () => {
    expect(socketInode(ours)).to.be.a('number');
    ours.write(Buffer.alloc(1000));
    ours.write(Buffer.alloc(2345));
    ours.pause();
    peer.write(Buffer.alloc(77));
    await new Promise((r) => setTimeout(r, 30)); // lets Node finish reading the 77 bytes: no event says it is done
    const q = await unixQueues(ours);
    expect(q.peerRecvQ).to.equal(3345);
    expect(q.ourRecvQ + ours.readableLength).to.equal(77);
    const u = await unreadByPeer(ours);
    expect(u.unread).to.equal(3345);
    expect(u.ourUnread).to.equal(77);
    expect(u.tookMs).to.be.below(500);
    // The peer reads 1000 bytes: the count drops by exactly that.
    await new Promise<void>((resolve) => {
      peer.once('readable', () => {
        peer.read(1000);
        resolve();
      });
      peer.resume();
      peer.pause();
    });
    const after = await unixQueues(ours);
    expect(after.peerRecvQ).to.be.lessThan(3345);
  });

  it('counts what Node still buffers when the kernel queue is full', async () => {
    const big = Buffer.alloc(4 * 1024 * 1024, 7);
    ours.write(big);
    await new Promise((r) => setTimeout(r, 50)); // lets libuv's write attempts run until the kernel queue is full: no event announces that
    const u = await unreadByPeer(ours);
    expect(u.nodeBuffered).to.be.greaterThan(0);
    expect(u.unread).to.equal(big.length);
  });
});
