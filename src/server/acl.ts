// Per-device access control: identity (from the client certificate) ->
// the devices it may list and claim. Deny by default.
import type { DeviceInfo } from './backends/types.js';
import { matchesSelector, validateSelector, type Selector } from './devices/selector.js';

/** identity -> selectors; the identity "*" applies to every authenticated client. */
export type AclConfig = Record<string, Selector[] | '*'>;

export class Acl {
  private readonly rules = new Map<string, Selector[] | '*'>();

  constructor(config: AclConfig) {
    for (const [identity, selectors] of Object.entries(config)) {
      if (selectors === '*') this.rules.set(identity, '*');
      else if (Array.isArray(selectors)) {
        this.rules.set(
          identity,
          selectors.map((s, i) => {
            try {
              return validateSelector(s);
            } catch (err) {
              throw new Error(`acl entry for "${identity}", selector ${i}: ${(err as Error).message}`);
            }
          }),
        );
      } else throw new Error(`acl entry for "${identity}" must be "*" or a list of selectors`);
    }
  }

  allows(identity: string, device: DeviceInfo): boolean {
    for (const key of [identity, '*']) {
      const r = this.rules.get(key);
      if (r === '*') return true;
      if (r?.some((s) => matchesSelector(s, device))) return true;
    }
    return false;
  }
}
