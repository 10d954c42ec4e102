export * from './libusb-backend.js';
export * from './libusb-device.js';
export * from './libusb-status.js';
export * from './info.js';
export * from './policy.js';
export * from './iso-koffi.js';
export * from './koffi-libusb.js';
export * from './streams-koffi.js';
