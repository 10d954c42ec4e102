export * from './emulated-device.js';
export * from './emulated-backend.js';
export * from './mass-storage.js';
export * from './loopback.js';
export * from './serial.js';
export * from './ftdi.js';
export * from './byte-fifo.js';
export * from './urb-helpers.js';
export * as descriptors from './descriptors.js';
