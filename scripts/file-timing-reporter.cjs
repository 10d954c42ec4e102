// Mocha reporter: the spec reporter, plus a table of wall time per test file
// at the end (from the first top-level describe of a file beginning to its
// last one ending, so before/after hooks such as guest boots are counted).
// With USBROAM_TEST_FAILURES set to a file path, each failure (file, title, the first lines of
// its error) is also written there as JSON, for scripts/run-tests.mjs to repeat at the very end
// of its output (CI shows only the tail of a run).
// CommonJS because mocha loads reporters with require().
'use strict';
const fs = require('node:fs');
const path = require('node:path');
const Mocha = require('mocha');

const { EVENT_SUITE_BEGIN, EVENT_SUITE_END, EVENT_RUN_END } = Mocha.Runner.constants;
const MAX_FAILURES = 20;
const MAX_ERROR_LINES = 8;

class FileTimingReporter extends Mocha.reporters.Spec {
  constructor(runner, options) {
    super(runner, options);
    /** @type {Map<string, {start: number, end: number, tests: number, failures: number}>} */
    const files = new Map();
    const fileOf = (suite) => (suite.file ? path.relative(process.cwd(), suite.file) : undefined);
    runner.on(EVENT_SUITE_BEGIN, (suite) => {
      if (!suite.parent || !suite.parent.root) return;
      const file = fileOf(suite);
      if (!file) return;
      const entry = files.get(file);
      if (entry) return;
      files.set(file, { start: Date.now(), end: Date.now(), tests: 0, failures: 0 });
    });
    runner.on(EVENT_SUITE_END, (suite) => {
      if (!suite.parent || !suite.parent.root) return;
      const entry = files.get(fileOf(suite) ?? '');
      if (!entry) return;
      entry.end = Date.now();
      const tests = suite.total();
      entry.tests += tests;
    });
    /** @type {{file?: string, title: string, error: string}[]} */
    const failed = [];
    runner.on('fail', (test, err) => {
      let suite = test.parent;
      while (suite && suite.parent && !suite.parent.root) suite = suite.parent;
      const entry = suite && files.get(fileOf(suite) ?? '');
      if (entry) entry.failures += 1;
      // Bounded: the first lines of the message only (a stall report carries its figures first).
      const message = String((err && (err.message || err)) ?? '').split('\n').slice(0, MAX_ERROR_LINES).map((l) => l.slice(0, 400)).join('\n');
      if (failed.length < MAX_FAILURES) failed.push({ file: (suite && fileOf(suite)) ?? (test.file && path.relative(process.cwd(), test.file)), title: test.fullTitle(), error: message });
    });
    runner.once(EVENT_RUN_END, () => {
      const out = process.env.USBROAM_TEST_FAILURES;
      if (out) fs.writeFileSync(out, JSON.stringify(failed));
      if (files.size === 0) return;
      const rows = [...files.entries()].map(([file, e]) => ({ file, ms: e.end - e.start, ...e }));
      rows.sort((a, b) => b.ms - a.ms);
      const total = rows.reduce((sum, r) => sum + r.ms, 0);
      const width = Math.max(...rows.map((r) => r.file.length));
      const lines = ['', `  wall time per file (hooks included), ${rows.length} files, ${(total / 1000).toFixed(1)} s in all:`];
      for (const r of rows) {
        const failed = r.failures > 0 ? `  ${r.failures} failed` : '';
        lines.push(`  ${(r.ms / 1000).toFixed(1).padStart(7)} s  ${r.file.padEnd(width)}  ${r.tests} test(s)${failed}`);
      }
      process.stdout.write(lines.join('\n') + '\n');
    });
  }
}

FileTimingReporter.description = 'spec, plus wall time per test file';
module.exports = FileTimingReporter;
