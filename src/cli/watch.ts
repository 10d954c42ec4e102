// usbroam watch: the device list, then hotplug and claim events as they happen.
import { Command } from 'commander';
import { DeviceEvent, DeviceEvent_Kind } from '../gen/usbroam/v1/usbhost.js';
import { fleetWatch, withFleetFlags, type FleetCliFlags } from '../fleet/cli.js';
import { clientFrom, describeDevice, reportError, withConnectionFlags, type ConnectionFlags } from './common.js';

const NAMES: Record<number, string> = {
  [DeviceEvent_Kind.KIND_PRESENT]: 'present',
  [DeviceEvent_Kind.KIND_ADDED]: 'added',
  [DeviceEvent_Kind.KIND_REMOVED]: 'removed',
  [DeviceEvent_Kind.KIND_CLAIMED]: 'claimed',
  [DeviceEvent_Kind.KIND_RELEASED]: 'released',
};

export function watchCommand(): Command {
  const cmd = withFleetFlags(withConnectionFlags(new Command('watch').description('stream device events (Ctrl-C to stop), of one server or (--etcd) the whole fleet')));
  return cmd.action(async (f: ConnectionFlags & FleetCliFlags) => {
    const abort = new AbortController();
    process.once('SIGINT', () => abort.abort());
    // Fleet: with --etcd the events come from etcd (src/fleet/cli.ts), not from one server.
    if (f.etcd) {
      return fleetWatch(f, abort.signal).catch((err) => {
        if (!abort.signal.aborted) reportError(err);
      });
    }
    const client = clientFrom(f);
    try {
      for await (const ev of client.watchDevices(abort.signal)) {
        if (f.json) console.log(JSON.stringify(DeviceEvent.toJSON(ev)));
        else if (ev.kind === DeviceEvent_Kind.KIND_SNAPSHOT_END) console.log('-- watching --');
        else console.log(`${(NAMES[ev.kind] ?? '?').padEnd(8)} ${ev.device ? describeDevice(ev.device) : ''}`);
      }
    } catch (err) {
      if (!abort.signal.aborted) reportError(err);
    } finally {
      client.close();
    }
  });
}
