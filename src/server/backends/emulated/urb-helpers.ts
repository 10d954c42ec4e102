// Small promise helpers to drive any DeviceHandle (tests, demos, benches).
import { TransferType, type DeviceHandle, type IsoPacket, type Urb, type UrbResult } from '../types.js';
import { makeSetup, type SetupPacket } from './emulated-device.js';

let nextUrbId = 1;

export function newUrbId(): number {
  nextUrbId = (nextUrbId + 1) % 0x7fffffff || 1;
  return nextUrbId;
}

export interface UrbSpec {
  endpoint: number;
  type: TransferType;
  id?: number;
  setup?: Uint8Array;
  data?: Uint8Array;
  length?: number;
  flags?: number;
  isoPackets?: IsoPacket[];
  timeoutMs?: number;
  /** Bulk stream id (default 0: none). */
  streamId?: number;
}

export function makeUrb(spec: UrbSpec): Urb {
  return {
    id: spec.id ?? newUrbId(),
    endpoint: spec.endpoint,
    type: spec.type,
    setup: spec.setup,
    data: spec.data,
    length: spec.length ?? spec.data?.length ?? 0,
    streamId: spec.streamId ?? 0,
    flags: spec.flags ?? 0,
    isoPackets: spec.isoPackets,
    timeoutMs: spec.timeoutMs ?? 0,
  };
}

/** Submit a URB; resolves with its result. */
export function submit(handle: DeviceHandle, urb: Urb): Promise<UrbResult> {
  return new Promise((resolve) => handle.submit(urb, resolve));
}

export function bulkOut(handle: DeviceHandle, endpoint: number, data: Uint8Array, id?: number): Promise<UrbResult> {
  return submit(handle, makeUrb({ endpoint, type: TransferType.Bulk, data, id }));
}

export function bulkIn(handle: DeviceHandle, endpoint: number, length: number, id?: number, flags = 0): Promise<UrbResult> {
  return submit(handle, makeUrb({ endpoint: endpoint | 0x80, type: TransferType.Bulk, length, id, flags }));
}

export function control(handle: DeviceHandle, setup: SetupPacket, data?: Uint8Array): Promise<UrbResult> {
  const isIn = (setup.bmRequestType & 0x80) !== 0;
  return submit(
    handle,
    makeUrb({
      endpoint: isIn ? 0x80 : 0x00,
      type: TransferType.Control,
      setup: makeSetup(setup),
      data,
      length: isIn ? setup.wLength : (data?.length ?? 0),
    }),
  );
}

export function getDescriptor(handle: DeviceHandle, type: number, index: number, length = 0xffff): Promise<UrbResult> {
  return control(handle, { bmRequestType: 0x80, bRequest: 0x06, wValue: (type << 8) | index, wIndex: type === 3 && index ? 0x0409 : 0, wLength: length });
}
