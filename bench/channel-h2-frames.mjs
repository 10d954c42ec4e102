#!/usr/bin/env node
// Does a larger SETTINGS_MAX_FRAME_SIZE make Node's HTTP/2 send larger DATA frames? Both ends
// advertise `maxFrameSize`, 1 MiB goes each way through a proxy that parses the cleartext frames,
// and the DATA frames are counted. Node 20 (nghttp2 without a read-length callback) sends at most
// 16 KiB per DATA frame whatever the peer advertises, so grpc-js messages stay 16 KiB frames.
//
//   node bench/channel-h2-frames.mjs [MAX_FRAME_SIZE]   (default 1048576)
import http2 from 'node:http2';
import net from 'node:net';

const MFS = Number(process.argv[2] ?? 1 << 20);
const BYTES = 1 << 20;

/** Counts DATA frames (type 0) and their largest payload in one direction of an h2 byte stream. */
function frameCounter(withPreface) {
  let buf = Buffer.alloc(0);
  let preface = withPreface;
  const counts = { data_frames: 0, max_data_frame: 0 };
  return {
    counts,
    feed(d) {
      buf = Buffer.concat([buf, d]);
      if (preface) {
        if (buf.length < 24) return;
        buf = buf.subarray(24);
        preface = false;
      }
      while (buf.length >= 9) {
        const len = buf.readUIntBE(0, 3);
        if (buf.length < 9 + len) break;
        if (buf[3] === 0) {
          counts.data_frames++;
          counts.max_data_frame = Math.max(counts.max_data_frame, len);
        }
        buf = buf.subarray(9 + len);
      }
    },
  };
}

const server = http2.createServer({ settings: { maxFrameSize: MFS, initialWindowSize: 8 << 20 } });
server.on('stream', (s) => {
  s.resume();
  s.on('end', () => {
    s.respond({ ':status': 200 });
    s.end(Buffer.alloc(BYTES));
  });
});
await new Promise((r) => server.listen(0, '127.0.0.1', r));
const up = frameCounter(true);
const down = frameCounter(false);
const proxy = net.createServer((a) => {
  const b = net.connect(server.address().port, '127.0.0.1');
  a.on('data', (d) => (up.feed(d), b.write(d)));
  b.on('data', (d) => (down.feed(d), a.write(d)));
  a.on('close', () => b.destroy());
  b.on('close', () => a.destroy());
});
await new Promise((r) => proxy.listen(0, '127.0.0.1', r));
const client = http2.connect(`http://127.0.0.1:${proxy.address().port}`, { settings: { maxFrameSize: MFS, initialWindowSize: 8 << 20 } });
const req = client.request({ ':method': 'POST', ':path': '/' });
let chunks = 0;
req.on('data', () => chunks++);
req.end(Buffer.alloc(BYTES));
await new Promise((r) => req.on('end', r));
await new Promise((r) => setTimeout(r, 50));
const peerSettings = client.remoteSettings.maxFrameSize;
console.log(JSON.stringify({ node: process.version, advertised_max_frame_size: MFS, server_advertised: peerSettings, bytes: BYTES, up: up.counts, down: down.counts, client_data_events: chunks }));
client.close();
server.close();
proxy.close();
