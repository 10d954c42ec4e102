// usbroam devices: what the server exports to you.
import { Command } from 'commander';
import { Device } from '../gen/usbroam/v1/usbhost.js';
import { clientFrom, describeDevice, reportError, withConnectionFlags, type ConnectionFlags } from './common.js';

export function devicesCommand(): Command {
  return withConnectionFlags(new Command('devices').description('list the devices a USB host server exports to you')).action(async (f: ConnectionFlags) => {
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
