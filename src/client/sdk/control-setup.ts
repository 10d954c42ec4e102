// The 8-byte setup packet of a control transfer, from WebUSB-shaped fields.

export interface ControlSetup {
  requestType: 'standard' | 'class' | 'vendor';
  recipient: 'device' | 'interface' | 'endpoint' | 'other';
  request: number;
  value: number;
  index: number;
}

export function encodeSetup(s: ControlSetup, dirIn: boolean, length: number): Uint8Array {
  const type = { standard: 0, class: 1, vendor: 2 }[s.requestType];
  const rcpt = { device: 0, interface: 1, endpoint: 2, other: 3 }[s.recipient];
  const b = new Uint8Array(8);
  b[0] = (dirIn ? 0x80 : 0) | (type << 5) | rcpt;
  b[1] = s.request;
  b[2] = s.value & 0xff;
  b[3] = s.value >> 8;
  b[4] = s.index & 0xff;
  b[5] = s.index >> 8;
  b[6] = length & 0xff;
  b[7] = length >> 8;
  return b;
}
