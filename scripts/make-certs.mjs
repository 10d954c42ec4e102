#!/usr/bin/env node
// Development certificates for usbroam's mutual-TLS gRPC transport (shells out to `openssl`, no deps).
//
//   node scripts/make-certs.mjs [--out DIR] [--client NAME]... [--san DNS:x|IP:y]... [--force] [--quiet]
//   node scripts/make-certs.mjs revoke --dir DIR (--name NAME | --cert FILE)... [--crl-days N] [--quiet]
//   node scripts/make-certs.mjs crl --dir DIR [--crl-days N] [--quiet]
//
// revoke: adds the certificate (DIR/NAME.pem, or FILE) to the CA's revocation database
// (crl-index.txt, kept beside the CA) and writes DIR/crl.pem, a CRL signed by ca.pem/ca.key with
// every certificate revoked so far. crl: (re)writes crl.pem with what is revoked so far (none at
// first): a fresh nextUpdate. Servers read it with --crl and again on SIGHUP. A CA that is made
// anew drops its revocation database and crl.pem (they belong to the old CA).
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
import { execFileSync, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
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
      '  --quiet        print nothing unless something fails\n' +
      'usage: node scripts/make-certs.mjs revoke --dir DIR (--name NAME | --cert FILE)... [--crl-days N] [--quiet]\n' +
      '       node scripts/make-certs.mjs crl --dir DIR [--crl-days N] [--quiet]\n' +
      '  revoke         revoke DIR/NAME.pem (or FILE) and write DIR/crl.pem signed by DIR/ca.pem\n' +
      '  crl            (re)write DIR/crl.pem with the certificates revoked so far\n' +
      '  --dir DIR      the directory of ca.pem/ca.key (same as --out)\n' +
      `  --crl-days N   the CRL's validity (nextUpdate), days (default ${DEFAULT_CRL_DAYS}); an expired CRL refuses every client`,
  );
  process.exit(code);
}

const DEFAULT_CRL_DAYS = 365;

