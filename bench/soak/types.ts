// What a bench:soak part returns: its figures, merged by bench/soak.ts into one JSON line.

export type FaultOutcome = { ok: boolean; detail: string; [k: string]: unknown };

export type SoakPart = {
  faults?: Record<string, FaultOutcome>;
  hostile?: Record<string, FaultOutcome>;
  data_lost?: number;
  errors?: number;
  [k: string]: unknown;
};

export interface SoakOptions {
  /** How long the timed phases run (load: the whole load phase). */
  durationS: number;
  /** A progress line (to stderr). */
  progress: (msg: string) => void;
}

export type SoakRun = (opts: SoakOptions) => Promise<SoakPart>;
