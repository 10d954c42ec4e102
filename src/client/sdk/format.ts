import { Speed } from '../../gen/usbroam/v1/usbhost.js';

const SPEEDS: Record<number, string> = {
  [Speed.SPEED_LOW]: 'low',
  [Speed.SPEED_FULL]: 'full',
  [Speed.SPEED_HIGH]: 'high',
  [Speed.SPEED_SUPER]: 'super',
  [Speed.SPEED_SUPER_PLUS]: 'super+',
};

export function speedName(s: Speed): string {
  return SPEEDS[s] ?? 'unknown';
}
