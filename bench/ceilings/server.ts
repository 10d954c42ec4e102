// Child process for the transport-ceiling benchmark: a raw mutual-TLS server and a grpc-js server
// on 127.0.0.1 ephemeral ports. Prints one JSON line {"tlsPort":..,"grpcPort":..,"pid":..} on stdout.
//
//   node --import tsx bench/ceilings/server.ts CERTS_DIR ['{"grpc server options json"}']
//
// Raw TLS protocol (first 9 bytes from the client): mode byte, u32 chunk size, u32 duration ms.
//   'U': server sinks everything after the header; on client half-close it writes u64 byte count, ends.
//   'D': server writes chunks of the given size for the given duration (with back-pressure), ends.
//   'N': as 'D' with a count of chunks in place of the duration.
import http2 from 'node:http2';
import tls from 'node:tls';
import * as grpc from '@grpc/grpc-js';
import { ASK_MAX_REPLY, CEILINGS_GRPC_SERVER_OPTIONS, CeilingsService, loadCerts } from './common.js';

const certsDir = process.argv[2];
if (!certsDir) {
  process.stderr.write('usage: server.ts CERTS_DIR [GRPC_SERVER_OPTIONS_JSON]\n');
  process.exit(2);
}
const extraOptions = process.argv[3] ? (JSON.parse(process.argv[3]) as grpc.ChannelOptions) : {};
const { ca, cert, key } = loadCerts(certsDir, 'server');

// Experiment (not a grpc-js option): grpc-js 1.14 has no server-side receive-window setting, so the
// server advertises Node's default 65535-byte stream window and client->server streams stall on it.
// 'usbroam-bench.server_flow_control_window' patches http2.createSecureServer to advertise a larger
// initial stream window and to raise the connection window of each session.
const serverWindow = extraOptions['usbroam-bench.server_flow_control_window'] as number | undefined;
if (serverWindow) {
  const orig = http2.createSecureServer;
  (http2 as { createSecureServer: typeof orig }).createSecureServer = ((opts: http2.SecureServerOptions, ...rest: unknown[]) => {
    const server = (orig as (...a: unknown[]) => http2.Http2SecureServer)(
      { ...opts, settings: { ...opts.settings, initialWindowSize: serverWindow } },
      ...rest,
    );
    server.on('session', (session: http2.ServerHttp2Session) => {
      try {
        session.setLocalWindowSize(serverWindow);
      } catch {
        /* ignore */
      }
    });
    return server;
  }) as typeof orig;
}

/** What Ask replies are cut from (grpc-js copies a message as it serializes it). */
const askReply = Buffer.alloc(ASK_MAX_REPLY, 0x3c);

/**
 * The Ask exchange on a byte stream: requests of {u32 up, u32 down} and `up` bytes, each answered
 * with `down` bytes once its `up` bytes are in. Returns the function to feed received bytes to.
 */
function askResponder(write: (b: Buffer) => void, refuse: () => void): (d: Buffer) => void {
  let head = Buffer.alloc(0);
  let left = 0;
  let down = 0;
  return (d) => {
    let i = 0;
    while (i < d.length) {
      if (left > 0) {
        const n = Math.min(left, d.length - i);
        left -= n;
        i += n;
        if (left === 0) write(askReply.subarray(0, down));
        continue;
      }
      const need = 8 - head.length;
      head = Buffer.concat([head, d.subarray(i, i + need)]);
      i += Math.min(need, d.length - i);
      if (head.length < 8) return;
      left = head.readUInt32BE(0);
      down = head.readUInt32BE(4);
      head = Buffer.alloc(0);
      if (down > ASK_MAX_REPLY) return refuse();
      if (left === 0) write(askReply.subarray(0, down));
    }
  };
}

function startTls(): Promise<number> {
  const server = tls.createServer({ ca, cert, key, requestCert: true, rejectUnauthorized: true }, (sock) => {
    sock.setNoDelay(true);
    let header = Buffer.alloc(0);
    let mode = '';
    let received = 0;
    sock.on('error', () => sock.destroy());
    // 'A' (ask): after the header, requests answered one by one (bench:e2e's tls floor, one per URB).
    const ask = askResponder(
      (b) => sock.write(b),
      () => sock.destroy(),
    );
    sock.on('data', (d: Buffer) => {
      if (mode === 'U') {
        received += d.length;
        return;
      }
      if (mode === 'A') return ask(d);
      if (mode !== '') return;
      header = Buffer.concat([header, d]);
      if (header.length < 9) return;
      mode = String.fromCharCode(header[0]!);
      const size = header.readUInt32BE(1);
      const durationMs = header.readUInt32BE(5);
      if (mode === 'U') {
        received += header.length - 9;
      } else if (mode === 'A') {
        ask(header.subarray(9));
      } else if (mode === 'D' || mode === 'N') {
        // 'N': the u32 after the size is a count of chunks instead of a duration (a fixed amount of work).
        const chunk = Buffer.alloc(size, 0xa5);
        const deadline = performance.now() + durationMs;
        let left = durationMs;
        const more = mode === 'D' ? () => performance.now() < deadline : () => left-- > 0;
        const pump = (): void => {
          while (more()) {
            if (!sock.write(chunk)) {
              sock.once('drain', pump);
              return;
            }
          }
          sock.end();
        };
        pump();
      } else {
        sock.destroy();
      }
    });
    sock.on('end', () => {
      if (mode === 'U') {
        const b = Buffer.alloc(8);
        b.writeBigUInt64BE(BigInt(received));
        sock.end(b);
      }
    });
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const addr = server.address();
      resolve(typeof addr === 'object' && addr ? addr.port : 0);
    });
  });
}

