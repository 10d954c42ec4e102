// The fleet claim token on the wire: a claimant presents it in Connect's gRPC
// metadata, the server compares it with the claim record in etcd.
export const CLAIM_TOKEN_METADATA = 'usbroam-fleet-claim';
export const MAX_TOKEN_CHARS = 256;

/** The claim token a Connect call carries, if any (longer values are cut at the bound and so never match). */
export function claimTokenOf(metadata: { get(key: string): (string | Buffer)[] }): string | undefined {
  const v = metadata.get(CLAIM_TOKEN_METADATA)[0];
  if (v === undefined) return undefined;
  const s = v.toString();
  return s.length > MAX_TOKEN_CHARS ? s.slice(0, MAX_TOKEN_CHARS) : s;
}
