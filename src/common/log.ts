// Structured logging (pino). Every component takes a child logger carrying
// the fields that identify what it works on: device, session, peer, vm.
import { pino, type Logger } from 'pino';

export type { Logger };

export function createLogger(options: { name?: string; level?: string } = {}): Logger {
  return pino({
    name: options.name ?? 'usbroam',
    level: options.level ?? process.env.USBROAM_LOG_LEVEL ?? 'info',
    base: { pid: process.pid },
  });
}

/** A logger that drops everything: the default for library code and tests. */
export const silentLogger: Logger = pino({ level: 'silent' });
