// RedirHost (the bridge's usbredir host) against a fake device: no sockets, no server, no sleeps.
import { expect } from 'chai';
import { UrbStatus, TransferType } from '../../src/gen/usbroam/v1/usbhost.js';
import { Cap, Status, type Packet, type PacketOf } from '../../src/qemu/usbredir/index.js';
import { encodeHandOffState, parseHandOffState } from '../../src/client/bridge/handoff/state.js';
import { FakeRedirDevice, hostRig, turn, type HostRig } from '../helpers/fake-redir-device.js';

const EMPTY = new Uint8Array(0);
let nextId = 0x100n;
const rid = () => (nextId += 4n);

function control(requesttype: number, request: number, value: number, index: number, length: number, data = EMPTY): PacketOf<'control_packet'> {
  return { type: 'control_packet', id: rid(), endpoint: requesttype & 0x80, request, requesttype, status: 0, value, index, length: requesttype & 0x80 ? length : data.length, data };
}
function bulk(endpoint: number, lengthOrData: number | Uint8Array): PacketOf<'bulk_packet'> {
  const data = typeof lengthOrData === 'number' ? EMPTY : lengthOrData;
  return { type: 'bulk_packet', id: rid(), endpoint, status: 0, length: typeof lengthOrData === 'number' ? lengthOrData : data.length, streamId: 0, data };
}

/** A connected host (device_connect sent), the packets of the connect cleared. */
async function connected(opts: Parameters<typeof hostRig>[0] = {}): Promise<HostRig> {
  const r = hostRig(opts);
  r.host.start();
  await turn();
  expect(r.host.state).to.equal('connected');
  r.sent.length = 0;
  r.events.length = 0;
  return r;
}

/** Receive packets, then let ops (one turn each) and completions run. */
async function feed(r: HostRig, ...packets: Packet[]): Promise<void> {
  r.host.receive(packets);
  for (let i = 0; i <= packets.length; i++) await turn();
}

