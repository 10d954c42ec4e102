// usbredir wire protocol: pure codec (no I/O, no policy).
export * from './proto.js';
export * from './parser.js';
export * from './filter.js';
