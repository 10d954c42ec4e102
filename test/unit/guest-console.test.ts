// The e2e harness's serial console client against a scripted fake guest on a unix socket:
// run() frames a command's output with its markers, nudges a console that printed nothing
// with a bare newline, and a timeout says which of the ways a command can hang it was.
import { expect } from 'chai';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { GuestCommandTimeoutError, GuestConsole } from '../../src/devkit/guest/console.js';
import { until } from '../helpers/wait.js';

/** What the harness wrote, and a way to answer as the guest's shell would. */
interface FakeGuest {
  received: string[];
  answer(text: string): void;
  /** The marker id of the newest command received. */
  lastId(): string;
}

async function connect(onData: (guest: FakeGuest, chunk: string) => void): Promise<{ cons: GuestConsole; warnings: string[]; received: string[]; close: () => void }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ucons-'));
  const sock = path.join(dir, 'console.sock');
  const warnings: string[] = [];
  const cons = new GuestConsole(undefined, (l) => warnings.push(l));
  const server = net.createServer();
  await new Promise<void>((r) => server.listen(sock, r));
  const accepted = new Promise<net.Socket>((r) => server.once('connection', r));
  const qemuSide = net.connect(sock);
  cons.attach(await accepted);
  const guest: FakeGuest = {
    received: [],
    answer: (t) => qemuSide.write(t),
    lastId: () => /__UR''B_(\S+?)'/.exec(guest.received.filter((c) => c.includes("__UR''B_")).at(-1) ?? '')?.[1] ?? '',
  };
  qemuSide.setEncoding('utf8');
  qemuSide.on('data', (d: string) => {
    guest.received.push(d);
    onData(guest, d);
  });
  return {
    cons,
    warnings,
    received: guest.received,
    close: () => {
      cons.close();
      qemuSide.destroy();
      server.close();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

describe('e2e harness: guest console run()', () => {
  it('returns what the markers frame and the exit status, ignoring the echoed command line', async () => {
    const c = await connect((g, chunk) => {
      if (!chunk.includes("__UR''B_")) return;
      const id = g.lastId();
      // An echoed command line (the markers split by quotes) must not count as output.
      g.answer(chunk.replace(/\n/g, '\r\n'));
      g.answer(`__URB_${id}\r\nline one\r\nline two\r\n__URE_${id}_3\r\n`);
    });
    try {
      const r = await c.cons.run('printf "line one\\nline two\\n"; false');
      expect(r).to.deep.equal({ output: 'line one\nline two\n', exitCode: 3 });
      expect(c.warnings).to.deep.equal([]);
    } finally {
      c.close();
    }
  });

  it('a console that printed nothing gets a bare newline, and the command completes once the guest answers', async () => {
    let commands = 0;
    const c = await connect((g, chunk) => {
      if (chunk.includes("__UR''B_")) {
        commands++;
        return; // the command arrives, but the guest stays silent ...
      }
      if (chunk === '\n') {
        const id = g.lastId(); // ... until the nudge wakes it
        g.answer(`__URB_${id}\nok\n__URE_${id}_0\n`);
      }
    });
    try {
      const r = await c.cons.run('echo ok', { timeoutMs: 5000, nudgeAfterMs: 200 });
      expect(r).to.deep.equal({ output: 'ok\n', exitCode: 0 });
      expect(commands).to.equal(1);
      expect(c.received.filter((x) => x === '\n')).to.have.length(1);
      expect(c.warnings).to.have.length(1);
      expect(c.warnings[0]).to.match(/no output .* sending a newline \(nudge 1\)/);
    } finally {
      c.close();
    }
  });

  it('never nudges a command that has started printing, however long it runs', async () => {
    const c = await connect((g, chunk) => {
      if (chunk.includes("__UR''B_")) {
        const id = g.lastId();
        g.answer(`__URB_${id}\n`);
        setTimeout(() => g.answer(`done\n__URE_${id}_0\n`), 700);
      }
    });
    try {
      const r = await c.cons.run('sleep 1; echo done', { timeoutMs: 5000, nudgeAfterMs: 100 });
      expect(r.output).to.equal('done\n');
      expect(c.received.filter((x) => x === '\n')).to.deep.equal([]);
      expect(c.warnings).to.deep.equal([]);
    } finally {
      c.close();
    }
  });

  it('a silent console times out with a reason, after at most 3 nudges, and the command is interrupted with ^C', async () => {
    const c = await connect(() => {});
    try {
      const err = await c.cons.run('touch /tmp/stop', { timeoutMs: 1000, nudgeAfterMs: 150 }).then(
        () => null,
        (e: unknown) => e,
      );
      expect(err).to.be.instanceOf(GuestCommandTimeoutError);
      expect((err as GuestCommandTimeoutError).why).to.match(/^no output at all since the command was sent \(3 newline nudges\)/);
      expect((err as GuestCommandTimeoutError).silent).to.equal(true);
      await until('the ^C', () => /\x03$/.test(c.received.join('')), 2000, 10);
    } finally {
      c.close();
    }
  });

  it('a command that started but did not finish times out saying so', async () => {
    const c = await connect((g, chunk) => {
      if (chunk.includes("__UR''B_")) g.answer(`__URB_${g.lastId()}\npartial\n`);
    });
    try {
      const err = (await c.cons.run('cat /dev/zero', { timeoutMs: 500, nudgeAfterMs: 100 }).catch((e: unknown) => e)) as GuestCommandTimeoutError;
      expect(err.why).to.equal('the command did not finish');
      expect(err.silent).to.equal(false);
      expect(err.partialOutput).to.equal('partial\n');
    } finally {
      c.close();
    }
  });

  it('after a timed-out command (^C), the next command waits for the shell to answer a sync line, re-sent until one comes back', async () => {
    // A line-by-line fake shell: silent until ^C, then it loses the first line after the ^C (as a
    // tty flush or a SIGINT in the shell can), then answers markers and `echo WORD`.
    let silent = true;
    let dropNext = false;
    let pending = '';
    const syncs: string[] = [];
    const c = await connect((g, chunk) => {
      if (chunk.includes('\x03')) {
        silent = false;
        dropNext = true;
        chunk = chunk.slice(chunk.indexOf('\x03') + 1);
      }
      if (silent) return;
      pending += chunk;
      let nl: number;
      while ((nl = pending.indexOf('\n')) >= 0) {
        const line = pending.slice(0, nl);
        pending = pending.slice(nl + 1);
        if (dropNext) {
          dropNext = false;
          continue;
        }
        let m: RegExpExecArray | null;
        if ((m = /^echo '__UR''S_(\S+)'$/.exec(line))) {
          syncs.push(m[1]!);
          g.answer(`__URS_${m[1]}\n`);
        } else if ((m = /^echo '__UR''B_(\S+)'$/.exec(line))) g.answer(`__URB_${m[1]}\n`);
        else if ((m = /^echo "__UR""E_(\S+)_\$\?"$/.exec(line))) g.answer(`__URE_${m[1]}_0\n`);
        else if ((m = /^\{ echo (\w+)$/.exec(line))) g.answer(`${m[1]}\n`);
      }
    });
    try {
      const err = await c.cons.run('echo lost', { timeoutMs: 300, nudgeAfterMs: 10_000 }).catch((e: unknown) => e);
      expect(err).to.be.instanceOf(GuestCommandTimeoutError);
      const r = await c.cons.run('echo second', { timeoutMs: 10_000 });
      expect(r).to.deep.equal({ output: 'second\n', exitCode: 0 });
      // The first sync line was the one lost; a re-sent copy came back.
      expect(syncs.length).to.be.greaterThan(0);
      expect(c.received.filter((x) => x.includes("__UR''S_")).length).to.be.greaterThan(1);
    } finally {
      c.close();
    }
  });
});
