// Sentinel mode (DESIGN §13) on real processes: a master, a replica and three
// `redis-server --sentinel` (down-after 1 s). Two gateways with signed-in and anonymous viewers on
// each; the master is SIGKILLed three times (A → B, B → A, A → B: the killed server comes back as a
// replica of the new master). From the promotion (the first `+switch-master` a sentinel publishes)
// the time until messages cross the nodes both ways again and a new viewer's presence_state lists
// every connected signed-in user and the right anonymous total; target ≤ 10 s. Readiness is 503
// meanwhile.
import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  test, startGateways, teardown, createRoom, member, anonymous, crosses,
} from './lib/harness.mjs';
import { viewerSees } from './lib/presence.mjs';
import { startSentinels, failover, ready, FAILOVER_ENV } from './lib/sentinel.mjs';

const PREFIX = 'stl';
const TARGET_MS = 10000;
let set;
let gw1; let gw2;

let env;

before(async () => {
  set = await startSentinels();
  env = { ...FAILOVER_ENV, ...set.env };
  [gw1, gw2] = await startGateways(['sen-gw1', 'sen-gw2'], { redisPort: set.masterPort(), prefix: PREFIX, env });
});
after(async () => {
  await teardown({ gateways: [gw1, gw2] });
  await set?.stop();
});

test('sentinel: the gateways follow three failovers; messages and presence are back within 10 s of the promotion', { timeout: 150000 }, async (t) => {
  const room = 'senroom';
  const topic = `rooms:${room}`;
  createRoom({ port: set.masterPort() }, PREFIX, room, env); // the CLI in sentinel mode
  const alice = await member(gw1, topic, '1', 'alice');
  const bob = await member(gw2, topic, '2', 'bob');
  await anonymous(gw1, topic);
  await anonymous(gw2, topic);
  await anonymous(gw2, topic);
  const want = ['alice: 1', 'bob: 1', 'Anonymous: 3'];
  assert.ok(await viewerSees(gw1, topic, 0, want, 5000), 'presence before the first failover');
  assert.ok(await crosses(alice, bob, topic, 3000) && await crosses(bob, alice, topic, 3000), 'messages before the first failover');

  const times = [];
  for (let round = 1; round <= 3; round++) {
    assert.equal(await ready(gw1), 200);
    assert.equal(await ready(gw2), 200);
    const r = await failover(set, { gateways: [gw1, gw2], a: alice, b: bob, topic, want, n: round * 100 });
    assert.equal(r.promoted, r.replica, 'the replica was promoted');
    t.diagnostic(`round ${round}: ${r.old} killed, promotion ${r.promotionMs} ms later; messages both ways after ${r.crossedMs} ms, presence complete after ${r.ms} ms (503 seen on ${r.seen503.join(', ')})`);
    assert.deepEqual(r.seen503, ['sen-gw1', 'sen-gw2'], 'readiness was 503 on both nodes meanwhile');
    assert.ok(r.ms <= TARGET_MS, `round ${round}: ${r.ms} ms > ${TARGET_MS} ms`);
    times.push(r.ms);
  }
  const sorted = [...times].sort((x, y) => x - y);
  t.diagnostic(`promotion → messages both ways and presence complete: median ${sorted[1]} ms of ${JSON.stringify(times)}`);
  assert.equal(alice.closeInfo, null);
  assert.equal(bob.closeInfo, null);
});
