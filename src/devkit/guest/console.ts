// The guest's serial console (ttyS0) as seen through a unix socket: a
// transcript of everything the guest printed, regex waits, and run(), which
// executes one shell command and returns its output and exit status.
//
// The guest's /init turns tty echo off and runs a prompt-less interactive shell
// that reads its commands from ttyS0 as a script file (see build-guest.sh: a
// shell reading them from stdin with echo off exits when a background job ends
// while it waits for input). run() does not rely on the echo being off: its
// markers are written split by quotes ('__UR''B_') so the echoed command line
// can never match the printed marker. A command that gets no output at all is
// nudged with a bare newline; one that times out is interrupted with ^C, and the
// next command first waits for the shell to answer a sync line.
import type net from 'node:net';
import fs from 'node:fs';

export interface RunResult {
  /** What the command printed (stdout and stderr, in order), \r removed. */
  output: string;
  exitCode: number;
}

export interface RunOptions {
  /** Default 60 s. On timeout a Ctrl-C is sent and GuestCommandTimeoutError thrown. */
  timeoutMs?: number;
  /** No output at all for this long after sending: send a bare newline (up to 3 times). Default 10 s. */
  nudgeAfterMs?: number;
}

/** Default for how long run() waits for any output before it sends a bare newline. */
const NUDGE_AFTER_MS = 10_000;

export interface WaitForOptions {
  /** Default 60 s. */
  timeoutMs?: number;
  /**
   * Search the whole transcript instead of only the output after the last
   * waitFor() match / run() result. Default false.
   */
  fromStart?: boolean;
}

export class GuestConsoleError extends Error {
  override name = 'GuestConsoleError';
}

export class GuestCommandTimeoutError extends GuestConsoleError {
  override name = 'GuestCommandTimeoutError';
  constructor(
    readonly command: string,
    readonly partialOutput: string,
    timeoutMs: number,
    readonly why: string,
    /** Nothing at all came from the guest after the command was sent. */
    readonly silent: boolean,
  ) {
    super(`guest command timed out after ${timeoutMs} ms (${why}): ${command}\n--- output so far ---\n${partialOutput.slice(-2000)}`);
  }
}

let markerSeq = 0;
/** A marker id no other command, console or test process uses. */
const newMarkerId = (kind: string) => `${process.pid}${kind}${++markerSeq}x${Math.random().toString(36).slice(2, 8)}`;

export class GuestConsole {
  private text = '';
  /** waitFor() searches from here unless fromStart. */
  private cursor = 0;
  private socket: net.Socket | null = null;
  private closedError: Error | null = null;
  private listeners = new Set<() => void>();
  private queue: Promise<unknown> = Promise.resolve();
  /** Set when a command timed out (and got ^C): the next run() first waits for the shell. */
  private interrupted = false;
  private readonly logStream: fs.WriteStream | null;

  /**
   * @param logFile the transcript, written as it arrives
   * @param warn told when a command got no output at all for a while and the console was nudged
   */
  constructor(
    logFile?: string,
    private readonly warn: (line: string) => void = () => {},
  ) {
    this.logStream = logFile ? fs.createWriteStream(logFile) : null;
  }

  /** Attach the connected chardev socket (QEMU's end of the serial port). */
  attach(socket: net.Socket): void {
    this.socket = socket;
    this.closedError = null;
    socket.setEncoding('utf8');
    socket.on('data', (d: string) => {
      this.logStream?.write(d);
      this.text += d.replace(/\r/g, '');
      this.notify();
    });
    socket.on('error', () => {});
    socket.on('close', () => {
      if (this.socket === socket) {
        this.socket = null;
        this.closedError = new GuestConsoleError('guest console disconnected (QEMU exited?)');
        this.notify();
      }
    });
  }

  /** Everything the guest printed so far (\r removed). */
  transcript(): string {
    return this.text;
  }

  get connected(): boolean {
    return this.socket !== null;
  }

  /** Raw write to the guest's serial input. */
  write(data: string): void {
    if (!this.socket) throw this.closedError ?? new GuestConsoleError('guest console not connected');
    this.socket.write(data);
  }

  /**
   * Wait until the console output matches `re`; resolves with the match.
   * Advances the cursor past the match, so consecutive waits see new output.
   */
  waitFor(re: RegExp, options: WaitForOptions = {}): Promise<RegExpExecArray> {
    const timeoutMs = options.timeoutMs ?? 60_000;
    const from = options.fromStart ? 0 : this.cursor;
    const rx = new RegExp(re.source, re.flags.replace('g', ''));
    return new Promise((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const check = () => {
        const m = rx.exec(this.text.slice(from));
        if (m) {
          done();
          this.cursor = Math.max(this.cursor, from + m.index + m[0].length);
          resolve(m);
          return true;
        }
        if (this.closedError) {
          done();
          reject(new GuestConsoleError(`${this.closedError.message} while waiting for ${re}; last output:\n${this.text.slice(-1500)}`));
          return true;
        }
        return false;
      };
      const done = () => {
        if (timer) clearTimeout(timer);
        this.listeners.delete(check);
      };
      if (check()) return;
      this.listeners.add(check);
      timer = setTimeout(() => {
        done();
        reject(new GuestConsoleError(`timed out after ${timeoutMs} ms waiting for ${re} on the guest console; last output:\n${this.text.slice(-1500)}`));
      }, timeoutMs);
    });
  }