describe('RedirHost (usbredir host, socket-free)', () => {
  describe('connect', () => {
    it('without a hello exchange: interface_info, ep_info, device_connect built from the device, then "connected"', async () => {
      const r = hostRig();
      r.host.start();
      expect(r.sent, 'device_connect waits a turn (a filter in the same read comes first)').to.deep.equal([]);
      await turn();
      expect(r.sent.map((p) => p.type)).to.deep.equal(['interface_info', 'ep_info', 'device_connect']);
      const conn = r.last('device_connect');
      expect(conn).to.include({ vendorId: 0x1d6b, productId: 0x0104, deviceClass: 0xef, deviceSubclass: 2, deviceProtocol: 1, deviceVersionBcd: 0x0100, speed: 2 });
      const ep = r.last('ep_info');
      expect([ep.epType[0], ep.epType[16]]).to.deep.equal([0, 0]);
      expect([ep.epType[1], ep.epType[17], ep.epType[18], ep.epType[19], ep.epType[3]]).to.deep.equal([2, 2, 3, 1, 1]);
      expect(ep.maxPacketSize![17]).to.equal(512);
      expect(ep.maxPacketSize![19], 'high-speed iso: 1024 x (1 + 2 extra transactions)').to.equal(3072);
      expect(ep.interval[18]).to.equal(4);
      expect(ep.epType[2], 'no endpoint 0x02').to.equal(255);
      const ii = r.last('interface_info');
      expect(ii).to.include({ interfaceCount: 1 });
      expect(ii.interfaceClass).to.deep.equal([0xff]);
      expect(r.events.map((e) => e[0])).to.deep.equal(['connected']);
      expect(r.host.state).to.equal('connected');
    });

    it("with a hello exchange: connects on QEMU's hello, not before", async () => {
      const caps = { peerCaps: null as number[] | null, noHello: false, hasCap: () => true, peerHasCap: () => true };
      const r = hostRig({ caps });
      r.host.start();
      await turn();
      expect(r.sent).to.deep.equal([]);
      caps.peerCaps = [0xff];
      await feed(r, { type: 'hello', id: 0n, version: 'qemu', caps: [0xff] });
      expect(r.sent.map((p) => p.type)).to.deep.equal(['interface_info', 'ep_info', 'device_connect']);
    });

    it('a VM filter that denies the device, in the same read as the hello: no device_connect, "rejected", closed', async () => {
      const r = hostRig({ caps: { peerCaps: [0xff], noHello: false, hasCap: () => true, peerHasCap: () => true } });
      r.host.start();
      await feed(r, { type: 'hello', id: 0n, version: 'qemu', caps: [0xff] }, { type: 'filter_filter', id: 0n, rules: '0xff,-1,-1,-1,0|-1,-1,-1,-1,1' });
      expect(r.of('device_connect')).to.have.length(0);
      expect(r.events.map((e) => e[0])).to.deep.equal(['rejected']);
      expect(r.closed?.reason).to.match(/filter/);
      expect(r.host.state).to.equal('closed');
    });

    it('a filter that allows the device changes nothing; an invalid one is ignored', async () => {
      const r = await connected();
      await feed(r, { type: 'filter_filter', id: 0n, rules: '-1,-1,-1,-1,1' }, { type: 'filter_filter', id: 0n, rules: 'nonsense' });
      expect(r.closed).to.equal(undefined);
      expect(r.sent).to.deep.equal([]);
    });

    it('filter_reject from QEMU closes', async () => {
      const r = await connected();
      await feed(r, { type: 'filter_reject', id: 0n });
      expect(r.events.map((e) => e[0])).to.include('rejected');
      expect(r.closed?.reason).to.match(/filter_reject/);
    });
  });

  describe('data packets', () => {
    it('control IN: one URB with the setup packet; answered with the same id, data cut to the actual length', async () => {
      const r = await connected();
      const p = control(0x80, 6, 0x0100, 0, 18);
      await feed(r, p);
      const u = r.dev.lastUrb();
      expect(u.req).to.include({ endpoint: 0x80, type: TransferType.TRANSFER_CONTROL, length: 18 });
      expect([...u.req.setup!]).to.deep.equal([0x80, 6, 0x00, 0x01, 0, 0, 18, 0]);
      expect(r.sent, 'no answer before the completion').to.deep.equal([]);
      u.complete({ data: new Uint8Array(20).fill(7), actualLength: 12 });
      await turn();
      const a = r.last('control_packet');
      expect(a).to.include({ id: p.id, status: Status.success, length: 12, request: 6, value: 0x100 });
      expect(a.data.length).to.equal(12);
    });

    it('control OUT: the data goes in the URB; the answer carries the length and no data', async () => {
      const r = await connected();
      const p = control(0x40, 0x02, 1, 2, 3, new Uint8Array([1, 2, 3]));
      await feed(r, p);
      const u = r.dev.lastUrb();
      expect(u.req.data).to.equal(p.data);
      u.complete({ actualLength: 3 });
      await turn();
      expect(r.last('control_packet')).to.include({ id: p.id, status: 0, length: 3 });
      expect(r.last('control_packet').data.length).to.equal(0);
    });

    it('CLEAR_FEATURE(ENDPOINT_HALT) becomes a clearHalt op answered with its status', async () => {
      const r = await connected();
      const seen: unknown[] = [];
      r.dev.opHandler = (op) => (seen.push(op), { status: UrbStatus.URB_STATUS_STALL });
      const p = control(0x02, 0x01, 0, 0x81, 0);
      await feed(r, p);
      expect(seen).to.deep.equal([{ $case: 'clearHalt', value: { endpoint: 0x81 } }]);
      expect(r.dev.urbs).to.have.length(0);
      expect(r.last('control_packet')).to.include({ id: p.id, status: Status.stall });
    });

    it('a control packet on a non-control endpoint is answered inval', async () => {
      const r = await connected();
      const p = { ...control(0x80, 6, 0x100, 0, 18), endpoint: 0x81 };
      await feed(r, p);
      expect(r.last('control_packet')).to.include({ id: p.id, status: Status.inval });
      expect(r.dev.urbs).to.have.length(0);
    });

    it('bulk OUT: the URB gets the packet data itself (no copy); bulk IN: the answer carries the data', async () => {
      const r = await connected();
      const out = bulk(0x01, new Uint8Array(1000).fill(5));
      const inp = bulk(0x81, 4096);
      await feed(r, out, inp);
      const [uo, ui] = r.dev.urbs;
      expect(uo!.req.data).to.equal(out.data);
      expect(uo!.req).to.include({ endpoint: 0x01, type: TransferType.TRANSFER_BULK, length: 1000 });
      expect(ui!.req).to.include({ endpoint: 0x81, length: 4096 });
      expect(ui!.req.data!.length).to.equal(0);
      // Completed out of order: each answer keeps its id.
      const inData = new Uint8Array(100).fill(9);
      ui!.complete({ data: inData, actualLength: 100 });
      uo!.complete({ actualLength: 1000 });
      await turn();
      const [a1, a2] = r.of('bulk_packet');
      expect(a1).to.include({ id: inp.id, status: 0, length: 100 });
      expect(a1!.data).to.equal(inData);
      expect(a2).to.include({ id: out.id, status: 0, length: 1000 });
      expect(a2!.data.length).to.equal(0);
      expect(r.bulkAnswered).to.deep.equal([
        [ui!.urbId, inp.id, 0x81],
        [uo!.urbId, out.id, 0x01],
      ]);
      expect(r.host.inFlightCount).to.equal(0);
      expect([r.host.urbsSubmitted, r.host.urbsCompleted]).to.deep.equal([2, 2]);
    });

    it('an error status passes through; a URB the channel failed is answered ioerror', async () => {
      const r = await connected();
      const a = bulk(0x81, 512);
      const b = bulk(0x81, 512);
      await feed(r, a, b);
      r.dev.urbs[0]!.complete({ status: UrbStatus.URB_STATUS_STALL });
      r.dev.urbs[1]!.fail(new Error('channel closed'));
      await turn();
      expect(r.of('bulk_packet').map((p) => [p.id, p.status, p.length])).to.deep.equal([
        [a.id, Status.stall, 0],
        [b.id, Status.ioerror, 0],
      ]);
    });

    it('interrupt OUT: one URB, answered with the length', async () => {
      const r = await connected();
      const p: PacketOf<'interrupt_packet'> = { type: 'interrupt_packet', id: rid(), endpoint: 0x02, status: 0, length: 4, data: new Uint8Array(4) };
      await feed(r, p);
      expect(r.dev.lastUrb().req).to.include({ endpoint: 0x02, type: TransferType.TRANSFER_INTERRUPT, length: 4 });
      r.dev.lastUrb().complete({ actualLength: 4 });
      await turn();
      expect(r.last('interrupt_packet')).to.include({ id: p.id, status: 0, length: 4 });
    });

    it('iso OUT: inval without a stream; with one, a one-packet iso URB each, errors reported as iso_stream_status', async () => {
      const r = await connected();
      const iso = (id: bigint): PacketOf<'iso_packet'> => ({ type: 'iso_packet', id, endpoint: 0x03, status: 0, length: 16, data: new Uint8Array(16) });
      await feed(r, iso(0n));
      expect(r.last('iso_stream_status')).to.include({ status: Status.inval, endpoint: 0x03 });
      r.sent.length = 0;
      await feed(r, { type: 'start_iso_stream', id: 1n, endpoint: 0x03, pktsPerUrb: 4, noUrbs: 2 });
      expect(r.last('iso_stream_status')).to.include({ id: 1n, status: Status.success, endpoint: 0x03 });
      await feed(r, iso(1n), iso(2n));
      expect(r.dev.urbs).to.have.length(2);
      expect(r.dev.urbs[0]!.req.isoPackets).to.deep.equal([{ length: 16, status: 0, actualLength: 0 }]);
      r.dev.urbs[0]!.complete({ actualLength: 16 });
      r.dev.urbs[1]!.complete({ status: UrbStatus.URB_STATUS_IOERROR });
      await turn();
      expect(r.of('iso_stream_status').map((p) => [p.id, p.status])).to.deep.equal([
        [1n, Status.success],
        [2n, Status.ioerror],
      ]);
    });
  });

  describe('cancel', () => {
    it('answers cancelled at once, cancels the URB and drops its later completion; the id can be reused', async () => {
      const r = await connected();
      const p = bulk(0x81, 512);
      await feed(r, p);
      const u = r.dev.lastUrb();
      await feed(r, { type: 'cancel_data_packet', id: p.id });
      expect(r.of('bulk_packet').map((x) => [x.id, x.status, x.length])).to.deep.equal([[p.id, Status.cancelled, 0]]);
      expect(r.dev.cancels).to.deep.equal([u.urbId]);
      u.complete({ status: UrbStatus.URB_STATUS_CANCELLED });
      await turn();
      expect(r.of('bulk_packet'), 'one answer only').to.have.length(1);
      expect(r.host.inFlightCount).to.equal(0);
      expect(r.host.urbsCancelled).to.equal(1);
      const again = { ...bulk(0x81, 64), id: p.id };
      await feed(r, again);
      r.dev.lastUrb().complete({ data: new Uint8Array(3), actualLength: 3 });
      await turn();
      expect(r.last('bulk_packet')).to.include({ id: p.id, status: 0, length: 3 });
    });

    it('a cancel for an unknown or completed id does nothing', async () => {
      const r = await connected();
      const p = bulk(0x81, 8);
      await feed(r, p);
      r.dev.lastUrb().complete({ actualLength: 0 });
      await turn();
      await feed(r, { type: 'cancel_data_packet', id: p.id }, { type: 'cancel_data_packet', id: 0xdeadn });
      expect(r.of('bulk_packet')).to.have.length(1);
      expect(r.dev.cancels).to.deep.equal([]);
    });
  });

  describe('configuration and alternate settings', () => {
    it('set_configuration: pending URBs cancelled (guest told), op, then interface_info + ep_info + status; ops wait for the submits before them', async () => {
      const dev = new FakeRedirDevice();
      dev.device.activeConfiguration = 0;
      const r = await connected({ dev });
      const ops: unknown[] = [];
      dev.opHandler = (op) => (ops.push(op), undefined);
      const pending = bulk(0x81, 512);
      r.host.receive([pending, { type: 'set_configuration', id: 7n, configuration: 1 }]);
      expect(dev.urbs, 'the URB is submitted at once').to.have.length(1);
      expect(ops, 'the op waits a turn').to.have.length(0);
      await turn();
      expect(ops).to.deep.equal([{ $case: 'setConfiguration', value: { value: 1 } }]);
      expect(r.last('bulk_packet')).to.include({ id: pending.id, status: Status.cancelled });
      dev.ops[0]!.answer({ status: UrbStatus.URB_STATUS_SUCCESS });
      await turn();
      expect(r.sent.map((p) => p.type).slice(-3)).to.deep.equal(['interface_info', 'ep_info', 'configuration_status']);
      expect(r.last('configuration_status')).to.include({ id: 7n, status: Status.success, configuration: 1 });
      await feed(r, { type: 'get_configuration', id: 8n });
      expect(r.last('configuration_status')).to.include({ id: 8n, status: Status.success, configuration: 1 });
    });

    it('set_configuration of the active one answers at once; a failed one keeps the old value and sends no ep_info', async () => {
      const r = await connected();
      let ops = 0;
      r.dev.opHandler = () => (ops++, { status: UrbStatus.URB_STATUS_STALL, message: 'no' });
      await feed(r, { type: 'set_configuration', id: 1n, configuration: 1 });
      expect(ops).to.equal(0);
      expect(r.last('configuration_status')).to.include({ id: 1n, status: Status.success, configuration: 1 });
      r.sent.length = 0;
      await feed(r, { type: 'set_configuration', id: 2n, configuration: 2 });
      expect(ops).to.equal(1);
      expect(r.sent.map((p) => p.type)).to.deep.equal(['configuration_status']);
      expect(r.last('configuration_status')).to.include({ id: 2n, status: Status.stall, configuration: 1 });
    });

    it('set_alt_setting: URBs on that interface cancelled, op, ep_info re-sent, status with the new alt; get_alt_setting; unknown interface inval', async () => {
      const r = await connected();
      const ops: unknown[] = [];
      r.dev.opHandler = (op) => {
        ops.push(op);
        r.dev.device.interfaces[0]!.alternateSetting = 1;
        return { status: UrbStatus.URB_STATUS_SUCCESS };
      };
      const onIface = bulk(0x81, 512);
      const ctrl = control(0x80, 6, 0x100, 0, 18);
      await feed(r, onIface, ctrl);
      await feed(r, { type: 'set_alt_setting', id: 3n, interface: 0, alt: 1 });
      expect(ops).to.deep.equal([{ $case: 'setInterface', value: { interfaceNumber: 0, alternateSetting: 1 } }]);
      expect(r.of('bulk_packet').map((p) => [p.id, p.status])).to.deep.equal([[onIface.id, Status.cancelled]]);
      expect(r.of('control_packet'), 'control requests are not on the interface').to.have.length(0);
      expect(r.sent.map((p) => p.type).slice(-3)).to.deep.equal(['interface_info', 'ep_info', 'alt_setting_status']);
      expect(r.last('alt_setting_status')).to.include({ id: 3n, status: 0, interface: 0, alt: 1 });
      await feed(r, { type: 'get_alt_setting', id: 4n, interface: 0 }, { type: 'get_alt_setting', id: 5n, interface: 9 }, { type: 'set_alt_setting', id: 6n, interface: 9, alt: 0 });
      expect(r.of('alt_setting_status').slice(-3).map((p) => [p.id, p.status, p.alt])).to.deep.equal([
        [4n, Status.success, 1],
        [5n, Status.inval, 0xff],
        [6n, Status.inval, 0xff],
      ]);
    });

    it('alloc_bulk_streams: endpoints from the bitmask; fewer streams than asked is an ioerror', async () => {
      const r = await connected();
      const ops: unknown[] = [];
      r.dev.opHandler = (op) => (ops.push(op), { status: UrbStatus.URB_STATUS_SUCCESS, value: 4 });
      await feed(r, { type: 'alloc_bulk_streams', id: 1n, endpoints: (1 << 1) | (1 << 17), noStreams: 8 });
      expect(ops).to.deep.equal([{ $case: 'allocBulkStreams', value: { endpoints: [0x01, 0x81], numStreams: 8 } }]);
      expect(r.last('bulk_streams_status')).to.include({ id: 1n, status: Status.ioerror, noStreams: 8 });
      await feed(r, { type: 'free_bulk_streams', id: 2n, endpoints: 1 << 17 });
      expect(r.last('bulk_streams_status')).to.include({ id: 2n, status: Status.success, noStreams: 0 });
    });

    it('reset: pending URBs cancelled, reset op, no reply; a failed reset disconnects the device', async () => {
      const r = await connected();
      const ops: string[] = [];
      r.dev.opHandler = (op) => (ops.push(op.$case), { status: UrbStatus.URB_STATUS_SUCCESS });
      const p = bulk(0x81, 512);
      await feed(r, p, { type: 'reset', id: 0n });
      expect(ops).to.deep.equal(['reset']);
      expect(r.sent.map((x) => [x.type, (x as { status?: number }).status])).to.deep.equal([['bulk_packet', Status.cancelled]]);
      r.dev.opHandler = () => ({ status: UrbStatus.URB_STATUS_IOERROR, message: 'gone' });
      await feed(r, { type: 'reset', id: 0n });
      expect(r.last('device_disconnect')).to.be.an('object');
      expect(r.events.map((e) => e[0])).to.include('deviceGone');
    });
  });

  describe('receiving streams', () => {
    it('interrupt receiving: start op, status, data as interrupt_packets with their own ids; stop', async () => {
      const r = await connected();
      const ops: unknown[] = [];
      r.dev.opHandler = (op) => (ops.push(op), { status: UrbStatus.URB_STATUS_SUCCESS });
      await feed(r, { type: 'start_interrupt_receiving', id: 5n, endpoint: 0x82 });
      expect(ops).to.deep.equal([{ $case: 'startReceiving', value: { endpoint: 0x82, type: TransferType.TRANSFER_INTERRUPT, transferLength: 8, transfers: 5, isoPacketsPerTransfer: 0 } }]);
      expect(r.last('interrupt_receiving_status')).to.include({ id: 5n, status: Status.success, endpoint: 0x82 });
      const d = new Uint8Array(8).fill(1);
      r.host.onReceived({ endpoint: 0x82, index: 0, status: 0, data: d, isoPackets: [] });
      r.host.onReceived({ endpoint: 0x82, index: 1, status: 0, data: d, isoPackets: [] });
      expect(r.of('interrupt_packet').map((p) => [p.id, p.endpoint, p.length])).to.deep.equal([
        [0n, 0x82, 8],
        [1n, 0x82, 8],
      ]);
      expect(r.last('interrupt_packet').data).to.equal(d);
      await feed(r, { type: 'stop_interrupt_receiving', id: 6n, endpoint: 0x82 });
      expect(ops[ops.length - 1]).to.deep.equal({ $case: 'stopReceiving', value: { endpoint: 0x82 } });
      expect(r.last('interrupt_receiving_status')).to.include({ id: 6n, status: Status.success });
      r.host.onReceived({ endpoint: 0x82, index: 2, status: 0, data: d, isoPackets: [] });
      expect(r.of('interrupt_packet'), 'nothing after the stop').to.have.length(2);
    });

    it('a stall is cleared and the stream restarted silently; another error is reported, then restarted', async () => {
      const r = await connected();
      const ops: string[] = [];
      r.dev.opHandler = (op) => (ops.push(op.$case), { status: UrbStatus.URB_STATUS_SUCCESS });
      await feed(r, { type: 'start_interrupt_receiving', id: 0n, endpoint: 0x82 });
      r.host.onReceived({ endpoint: 0x82, index: 0, status: 0, data: new Uint8Array(8), isoPackets: [] });
      ops.length = 0;
      r.sent.length = 0;
      r.host.onReceived({ endpoint: 0x82, index: 1, status: UrbStatus.URB_STATUS_STALL, data: EMPTY, isoPackets: [] });
      for (let i = 0; i < 4; i++) await turn();
      expect(ops).to.deep.equal(['stopReceiving', 'clearHalt', 'startReceiving']);
      expect(r.sent).to.deep.equal([]);
      r.host.onReceived({ endpoint: 0x82, index: 0, status: 0, data: new Uint8Array(8), isoPackets: [] });
      expect(r.last('interrupt_packet').id, 'ids start again at 0 after a restart').to.equal(0n);
      ops.length = 0;
      r.host.onReceived({ endpoint: 0x82, index: 1, status: UrbStatus.URB_STATUS_IOERROR, data: EMPTY, isoPackets: [] });
      for (let i = 0; i < 4; i++) await turn();
      expect(r.last('interrupt_packet')).to.include({ id: 1n, status: Status.ioerror, length: 0 });
      expect(ops).to.deep.equal(['stopReceiving', 'startReceiving']);
    });

    it('a start on an endpoint of another type stalls; a second start is inval; a failed start op stalls', async () => {
      const r = await connected();
      await feed(r, { type: 'start_interrupt_receiving', id: 1n, endpoint: 0x81 });
      expect(r.last('interrupt_receiving_status')).to.include({ id: 1n, status: Status.stall });
      await feed(r, { type: 'start_bulk_receiving', id: 2n, endpoint: 0x81, streamId: 0, bytesPerTransfer: 4096, noTransfers: 4 });
      await feed(r, { type: 'start_bulk_receiving', id: 3n, endpoint: 0x81, streamId: 0, bytesPerTransfer: 4096, noTransfers: 4 });
      expect(r.of('bulk_receiving_status').map((p) => [p.id, p.status])).to.deep.equal([
        [2n, Status.success],
        [3n, Status.inval],
      ]);
      r.dev.opHandler = () => ({ status: UrbStatus.URB_STATUS_IOERROR });
      await feed(r, { type: 'start_iso_stream', id: 4n, endpoint: 0x83, pktsPerUrb: 8, noUrbs: 2 });
      expect(r.last('iso_stream_status')).to.include({ id: 4n, status: Status.stall });
    });

    it('bulk receiving: buffered_bulk_packets; data QEMU does not take beyond the bound closes', async () => {
      const r = await connected({ host: { maxBufferedBytes: 10_000 } });
      await feed(r, { type: 'start_bulk_receiving', id: 2n, endpoint: 0x81, streamId: 0, bytesPerTransfer: 4096, noTransfers: 4 });
      r.host.onReceived({ endpoint: 0x81, index: 0, status: 0, data: new Uint8Array(4096), isoPackets: [] });
      expect(r.last('buffered_bulk_packet')).to.include({ id: 0n, endpoint: 0x81, status: 0, length: 4096 });
      r.backlog = 8000;
      r.host.onReceived({ endpoint: 0x81, index: 1, status: 0, data: new Uint8Array(4096), isoPackets: [] });
      expect(r.of('buffered_bulk_packet')).to.have.length(1);
      expect(r.closed?.reason).to.equal('output buffer limit exceeded');
    });

    it('iso IN: one iso_packet per packet (packed or at fixed offsets), failed packets empty; dropped above the high water, ids advancing', async () => {
      const r = await connected({ host: { writeHighWater: 1000 } });
      const ops: unknown[] = [];
      r.dev.opHandler = (op) => (ops.push(op), { status: UrbStatus.URB_STATUS_SUCCESS });
      await feed(r, { type: 'start_iso_stream', id: 1n, endpoint: 0x83, pktsPerUrb: 3, noUrbs: 2 });
      expect(ops).to.deep.equal([{ $case: 'startReceiving', value: { endpoint: 0x83, type: TransferType.TRANSFER_ISOCHRONOUS, transferLength: 3072, transfers: 2, isoPacketsPerTransfer: 3 } }]);
      const data = Uint8Array.from({ length: 30 }, (_, i) => i);
      // Packed: 10 + 0 (error) + 20 bytes.
      r.host.onReceived({
        endpoint: 0x83,
        index: 0,
        status: 0,
        data,
        isoPackets: [
          { length: 100, status: 0, actualLength: 10 },
          { length: 100, status: UrbStatus.URB_STATUS_IOERROR, actualLength: 0 },
          { length: 100, status: 0, actualLength: 20 },
        ],
      });
      const pk = r.of('iso_packet');
      expect(pk.map((p) => [p.id, p.status, p.length])).to.deep.equal([
        [0n, 0, 10],
        [1n, Status.ioerror, 0],
        [2n, 0, 20],
      ]);
      expect([...pk[2]!.data.subarray(0, 2)]).to.deep.equal([10, 11]);
      // Fixed offsets (libusb layout): packet i at i * length.
      r.host.onReceived({ endpoint: 0x83, index: 1, status: 0, data: new Uint8Array(20).fill(3), isoPackets: [{ length: 10, status: 0, actualLength: 4 }, { length: 10, status: 0, actualLength: 4 }] });
      expect(r.of('iso_packet').slice(3).map((p) => [p.id, p.length])).to.deep.equal([
        [3n, 4],
        [4n, 4],
      ]);
      r.backlog = 5000;
      r.host.onReceived({ endpoint: 0x83, index: 2, status: 0, data: new Uint8Array(4), isoPackets: [{ length: 4, status: 0, actualLength: 4 }] });
      r.backlog = 0;
      r.host.onReceived({ endpoint: 0x83, index: 3, status: 0, data: new Uint8Array(4), isoPackets: [{ length: 4, status: 0, actualLength: 4 }] });
      expect(r.last('iso_packet').id, 'the dropped packet used id 5').to.equal(6n);
    });
  });

  describe('device gone and disconnect', () => {
    it('device gone: device_disconnect, requests answered ioerror, closed on the ack', async () => {
      const r = await connected();
      r.host.onDeviceGone('unplugged');
      expect(r.events.map((e) => e[0])).to.deep.equal(['deviceGone']);
      expect(r.sent.map((p) => p.type)).to.deep.equal(['device_disconnect']);
      expect(r.host.state).to.equal('disconnecting');
      const p = bulk(0x81, 64);
      const c = control(0x80, 6, 0x100, 0, 18);
      await feed(r, p, c, { type: 'get_configuration', id: 9n });
      expect(r.dev.urbs).to.have.length(0);
      expect(r.last('bulk_packet')).to.include({ id: p.id, status: Status.ioerror });
      expect(r.last('control_packet')).to.include({ id: c.id, status: Status.ioerror });
      expect(r.last('configuration_status')).to.include({ id: 9n, status: Status.ioerror });
      r.host.onDeviceGone('again');
      expect(r.of('device_disconnect'), 'once').to.have.length(1);
      expect(r.closed).to.equal(undefined);
      await feed(r, { type: 'device_disconnect_ack', id: 0n });
      expect(r.closed?.reason).to.equal('device gone: unplugged');
    });

    it('without device_disconnect_ack: closes once the output has left; an ack without a disconnect is ignored', async () => {
      const r = await connected({ caps: { peerCaps: [0], noHello: true, hasCap: (c) => c !== Cap.device_disconnect_ack, peerHasCap: () => true } });
      await feed(r, { type: 'device_disconnect_ack', id: 0n });
      expect(r.closed).to.equal(undefined);
      expect(r.host.disconnect('detached')).to.equal(true);
      expect(r.closed?.reason).to.equal('detached');
    });

    it('no ack in time: closes anyway', async () => {
      const closed = new Promise<string>((resolve) => {
        const r = hostRig({ host: { disconnectAckTimeoutMs: 1, close: (reason) => resolve(reason) } });
        r.host.start();
        void turn().then(() => r.host.onDeviceGone('pulled'));
      });
      expect(await closed).to.equal('device gone: pulled');
    });

    it('device gone before the connect: closed without device_connect', async () => {
      const r = hostRig();
      r.host.start();
      r.host.onDeviceGone('gone');
      await turn();
      expect(r.of('device_connect')).to.have.length(0);
      expect(r.closed?.reason).to.match(/before connect/);
      expect(r.host.disconnect('x'), 'never connected').to.equal(false);
    });
  });

  describe('hand-off', () => {
    it('once exported, completions and op answers are not this host’s any more', async () => {
      const r = await connected();
      r.dev.opHandler = () => undefined;
      const p = bulk(0x81, 64);
      await feed(r, p, { type: 'set_configuration', id: 1n, configuration: 2 });
      r.exported = true;
      r.dev.lastUrb().complete({ actualLength: 0 });
      r.dev.ops[0]!.answer({ status: 0 });
      r.host.onDeviceGone('gone');
      await turn();
      expect(r.sent.map((x) => [x.type, (x as { status?: number }).status])).to.deep.equal([['bulk_packet', Status.cancelled]]);
      expect(r.host.inFlightCount, 'the exported request stays for the state').to.equal(1);
      expect(r.events.map((e) => e[0])).to.deep.equal([]);
    });

    it('a snapshot, through the hand-off state encoding, continues on another host: URBs adopted, answered with their usbredir ids', async () => {
      const a = await connected();
      const p1 = bulk(0x81, 512);
      const p2 = control(0x80, 6, 0x100, 0, 18);
      await feed(a, p1, p2, { type: 'start_interrupt_receiving', id: 0n, endpoint: 0x82 });
      a.host.onReceived({ endpoint: 0x82, index: 0, status: 0, data: new Uint8Array(8), isoPackets: [] });
      const urbIds = a.dev.urbs.map((u) => u.urbId);
      const bytes = encodeHandOffState({ v: 2, id: 'x', usbredir: '', ...a.host.snapshot(), lastUrbId: a.dev.peekNextUrbId() - 1, device: '', positions: { bytesFromQemu: 0, bytesToQemu: 0, consumedByQemu: 0 } });
      const st = parseHandOffState(bytes);
      expect(st.inFlight.map(([u]) => u)).to.deep.equal(urbIds);
      expect((st.inFlight[0]![1].pkt as { data?: unknown }).data, 'packet data is not in the state').to.equal(undefined);

      const b = hostRig();
      b.host.restore(st, st.lastUrbId);
      expect(b.host.state).to.equal('connected');
      expect(b.events.map((e) => e[0])).to.deep.equal(['connected']);
      expect(b.dev.adopted).to.deep.equal(urbIds);
      expect(b.dev.peekNextUrbId()).to.equal(urbIds[1]! + 1);
      b.dev.urb(urbIds[1]!).complete({ data: new Uint8Array(18), actualLength: 18 });
      await turn();
      expect(b.last('control_packet')).to.include({ id: p2.id, length: 18, request: 6 });
      b.host.onReceived({ endpoint: 0x82, index: 1, status: 0, data: new Uint8Array(8), isoPackets: [] });
      expect(b.last('interrupt_packet').id, 'the stream id counter continues').to.equal(1n);
      // A cancel by usbredir id finds the adopted URB.
      await feed(b, { type: 'cancel_data_packet', id: p1.id });
      expect(b.last('bulk_packet')).to.include({ id: p1.id, status: Status.cancelled });
      expect(b.dev.cancels).to.deep.equal([urbIds[0]]);
      // New requests get ids after the source's.
      await feed(b, bulk(0x81, 64));
      expect(b.dev.lastUrb().urbId).to.equal(urbIds[1]! + 1);
    });
  });
});
