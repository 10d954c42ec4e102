// The methods of the USB host server and of the bridge control API, with their decoders and
// valid sample requests, for the byte-level fuzzers.
import { service as healthService } from 'grpc-health-check';
import {
  AttachDeviceRequest,
  CancelIncomingRequest,
  DetachDeviceRequest,
  ListAttachmentsRequest,
  PrepareIncomingRequest,
} from '../../gen/usbroam/v1/bridge.js';
import { CaptureRequest, ClientMessage, CloseSessionRequest, ListDevicesRequest, ListSessionsRequest, WatchDevicesRequest } from '../../gen/usbroam/v1/usbhost.js';
import type { MethodUnderFuzz } from './wire-fuzz.js';

const health: MethodUnderFuzz = {
  path: '/grpc.health.v1.Health/Check',
  decode: (b) => healthService.Check.requestDeserialize(Buffer.from(b)),
  samples: [Uint8Array.of(0x0a, 0x12, ...Buffer.from('usbroam.v1.UsbHost'))],
};

export function usbHostMethods(serial: string): MethodUnderFuzz[] {
  const open = ClientMessage.encode({ frames: [{ seq: 0, kind: { $case: 'open', value: { target: { $case: 'device', value: { id: '', vidPid: '', serial, portPath: '' } } } } }] }).finish();
  const resume = ClientMessage.encode({ frames: [{ seq: 0, kind: { $case: 'open', value: { target: { $case: 'resume', value: { sessionId: 'f0e1d2c3', lastServerSeq: 3 } } } } }] }).finish();
  return [
    { path: '/usbroam.v1.UsbHost/Connect', decode: (b) => ClientMessage.decode(b), samples: [open, resume] },
    { path: '/usbroam.v1.UsbHost/ListDevices', decode: (b) => ListDevicesRequest.decode(b), samples: [] },
    { path: '/usbroam.v1.UsbHost/WatchDevices', decode: (b) => WatchDevicesRequest.decode(b), samples: [] },
    { path: '/usbroam.v1.UsbHost/ListSessions', decode: (b) => ListSessionsRequest.decode(b), samples: [] },
    { path: '/usbroam.v1.UsbHost/CloseSession', decode: (b) => CloseSessionRequest.decode(b), samples: [CloseSessionRequest.encode({ sessionId: 'no-such-session' }).finish()] },
    {
      path: '/usbroam.v1.UsbHost/Capture',
      decode: (b) => CaptureRequest.decode(b),
      samples: [CaptureRequest.encode({ target: { $case: 'sessionId', value: 'no-such-session' }, snaplen: 64 }).finish()],
    },
    health,
  ];
}

/** An address the bridge may be made to dial: none (its default) or a unix socket, never a name to resolve. */
export const dialsOnlyLocally = (r: unknown): boolean => {
  const server = (r as { server?: string }).server ?? '';
  return server === '' || /^unix:[^\0]*$/.test(server);
};

export function bridgeControlMethods(): MethodUnderFuzz[] {
  return [
    {
      path: '/usbroam.v1.Bridge/AttachDevice',
      decode: (b) => AttachDeviceRequest.decode(b),
      safe: dialsOnlyLocally,
      samples: [AttachDeviceRequest.encode(AttachDeviceRequest.fromPartial({ vm: 'vm1', device: { serial: 'NOPE' }, server: 'unix:/nonexistent/usbroam.sock' })).finish()],
    },
    { path: '/usbroam.v1.Bridge/DetachDevice', decode: (b) => DetachDeviceRequest.decode(b), samples: [DetachDeviceRequest.encode({ vm: 'vm1', attachmentId: 'a1' }).finish()] },
    { path: '/usbroam.v1.Bridge/ListAttachments', decode: (b) => ListAttachmentsRequest.decode(b), samples: [ListAttachmentsRequest.encode({ vm: 'vm1' }).finish()] },
    {
      // The bridge's default server (a live one): a PrepareIncoming naming an unreachable server
      // waits past any deadline (the standby stream retries), which this fuzzer would report.
      path: '/usbroam.v1.Bridge/PrepareIncoming',
      decode: (b) => PrepareIncomingRequest.decode(b),
      safe: dialsOnlyLocally,
      samples: [PrepareIncomingRequest.encode(PrepareIncomingRequest.fromPartial({ vm: 'vm1', sessionId: 's', attachmentId: 'a1' })).finish()],
    },
    { path: '/usbroam.v1.Bridge/CancelIncoming', decode: (b) => CancelIncomingRequest.decode(b), samples: [CancelIncomingRequest.encode({ vm: 'vm1', attachmentId: 'a1' }).finish()] },
    { ...health, samples: [Uint8Array.of(0x0a, 0x11, ...Buffer.from('usbroam.v1.Bridge'))] },
  ];
}
