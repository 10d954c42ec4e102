// What the bridge knows of fleet claims (src/fleet/bridge-fleet.ts implements
// it): an attachment may hold a claim, which it gives up when it ends and moves
// to the destination when its session is handed off; a migration destination
// offers to hold the claim of the session it stands by on. The bridge itself
// never talks to etcd.

export interface HeldClaim {
  /** "host/device-id", for listings and logs. */
  readonly label: string;
  /** The attachment ended here (detached, or closed by itself): give the claim up. Never throws. */
  release(): Promise<void>;
  /** The session was handed off to a migration destination: move the claim to its offer. Never throws. */
  handedOff(sessionId: string): Promise<void>;
}

export interface IncomingClaim {
  /** The session was taken over here: the claim as the source moves it to us. */
  takenOver(): HeldClaim;
  /** The migration was cancelled or failed: withdraw the offer. Never throws. */
  withdraw(): Promise<void>;
}

export interface IncomingClaims {
  /** A migration destination stands by on `sessionId`: offer to hold its claim (undefined: no fleet here). */
  offer(sessionId: string): Promise<IncomingClaim | undefined>;
}
