// Force full garbage collections in another Node process through its inspector and print its heap
// use, so that a memory figure is what is live, not what the collector has not reached yet.
// Run with: node --experimental-websocket bench/soak/inspector-gc.mjs PORT
// (Node 20 has WebSocket only behind that flag; the soak part spawns this.) Last stdout line:
// {"usedSize", "totalSize" (V8 heap), "arrayBuffers", "external" (process.memoryUsage()), in bytes}.
const port = Number(process.argv[2]);
if (!Number.isInteger(port) || port <= 0) throw new Error(`inspector-gc: port "${process.argv[2]}"`);
const targets = await (await fetch(`http://127.0.0.1:${port}/json/list`)).json();
const url = targets[0]?.webSocketDebuggerUrl;
if (!url) throw new Error(`inspector-gc: no debugger target on 127.0.0.1:${port}`);
const ws = new WebSocket(url);
await new Promise((resolve, reject) => {
  ws.onopen = resolve;
  ws.onerror = () => reject(new Error(`inspector-gc: cannot connect to ${url}`));
});
let next = 1;
const waiting = new Map();
ws.onmessage = (ev) => {
  const m = JSON.parse(String(ev.data));
  const w = m.id !== undefined ? waiting.get(m.id) : undefined;
  if (!w) return;
  waiting.delete(m.id);
  if (m.error) w.reject(new Error(`inspector-gc: ${JSON.stringify(m.error)}`));
  else w.resolve(m.result);
};
const call = (method, params = {}) =>
  new Promise((resolve, reject) => {
    const id = next++;
    waiting.set(id, { resolve, reject });
    ws.send(JSON.stringify({ id, method, params }));
  });
const timer = setTimeout(() => {
  process.stderr.write('inspector-gc: no answer in 30 s\n');
  process.exit(1);
}, 30_000);
await call('HeapProfiler.enable');
// Twice: the first collection's finalizers free more for the second.
await call('HeapProfiler.collectGarbage');
await call('HeapProfiler.collectGarbage');
const usage = await call('Runtime.getHeapUsage');
// Buffers (URB payloads) live outside the V8 heap: their bytes, as the process counts them.
const mem = await call('Runtime.evaluate', { expression: 'JSON.stringify(process.memoryUsage())', returnByValue: true });
const { arrayBuffers, external } = JSON.parse(mem.result.value);
await call('HeapProfiler.disable');
clearTimeout(timer);
ws.close();
process.stdout.write(JSON.stringify({ usedSize: usage.usedSize, totalSize: usage.totalSize, arrayBuffers, external }) + '\n');
