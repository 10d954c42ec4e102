// The libvirt pieces that need no daemon: the XML qemu-args --libvirt gives, the attachments the
// hook reads back from a domain XML as libvirt formats it, and which hook call does what.
import { expect } from 'chai';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { attachmentsMetadataXml, attachmentsOf, bridgeQmpCommandlineXml, bridgeQmpSocketOf, libvirtRedirIds, redirdevXml } from '../../src/libvirt/domain-xml.js';
import { hookAction, hookScript, IncomingMarks } from '../../src/libvirt/hook.js';

// As `virsh dumpxml` prints a domain after `virsh metadata --set` (libvirt adds the prefix).
const DOMAIN = `<domain type='qemu' id='1' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>lv0</name>
  <metadata>
    <usbroam:attachments xmlns:usbroam="urn:usbroam:libvirt:1">
      <usbroam:attachment id="ua-usbroam-1-2" session="s-42" bus="usb.0"/>
      <usbroam:attachment id="ua-usbroam-3-1" session="s&amp;43" bus="usb.0" server="host:7470"/>
    </usbroam:attachments>
    <other:thing xmlns:other="urn:other"><other:attachment id="x" session="y"/></other:thing>
  </metadata>
  <devices/>
  <qemu:commandline>
    <qemu:arg value='-qmp'/>
    <qemu:arg value='unix:/run/usbroam/lv0.qmp.sock,server=on,wait=off'/>
  </qemu:commandline>
</domain>`;

describe('libvirt domain XML and hook', () => {
  it('the redirdev alias is the QEMU device id, ua-usbroam-<device>', () => {
    expect(libvirtRedirIds('1-2')).to.deep.equal({ id: 'ua-usbroam-1-2', chardevId: 'charua-usbroam-1-2' });
    const x = redirdevXml({ deviceId: '1-2', socketPath: '/run/u/a.sock', filter: '0x08:-1:-1:-1:1|-1:-1:-1:-1:0' });
    expect(x).to.contain(`<source mode='bind' path='/run/u/a.sock'/>`).and.to.contain(`<alias name='ua-usbroam-1-2'/>`);
    expect(x).to.contain(`<usbdev class='0x08' allow='yes'/>`).and.to.contain(`<usbdev allow='no'/>`);
  });

  it('reads back the bridge QMP socket and the attachments it wrote', () => {
    expect(bridgeQmpSocketOf(bridgeQmpCommandlineXml('/tmp/a b.sock'))).to.equal('/tmp/a b.sock');
    expect(bridgeQmpSocketOf(DOMAIN)).to.equal('/run/usbroam/lv0.qmp.sock');
    expect(attachmentsOf(DOMAIN)).to.deep.equal([
      { id: 'ua-usbroam-1-2', session: 's-42', bus: 'usb.0', server: undefined },
      { id: 'ua-usbroam-3-1', session: 's&43', bus: 'usb.0', server: 'host:7470' },
    ]);
    const set = attachmentsMetadataXml([{ id: 'a', session: 'b"c', bus: 'usb.0' }]);
    expect(set).to.equal('<attachments><attachment id="a" session="b&quot;c" bus="usb.0"/></attachments>');
    const stored = `<metadata>${set.replace(/<(\/?)attachment/g, '<$1u:attachment').replace('<u:attachments>', '<u:attachments xmlns:u="urn:usbroam:libvirt:1">')}</metadata>`;
    expect(attachmentsOf(stored)).to.deep.equal([{ id: 'a', session: 'b"c', bus: 'usb.0', server: undefined }]);
    expect(attachmentsOf('<domain><name>x</name></domain>')).to.deep.equal([]);
    expect(() => attachmentsOf('<metadata><u:attachments xmlns:u="urn:usbroam:libvirt:1"><u:attachment id="a"/></u:attachments></metadata>')).to.throw(/without id or session/);
  });

  it('marks at migrate begin, prepares at started begin only when marked', () => {
    expect(hookAction(['lv0', 'migrate', 'begin', '-'], DOMAIN, false)).to.deep.equal({ kind: 'mark-incoming', domain: 'lv0' });
    expect(hookAction(['lv0', 'restore', 'begin', '-'], DOMAIN, false).kind).to.equal('mark-incoming');
    expect(hookAction(['lv0', 'migrate', 'begin', '-'], '<domain/>', false).kind).to.equal('none');
    expect(hookAction(['lv0', 'started', 'begin', '-'], DOMAIN, false)).to.deep.equal({ kind: 'none', why: 'not an incoming migration' });
    const p = hookAction(['lv0', 'started', 'begin', '-'], DOMAIN, true);
    expect(p).to.deep.include({ kind: 'prepare', domain: 'lv0', qmpSocket: '/run/usbroam/lv0.qmp.sock' });
    expect(hookAction(['lv0', 'prepare', 'begin', '-'], DOMAIN, true).kind).to.equal('none');
    expect(() => hookAction(['lv0', 'started', 'begin'], DOMAIN.replace(/<qemu:commandline>[\s\S]*<\/qemu:commandline>/, ''), true)).to.throw(/no bridge QMP socket/);
    expect(() => hookAction([], '', false)).to.throw(/usage/);
  });

  it('a mark is taken once', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'hook-marks-'));
    try {
      const m = new IncomingMarks(path.join(dir, 'state'));
      expect(m.take('lv0')).to.equal(false);
      m.mark('lv0');
      expect(m.take('lv0')).to.equal(true);
      expect(m.take('lv0')).to.equal(false);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('the hook script runs usbroam only for the phases it needs', () => {
    const s = hookScript({ usbroam: ['/usr/bin/usbroam'], control: '/run/usbroam/bridge.sock' });
    expect(s.startsWith('#!/bin/sh\n')).to.equal(true);
    expect(s).to.contain(`"migrate begin"|"restore begin"|"started begin") ;;`);
    expect(s).to.contain(`exec '/usr/bin/usbroam' 'libvirt-hook' '--control' '/run/usbroam/bridge.sock' "$@"`);
  });
});
