#!/usr/bin/env node
// Development certificates for usbroam's mutual-TLS gRPC transport (shells out to `openssl`, no deps).
//
//   node scripts/make-certs.mjs [--out DIR] [--client NAME]... [--san DNS:x|IP:y]... [--force] [--quiet]
//
// Output dir: --out DIR, else $USBROAM_CERTS_DIR, else certs/out/ (gitignored).
// Makes:
//   ca.pem ca.key                 development CA
//   server.pem server.key         EKU serverAuth, SAN DNS:localhost, IP:127.0.0.1, IP:::1 (+ --san ...)
//   bridge.pem bridge.key         EKU clientAuth, CN=bridge, SAN DNS:bridge + URI:spiffe://usbroam/client/bridge
//   viewer.pem viewer.key         EKU clientAuth, CN=viewer (unprivileged identity)
//   <NAME>.pem <NAME>.key         one per --client NAME
//   other-ca.pem other-ca.key     a second, unrelated CA
//   intruder.pem intruder.key     EKU clientAuth, signed by other-ca (must be rejected by the server)
// Keys are EC P-256 (PKCS#8 PEM), mode 0600.
//
// Idempotent: if every file exists nothing is done. A CA whose pem+key exist is reused and only
// missing leaf certificates are issued from it; a (re)created CA re-issues all of its leaves.
// --force regenerates everything.
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

function usage(code) {
  const out = code === 0 ? console.log : console.error;
  out(
    'usage: node scripts/make-certs.mjs [--out DIR] [--client NAME]... [--san DNS:host|IP:addr]... [--force] [--quiet]\n' +
      '  --out DIR      output directory (default $USBROAM_CERTS_DIR or certs/out)\n' +
      '  --client NAME  also issue a client certificate NAME.pem/NAME.key (repeatable)\n' +
      '  --san SAN      extra subjectAltName for the server certificate (repeatable)\n' +
      '  --force        regenerate everything even if the files exist\n' +
      '  --quiet        print nothing unless something fails',
  );
  process.exit(code);
}

function parseArgs(argv) {
  const opts = { out: undefined, clients: [], sans: [], force: false, quiet: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const eq = a.indexOf('=');
    const [flag, inline] = a.startsWith('--') && eq > 0 ? [a.slice(0, eq), a.slice(eq + 1)] : [a, undefined];
    const value = () => {
      if (inline !== undefined) return inline;
      const v = argv[++i];
      if (v === undefined) {
        console.error(`make-certs: ${flag} needs a value`);
        usage(2);
      }
      return v;
    };
    switch (flag) {
      case '--out':
        opts.out = value();
        break;
      case '--client':
        opts.clients.push(value());
        break;
      case '--san':
        opts.sans.push(value());
        break;
      case '--force':
        opts.force = true;
        break;
      case '--quiet':
      case '-q':
        opts.quiet = true;
        break;
      case '--help':
      case '-h':
        usage(0);
        break;
      default:
        console.error(`make-certs: unknown argument ${a}`);
        usage(2);
    }
  }
  return opts;
}

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const RESERVED = new Set(['ca', 'server', 'other-ca', 'intruder']);

const opts = parseArgs(process.argv.slice(2));
const outDir = path.resolve(opts.out ?? process.env.USBROAM_CERTS_DIR ?? path.join(root, 'certs', 'out'));

for (const n of opts.clients) {
  if (!NAME_RE.test(n) || RESERVED.has(n)) {
    console.error(`make-certs: invalid client name ${JSON.stringify(n)} (want [A-Za-z0-9._-], not ${[...RESERVED].join('/')})`);
    process.exit(2);
  }
}
for (const s of opts.sans) {
  if (!/^(DNS|IP|URI):\S+$/.test(s)) {
    console.error(`make-certs: invalid --san ${JSON.stringify(s)} (want DNS:name, IP:addr or URI:uri)`);
    process.exit(2);
  }
}

const clientNames = [...new Set(['bridge', 'viewer', ...opts.clients])];
const clientSan = (n) => `DNS:${n}, URI:spiffe://usbroam/client/${n}`;

/** @type {{ name: string, cn: string, leaves: { name: string, cn: string, eku: string, san: string }[] }[]} */
const cas = [
  {
    name: 'ca',
    cn: 'usbroam development CA',
    leaves: [
      {
        name: 'server',
        cn: 'localhost',
        eku: 'serverAuth',
        san: ['DNS:localhost', 'IP:127.0.0.1', 'IP:::1', ...opts.sans].join(', '),
      },
      ...clientNames.map((n) => ({ name: n, cn: n, eku: 'clientAuth', san: clientSan(n) })),
    ],
  },
  {
    name: 'other-ca',
    cn: 'unrelated CA (not trusted by usbroam)',
    leaves: [{ name: 'intruder', cn: 'intruder', eku: 'clientAuth', san: clientSan('intruder') }],
  },
];

