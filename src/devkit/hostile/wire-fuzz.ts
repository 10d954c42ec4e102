// Stateless hostile calls on any gRPC method: random bytes, mutated valid messages, messages
// past the size limit. Bytes that do not parse must end the call with INVALID_ARGUMENT; nothing
// may end INTERNAL or UNKNOWN; every call ends by its deadline.
import * as grpc from '@grpc/grpc-js';
import fc from 'fast-check';

const S = grpc.status;
const raw = (b: Buffer) => b;

export interface MethodUnderFuzz {
  /** /package.Service/Method */
  path: string;
  /** The method's request decoder (throws on bytes that do not parse). */
  decode(bytes: Uint8Array): unknown;
  /** Valid encodings to mutate. */
  samples: Uint8Array[];
  /** A decoded request this fuzzer may send (e.g. no address off this host to dial); default all. */
  safe?(request: unknown): boolean;
}

export interface WireTally {
  cases: number;
  /** Requests not sent: they parse, and would make the server dial off this host. */
  skipped: number;
  /** Calls whose bytes do not parse. */
  undecodable: number;
  /** Calls that a handler served (a response came). */
  served: number;
  statuses: Record<string, number>;
  internal_count: number;
  /** Cases that broke a rule, with what happened (bounded). */
  violations: string[];
}

export function newWireTally(): WireTally {
  return { cases: 0, skipped: 0, undecodable: 0, served: 0, statuses: {}, internal_count: 0, violations: [] };
}

function count(t: WireTally, code: grpc.status): void {
  const name = S[code] ?? String(code);
  t.statuses[name] = (t.statuses[name] ?? 0) + 1;
  if (code === S.INTERNAL || code === S.UNKNOWN) t.internal_count++;
}

function violation(t: WireTally, what: string): void {
  if (t.violations.length < 20) t.violations.push(what);
}

/**
 * One call, whatever the method's kind: the messages, then half-close. Resolves with the status,
 * or 'served' once a response arrives (a stream is then cancelled: it would run on).
 */
export function rawCall(client: grpc.Client, path: string, messages: Uint8Array[], deadlineMs = 10_000): Promise<grpc.StatusObject | 'served'> {
  return new Promise((resolve) => {
    const call = client.makeBidiStreamRequest(path, raw, raw, new grpc.Metadata(), { deadline: Date.now() + deadlineMs });
    let done = false;
    call.on('data', () => {
      if (done) return;
      done = true;
      call.cancel();
      resolve('served');
    });
    call.on('status', (s) => {
      if (done) return;
      done = true;
      resolve(s);
    });
    call.on('error', () => {});
    for (const m of messages) call.write(Buffer.from(m));
    call.end();
  });
}

/** 'bad' (does not parse), 'ok', or 'unsafe' (parses, and m.safe refuses it). */
function classify(m: MethodUnderFuzz, b: Uint8Array): 'bad' | 'ok' | 'unsafe' {
  let req: unknown;
  try {
    req = m.decode(b);
  } catch {
    return 'bad';
  }
  return !m.safe || m.safe(req) ? 'ok' : 'unsafe';
}

/** Random bytes, and valid messages with bits flipped, bytes cut or inserted. */
export function hostileBytes(m: MethodUnderFuzz): fc.Arbitrary<Uint8Array> {
  const random = fc.uint8Array({ minLength: 1, maxLength: 512 });
  if (!m.samples.length) return random;
  const mutated = fc
    .tuple(fc.constantFrom(...m.samples), fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 }), fc.constantFrom('flip', 'cut', 'insert', 'set')), { minLength: 1, maxLength: 6 }))
    .map(([sample, edits]) => {
      let b = Array.from(sample);
      for (const [at, v, op] of edits) {
        const i = b.length ? at % b.length : 0;
        if (op === 'flip' && b.length) b[i] ^= 1 << (v & 7);
        else if (op === 'cut') b = b.slice(0, i);
        else if (op === 'insert') b.splice(i, 0, v);
        else if (b.length) b[i] = v;
      }
      return Uint8Array.from(b);
    });
  return fc.oneof(random, mutated);
}

/**
 * `runs` hostile messages to each method, one call each. Undecodable bytes must end with
 * INVALID_ARGUMENT; any other message may be served or refused, but not INTERNAL / UNKNOWN.
 */
export async function fuzzMethods(client: grpc.Client, methods: MethodUnderFuzz[], runs: number, tally: WireTally, opts: { seed?: number; deadlineMs?: number } = {}): Promise<void> {
  for (const m of methods) {
    const samples = fc.sample(hostileBytes(m), { numRuns: runs, seed: opts.seed });
    for (const bytes of samples) {
      const kind = classify(m, bytes);
      if (kind === 'unsafe') {
        tally.skipped++;
        continue;
      }
      tally.cases++;
      const bad = kind === 'bad';
      if (bad) tally.undecodable++;
      const r = await rawCall(client, m.path, [bytes], opts.deadlineMs);
      if (r === 'served') {
        tally.served++;
        if (bad) violation(tally, `${m.path}: bytes that do not parse were served: ${Buffer.from(bytes).toString('hex').slice(0, 64)}`);
        continue;
      }
      count(tally, r.code);
      if (r.code === S.DEADLINE_EXCEEDED) violation(tally, `${m.path}: no answer before the deadline: ${Buffer.from(bytes).toString("hex").slice(0, 160)}`);
      else if (bad && (r.code !== S.INVALID_ARGUMENT || !/is not a valid protobuf message/.test(r.details))) {
        violation(tally, `${m.path}: bytes that do not parse ended ${S[r.code]} "${r.details}": ${Buffer.from(bytes).toString('hex').slice(0, 64)}`);
      } else if (r.code === S.INTERNAL || r.code === S.UNKNOWN) violation(tally, `${m.path}: ${S[r.code]} "${r.details}"`);
    }
  }
}

/** One message of `bytes` (all zero: valid protobuf field-less padding would not be; 0x0a marks a length-delimited field). */
export function oversizedMessage(bytes: number): Uint8Array {
  const b = new Uint8Array(bytes);
  b[0] = 0x0a;
  return b;
}

/** A message past the server's receive limit must end RESOURCE_EXHAUSTED; the server then still serves `probe`. */
export async function oversizedCase(client: grpc.Client, path: string, bytes: number, tally: WireTally, deadlineMs = 30_000): Promise<void> {
  tally.cases++;
  const r = await rawCall(client, path, [oversizedMessage(bytes)], deadlineMs);
  if (r === 'served') return violation(tally, `${path}: a ${bytes}-byte message was served`);
  count(tally, r.code);
  if (r.code !== S.RESOURCE_EXHAUSTED) violation(tally, `${path}: a ${bytes}-byte message ended ${S[r.code]} "${r.details}", not RESOURCE_EXHAUSTED`);
}
