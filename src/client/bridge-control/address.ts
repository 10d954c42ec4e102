// Where the bridge's control API listens: a unix socket by default, or host:port.
import os from 'node:os';
import path from 'node:path';

/**
 * Where the control socket lives when not told: `/run/usbroam/bridge.sock` as root, else
 * `$XDG_RUNTIME_DIR/usbroam/bridge.sock`, else `$TMPDIR/usbroam-<uid>/bridge.sock`.
 * `USBROAM_CONTROL` overrides it (for the daemon and the CLI alike).
 */
export function defaultControlSocket(): string {
  const uid = process.getuid?.() ?? 0;
  if (uid === 0) return '/run/usbroam/bridge.sock';
  const xdg = process.env.XDG_RUNTIME_DIR;
  if (xdg) return path.join(xdg, 'usbroam', 'bridge.sock');
  return path.join(os.tmpdir(), `usbroam-${uid}`, 'bridge.sock');
}

/** The directory for the bridge's chardev sockets by default: next to the control socket. */
export function defaultRunDir(): string {
  return path.dirname(defaultControlSocket());
}

export type ControlAddress = { kind: 'unix'; path: string } | { kind: 'tcp'; hostPort: string };

/** `unix:/path`, `/path` or `./path` -> a unix socket; `host:port` -> TCP. */
export function parseControlAddress(a: string | undefined): ControlAddress {
  const s = a || process.env.USBROAM_CONTROL || defaultControlSocket();
  if (s.startsWith('unix:')) return { kind: 'unix', path: path.resolve(s.slice('unix:'.length)) };
  if (s.includes('/') || !/:\d+$/.test(s)) return { kind: 'unix', path: path.resolve(s) };
  return { kind: 'tcp', hostPort: s };
}

export function isLoopbackHost(hostPort: string): boolean {
  const host = hostPort.replace(/:\d+$/, '').replace(/^\[|\]$/g, '');
  return host === 'localhost' || host === '::1' || /^127\./.test(host);
}
