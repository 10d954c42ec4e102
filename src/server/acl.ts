// Per-device access control: identity (from the client certificate) ->
// the devices it may list and claim. Deny by default.
import type { DeviceInfo } from './backends/types.js';
import { matchesSelector, validateSelector, type Selector } from './devices/selector.js';

/** identity -> selectors; the identity "*" applies to every authenticated client. */
export type AclConfig = Record<string, Selector[] | '*'>;

type Rules = Map<string, Selector[] | '*'>;

export class Acl {
  private rules: Rules;

  constructor(config: AclConfig) {
    this.rules = Acl.parse(config);
  }

  /** New rules (a reload): every check from now on uses them. Throws, keeping the old ones, on a bad entry. */
  replace(config: AclConfig): void {
    this.rules = Acl.parse(config);
  }

  /** Identities with an entry. */
  get identities(): string[] {
    return [...this.rules.keys()];
  }

  private static parse(config: AclConfig): Rules {
    const rules: Rules = new Map();
    if (!config || typeof config !== 'object' || Array.isArray(config)) throw new Error('the acl must be an object: identity -> "*" or a list of selectors');
    for (const [identity, selectors] of Object.entries(config)) {
      if (selectors === '*') rules.set(identity, '*');
      else if (Array.isArray(selectors)) {
        rules.set(
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
    return rules;
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
