// The shape of a bench:soak part (bench/soak/*.ts): bench/soak.ts runs the parts and merges their fields.
export type FaultOutcome = { ok: boolean; detail: string; [k: string]: unknown };

export type SoakPart = {
  faults?: Record<string, FaultOutcome>;
  hostile?: Record<string, FaultOutcome>;
  data_lost?: number;
  errors?: number;
  [k: string]: unknown;
};

export type SoakRun = (opts: { durationS: number; progress: (msg: string) => void }) => Promise<SoakPart>;
