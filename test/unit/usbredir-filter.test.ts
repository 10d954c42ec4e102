import { expect } from 'chai';
import fc from 'fast-check';
import {
  QEMU_RULE_SEP,
  QEMU_TOKEN_SEP,
  UsbredirFilterError,
  checkDevice,
  formatFilterRules,
  parseFilterRules,
  type FilterDeviceInfo,
  type FilterRule,
} from '../../src/qemu/usbredir/index.js';

const rule = (deviceClass: number, vendorId: number, productId: number, deviceVersionBcd: number, allow: boolean): FilterRule => ({
  deviceClass,
  vendorId,
  productId,
  deviceVersionBcd,
  allow,
});

function dev(over: Partial<FilterDeviceInfo> = {}): FilterDeviceInfo {
  return { class: 0, subclass: 0, protocol: 0, vendorId: 0x1234, productId: 0xbeef, bcdDevice: 0x0200, interfaces: [], ...over };
}

describe('usbredir filter: parsing', () => {
  it('parses the QEMU property format (":" fields, "|" rules)', () => {
    const rules = parseFilterRules('0x08:0x1234:0xBEEF:0x0200:1|-1:-1:-1:-1:0', QEMU_TOKEN_SEP, QEMU_RULE_SEP);
    expect(rules).to.deep.equal([rule(8, 0x1234, 0xbeef, 0x0200, true), rule(-1, -1, -1, -1, false)]);
  });

  it('parses the filter_filter packet format ("," fields) by default', () => {
    expect(parseFilterRules('3,-1,-1,-1,0|-1,-1,-1,-1,1')).to.deep.equal([rule(3, -1, -1, -1, false), rule(-1, -1, -1, -1, true)]);
    expect(parseFilterRules('')).to.deep.equal([]);
  });

  it('strtok semantics: runs of separators collapse, empty rules are skipped', () => {
    expect(parseFilterRules('||,,1,,2,3,4,5,||')).to.deep.equal([rule(1, 2, 3, 4, true)]);
    // separators are character sets
    expect(parseFilterRules('1:2,3:4,0', ',:', '|')).to.deep.equal([rule(1, 2, 3, 4, false)]);
  });

  it('numbers follow strtol base 0: hex, octal, sign, leading whitespace; allow is non-zero', () => {
    expect(parseFilterRules('010,0x10, 16,+0,-1')).to.deep.equal([rule(8, 16, 16, 0, true)]);
    expect(parseFilterRules('0,0,0,0,2')[0]!.allow).to.equal(true);
  });

  it('rejects malformed rules (like -EINVAL)', () => {
    for (const bad of ['1,2,3,4', '1,2,3,4,5,6', 'a,2,3,4,5', '08,0,0,0,1', '0x,0,0,0,1', '1 ,2,3,4,5', '256,0,0,0,1', '-2,0,0,0,1', '0,0x10000,0,0,1', '1,2,3,4,5|x']) {
      expect(() => parseFilterRules(bad), bad).to.throw(UsbredirFilterError);
    }
    expect(() => parseFilterRules('1,2,3,4,5', '', '|')).to.throw(UsbredirFilterError);
  });

  it('formats like usbredirfilter_rules_to_string and round-trips', () => {
    const rules = [rule(8, 0x1234, 0xbeef, 0x0200, true), rule(-1, -1, -1, -1, false)];
    expect(formatFilterRules(rules)).to.equal('0x08,0x1234,0xbeef,0x0200,1|-1,-1,-1,-1,0');
    expect(formatFilterRules(rules, ':', '|')).to.equal('0x08:0x1234:0xbeef:0x0200:1|-1:-1:-1:-1:0');
    expect(() => formatFilterRules([rule(300, 0, 0, 0, true)])).to.throw(UsbredirFilterError);
    const field = (max: number) => fc.oneof(fc.constant(-1), fc.integer({ min: 0, max }));
    fc.assert(
      fc.property(fc.array(fc.tuple(field(255), field(0xffff), field(0xffff), field(0xffff), fc.boolean()), { maxLength: 6 }), (ts) => {
        const rs = ts.map((t) => rule(...t));
        expect(parseFilterRules(formatFilterRules(rs))).to.deep.equal(rs);
        expect(parseFilterRules(formatFilterRules(rs, ':', '|'), ':', '|')).to.deep.equal(rs);
      }),
      { numRuns: 200 },
    );
  });
});

