// The interface of a bench:soak part: each module under bench/soak/ exports
// `run(opts): Promise<SoakPart>`; bench/soak.ts runs the parts and merges their fields.
export type FaultOutcome = { ok: boolean; detail: string; [k: string]: unknown };

export type SoakPart = {
  faults?: Record<string, FaultOutcome>;
  hostile?: Record<string, FaultOutcome>;
  data_lost?: number;
  errors?: number;
  [k: string]: unknown;
};

export interface SoakPartOptions {
  durationS: number;
  progress: (msg: string) => void;
}
