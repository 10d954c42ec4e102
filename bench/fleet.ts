// npm run bench:fleet — the fleet on a real three-member etcd cluster on
// loopback: HOSTS simulated servers (FleetPublisher each, one process)
// registering DEVICES_PER_HOST devices, then
//   - claim races: CLAIMANTS claimants race for one device per round; a round
//     with more than one winner, or whose etcd record names another than the
//     winner, is a double claim;
//   - lease moves: a claim moved back and forth between two leases while a
//     third claimant keeps trying to take it;
//   - a member kill (the leader): claims and a directory lookup right after;
//   - directory lookups by serial over all registered devices.
// Baselines in the same run, interleaved round by round: a bare etcd put under
// a lease (for claims) and a bare range read of the devices prefix (for
// lookups); ratios are medians of per-round ratios.
// Progress goes to stderr; the last line on stdout is one JSON object.
import { FleetClaimant, moveClaim, type FleetClaim } from '../src/fleet/claims.js';
import { FleetDirectory } from '../src/fleet/directory.js';
import { connectEtcd, type EtcdConnection } from '../src/fleet/etcd.js';
import type { FleetError } from '../src/fleet/errors.js';
import { FleetPublisher } from '../src/fleet/publisher.js';
import { parseFleetSelector as sel } from '../src/fleet/selector.js';
import { startEtcd } from '../src/devkit/etcd.js';
import { FakeDeviceSource, fakeDevice } from '../src/devkit/fleet-fakes.js';

const HOSTS = Number(process.env.BENCH_FLEET_HOSTS ?? 20);
const DEVICES_PER_HOST = Number(process.env.BENCH_FLEET_DEVICES_PER_HOST ?? 50);
const CLAIMANTS = Number(process.env.BENCH_FLEET_CLAIMANTS ?? 8);
const ROUNDS = Number(process.env.BENCH_FLEET_ROUNDS ?? 100);
const MOVES = Number(process.env.BENCH_FLEET_MOVES ?? 100);
const LOOKUPS = Number(process.env.BENCH_FLEET_LOOKUPS ?? 200);
const TTL = 10;
const log = (s: string) => process.stderr.write(`[bench:fleet] ${s}\n`);

const pct = (xs: number[], p: number) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] : NaN;
};
const r2 = (x: number) => Math.round(x * 100) / 100;
const cpuMs = () => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1000;
};

async function leaderIndex(clientUrls: string[]): Promise<number> {
  const st = await Promise.all(
    clientUrls.map(async (u) => (await (await fetch(`${u}/v3/maintenance/status`, { method: 'POST', body: '{}' })).json()) as { header: { member_id: string }; leader: string }),
  );
  return st.findIndex((s) => s.header.member_id === s.leader);
}

