// Fleet selectors, key schema and the serve flags that configure registration.
import { expect } from 'chai';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { serveConfig } from '../../src/cli/serve.js';
import { fleetConfig } from '../../src/fleet/config.js';
import { deviceRecord, FleetKeys } from '../../src/fleet/keys.js';
import { describeFleetSelector, matchesFleetSelector, parseFleetSelector } from '../../src/fleet/selector.js';
import { fakeDevice } from '../../src/devkit/fleet-fakes.js';

const rec = (over = {}, labels: Record<string, string> = {}) =>
  deviceRecord('lab-1', '10.0.0.1:7470', fakeDevice('d1', { vendorId: 0x1050, productId: 0x0407, serial: 'YK-9', bus: 1, portPath: [4, 2], ...over }), labels, undefined);

describe('fleet selectors', () => {
  it('parses every term form, normalises vid:pid and joins repeated flags', () => {
    expect(parseFleetSelector('1050:407,serial=YK-9 host=lab-1')).to.deep.equal({ vidPid: '1050:0407', serial: 'YK-9', host: 'lab-1', labels: {} });
    expect(parseFleetSelector(['label license=cad', 'label:team=x', 'rack=r1', 'port=1-4.2', 'class=3'])).to.deep.equal({
      labels: { license: 'cad', team: 'x', rack: 'r1' },
      portPath: '1-4.2',
      class: 3,
    });
  });

  it('says which term is wrong', () => {
    expect(() => parseFleetSelector('bogus')).to.throw(/"bogus" is none of/);
    expect(() => parseFleetSelector('label')).to.throw(/"label" must be followed by k=v/);
    expect(() => parseFleetSelector('xyz:1')).to.throw(/not of the form vvvv:pppp/);
    expect(() => parseFleetSelector('serial=')).to.throw(/has no value/);
    expect(() => parseFleetSelector('serial=A serial=B')).to.throw(/serial twice/);
    expect(() => parseFleetSelector('class=300')).to.throw(/not a USB class code/);
    expect(() => parseFleetSelector('x'.repeat(5000))).to.throw(/over 4096/);
  });

  it('matches only when every term matches', () => {
    const d = rec({}, { license: 'cad' });
    for (const yes of ['1050:0407', '1050:*', 'serial=YK-9', 'host=lab-1', 'port=1-4.2', 'label license=cad', 'id=d1', '']) {
      expect(matchesFleetSelector(parseFleetSelector(yes), d), yes).to.equal(true);
    }
    for (const no of ['1050:0408', 'serial=YK-8', 'host=lab-2', 'port=1-4', 'label license=cam', 'label other=x', '1050:0407 host=lab-2', 'class=3']) {
      expect(matchesFleetSelector(parseFleetSelector(no), d), no).to.equal(false);
    }
    expect(describeFleetSelector(parseFleetSelector('serial=YK-9 label license=cad'))).to.equal('serial=YK-9,label license=cad');
  });
});

describe('fleet keys', () => {
  it('percent-encodes host names and device ids so neither can reach another key, and parses them back', () => {
    const k = new FleetKeys('/p/');
    expect(k.claim('a/b', 'x y')).to.equal('/p/claims/a%2Fb/x%20y');
    expect(k.parse(k.claim('a/b', 'x y'))).to.deep.equal({ kind: 'claim', host: 'a/b', id: 'x y' });
    expect(k.parse(k.device('h', 'd'))).to.deep.equal({ kind: 'device', host: 'h', id: 'd' });
    expect(k.parse(k.host('h'))).to.deep.equal({ kind: 'host', host: 'h' });
    expect(k.parse('/p/devices/h/d/extra')).to.equal(undefined);
    expect(k.parse('/other/hosts/h')).to.equal(undefined);
    expect(() => new FleetKeys('/no-slash')).to.throw(/must end with "\/"/);
  });
});

describe('fleet serve flags', () => {
  it('merges flags over the config file', () => {
    const cfg = fleetConfig(
      { etcd: 'http://127.0.0.1:2379,http://127.0.0.1:2479', hostName: 'lab-1', label: ['rack=a'], deviceLabel: ['serial=YK-9,1050:0407 license=cad team=x'], leaseTtl: '5' },
      { labels: { site: 'x', rack: 'file' }, devices: [{ select: 'host=lab-1', labels: { all: 'yes' } }] },
    )!;
    expect(cfg.etcd).to.deep.equal(['http://127.0.0.1:2379', 'http://127.0.0.1:2479']);
    expect(cfg.labels).to.deep.equal({ site: 'x', rack: 'a' });
    expect(cfg.leaseTtlS).to.equal(5);
    expect(cfg.deviceLabels.map((r) => r.labels)).to.deep.equal([{ all: 'yes' }, { license: 'cad', team: 'x' }]);
    expect(cfg.deviceLabels[1].select).to.deep.equal({ serial: 'YK-9', vidPid: '1050:0407', labels: {} });
    expect(fleetConfig({}, undefined)).to.equal(undefined);
  });

  it('refuses bad flags with a message that says what is wrong', () => {
    expect(() => fleetConfig({ hostName: 'x' }, undefined)).to.throw(/need --etcd/);
    expect(() => fleetConfig({ etcd: '127.0.0.1:2379' }, undefined)).to.throw(/must be http:\/\/ or https:\/\/|is not a URL/);
    expect(() => fleetConfig({ etcd: 'http://127.0.0.1' }, undefined)).to.throw(/names no port/);
    expect(() => fleetConfig({ etcd: 'http://127.0.0.1:1', leaseTtl: '1' }, undefined)).to.throw(/from 2 to 3600/);
    expect(() => fleetConfig({ etcd: 'http://127.0.0.1:1', label: ['novalue'] }, undefined)).to.throw(/key=value/);
    expect(() => fleetConfig({ etcd: 'http://127.0.0.1:1', deviceLabel: ['serial=X'] }, undefined)).to.throw(/SELECTOR k=v/);
    expect(() => fleetConfig({ etcd: 'http://127.0.0.1:1', hostName: 'a b' }, undefined)).to.throw(/without spaces/);
  });

  it('takes the config file\'s "fleet" object through serve --config', () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'usbroam-fleet-cfg-'));
    try {
      const file = path.join(dir, 'server.json');
      writeFileSync(file, JSON.stringify({ fleet: { etcd: ['http://127.0.0.1:2379'], hostName: 'lab-9', devices: [{ select: '1050:0407', labels: { role: 'hsm' } }] } }));
      const cfg = serveConfig({ config: file });
      const fleet = fleetConfig({ label: ['rack=z'] }, cfg.fleet)!;
      expect(fleet).to.include({ hostName: 'lab-9', leaseTtlS: 10, prefix: '/usbroam/v1/' });
      expect(fleet.labels).to.deep.equal({ rack: 'z' });
      expect(fleet.deviceLabels[0]).to.deep.equal({ select: { vidPid: '1050:0407', labels: {} }, labels: { role: 'hsm' } });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
