// usbroam devices: what the server exports to you.
import { Command } from 'commander';
import { Device } from '../gen/usbroam/v1/usbhost.js';
import { fleetDevices, withFleetFlags, type FleetCliFlags } from '../fleet/cli.js';
import { clientFrom, describeDevice, reportError, withConnectionFlags, type ConnectionFlags } from './common.js';

export function devicesCommand(): Command {
  const cmd = withFleetFlags(withConnectionFlags(new Command('devices').description('list the devices a USB host server exports to you, or (--etcd) the whole fleet')));
  return cmd.action(async (f: ConnectionFlags & FleetCliFlags) => {
    // Fleet: with --etcd the list comes from etcd (src/fleet/cli.ts), not from one server.
    if (f.etcd) return fleetDevices(f).catch(reportError);
    const client = clientFrom(f);
    try {
      const devices = await client.listDevices();
      if (f.json) console.log(JSON.stringify(devices.map((d) => Device.toJSON(d)), null, 2));
      else if (!devices.length) console.log('no devices');
      else for (const d of devices) console.log(describeDevice(d));
    } catch (err) {
      reportError(err);
    } finally {
      client.close();
    }
  });
}
