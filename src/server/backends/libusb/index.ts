export * from './libusb-backend.js';
export * from './libusb-device.js';
export * from './info.js';
export * from './policy.js';
export * from './iso-koffi.js';