function parseArgs(argv) {
  const opts = { command: 'make', out: undefined, clients: [], sans: [], revoke: [], crlDays: DEFAULT_CRL_DAYS, force: false, quiet: false };
  if (argv[0] === 'revoke' || argv[0] === 'crl') opts.command = argv.shift();
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
      case '--dir':
        opts.out = value();
        break;
      case '--name':
        opts.revoke.push({ name: value() });
        break;
      case '--cert':
        opts.revoke.push({ file: value() });
        break;
      case '--crl-days': {
        const v = value();
        opts.crlDays = Number(v);
        if (!Number.isInteger(opts.crlDays) || opts.crlDays < 1 || opts.crlDays > 3650) {
          console.error(`make-certs: --crl-days must be a whole number of days from 1 to 3650, not ${JSON.stringify(v)}`);
          process.exit(2);
        }
        break;
      }
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
const files = (n) => [path.join(outDir, `${n}.pem`), path.join(outDir, `${n}.key`)];
const CRL_FILES = ['crl-index.txt', 'crl-index.txt.attr', 'crl-index.txt.old', 'crl-index.txt.attr.old', 'crlnumber', 'crlnumber.old', 'crl.pem'];

if (opts.command !== 'make') {
  if (opts.clients.length || opts.sans.length || opts.force) {
    console.error(`make-certs ${opts.command}: --client, --san and --force belong to making certificates`);
    usage(2);
  }
  if (opts.command === 'revoke' && !opts.revoke.length) {
    console.error('make-certs revoke: name what to revoke: --name NAME (DIR/NAME.pem) or --cert FILE');
    usage(2);
  }
  if (opts.command === 'crl' && opts.revoke.length) {
    console.error('make-certs crl: --name/--cert belong to revoke');
    usage(2);
  }
  process.exit(revokeAndWriteCrl());
}
if (opts.revoke.length || opts.crlDays !== DEFAULT_CRL_DAYS) {
  console.error('make-certs: --name, --cert and --crl-days belong to the revoke and crl commands');
  usage(2);
}

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
  if (ca.name === 'ca') for (const f of CRL_FILES) rmSync(path.join(outDir, f), { force: true }); // the old CA's revocations
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

/** The CA's revocation database (openssl ca's index, CRL number) and the CRL itself, in the output dir. */
function crlFiles() {
  return { index: path.join(outDir, 'crl-index.txt'), number: path.join(outDir, 'crlnumber'), crl: path.join(outDir, 'crl.pem') };
}

/** revoke / crl: add certificates to the CA's revocation database, then write crl.pem from it. Returns the exit code. */
function revokeAndWriteCrl() {
  const [caPem, caKey] = files('ca');
  if (!existsSync(caPem) || !existsSync(caKey)) {
    console.error(`make-certs ${opts.command}: no CA in ${outDir} (ca.pem and ca.key): make the certificates first`);
    return 1;
  }
  const targets = opts.revoke.map((r) => (r.file ? path.resolve(r.file) : path.join(outDir, `${r.name}.pem`)));
  for (const t of targets) {
    if (!existsSync(t)) {
      console.error(`make-certs revoke: no certificate ${t}`);
      return 1;
    }
  }
  const f = crlFiles();
  if (!existsSync(f.index)) writeFileSync(f.index, '');
  if (!existsSync(f.number)) writeFileSync(f.number, '01\n');
  const tmpDir = mkdtempSync(path.join(os.tmpdir(), 'usbroam-crl-'));
  const cnf = path.join(tmpDir, 'ca.cnf');
  writeFileSync(
    cnf,
    [
      '[ca]',
      'default_ca = usbroam',
      '[usbroam]',
      `database = ${f.index}`,
      `crlnumber = ${f.number}`,
      `certificate = ${caPem}`,
      `private_key = ${caKey}`,
      'default_md = sha256',
      'unique_subject = no',
      'crl_extensions = crl_ext',
      '[crl_ext]',
      'authorityKeyIdentifier = keyid:always',
      '',
    ].join('\n'),
  );
  const run = (args) => {
    try {
      return execFileSync('openssl', args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, OPENSSL_CONF: '' } });
    } catch (e) {
      throw new Error(`openssl ${args.join(' ')} failed: ${e.stderr ? e.stderr.toString() : e.message}`);
    }
  };
  const done = [];
  try {
    for (const t of targets) {
      // A certificate of another CA would be listed in a CRL that does not cover it.
      const issued = spawnSync('openssl', ['verify', '-partial_chain', '-CAfile', caPem, t], { encoding: 'utf8' });
      if (issued.status !== 0) throw new Error(`${t} is not signed by ${caPem}: ${issued.stdout}${issued.stderr}`.trim());
      const serialHex = run(['x509', '-in', t, '-noout', '-serial']).toString().trim().replace(/^serial=/, '');
      const subject = run(['x509', '-in', t, '-noout', '-subject']).toString().trim();
      const already = readFileSync(f.index, 'utf8').split('\n').some((l) => l.startsWith('R\t') && l.split('\t')[3]?.toUpperCase() === serialHex.toUpperCase());
      if (!already) run(['ca', '-config', cnf, '-revoke', t, '-batch']);
      done.push(`${path.basename(t)} serial ${serialHex} (${subject})${already ? ' was already revoked' : ' revoked'}`);
    }
    const crl = run(['ca', '-config', cnf, '-gencrl', '-crldays', String(opts.crlDays), '-batch']);
    const tmpCrl = `${f.crl}.tmp`;
    writeFileSync(tmpCrl, crl, { mode: 0o644 });
    renameSync(tmpCrl, f.crl); // atomic: a server reloading on SIGHUP never reads half a file
  } catch (e) {
    console.error(`make-certs ${opts.command}: ${e.message}`);
    return 1;
  } finally {
    rmSync(tmpDir, { recursive: true, force: true });
  }
  if (!opts.quiet) {
    for (const d of done) console.log(`make-certs: ${d}`);
    const revoked = readFileSync(f.index, 'utf8').split('\n').filter((l) => l.startsWith('R\t')).length;
    console.log(`make-certs: wrote ${f.crl} (${revoked} revoked, valid ${opts.crlDays} days); reload servers with SIGHUP`);
  }
  return 0;
}
