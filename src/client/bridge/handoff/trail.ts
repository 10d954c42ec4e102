// The last usbredir packets in and out of an attachment (type:id@endpoint/status/length), kept
// at debug level only: the hand-off logs them on the source, and the first ones after it on the
// destination.
import type { Packet } from '../../../qemu/usbredir/index.js';

const KEEP = 64;

export class PacketTrail {
  private readonly lastOnes: string[] = [];
  private firstOnes?: string[];

  /** Check before note(): false costs nothing per packet. */
  constructor(readonly on: boolean) {}

  note(dir: '<' | '>', p: Packet): void {
    const id = (p as { id?: bigint }).id;
    const ep = (p as { endpoint?: number }).endpoint;
    const st = (p as { status?: number }).status;
    const len = (p as { length?: number }).length;
    const entry = `${(performance.now() % 1e6).toFixed(1)}${dir}${p.type}:${id ?? ''}${ep !== undefined ? `@${ep.toString(16)}` : ''}${st !== undefined && dir === '>' ? `/s${st}` : ''}${len !== undefined ? `/${len}` : ''}`;
    this.lastOnes.push(entry);
    if (this.lastOnes.length > KEEP) this.lastOnes.shift();
    if (this.firstOnes && this.firstOnes.length < KEEP) this.firstOnes.push(entry);
  }

  /** From now on, also keep the first packets. */
  recordFirst(): void {
    this.firstOnes = [];
  }
  last(): string {
    return this.lastOnes.join(' ');
  }
  first(): string {
    return (this.firstOnes ?? []).join(' ');
  }
}
