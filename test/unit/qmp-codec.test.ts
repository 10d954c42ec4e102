import { expect } from 'chai';
import fc from 'fast-check';
import { QmpDecoder, classifyMessage, encodeCommand, parseLine, QmpProtocolError, type QmpDecoded } from '../../src/qemu/qmp/codec.js';

const GREETING = '{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7"}, "capabilities": ["oob"]}}';

describe('qmp codec', () => {
  it('classifies a greeting', () => {
    const m = parseLine(GREETING);
    expect(m.kind).to.equal('greeting');
    if (m.kind !== 'greeting') return;
    expect(m.version.qemu).to.deep.equal({ major: 7, minor: 2, micro: 22 });
    expect(m.version.package).to.equal('Debian 1:7.2+dfsg-7');
    expect(m.capabilities).to.deep.equal(['oob']);
  });

  it('classifies return, error and event', () => {
    const r = parseLine('{"return": {"running": true, "status": "running"}, "id": "a1"}');
    expect(r).to.include({ kind: 'return', id: 'a1' });
    expect(r.kind === 'return' && r.value).to.deep.equal({ running: true, status: 'running' });
    const r2 = parseLine('{"return": {}}');
    expect(r2.kind === 'return' && r2.id).to.equal(undefined);
    const e = parseLine('{"id": 7, "error": {"class": "DeviceNotFound", "desc": "Device \'x\' not found"}}');
    expect(e).to.include({ kind: 'error', id: 7, errorClass: 'DeviceNotFound', desc: "Device 'x' not found" });
    const ev = parseLine('{"timestamp": {"seconds": 1700000000, "microseconds": 12}, "event": "DEVICE_DELETED", "data": {"device": "redir0", "path": "/machine/peripheral/redir0"}}');
    expect(ev.kind).to.equal('event');
    if (ev.kind !== 'event') return;
    expect(ev.event).to.equal('DEVICE_DELETED');
    expect(ev.data).to.deep.equal({ device: 'redir0', path: '/machine/peripheral/redir0' });
    expect(ev.timestamp).to.deep.equal({ seconds: 1700000000, microseconds: 12 });
    const ev2 = parseLine('{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}');
    expect(ev2.kind === 'event' && ev2.data).to.deep.equal({});
  });

  it('rejects non-QMP values', () => {
    expect(() => classifyMessage([1, 2])).to.throw(QmpProtocolError);
    expect(() => classifyMessage({ foo: 1 })).to.throw(QmpProtocolError, /foo/);
    expect(() => parseLine('{"return": ')).to.throw(QmpProtocolError, /invalid JSON/);
    expect(() => classifyMessage({ error: 'x' })).to.throw(QmpProtocolError);
  });

  it('splits lines across chunks, handles CRLF, LF, blank lines and several lines per chunk', () => {
    const d = new QmpDecoder();
    expect(d.push(GREETING.slice(0, 10))).to.deep.equal([]);
    expect(d.pendingBytes).to.equal(10);
    const out = d.push(GREETING.slice(10) + '\r\n\r\n{"return": {}, "id": 1}\n{"return": 2, "id": 2}\r\n{"ret');
    expect(out.map((m) => m.kind)).to.deep.equal(['greeting', 'return', 'return']);
    const more = d.push('urn": 3}\r\n');
    expect(more).to.have.length(1);
    expect(more[0]!.kind === 'return' && more[0]!.value).to.equal(3);
    expect(d.pendingBytes).to.equal(0);
  });

  it('reassembles multi-byte UTF-8 split between chunks', () => {
    const d = new QmpDecoder();
    const bytes = Buffer.from('{"return": "héllo ✓ 😀"}\r\n', 'utf8');
    const cut = bytes.indexOf(0x98); // inside the 4-byte emoji
    expect(d.push(bytes.subarray(0, cut))).to.deep.equal([]);
    const out = d.push(bytes.subarray(cut));
    expect(out[0]!.kind === 'return' && out[0]!.value).to.equal('héllo ✓ 😀');
  });

  it('reports invalid lines and keeps going', () => {
    const d = new QmpDecoder();
    const out = d.push('not json\r\n{"weird": 1}\r\n{"return": {}}\r\n');
    expect(out.map((m) => m.kind)).to.deep.equal(['invalid', 'invalid', 'return']);
    expect(out[0]!.kind === 'invalid' && out[0]!.reason).to.match(/invalid JSON/);
  });

  it('discards over-long lines', () => {
    const d = new QmpDecoder({ maxLineBytes: 16 });
    const a = d.push('{"return": "aaaaaaaa');
    const b = d.push('aaaaaaaaaaaaaaaaaaaa"}\r\n{"return": 1}\r\n');
    const all = [...a, ...b];
    expect(all.map((m) => m.kind)).to.deep.equal(['invalid', 'return']);
  });

  it('end() reports an unterminated trailing line', () => {
    const d = new QmpDecoder();
    d.push('{"return": 1}');
    const out = d.end();
    expect(out).to.have.length(1);
    expect(out[0]!.kind).to.equal('invalid');
    expect(d.pendingBytes).to.equal(0);
  });

  it('any chunking of a stream decodes to the same messages (property)', () => {
    const msg = fc.oneof(
      fc.record({ return: fc.jsonValue(), id: fc.string() }),
      fc.record({ error: fc.record({ class: fc.string(), desc: fc.string() }), id: fc.integer() }),
      fc.record({ event: fc.string(), data: fc.dictionary(fc.string(), fc.jsonValue()), timestamp: fc.record({ seconds: fc.nat(), microseconds: fc.nat() }) }),
    );
    fc.assert(
      fc.property(fc.array(msg, { maxLength: 8 }), fc.array(fc.nat(), { maxLength: 10 }), (msgs, cuts) => {
        const stream = Buffer.from(msgs.map((m) => JSON.stringify(m) + '\r\n').join(''), 'utf8');
        const points = [...new Set(cuts.map((c) => (stream.length ? c % stream.length : 0)))].sort((a, b) => a - b);
        const d = new QmpDecoder();
        const got: QmpDecoded[] = [];
        let prev = 0;
        for (const p of [...points, stream.length]) {
          got.push(...d.push(stream.subarray(prev, p)));
          prev = p;
        }
        expect(got.map((m) => (m.kind === 'invalid' ? null : m.raw))).to.deep.equal(msgs.map((m) => JSON.parse(JSON.stringify(m))));
      }),
      { numRuns: 200 },
    );
  });

  it('encodes commands', () => {
    expect(encodeCommand({ execute: 'qmp_capabilities' })).to.equal('{"execute":"qmp_capabilities"}\r\n');
    expect(encodeCommand({ execute: 'device_del', arguments: { id: 'r0' }, id: 'x-1' })).to.equal('{"execute":"device_del","arguments":{"id":"r0"},"id":"x-1"}\r\n');
    expect(encodeCommand({ execute: 'migrate-pause', oob: true, id: 3 })).to.equal('{"exec-oob":"migrate-pause","id":3}\r\n');
  });
});
