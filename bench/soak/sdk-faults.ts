import type { SoakOptions, SoakPart } from './types.js';
export async function run(_o: SoakOptions): Promise<SoakPart> {
  return {};
}
