// The fleet side of `usbroam devices` and `usbroam watch` (with --etcd): the
// subcommand files add the flags and call these.
import type { Command } from 'commander';
import { speedName } from '../client/sdk/format.js';
import { FleetDirectory, type FleetDevice, type FleetEvent } from './directory.js';
import { connectEtcd } from './etcd.js';
import { FleetKeys } from './keys.js';
import { parseFleetSelector } from './selector.js';

export interface FleetCliFlags {
  etcd?: string;
  select?: string[];
  fleetPrefix?: string;
  json?: boolean;
}

/** --etcd, --select and --fleet-prefix on a client subcommand. */
export function withFleetFlags(cmd: Command): Command {
  return cmd
    .option('--etcd <urls>', 'the fleet: read every host\'s devices from etcd, URL[,URL...]')
    .option('--select <terms...>', "with --etcd: only devices matching, e.g. '1050:0407', 'serial=ABC', 'label license=cad', 'host=lab-2'")
    .option('--fleet-prefix <prefix>', 'with --etcd: the fleet key prefix (default /usbroam/v1/)');
}

export function describeFleetDevice(d: FleetDevice): string {
  const claim = d.claim ? `claimed by ${d.claim.claimant}` : d.session ? `open by ${d.session.identity}` : 'free';
  const labels = Object.entries(d.labels ?? {}).map(([k, v]) => `${k}=${v}`).join(',');
  return `${d.host.padEnd(12)} ${d.id.padEnd(10)} ${d.vidPid}  ${d.portPath.padEnd(6)} ${speedName(d.speed).padEnd(6)} ${`${d.manufacturer} ${d.product}`.trim()} [serial ${d.serial || '-'}]${labels ? ` {${labels}}` : ''}  ${claim}  @${d.address}`;
}

function describeEvent(ev: FleetEvent): string {
  switch (ev.kind) {
    case 'present':
      return `present  ${describeFleetDevice(ev.device)}`;
    case 'snapshot-end':
      return '-- watching --';
    case 'host-up':
    case 'host-down':
      return `${ev.kind.padEnd(8)} ${ev.host.host}${'address' in ev.host ? ` @${ev.host.address}` : ''}`;
    case 'added':
    case 'updated':
    case 'removed':
      return `${ev.kind.padEnd(8)} ${ev.device.host}/${ev.device.id}${'vidPid' in ev.device ? ` ${ev.device.vidPid} [serial ${ev.device.serial || '-'}]` : ''}`;
    case 'claimed':
      return `claimed  ${ev.claim.host}/${ev.claim.deviceId} by ${ev.claim.claimant}`;
    case 'released':
      return `released ${ev.claim.host}/${ev.claim.deviceId}`;
  }
}

async function open(f: FleetCliFlags) {
  const selector = f.select?.length ? parseFleetSelector(f.select) : undefined;
  const etcd = await connectEtcd(f.etcd!);
  return { etcd, dir: new FleetDirectory(etcd, new FleetKeys(f.fleetPrefix)), selector };
}

export async function fleetDevices(f: FleetCliFlags): Promise<void> {
  const { etcd, dir, selector } = await open(f);
  try {
    const devices = await dir.list(selector);
    if (f.json) console.log(JSON.stringify(devices, null, 2));
    else if (!devices.length) console.log(selector ? 'no device in the fleet matches' : 'no devices in the fleet');
    else for (const d of devices) console.log(describeFleetDevice(d));
  } finally {
    etcd.close();
  }
}

export async function fleetWatch(f: FleetCliFlags, signal: AbortSignal): Promise<void> {
  const { etcd, dir, selector } = await open(f);
  try {
    for await (const ev of dir.watch({ signal, selector })) console.log(f.json ? JSON.stringify(ev) : describeEvent(ev));
  } finally {
    etcd.close();
  }
}
