// Every descriptor an emulated device answers, as hex, for each device kind and speed: what
// test/unit/emulated-descriptors.test.ts compares with the bytes captured before the devices
// declared their descriptors through the builder.
import { Speed } from '../../src/server/backends/types.js';
import { LoopbackDevice } from '../../src/server/backends/emulated/loopback.js';
import { MassStorageDevice } from '../../src/server/backends/emulated/mass-storage.js';
import { SerialDevice } from '../../src/server/backends/emulated/serial.js';
import type { EmulatedDevice } from '../../src/server/backends/emulated/emulated-device.js';

const hex = (b: Uint8Array) => Buffer.from(b).toString('hex');

export const SPEEDS = { full: Speed.Full, high: Speed.High, super: Speed.Super } as const;

/** The devices to dump at one speed: default options and a set with every override. */
export function devicesAt(speed: Speed): Record<string, EmulatedDevice> {
  const names = { vendorId: 0x1d6b, productId: 0x0104, serial: 'S-1', manufacturer: 'M', product: 'P' };
  return {
    'mass-storage': new MassStorageDevice({ imagePath: '/nonexistent/disk.img', speed }),
    'mass-storage-named': new MassStorageDevice({ imagePath: '/nonexistent/disk.img', speed, ...names }),
    loopback: new LoopbackDevice({ speed }),
    'loopback-named': new LoopbackDevice({ speed, vendorId: 0x1d6b, productId: 0x0105, serial: 'L-1' }),
    serial: new SerialDevice({ speed }),
    'serial-named': new SerialDevice({ speed, ...names }),
  };
}

export function dumpDescriptors(d: EmulatedDevice): Record<string, unknown> {
  const ds = d.descriptors;
  return {
    device: hex(ds.device),
    configs: ds.configs.map(hex),
    strings: Object.fromEntries([...ds.strings].map(([i, s]) => [i, hex(s)])),
    qualifier: ds.qualifier && hex(ds.qualifier),
    otherSpeedConfigs: ds.otherSpeedConfigs?.map(hex),
    bos: ds.bos && hex(ds.bos),
  };
}

export function dumpAll(): Record<string, Record<string, unknown>> {
  const out: Record<string, Record<string, unknown>> = {};
  for (const [speedName, speed] of Object.entries(SPEEDS)) {
    for (const [name, d] of Object.entries(devicesAt(speed))) out[`${name}@${speedName}`] = dumpDescriptors(d);
  }
  return out;
}
