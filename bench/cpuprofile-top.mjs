#!/usr/bin/env node
// Summarise a V8 .cpuprofile (node --cpu-prof): self time per function and per file, and the
// total (self + callees) time of functions whose file matches a filter.
//
//   node bench/cpuprofile-top.mjs FILE [--top N] [--match SUBSTRING]
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';

const { values, positionals } = parseArgs({ allowPositionals: true, options: { top: { type: 'string' }, match: { type: 'string' } } });
const file = positionals[0];
if (!file) {
  console.error('usage: node bench/cpuprofile-top.mjs FILE [--top N] [--match SUBSTRING]');
  process.exit(2);
}
const top = Number(values.top ?? 30);
const prof = JSON.parse(readFileSync(file, 'utf8'));
const byId = new Map(prof.nodes.map((n) => [n.id, n]));
const self = new Map();
const dt = prof.timeDeltas;
for (let i = 0; i < prof.samples.length; i++) self.set(prof.samples[i], (self.get(prof.samples[i]) ?? 0) + (dt[i] ?? 0));
const total = [...self.values()].reduce((a, b) => a + b, 0);
const short = (url) => (url || '(native)').replace(/^file:\/\//, '').replace(/.*\/node_modules\//, 'nm/').replace(/.*\/(src|bench|test)\//, '$1/');
const key = (n) => `${n.callFrame.functionName || '(anonymous)'} ${short(n.callFrame.url)}:${n.callFrame.lineNumber + 1}`;
const fnSelf = new Map();
const fileSelf = new Map();
for (const [id, t] of self) {
  const n = byId.get(id);
  fnSelf.set(key(n), (fnSelf.get(key(n)) ?? 0) + t);
  const f = short(n.callFrame.url);
  fileSelf.set(f, (fileSelf.get(f) ?? 0) + t);
}
const pct = (t) => `${((100 * t) / total).toFixed(1).padStart(5)}%`;
const ms = (t) => `${(t / 1000).toFixed(0).padStart(7)} ms`;
console.log(`total sampled ${ms(total)}`);
console.log('\nself time by function:');
for (const [k, t] of [...fnSelf].sort((a, b) => b[1] - a[1]).slice(0, top)) console.log(`${pct(t)} ${ms(t)}  ${k}`);
console.log('\nself time by file:');
for (const [k, t] of [...fileSelf].sort((a, b) => b[1] - a[1]).slice(0, top)) console.log(`${pct(t)} ${ms(t)}  ${k}`);
if (values.match) {
  // Inclusive time of the subtrees rooted at frames whose file matches (outermost match only).
  const parent = new Map();
  for (const n of prof.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  const incl = new Map();
  for (const [id, t] of self) {
    let cur = id;
    let outer;
    while (cur !== undefined) {
      const n = byId.get(cur);
      if (short(n.callFrame.url).includes(values.match)) outer = n;
      cur = parent.get(cur);
    }
    if (outer) incl.set(key(outer), (incl.get(key(outer)) ?? 0) + t);
  }
  const sum = [...incl.values()].reduce((a, b) => a + b, 0);
  console.log(`\ninclusive time entered through ${values.match}: ${pct(sum)} ${ms(sum)}`);
  for (const [k, t] of [...incl].sort((a, b) => b[1] - a[1]).slice(0, top)) console.log(`${pct(t)} ${ms(t)}  ${k}`);
}