const files = (n) => [path.join(outDir, `${n}.pem`), path.join(outDir, `${n}.key`)];
const have = (n) => files(n).every((f) => existsSync(f));

const allPresent = cas.every((ca) => have(ca.name) && ca.leaves.every((l) => have(l.name)));
if (allPresent && !opts.force) {
  if (!opts.quiet) console.log(`make-certs: all certificates already present in ${outDir} (use --force to regenerate)`);
  process.exit(0);
}

try {
  execFileSync('openssl', ['version'], { stdio: 'ignore' });
} catch {
  console.error('make-certs: `openssl` not found on PATH');
  process.exit(1);
}

mkdirSync(outDir, { recursive: true });
const tmp = mkdtempSync(path.join(os.tmpdir(), 'usbroam-certs-'));
const made = [];

function openssl(args, input) {
  try {
    return execFileSync('openssl', args, { input, stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, OPENSSL_CONF: '' } });
  } catch (e) {
    const stderr = e.stderr ? e.stderr.toString() : '';
    throw new Error(`openssl ${args.join(' ')} failed: ${stderr || e.message}`);
  }
}

function writeKey(file) {
  const pem = openssl(['genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256']);
  writeFileSync(file, pem, { mode: 0o600 });
  chmodSync(file, 0o600);
}

const serial = () => '0x' + (randomBytes(16)[0] & 0x7f).toString(16).padStart(2, '0') + randomBytes(15).toString('hex');

// Minimal, self-contained config so the system openssl.cnf cannot add or conflict with extensions.
function config(cn, ext) {
  const f = path.join(tmp, `${randomBytes(6).toString('hex')}.cnf`);
  writeFileSync(
    f,
    [
      '[req]',
      'distinguished_name = dn',
      'prompt = no',
      'utf8 = yes',
      '[dn]',
      `CN = ${cn}`,
      'O = usbroam development',
      '[ext]',
      ...ext,
      '',
    ].join('\n'),
  );
  return f;
}

function makeCa(ca) {
  const [pem, key] = files(ca.name);
  writeKey(key);
  const cnf = config(ca.cn, [
    'basicConstraints = critical, CA:TRUE, pathlen:0',
    'keyUsage = critical, keyCertSign, cRLSign',
    'subjectKeyIdentifier = hash',
  ]);
  const cert = openssl(['req', '-new', '-x509', '-config', cnf, '-extensions', 'ext', '-key', key, '-days', '3650', '-sha256', '-set_serial', serial()]);
  writeFileSync(pem, cert, { mode: 0o644 });
  made.push(`${ca.name}.pem/.key  CA "${ca.cn}"`);
}

function makeLeaf(ca, leaf) {
  const [pem, key] = files(leaf.name);
  const [caPem, caKey] = files(ca.name);
  writeKey(key);
  const cnf = config(leaf.cn, [
    'basicConstraints = critical, CA:FALSE',
    'keyUsage = critical, digitalSignature, keyAgreement',
    `extendedKeyUsage = ${leaf.eku}`,
    `subjectAltName = ${leaf.san}`,
    'subjectKeyIdentifier = hash',
    'authorityKeyIdentifier = keyid',
  ]);
  const csr = openssl(['req', '-new', '-config', cnf, '-key', key]);
  const cert = openssl(
    ['x509', '-req', '-CA', caPem, '-CAkey', caKey, '-set_serial', serial(), '-days', '825', '-sha256', '-extfile', cnf, '-extensions', 'ext'],
    csr,
  );
  writeFileSync(pem, cert, { mode: 0o644 });
  made.push(`${leaf.name}.pem/.key  CN=${leaf.cn} ${leaf.eku} signed by ${ca.name} [${leaf.san}]`);
}

try {
  for (const ca of cas) {
    const fresh = opts.force || !have(ca.name);
    if (fresh) makeCa(ca);
    for (const leaf of ca.leaves) {
      if (fresh || !have(leaf.name)) makeLeaf(ca, leaf);
    }
  }
} catch (e) {
  console.error(`make-certs: ${e.message}`);
  process.exitCode = 1;
} finally {
  rmSync(tmp, { recursive: true, force: true });
}

if (!opts.quiet || process.exitCode) {
  console.log(`make-certs: wrote to ${outDir}:`);
  for (const m of made) console.log(`  ${m}`);
}
