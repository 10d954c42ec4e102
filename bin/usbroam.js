#!/usr/bin/env node
// The usbroam CLI. Runs the TypeScript sources through tsx's loader.
import { register } from 'tsx/esm/api';

register();
await import('../src/client/cli/main.ts');