const etcd = await startEtcd(3);
const conns: EtcdConnection[] = [];
const connect = async () => {
  const c = await connectEtcd(etcd.endpoints);
  conns.push(c);
  return c;
};
try {
  const main = await connect();
  const dir = new FleetDirectory(main);

  log(`registering ${HOSTS} hosts x ${DEVICES_PER_HOST} devices`);
  const t0 = Date.now();
  const publishers: FleetPublisher[] = [];
  for (let h = 0; h < HOSTS; h++) {
    const devs = Array.from({ length: DEVICES_PER_HOST }, (_, i) => fakeDevice(`d${i}`, { serial: `H${h}-D${i}`, portPath: [1 + (i % 7), 1 + Math.floor(i / 7)] }));
    const p = new FleetPublisher(main, new FakeDeviceSource(devs), {
      host: `host-${h}`,
      address: `127.0.0.1:${10000 + h}`,
      leaseTtlS: TTL,
      deviceLabels: [{ select: sel('id=d0'), labels: { license: 'cad' } }],
    });
    p.start();
    publishers.push(p);
  }
  while ((await dir.list()).length < HOSTS * DEVICES_PER_HOST) await new Promise((r) => setTimeout(r, 100));
  const devices = HOSTS * DEVICES_PER_HOST;
  log(`registered ${devices} devices in ${Date.now() - t0} ms`);

  // Claimants, each with its own connection, as separate bridges would have.
  const claimants = await Promise.all(Array.from({ length: CLAIMANTS }, async (_, i) => FleetClaimant.create(await connect(), { claimant: `bridge-${i}`, leaseTtlS: TTL })));
  const baseLease = main.client.lease(TTL);
  await baseLease.grant();

  // Claim races, interleaved with a bare put under a lease.
  log(`${ROUNDS} claim races of ${CLAIMANTS} claimants`);
  const claimMs: number[] = [];
  const putMs: number[] = [];
  const claimRatios: number[] = [];
  let doubleClaims = 0;
  let claimCpuMs = 0;
  for (let round = 0; round < ROUNDS; round++) {
    const h = round % HOSTS;
    const d = Math.floor(round / HOSTS) % DEVICES_PER_HOST;
    const selector = sel(`host=host-${h} serial=H${h}-D${d}`);
    const tp = performance.now();
    await baseLease.put(`/bench/put/${round}`).value('x');
    const put = performance.now() - tp;
    putMs.push(put);
    const c0 = cpuMs();
    const results = await Promise.allSettled(
      claimants.map(async (c) => {
        const t = performance.now();
        try {
          return await c.claim(selector);
        } finally {
          claimMs.push(performance.now() - t);
        }
      }),
    );
    claimCpuMs += cpuMs() - c0;
    const won = results.filter((r): r is PromiseFulfilledResult<FleetClaim> => r.status === 'fulfilled').map((r) => r.value);
    const lostOk = results.every((r) => r.status === 'fulfilled' || (r.reason as FleetError).code === 6);
    const [now] = await dir.list(selector);
    if (won.length !== 1 || !lostOk || now.claim?.claimant !== won[0].record.claimant || now.claim?.token !== won[0].record.token) {
      doubleClaims++;
      log(`round ${round}: ${won.length} winners, etcd says ${now.claim?.claimant}`);
    }
    claimRatios.push(pct(claimMs.slice(-CLAIMANTS), 50) / put);
    for (const w of won) await claimants.find((c) => c.identity === w.record.claimant)!.release(w);
  }

  // Lease moves: back and forth between two claimants while a third keeps trying.
  log(`${MOVES} lease moves`);
  const [a, b, intruder] = claimants;
  let claim = await a.claim(sel('host=host-0 serial=H0-D1'));
  let holder = a;
  let record = claim.record;
  let moveFailures = 0;
  const moveMs: number[] = [];
  let racing = true;
  let intruderWins = 0;
  const intrude = (async () => {
    while (racing) await intruder.claim(sel('host=host-0 serial=H0-D1')).then(() => intruderWins++, () => {});
  })();
  for (let i = 0; i < MOVES; i++) {
    const to = holder === a ? b : a;
    const t = performance.now();
    try {
      record = await moveClaim(main, claim.key, record, { claimant: to.identity, leaseId: to.lease.leaseId! });
      moveMs.push(performance.now() - t);
      holder = to;
    } catch (err) {
      moveFailures++;
      log(`move ${i} failed: ${(err as Error).message}`);
    }
  }
  racing = false;
  await intrude;
  claim = holder.adopt(claim.key, record, claim.device);
  await holder.release(claim);
  if (intruderWins) moveFailures += intruderWins;

  // Directory lookups by serial over every registered device, interleaved with a bare range read.
  log(`${LOOKUPS} directory lookups over ${devices} devices`);
  const lookupMs: number[] = [];
  const rangeMs: number[] = [];
  const lookupRatios: number[] = [];
  let lookupCpuMs = 0;
  for (let i = 0; i < LOOKUPS; i++) {
    const h = Math.floor(Math.random() * HOSTS);
    const d = Math.floor(Math.random() * DEVICES_PER_HOST);
    const tr = performance.now();
    await main.client.getAll().prefix(dir.keys.devices).exec();
    const range = performance.now() - tr;
    rangeMs.push(range);
    const c0 = cpuMs();
    const t = performance.now();
    const found = await dir.list(sel(`serial=H${h}-D${d}`));
    const ms = performance.now() - t;
    lookupCpuMs += cpuMs() - c0;
    if (found.length !== 1) throw new Error(`lookup of H${h}-D${d} found ${found.length}`);
    lookupMs.push(ms);
    lookupRatios.push(ms / range);
  }

  // Kill the leader: claims (a race) and a lookup must still work, and the registrations keep their leases.
  log('killing the etcd leader');
  const leader = await leaderIndex(etcd.endpoints);
  const leasesBefore = (await main.client.getAll().prefix(dir.keys.hosts).exec()).kvs.map((kv) => kv.lease).sort().join();
  await etcd.members[leader].kill();
  const tk = performance.now();
  let memberKillOk = false;
  try {
    const results = await Promise.allSettled(claimants.map((c) => c.claim(sel('host=host-1 serial=H1-D2'))));
    const won = results.filter((r) => r.status === 'fulfilled');
    const lookup = await dir.list(sel('label license=cad'));
    const leasesAfter = (await main.client.getAll().prefix(dir.keys.hosts).exec()).kvs.map((kv) => kv.lease).sort().join();
    memberKillOk = won.length === 1 && lookup.length === HOSTS && leasesAfter === leasesBefore;
    if (won.length !== 1) doubleClaims += won.length > 1 ? 1 : 0;
    log(`after the kill: ${won.length} winner, ${lookup.length} labelled devices, leases kept: ${leasesAfter === leasesBefore} (${Math.round(performance.now() - tk)} ms)`);
  } catch (err) {
    log(`after the kill: ${(err as Error).message}`);
  }
  const memberKillRecoverMs = performance.now() - tk;

  const median = (xs: number[]) => pct(xs, 50);
  console.log(
    JSON.stringify({
      hosts: HOSTS,
      devices,
      claimants: CLAIMANTS,
      claim_races: ROUNDS,
      double_claims: doubleClaims,
      claim_p50_ms: r2(pct(claimMs, 50)),
      claim_p99_ms: r2(pct(claimMs, 99)),
      claim_cpu_ms_per_claim_attempt: r2(claimCpuMs / (ROUNDS * CLAIMANTS)),
      baseline_put_p50_ms: r2(pct(putMs, 50)),
      claim_vs_put_ratio: { median: r2(median(claimRatios)), min: r2(Math.min(...claimRatios)), max: r2(Math.max(...claimRatios)) },
      lease_moves: moveMs.length,
      lease_move_failures: moveFailures,
      lease_move_p50_ms: r2(pct(moveMs, 50)),
      lease_move_p99_ms: r2(pct(moveMs, 99)),
      member_kill_ok: memberKillOk,
      member_kill_claim_and_lookup_ms: Math.round(memberKillRecoverMs),
      directory_lookups: LOOKUPS,
      directory_p50_ms: r2(pct(lookupMs, 50)),
      directory_p99_ms: r2(pct(lookupMs, 99)),
      directory_cpu_ms_per_lookup: r2(lookupCpuMs / LOOKUPS),
      baseline_range_p50_ms: r2(pct(rangeMs, 50)),
      directory_vs_range_ratio: { median: r2(median(lookupRatios)), min: r2(Math.min(...lookupRatios)), max: r2(Math.max(...lookupRatios)) },
    }),
  );
  for (const c of claimants) await c.close().catch(() => {});
  await Promise.all(publishers.map((p) => p.stop().catch(() => {})));
  await baseLease.revoke().catch(() => {});
} finally {
  for (const c of conns) c.close();
  await etcd.stop();
}
