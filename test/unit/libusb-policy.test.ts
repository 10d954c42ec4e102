import { expect } from 'chai';
import { isExported, isHub, normalizeAllowRules, parseAllowRule } from '../../src/server/backends/libusb/policy.js';
import { deviceId, speedFromSysfs, sysfsName } from '../../src/server/backends/libusb/info.js';
import { Speed, type DeviceInfo } from '../../src/server/backends/types.js';

function info(p: Partial<DeviceInfo> = {}): DeviceInfo {
  return {
    id: 'usb-1-2-S',
    vendorId: 0x46f4,
    productId: 0x0001,
    deviceClass: 0,
    deviceSubclass: 0,
    deviceProtocol: 0,
    bcdUsb: 0x0200,
    bcdDevice: 0,
    speed: Speed.High,
    manufacturer: 'QEMU',
    product: 'QEMU USB HARDDRIVE',
    serial: 'S',
    bus: 1,
    portPath: [2],
    maxPacketSize0: 64,
    configurations: [{ value: 1, maxPowerMa: 100, selfPowered: false, remoteWakeup: false, interfaces: [{ number: 0, alternateSetting: 0, interfaceClass: 8, interfaceSubclass: 6, interfaceProtocol: 0x50, numEndpoints: 2 }], endpoints: [] }],
    activeConfiguration: 1,
    interfaces: [{ number: 0, alternateSetting: 0, interfaceClass: 8, interfaceSubclass: 6, interfaceProtocol: 0x50, numEndpoints: 2 }],
    endpoints: [],
    backend: 'libusb',
    ...p,
  };
}

describe('libusb export policy', () => {
  it('parses the flag forms', () => {
    expect(parseAllowRule('*')).to.deep.equal({});
    expect(parseAllowRule('46f4:0001')).to.deep.equal({ vendorId: 0x46f4, productId: 1 });
    expect(parseAllowRule('46f4:*')).to.deep.equal({ vendorId: 0x46f4 });
    expect(parseAllowRule('vid=0627,pid=1,serial=X,class=03,port=1-1.4')).to.deep.equal({ vendorId: 0x627, productId: 1, serial: 'X', class: 3, bus: 1, portPath: [1, 4] });
    expect(parseAllowRule('port=2,bus=3')).to.deep.equal({ portPath: [2], bus: 3 });
  });

  it('rejects bad rules with the reason', () => {
    expect(() => parseAllowRule('')).to.throw(/empty/);
    expect(() => parseAllowRule('xyz')).to.throw(/cannot parse "xyz"/);
    expect(() => parseAllowRule('vid=12345')).to.throw(/vendor id/);
    expect(() => parseAllowRule('colour=red')).to.throw(/unknown key "colour"/);
    expect(() => parseAllowRule('port=a.b')).to.throw(/port/);
    expect(() => normalizeAllowRules({})).to.throw(/array/);
    expect(() => normalizeAllowRules([{ vendor: 1 }])).to.throw(/unknown key "vendor"/);
    expect(normalizeAllowRules(['*', { vendorId: 1 }])).to.deep.equal([{}, { vendorId: 1 }]);
  });

  it('exports only matching devices; no rules, nothing', () => {
    expect(isExported([], info())).to.equal(false);
    expect(isExported([{}], info())).to.equal(true);
    expect(isExported([{ vendorId: 0x46f4, productId: 2 }], info())).to.equal(false);
    expect(isExported([{ vendorId: 0x46f4, productId: 2 }, { serial: 'S' }], info())).to.equal(true);
    expect(isExported([{ class: 8 }], info())).to.equal(true);
    expect(isExported([{ class: 3 }], info())).to.equal(false);
    expect(isExported([{ bus: 1, portPath: [2] }], info())).to.equal(true);
    expect(isExported([{ bus: 1, portPath: [2, 1] }], info())).to.equal(false);
  });

  it('never exports hubs, whatever the rules', () => {
    const hub = info({ deviceClass: 9 });
    expect(isHub(hub)).to.equal(true);
    expect(isExported([{}], hub)).to.equal(false);
    expect(isExported([{ class: 9 }], hub)).to.equal(false);
    const hubIntf = info({ configurations: [{ value: 1, maxPowerMa: 0, selfPowered: true, remoteWakeup: false, interfaces: [{ number: 0, alternateSetting: 0, interfaceClass: 9, interfaceSubclass: 0, interfaceProtocol: 0, numEndpoints: 1 }], endpoints: [] }] });
    expect(isExported([{}], hubIntf)).to.equal(false);
  });

  it('ids, sysfs names and speeds', () => {
    expect(sysfsName(2, [1, 4])).to.equal('2-1.4');
    expect(sysfsName(2, [])).to.equal('usb2');
    expect(deviceId(2, [1], 'STICK0001')).to.equal('usb-2-1-STICK0001');
    expect(deviceId(1, [3], '1-0000:00:02.0-3')).to.equal('usb-1-3-1-0000_00_02.0-3');
    expect(deviceId(1, [3], '')).to.equal('usb-1-3');
    expect(speedFromSysfs('480')).to.equal(Speed.High);
    expect(speedFromSysfs('5000')).to.equal(Speed.Super);
    expect(speedFromSysfs('12')).to.equal(Speed.Full);
    expect(speedFromSysfs('1.5')).to.equal(Speed.Low);
    expect(speedFromSysfs(undefined)).to.equal(Speed.Unknown);
  });
});
