// A fake RedirDevice and a RedirHost rig for socket-free tests of the usbredir host: URBs and
// ops are recorded and answered by the test (or by a default op handler); every packet the host
// sends is collected.
import { Device, type DeviceOp, type OpResult, type UrbComplete, TransferType, UrbStatus } from '../../src/gen/usbroam/v1/usbhost.js';
import type { UrbRequest } from '../../src/client/sdk/remote-device.js';
import { RedirHost, type RedirCaps, type RedirDevice, type RedirHostOptions } from '../../src/client/bridge/redir-host.js';
import { silentLogger } from '../../src/common/log.js';
import { ALL_CAPS, UsbredirParser, type Packet, type PacketOf, type PacketTypeName } from '../../src/qemu/usbredir/index.js';

export interface PendingUrb {
  urbId: number;
  req: UrbRequest;
  complete(c: Partial<UrbComplete>): void;
  fail(err: Error): void;
}
export type Op = NonNullable<DeviceOp['op']>;
export interface PendingOp {
  op: Op;
  answer(r: Partial<OpResult>): void;
  fail(err: Error): void;
}

/** A configured device: interface 0 (alt 0) with bulk 0x01/0x81, interrupt IN 0x82, iso IN 0x83 and iso OUT 0x03. */
export function testDevice(): Device {
  const ep = (address: number, type: TransferType, maxPacketSize: number, interval = 0) => ({ address, type, maxPacketSize, interval, maxStreams: 0, interfaceNumber: 0 });
  return Device.fromPartial({
    id: 'fake-1',
    vendorId: 0x1d6b,
    productId: 0x0104,
    deviceClass: 0xef,
    deviceSubclass: 2,
    deviceProtocol: 1,
    bcdDevice: 0x0100,
    speed: 3,
    activeConfiguration: 1,
    interfaces: [{ number: 0, alternateSetting: 0, interfaceClass: 0xff, interfaceSubclass: 0, interfaceProtocol: 0, numEndpoints: 5 }],
    endpoints: [
      ep(0x01, TransferType.TRANSFER_BULK, 512),
      ep(0x81, TransferType.TRANSFER_BULK, 512),
      ep(0x82, TransferType.TRANSFER_INTERRUPT, 8, 4),
      ep(0x83, TransferType.TRANSFER_ISOCHRONOUS, 0x1400, 1), // 2 extra transactions: 3 x 1024
      ep(0x03, TransferType.TRANSFER_ISOCHRONOUS, 1024, 1),
    ],
    configurations: [{ value: 1, interfaces: [], endpoints: [] }],
  });
}

export class FakeRedirDevice implements RedirDevice {
  device: Device;
  readonly urbs: PendingUrb[] = [];
  readonly ops: PendingOp[] = [];
  readonly cancels: number[] = [];
  readonly adopted: number[] = [];
  /** Answers ops at once unless it returns undefined (then the test answers). */
  opHandler: (op: Op) => Partial<OpResult> | undefined = () => ({ status: UrbStatus.URB_STATUS_SUCCESS });
  private nextId = 1;

  constructor(device = testDevice()) {
    this.device = device;
  }

  submit(req: UrbRequest): Promise<UrbComplete> {
    const urbId = this.nextId++;
    return new Promise((resolve, reject) => {
      this.urbs.push({
        urbId,
        req,
        complete: (c) => resolve({ urbId, status: UrbStatus.URB_STATUS_SUCCESS, data: new Uint8Array(0), actualLength: 0, isoPackets: [], ...c }),
        fail: reject,
      });
    });
  }
  cancel(urbId: number): void {
    this.cancels.push(urbId);
  }
  rawOp(op: DeviceOp['op']): Promise<OpResult> {
    const base: OpResult = { opId: 0, status: UrbStatus.URB_STATUS_SUCCESS, value: 0, message: '', interfaces: [], endpoints: [] };
    const now = this.opHandler(op!);
    if (now) return Promise.resolve({ ...base, ...now });
    return new Promise((resolve, reject) => this.ops.push({ op: op!, answer: (r) => resolve({ ...base, ...r }), fail: reject }));
  }
  peekNextUrbId(): number {
    return this.nextId;
  }
  adopt(urbId: number): Promise<UrbComplete> {
    this.adopted.push(urbId);
    return new Promise((resolve, reject) => {
      this.urbs.push({ urbId, req: { endpoint: 0, type: TransferType.TRANSFER_BULK }, complete: (c) => resolve({ urbId, status: 0, data: new Uint8Array(0), actualLength: 0, isoPackets: [], ...c }), fail: reject });
    });
  }
  continueUrbIdsAfter(urbId: number): void {
    this.nextId = Math.max(this.nextId, urbId + 1);
  }
  urb(urbId: number): PendingUrb {
    const u = this.urbs.find((x) => x.urbId === urbId);
    if (!u) throw new Error(`no URB ${urbId}`);
    return u;
  }
  lastUrb(): PendingUrb {
    const u = this.urbs[this.urbs.length - 1];
    if (!u) throw new Error('no URB submitted');
    return u;
  }
}

/** One event loop turn: ops wait one (see redir-host.ts), completions a microtask. */
export function turn(): Promise<void> {
  return new Promise((r) => setImmediate(r));
}

export interface HostRig {
  host: RedirHost;
  dev: FakeRedirDevice;
  sent: Packet[];
  events: [string, unknown[]][];
  closed?: { reason: string; err?: Error };
  bulkAnswered: [number, bigint, number][];
  /** What backlog() reports (bytes QEMU has not taken). */
  backlog: number;
  exported: boolean;
  /** The sent packets of one type, in order. */
  of<T extends PacketTypeName>(type: T): PacketOf<T>[];
  /** The last sent packet of a type. */
  last<T extends PacketTypeName>(type: T): PacketOf<T>;
}

/** A host on a connection whose hello exchange is done (all caps on both sides) unless `caps` says otherwise. */
export function hostRig(opts: { dev?: FakeRedirDevice; caps?: RedirCaps; host?: Partial<RedirHostOptions> } = {}): HostRig {
  const dev = opts.dev ?? new FakeRedirDevice();
  const caps = opts.caps ?? new UsbredirParser({ role: 'device', noHello: { peerCaps: ALL_CAPS } });
  const rig = {
    dev,
    sent: [] as Packet[],
    events: [] as [string, unknown[]][],
    bulkAnswered: [] as [number, bigint, number][],
    backlog: 0,
    exported: false,
    closed: undefined as HostRig['closed'],
    of<T extends PacketTypeName>(type: T): PacketOf<T>[] {
      return this.sent.filter((p) => p.type === type) as PacketOf<T>[];
    },
    last<T extends PacketTypeName>(type: T): PacketOf<T> {
      const all = this.of(type);
      if (!all.length) throw new Error(`no ${type} sent; sent ${this.sent.map((p) => p.type).join(',')}`);
      return all[all.length - 1]!;
    },
  } as HostRig;
  rig.host = new RedirHost({
    device: dev,
    caps,
    send: (p) => void rig.sent.push(p),
    backlog: () => rig.backlog,
    afterFlush: (fn) => fn(),
    close: (reason, err) => {
      rig.closed ??= { reason, err };
      rig.host.shutdown();
    },
    flow: () => {},
    exported: () => rig.exported,
    bulkAnswered: (urbId, id, ep) => void rig.bulkAnswered.push([urbId, id, ep]),
    events: { emit: (e: string, ...a: unknown[]) => (rig.events.push([e, a]), true) },
    log: silentLogger,
    id: 'test',
    ...opts.host,
  });
  return rig;
}