type Duplex = grpc.ServerDuplexStream<Buffer, Buffer>;


function writeWithBackpressure(call: Duplex, msg: Buffer): Promise<void> | undefined {
  if (call.write(msg)) return undefined;
  return new Promise((resolve) => call.once('drain', resolve));
}

function startGrpc(): Promise<number> {
  const server = new grpc.Server({ ...CEILINGS_GRPC_SERVER_OPTIONS, ...extraOptions });
  server.addService(CeilingsService, {
    Up(call: Duplex) {
      let bytes = 0;
      let msgs = 0;
      call.on('data', (m: Buffer) => {
        bytes += m.length;
        msgs++;
      });
      call.on('end', () => {
        const b = Buffer.alloc(16);
        b.writeBigUInt64BE(BigInt(bytes), 0);
        b.writeBigUInt64BE(BigInt(msgs), 8);
        call.write(b);
        call.end();
      });
      call.on('error', () => {});
    },
    Down(call: Duplex) {
      call.on('error', () => {});
      call.once('data', async (ctl: Buffer) => {
        const size = ctl.readUInt32BE(0);
        const durationMs = ctl.readUInt32BE(4);
        // A 12-byte control message adds a count of messages: send that many, whatever the time.
        let left = ctl.length >= 12 ? ctl.readUInt32BE(8) : -1;
        const msg = Buffer.alloc(size, 0x5a);
        const deadline = performance.now() + durationMs;
        while ((left < 0 ? performance.now() < deadline : left-- > 0) && !call.cancelled) {
          const p = writeWithBackpressure(call, msg);
          if (p) await p;
        }
        call.end();
      });
    },
    Echo(call: Duplex) {
      call.on('data', (m: Buffer) => call.write(m));
      call.on('end', () => call.end());
      call.on('error', () => {});
    },
    Ask(call: Duplex) {
      call.on('data', (m: Buffer) => {
        const size = m.length >= 4 ? m.readUInt32BE(0) : 0;
        if (size > ASK_MAX_REPLY) return call.destroy(new Error(`Ask: reply of ${size} bytes asked, at most ${ASK_MAX_REPLY}`));
        call.write(askReply.subarray(0, size));
      });
      call.on('end', () => call.end());
      call.on('error', () => {});
    },
  });
  const creds = grpc.ServerCredentials.createSsl(ca, [{ cert_chain: cert, private_key: key }], true);
  return new Promise((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', creds, (err, port) => (err ? reject(err) : resolve(port)));
  });
}

/**
 * The Ask exchange on one raw node:http2 stream (mutual TLS, no grpc-js): the request body is the
 * TLS 'A' mode's requests, the response body their answers. What HTTP/2 costs under a channel
 * that would not use grpc-js (bench:e2e's h2 floor).
 */
function startH2(): Promise<number> {
  const server = http2.createSecureServer({ ca, cert, key, requestCert: true, rejectUnauthorized: true, settings: { initialWindowSize: 16 * 1024 * 1024 } });
  server.on('session', (session) => {
    try {
      session.setLocalWindowSize(16 * 1024 * 1024);
    } catch {
      /* ignore */
    }
  });
  server.on('stream', (stream) => {
    stream.respond({ ':status': 200 });
    stream.on(
      'data',
      askResponder(
        (b) => stream.write(b),
        () => stream.close(http2.constants.NGHTTP2_PROTOCOL_ERROR),
      ),
    );
    stream.on('end', () => stream.end());
    stream.on('error', () => {});
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const addr = server.address();
      resolve(typeof addr === 'object' && addr ? addr.port : 0);
    });
  });
}

const [tlsPort, grpcPort, h2Port] = await Promise.all([startTls(), startGrpc(), startH2()]);
process.stdout.write(JSON.stringify({ tlsPort, grpcPort, h2Port, pid: process.pid }) + '\n');
process.on('SIGTERM', () => process.exit(0));
process.on('SIGINT', () => process.exit(0));
// Exit if the parent goes away (stdin is a pipe from the parent when spawned by client.ts).
if (!process.stdin.isTTY) {
  process.stdin.on('end', () => process.exit(0));
  process.stdin.on('error', () => process.exit(0));
  process.stdin.resume();
}
