// What the bridge-control subcommands (attach, detach, attachments) share: how to reach the
// bridge, the device selector syntax, and how an attachment is printed.
import type { Command } from 'commander';
import { AttachmentState, type Attachment } from '../gen/usbroam/v1/bridge.js';
import type { DeviceSelector } from '../client/sdk/client.js';
import { BridgeControlClient } from '../client/bridge-control/client.js';
import { withEndpointFlags } from './common.js';

export interface ControlFlags {
  control?: string;
  controlCa?: string;
  controlCert?: string;
  controlKey?: string;
  insecure?: boolean;
  json?: boolean;
}

export function withControlFlags(cmd: Command): Command {
  return withEndpointFlags(cmd, {
    address: ['--control <address>', "the bridge's control API: a unix socket path, or host:port (default: the bridge's default socket)", 'USBROAM_CONTROL'],
    ca: ['--control-ca <file>', 'TCP: CA that signed the bridge certificate', 'USBROAM_CONTROL_CA'],
    cert: ['--control-cert <file>', 'TCP: client certificate (its CN is your identity)', 'USBROAM_CONTROL_CERT'],
    key: ['--control-key <file>', 'TCP: client private key', 'USBROAM_CONTROL_KEY'],
    insecure: 'TCP: plaintext, for a bridge started with --insecure on loopback',
  });
}

export function controlClientFrom(f: ControlFlags): BridgeControlClient {
  return new BridgeControlClient({ address: f.control, ca: f.controlCa, cert: f.controlCert, key: f.controlKey, insecure: f.insecure });
}

/**
 * A device selector: `ID`, `vvvv:pppp`, `serial=S`, `port=1-4.2`, `id=ID`, `vid-pid=vvvv:pppp`,
 * or several joined by commas (every one must match), e.g. `0951:1666,serial=ABC`.
 */
export function parseSelector(s: string): DeviceSelector {
  const out: DeviceSelector = {};
  const parts = s.split(',').map((p) => p.trim()).filter(Boolean);
  if (!parts.length) throw new Error('empty device selector');
  for (const p of parts) {
    const eq = p.indexOf('=');
    if (eq > 0) {
      const k = p.slice(0, eq).toLowerCase();
      const v = p.slice(eq + 1);
      if (!v) throw new Error(`device selector "${p}": no value`);
      if (k === 'serial') out.serial = v;
      else if (k === 'port' || k === 'port-path' || k === 'port_path') {
        if (!/^\d+-\d+(\.\d+)*$/.test(v)) throw new Error(`device selector "${p}": a port is bus-port[.port...], e.g. 1-4.2`);
        out.portPath = v;
      } else if (k === 'id') out.id = v;
      else if (k === 'vid-pid' || k === 'vidpid' || k === 'vid_pid') {
        if (!/^[0-9a-fA-F]{4}:[0-9a-fA-F]{4}$/.test(v)) throw new Error(`device selector "${p}": vendor:product is vvvv:pppp in hex`);
        out.vidPid = v.toLowerCase();
      } else throw new Error(`device selector "${p}": unknown key ${k} (use id=, serial=, port=, vid-pid=)`);
    } else if (/^[0-9a-fA-F]{4}:[0-9a-fA-F]{4}$/.test(p)) out.vidPid = p.toLowerCase();
    else out.id = p;
  }
  return out;
}

const STATE_NAMES: Record<number, string> = {
  [AttachmentState.ATTACHMENT_STATE_STARTING]: 'starting',
  [AttachmentState.ATTACHMENT_STATE_CONNECTED]: 'connected',
  [AttachmentState.ATTACHMENT_STATE_DISCONNECTING]: 'disconnecting',
  [AttachmentState.ATTACHMENT_STATE_CLOSED]: 'closed',
};

export function stateName(s: AttachmentState): string {
  return STATE_NAMES[s] ?? 'unknown';
}

const hex4 = (n: number) => n.toString(16).padStart(4, '0');

export function describeAttachment(a: Attachment): string {
  const d = a.device;
  const dev = d ? `${d.id} ${hex4(d.vendorId)}:${hex4(d.productId)} ${`${d.manufacturer} ${d.product}`.trim()} [serial ${d.serial || '-'}]` : '?';
  const c = a.counters;
  const io = c ? `  urbs ${c.urbsCompleted}/${c.urbsSubmitted}, ${c.bytesFromQemu} B out, ${c.bytesToQemu} B in` : '';
  const claim = a.fleetClaim ? `  fleet claim ${a.fleetClaim}` : '';
  return `${a.id}  vm ${a.vm}  ${stateName(a.state)}  ${dev}  on ${a.bus}${a.hotPlugged ? '' : ' (cold-plugged)'}  from ${a.server} session ${a.sessionId}${claim}${io}`;
}
