import { expect } from 'chai';
import { qemuArgsFor, redirIds } from '../../src/client/bridge/qemu-attach.js';

describe('bridge qemu args', () => {
  it('stable ids, -chardev/-device args and libvirt XML for a cold-plugged attachment', () => {
    const ids = redirIds('emu-1-1');
    expect(ids).to.deep.equal({ id: 'usbroam-emu-1-1', chardevId: 'usbroam-emu-1-1-chr' });
    expect(redirIds('a/b c').id).to.equal('usbroam-a-b-c');
    const r = qemuArgsFor({ ...ids, socketPath: '/run/usbroam/vm1,x.sock', bus: 'xhci.0', filter: '0x08:-1:-1:-1:1|-1:-1:-1:-1:0' });
    expect(r.args).to.deep.equal([
      '-chardev',
      'socket,id=usbroam-emu-1-1-chr,path=/run/usbroam/vm1,,x.sock,server=on,wait=off',
      '-device',
      'usb-redir,chardev=usbroam-emu-1-1-chr,id=usbroam-emu-1-1,bus=xhci.0,filter=0x08:-1:-1:-1:1|-1:-1:-1:-1:0',
    ]);
    expect(r.libvirtXml).to.include("<redirdev bus='usb' type='unix'>");
    expect(r.libvirtXml).to.include("<source mode='bind' path='/run/usbroam/vm1,x.sock'/>");
    expect(r.libvirtXml).to.include("<usbdev class='0x08' allow='yes'/>");
    expect(r.libvirtXml).to.include("<usbdev allow='no'/>");
  });
});
