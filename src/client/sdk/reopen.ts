// Open a device again after its session is gone (e.g. the server restarted): retried with
// exponential backoff while the server is unreachable or the device is not back yet.
import { ExponentialBackoff, handleAll, retry } from 'cockatiel';
import type { DeviceSelector, UsbHostClient } from './client.js';
import type { RemoteDevice, RemoteDeviceOptions } from './remote-device.js';

export interface ReopenOptions extends RemoteDeviceOptions {
  /** Attempts before giving up (default 20). */
  maxAttempts?: number;
  /** First and longest delay between attempts, ms (default 100 and 2000). */
  initialDelayMs?: number;
  maxDelayMs?: number;
  signal?: AbortSignal;
  /** Told of each failed attempt. */
  onRetry?: (attempt: number, err: Error) => void;
}

export async function openDeviceWithRetry(client: UsbHostClient, selector: DeviceSelector, opts: ReopenOptions = {}): Promise<RemoteDevice> {
  const policy = retry(handleAll, {
    maxAttempts: opts.maxAttempts ?? 20,
    backoff: new ExponentialBackoff({ initialDelay: opts.initialDelayMs ?? 100, maxDelay: opts.maxDelayMs ?? 2000 }),
  });
  const sub = policy.onRetry((e) => opts.onRetry?.(e.attempt, 'error' in e ? (e.error as Error) : new Error(String(e.value))));
  try {
    return await policy.execute(() => client.openDevice(selector, opts), opts.signal);
  } finally {
    sub.dispose();
  }
}
