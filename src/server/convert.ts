// Backend types <-> the generated proto types. The enums share numbering, so
// only shapes differ.
import { TransferType as PbTransferType, type Device, type EndpointInfo as PbEndpoint, type InterfaceInfo as PbInterface, type IsoPacket as PbIsoPacket, type UrbStatus as PbUrbStatus } from "../gen/usbroam/v1/usbhost.js";
import { TransferType, type DeviceInfo, type EndpointInfo, type InterfaceInfo, type IsoPacket, type UrbStatus } from "./backends/types.js";
import type { Claim } from './devices/registry.js';

export function interfaceToProto(i: InterfaceInfo): PbInterface {
  return { ...i };
}

export function endpointToProto(e: EndpointInfo): PbEndpoint {
  return { ...e, type: transferTypeToProto(e.type) };
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

/** The backends' transfer type as the proto's. */
export function transferTypeToProto(t: TransferType): PbTransferType {
  switch (t) {
    case TransferType.Control:
      return PbTransferType.TRANSFER_CONTROL;
    case TransferType.Isochronous:
      return PbTransferType.TRANSFER_ISOCHRONOUS;
    case TransferType.Bulk:
      return PbTransferType.TRANSFER_BULK;
    case TransferType.Interrupt:
      return PbTransferType.TRANSFER_INTERRUPT;
  }
}

/** A client's transfer type as the backends', or undefined for a number that names none (a client may send any). */
export function transferTypeFromProto(t: PbTransferType): TransferType | undefined {
  switch (t) {
    case PbTransferType.TRANSFER_CONTROL:
      return TransferType.Control;
    case PbTransferType.TRANSFER_ISOCHRONOUS:
      return TransferType.Isochronous;
    case PbTransferType.TRANSFER_BULK:
      return TransferType.Bulk;
    case PbTransferType.TRANSFER_INTERRUPT:
      return TransferType.Interrupt;
    default:
      return undefined;
  }
}

/** The backend and proto status enums share numbering; this makes the crossing explicit. */
export const pbStatus = (s: UrbStatus): PbUrbStatus => s as number as PbUrbStatus;
export const pbIsoPackets = (ps: IsoPacket[] | undefined): PbIsoPacket[] =>
  ps ? ps.map((p) => ({ length: p.length, status: pbStatus(p.status), actualLength: p.actualLength })) : [];
