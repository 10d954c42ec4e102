// Backend types <-> the generated proto types. The enums share numbering, so
// only shapes differ.
import type { Device, EndpointInfo as PbEndpoint, InterfaceInfo as PbInterface, IsoPacket as PbIsoPacket, UrbStatus as PbUrbStatus } from "../gen/usbroam/v1/usbhost.js";
import type { DeviceInfo, EndpointInfo, InterfaceInfo, IsoPacket, UrbStatus } from "./backends/types.js";
import type { Claim } from './devices/registry.js';

export function interfaceToProto(i: InterfaceInfo): PbInterface {
  return { ...i };
}

export function endpointToProto(e: EndpointInfo): PbEndpoint {
  return { ...e, type: e.type as number };
}

export function deviceToProto(d: DeviceInfo, claim?: Claim): Device {
  return {
    id: d.id,
    vendorId: d.vendorId,
    productId: d.productId,
    deviceClass: d.deviceClass,
    deviceSubclass: d.deviceSubclass,
    deviceProtocol: d.deviceProtocol,
    bcdUsb: d.bcdUsb,
    bcdDevice: d.bcdDevice,
    speed: d.speed as number,
    manufacturer: d.manufacturer,
    product: d.product,
    serial: d.serial,
    bus: d.bus,
    portPath: [...d.portPath],
    numConfigurations: d.configurations.length,
    configurations: d.configurations.map((c) => ({
      value: c.value,
      maxPowerMa: c.maxPowerMa,
      selfPowered: c.selfPowered,
      remoteWakeup: c.remoteWakeup,
      interfaces: c.interfaces.map(interfaceToProto),
      endpoints: c.endpoints.map(endpointToProto),
    })),
    activeConfiguration: d.activeConfiguration,
    interfaces: d.interfaces.map(interfaceToProto),
    endpoints: d.endpoints.map(endpointToProto),
    claim: claim ? { claimed: true, identity: claim.identity, sessionId: claim.sessionId } : { claimed: false, identity: '', sessionId: '' },
    backend: d.backend,
    maxPacketSize0: d.maxPacketSize0,
  };
}

/** The backend and proto enums share numbering; these make the crossing explicit. */
export const pbStatus = (s: UrbStatus): PbUrbStatus => s as number as PbUrbStatus;
export const pbIsoPackets = (ps: IsoPacket[] | undefined): PbIsoPacket[] =>
  ps ? ps.map((p) => ({ length: p.length, status: pbStatus(p.status), actualLength: p.actualLength })) : [];
