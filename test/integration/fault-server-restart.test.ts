// The server killed with SIGKILL and started again, under verified I/O (bench/soak/sdk-faults.ts):
// the SDK user sees the device go with an error naming the session, reopens it with backoff, carries on.
import { expect } from 'chai';
import { serverRestart } from '../../bench/soak/sdk-faults.js';

describe('server kill -9 and restart under verified I/O', function () {
  this.timeout(90_000);

  it('the session ends with an error naming it, the device is reopened with backoff, no byte lost', async () => {
    const r = await serverRestart({ graceMs: 3000, downMs: 1000 });
    expect(r.ok, r.detail).to.equal(true);
    expect(r.data_lost).to.equal(0);
  });
});