  /**
   * Run one shell command in the guest (stdin is /dev/null, stderr merged
   * into stdout). Commands are serialized: one at a time on the console.
   */
  run(command: string, options: RunOptions = {}): Promise<RunResult> {
    const next = this.queue.then(() => this.runNow(command, options));
    this.queue = next.catch(() => undefined);
    return next;
  }

  private async runNow(command: string, options: RunOptions): Promise<RunResult> {
    const timeoutMs = options.timeoutMs ?? 60_000;
    if (this.interrupted) await this.resync(timeoutMs);
    const id = newMarkerId('x');
    const begin = `__URB_${id}\n`;
    const endRx = new RegExp(`__URE_${id}_(\\d+)\n`);
    const startLen = this.text.length;
    this.write(`echo '__UR''B_${id}'\n{ ${command}\n} </dev/null 2>&1\necho "__UR""E_${id}_$?"\n`);
    const deadline = Date.now() + timeoutMs;
    return new Promise<RunResult>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      // A guest that printed nothing at all since the command went out gets a bare newline (an
      // empty command to a shell that is reading; new receive data for a UART whose interrupt
      // was missed). Seen once after live migration under TCG: not a byte for 60 s. The warning
      // says it happened, and the command's result is still only what its markers frame.
      let nudges = 0;
      const nudgeAfterMs = options.nudgeAfterMs ?? NUDGE_AFTER_MS;
      const nudgeTimer = setInterval(() => {
        if (this.text.length !== startLen || nudges >= 3) return;
        nudges++;
        this.warn(`console: no output ${((nudgeAfterMs * nudges) / 1000).toFixed(0)} s after sending a command; sending a newline (nudge ${nudges})`);
        this.writeIfConnected('\n'); // a lost console: reported by the timeout
      }, nudgeAfterMs);
      const check = () => {
        const hay = this.text.slice(startLen);
        const b = hay.indexOf(begin);
        if (b >= 0) {
          const after = hay.slice(b + begin.length);
          const m = endRx.exec(after);
          if (m) {
            done();
            this.cursor = Math.max(this.cursor, startLen + b + begin.length + m.index + m[0].length);
            resolve({ output: after.slice(0, m.index), exitCode: Number(m[1]) });
            return true;
          }
        }
        if (this.closedError) {
          done();
          reject(new GuestConsoleError(`${this.closedError.message} while running: ${command}`));
          return true;
        }
        return false;
      };
      const done = () => {
        if (timer) clearTimeout(timer);
        clearInterval(nudgeTimer);
        this.listeners.delete(check);
      };
      if (check()) return;
      this.listeners.add(check);
      timer = setTimeout(() => {
        done();
        const hay = this.text.slice(startLen);
        const b = hay.indexOf(begin);
        const partial = b >= 0 ? hay.slice(b + begin.length) : hay;
        this.interrupted = true;
        this.writeIfConnected('\x03'); // Ctrl-C the stuck command
        const why =
          hay.length === 0
            ? `no output at all since the command was sent (${nudges} newline nudges); console tail before it:\n${this.text.slice(Math.max(0, startLen - 1000), startLen)}`
            : b < 0
              ? 'the command was never started (no begin marker)'
              : 'the command did not finish';
        reject(new GuestCommandTimeoutError(command, partial, timeoutMs, why, hay.length === 0));
      }, Math.max(1, deadline - Date.now()));
    });
  }

  /**
   * After a ^C: the tty flushes its input queue and the shell drops what it had buffered when
   * the SIGINT lands, which can be the first lines of the next command (seen when the guest was
   * paused at the time). Echo a sync marker every 2 s until one comes back, so the next command
   * goes to a shell that is reading again.
   */
  private async resync(timeoutMs: number): Promise<void> {
    const id = newMarkerId('s');
    const send = () => this.writeIfConnected(`echo '__UR''S_${id}'\n`); // a lost console: the wait below reports it
    send();
    const resend = setInterval(send, 2000);
    try {
      await this.waitFor(new RegExp(`__URS_${id}\n`), { timeoutMs });
      this.interrupted = false; // later copies of the sync line print before the next command's markers
    } finally {
      clearInterval(resend);
    }
  }

  /** Write to the guest if the console is still there; a write on a closing socket is not an error here. */
  private writeIfConnected(data: string): void {
    try {
      this.socket?.write(data);
    } catch {
      /* the caller's wait reports a lost console */
    }
  }

  /** Detach and stop logging. */
  close(): void {
    this.socket?.destroy();
    this.socket = null;
    this.closedError = new GuestConsoleError('guest console closed');
    this.notify();
    this.logStream?.end();
  }

  private notify(): void {
    for (const l of [...this.listeners]) l();
  }
}
