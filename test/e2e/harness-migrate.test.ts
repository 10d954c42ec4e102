// The harness supports a migration destination (-incoming defer): live-migrate
// a running guest from one QEMU to another over a unix socket and keep using
// its console on the destination.
import { expect } from 'chai';
import path from 'node:path';
import { startGuest, type Guest, type GuestImage } from '../../src/devkit/guest/guest.js';
import { e2eImageOrSkip } from '../../src/devkit/bridge-guest.js';

describe('e2e harness: live migration between two guests', function () {
  this.timeout(300_000);
  let image: GuestImage;
  const guests: Guest[] = [];

  before(async function () {
    this.timeout(900_000);
    image = await e2eImageOrSkip(this);
  });

  after(async () => {
    await Promise.allSettled(guests.map((g) => g.stop()));
  });

  it('migrates src -> dst (-incoming defer) and the shell state survives', async () => {
    const src = await startGuest({ name: 'src', image });
    guests.push(src);
    const dst = await startGuest({ name: 'dst', image, extraArgs: ['-incoming', 'defer'] });
    guests.push(dst);
    expect(dst.bootMs).to.equal(undefined);
    expect((await dst.qmp.execute<{ status: string }>('query-status')).status).to.equal('inmigrate');

    await src.sh('echo before-migration > /tmp/marker; MYVAR=kept');
    for (const g of [src, dst]) {
      await g.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
    }
    const uri = `unix:${path.join(dst.dir, 'migrate.sock')}`;
    await dst.qmp.execute('migrate-incoming', { uri });
    const srcDone = src.events.waitForEvent('MIGRATION', (ev) => ev.data.status === 'completed' || ev.data.status === 'failed', { timeoutMs: 120_000 });
    const dstDone = dst.events.waitForEvent('MIGRATION', (ev) => ev.data.status === 'completed' || ev.data.status === 'failed', { timeoutMs: 120_000 });
    const resumed = dst.events.waitForEvent('RESUME', undefined, { timeoutMs: 120_000 });
    const t0 = Date.now();
    await src.qmp.execute('migrate', { uri });
    expect((await srcDone).data.status).to.equal('completed');
    expect((await dstDone).data.status).to.equal('completed');
    await resumed;
    const info = await src.qmp.execute<{ status: string; 'total-time'?: number; downtime?: number }>('query-migrate');
    console.log(`      migration completed in ${Date.now() - t0} ms (QEMU: total ${info['total-time']} ms, downtime ${info.downtime} ms)`);
    expect((await src.qmp.execute<{ status: string }>('query-status')).status).to.equal('postmigrate');
    expect((await dst.qmp.execute<{ status: string; running: boolean }>('query-status')).running).to.equal(true);

    const r = await dst.run('cat /tmp/marker; echo $MYVAR', { timeoutMs: 30_000 });
    expect(r).to.deep.equal({ output: 'before-migration\nkept\n', exitCode: 0 });
  });
});
