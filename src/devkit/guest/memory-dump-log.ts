// Kernel log lines recovered from a guest memory dump (QMP dump-guest-memory), for a guest whose
// console went silent: its printk ring buffer keeps each message as plain text, so the lines
// that matter (oopses, hung tasks, USB and SCSI errors) can be found without the console.

/** Text of printk messages worth showing: faults, warnings, hung tasks, USB/xHCI/SCSI lines. */
const INTERESTING =
  /^(BUG: |Oops|WARNING: |INFO: task |Kernel panic|RIP: |Call Trace|general protection|watchdog: |rcu: |usb \d+-[\d.]+: |xhci_hcd [\da-f:.]+: |sd \d+:\d+:\d+:\d+: |cdc_acm |scsi host\d+: )/;

/**
 * Printable runs (at least 12 characters) in `dump` that look like those kernel messages, each
 * once, in the order found, at most `max`.
 */
export function kernelLinesInMemoryDump(dump: Buffer, max = 80): string[] {
  const found = new Set<string>();
  const text = dump.toString('latin1');
  for (const m of text.matchAll(/[\x20-\x7e]{12,300}/g)) {
    // Format strings (the kernel image's own rodata) are not messages.
    if (!INTERESTING.test(m[0]) || m[0].includes('%')) continue;
    found.add(m[0]);
    if (found.size >= max) break;
  }
  return [...found];
}