describe('usbredir filter: checkDevice (usbredirfilter_check)', () => {
  const massStorage = dev({ class: 0, interfaces: [{ class: 8, subclass: 6, protocol: 0x50 }] });

  it('first matching rule decides; device class pass then interface passes', () => {
    expect(checkDevice(parseFilterRules('8,-1,-1,-1,1'), massStorage)).to.deep.equal({ allowed: true });
    const deny = parseFilterRules('8,0x1234,-1,-1,0|-1,-1,-1,-1,1');
    expect(checkDevice(deny, massStorage)).to.deep.equal({ allowed: false, reason: 'denied', rule: deny[0] });
    // vendor/product/version participate in matching
    expect(checkDevice(parseFilterRules('8,0x1234,0xbeef,0x0200,0|-1,-1,-1,-1,1'), massStorage).allowed).to.equal(false);
    expect(checkDevice(parseFilterRules('8,0x1234,0xbeef,0x0201,0|-1,-1,-1,-1,1'), massStorage).allowed).to.equal(true);
  });

  it('a pass without a match is -ENOENT unless defaultAllow', () => {
    const rules = parseFilterRules('3,-1,-1,-1,1');
    expect(checkDevice(rules, massStorage)).to.deep.equal({ allowed: false, reason: 'no_match', classChecked: 8 });
    expect(checkDevice(rules, massStorage, { defaultAllow: true })).to.deep.equal({ allowed: true });
    expect(checkDevice([], massStorage, { defaultAllow: true }).allowed).to.equal(true);
    expect(checkDevice([], massStorage).allowed).to.equal(false);
  });

  it('device class pass runs for class != 0x00/0xef and is skipped for 0x00/0xef', () => {
    const rules = parseFilterRules('9,-1,-1,-1,0|-1,-1,-1,-1,1');
    const hub = dev({ class: 9, interfaces: [{ class: 9, subclass: 0, protocol: 0 }] });
    expect(checkDevice(rules, hub).allowed).to.equal(false);
    const deviceOnly = dev({ class: 0xff, interfaces: [] });
    expect(checkDevice(parseFilterRules('0xff,-1,-1,-1,0|-1,-1,-1,-1,1'), deviceOnly).allowed).to.equal(false);
    const misc = dev({ class: 0xef, interfaces: [{ class: 0x0e, subclass: 1, protocol: 0 }] });
    expect(checkDevice(parseFilterRules('0xef,-1,-1,-1,0|-1,-1,-1,-1,1'), misc).allowed).to.equal(true);
  });

  it('skips non-boot HID interfaces on multi-interface devices, unless told not to', () => {
    const headset = dev({
      interfaces: [
        { class: 1, subclass: 1, protocol: 0 },
        { class: 3, subclass: 0, protocol: 0 },
      ],
    });
    const rules = parseFilterRules('1,-1,-1,-1,1|3,-1,-1,-1,0');
    expect(checkDevice(rules, headset).allowed).to.equal(true);
    expect(checkDevice(rules, headset, { dontSkipNonBootHid: true })).to.deep.include({ allowed: false, reason: 'denied' });
    // a boot HID interface (subclass 1) is never skipped
    const kbd = dev({ interfaces: [{ class: 1, subclass: 1, protocol: 0 }, { class: 3, subclass: 1, protocol: 1 }] });
    expect(checkDevice(rules, kbd).allowed).to.equal(false);
    // single-interface non-boot HID is checked
    expect(checkDevice(rules, dev({ interfaces: [{ class: 3, subclass: 0, protocol: 0 }] })).allowed).to.equal(false);
  });

  it('when every interface is skipped, re-checks without skipping', () => {
    const twoHid = dev({ interfaces: [{ class: 3, subclass: 0, protocol: 0 }, { class: 3, subclass: 0, protocol: 0 }] });
    expect(checkDevice(parseFilterRules('3,-1,-1,-1,0|-1,-1,-1,-1,1'), twoHid).allowed).to.equal(false);
    expect(checkDevice(parseFilterRules('3,-1,-1,-1,1'), twoHid).allowed).to.equal(true);
  });

  it('invalid rules throw (-EINVAL)', () => {
    expect(() => checkDevice([rule(-5, -1, -1, -1, true)], massStorage)).to.throw(UsbredirFilterError);
  });
});
