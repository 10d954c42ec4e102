// CPU time of processes, for cost per unit of work: process.cpuUsage() for this process
// (microseconds), /proc/PID/stat for a child (utime + stime of all its threads, in clock ticks:
// 10 ms each here, so a measured phase should last a second or more of CPU across the processes).
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';

let ticksPerSecond: number | undefined;
function clockTicks(): number {
  if (ticksPerSecond === undefined) {
    try {
      ticksPerSecond = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
    } catch {
      ticksPerSecond = 100;
    }
  }
  return ticksPerSecond;
}

/** user + sys CPU of process `pid` so far, in microseconds (from /proc/PID/stat). */
export function procCpuMicros(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'latin1');
  // The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  // fields[0] is field 3 (state): utime is field 14, stime field 15.
  const ticks = Number(fields[11]) + Number(fields[12]);
  return (ticks * 1e6) / clockTicks();
}

/** user + sys CPU of this process so far, in microseconds. */
export function selfCpuMicros(): number {
  const u = process.cpuUsage();
  return u.user + u.system;
}

/** CPU of this process plus the given child processes, summed (microseconds). */
export function cpuMicros(childPids: readonly number[]): number {
  return selfCpuMicros() + childPids.reduce((a, pid) => a + procCpuMicros(pid), 0);
}

export interface Measured<T> {
  value: T;
  wallMs: number;
  /** CPU of this process and the children over the work, microseconds. */
  cpuUs: number;
}

/** Runs `work` and returns its result with the wall time and the CPU it cost (this process + `childPids`). */
export async function measureCpu<T>(childPids: readonly number[], work: () => Promise<T>): Promise<Measured<T>> {
  const c0 = cpuMicros(childPids);
  const t0 = performance.now();
  const value = await work();
  const wallMs = performance.now() - t0;
  return { value, wallMs, cpuUs: cpuMicros(childPids) - c0 };
}
