// What a bench needs from the machine, installed the way .ci/run does (apt-get, when root and
// missing), or a clear message that says what to install: a fresh machine must not fail a bench
// with "usbredirect: not found".
import { execFileSync, spawnSync } from 'node:child_process';

export interface Needed {
  /** The command looked up on PATH (the first of several names that exists wins). */
  command: string | string[];
  /** The Debian package that holds it. */
  apt: string;
}

function onPath(cmd: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
}

/** The name of the first of `needed.command` on PATH, or undefined. */
export function findCommand(needed: Needed): string | undefined {
  return ([] as string[]).concat(needed.command).find(onPath);
}

/**
 * Makes sure every command is on PATH: missing ones are installed with apt-get when running as
 * root on a Debian-like machine, otherwise this throws an error naming the packages. Returns the
 * command names found, in order.
 */
export function ensureCommands(needed: readonly Needed[], log: (line: string) => void = (l) => process.stderr.write(`${l}\n`)): string[] {
  const missing = needed.filter((n) => !findCommand(n));
  if (missing.length) {
    const pkgs = [...new Set(missing.map((n) => n.apt))];
    const what = missing.map((n) => ([] as string[]).concat(n.command)[0]).join(', ');
    const root = process.getuid?.() === 0;
    if (!root || !onPath('apt-get')) {
      throw new Error(`${what} not found: install ${pkgs.join(' ')} (apt-get install -y --no-install-recommends ${pkgs.join(' ')}), as .ci/run does`);
    }
    log(`${what} not found: apt-get install ${pkgs.join(' ')}`);
    const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
    const install = () => spawnSync('apt-get', ['install', '-y', '--no-install-recommends', ...pkgs], { stdio: ['ignore', 'ignore', 'inherit'], env }).status === 0;
    if (!install()) {
      execFileSync('apt-get', ['update'], { stdio: ['ignore', 'ignore', 'inherit'], env });
      if (!install()) throw new Error(`apt-get install ${pkgs.join(' ')} failed`);
    }
    const still = missing.filter((n) => !findCommand(n));
    if (still.length) throw new Error(`${still.map((n) => ([] as string[]).concat(n.command)[0]).join(', ')} still not found after apt-get install ${pkgs.join(' ')}`);
  }
  return needed.map((n) => findCommand(n)!);
}

/** What every QEMU bench runs: QEMU itself and openssl for the test certificates (the guest image builder installs the rest). */
export const QEMU_BENCH_NEEDS: readonly Needed[] = [
  { command: 'qemu-system-x86_64', apt: 'qemu-system-x86' },
  { command: 'qemu-img', apt: 'qemu-utils' },
  { command: 'openssl', apt: 'openssl' },
];
