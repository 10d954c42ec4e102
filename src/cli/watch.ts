// usbroam watch: the device list, then hotplug and claim events as they happen.
import { Command } from 'commander';
import { DeviceEvent, DeviceEvent_Kind } from '../gen/usbroam/v1/usbhost.js';
import { clientFrom, describeDevice, reportError, withConnectionFlags, type ConnectionFlags } from './common.js';

const NAMES: Record<number, string> = {
  [DeviceEvent_Kind.KIND_PRESENT]: 'present',
  [DeviceEvent_Kind.KIND_ADDED]: 'added',
  [DeviceEvent_Kind.KIND_REMOVED]: 'removed',
  [DeviceEvent_Kind.KIND_CLAIMED]: 'claimed',
  [DeviceEvent_Kind.KIND_RELEASED]: 'released',
};

export function watchCommand(): Command {
  return withConnectionFlags(new Command('watch').description('stream device events (Ctrl-C to stop)')).action(async (f: ConnectionFlags) => {
    const client = clientFrom(f);
    const abort = new AbortController();
    process.once('SIGINT', () => abort.abort());
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
