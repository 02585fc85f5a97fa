// Sentinel over TLS (DESIGN §13): a master, a replica and three sentinels, all TLS only, client
// certificates required everywhere (the sentinels reach the servers and each other over TLS and
// announce their TLS ports). Two gateways in sentinel mode with rediss:// sentinel URLs, the CA and
// a client certificate; signed-in and anonymous viewers on both; the master is SIGKILLed once and
// messages and presence cross the nodes again afterwards.
import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  test, startGateways, teardown, createRoom, member, anonymous, crosses,
} from './lib/harness.mjs';
import { viewerSees } from './lib/presence.mjs';
import { makeCerts, refused } from './lib/tls.mjs';
import { startSentinels, failover, ready, FAILOVER_ENV } from './lib/sentinel.mjs';

const PREFIX = 'stls';
let certs; let set; let env; let gw1; let gw2;

before(async () => {
  certs = makeCerts();
  set = await startSentinels({ tls: certs });
  env = { ...FAILOVER_ENV, ...set.env };
  [gw1, gw2] = await startGateways(['stls-gw1', 'stls-gw2'], { redisPort: set.masterPort(), prefix: PREFIX, env });
});
after(async () => {
  await teardown({ gateways: [gw1, gw2] });
  await set?.stop();
  certs?.remove();
});

test('TLS sentinel: the sentinels announce TLS ports; the gateways follow a failover over TLS', { timeout: 90000 }, async (t) => {
  // the sentinels found each other and the replica on the TLS ports they listen on
  const s0 = set.sentinels[0];
  const peers = set.sentinelCli(s0, 'SENTINEL', 'sentinels', set.name).split('\n');
  for (const s of set.sentinels.slice(1)) assert.ok(peers.includes(String(s.port)), `sentinel ${s.port} known by its TLS port: ${peers}`);
  const room = 'stlsroom';
  const topic = `rooms:${room}`;
  createRoom({ port: set.masterPort() }, PREFIX, room, env); // the CLI in sentinel mode over TLS
  const alice = await member(gw1, topic, '1', 'alice');
  const bob = await member(gw2, topic, '2', 'bob');
  const anon1 = await anonymous(gw1, topic);
  const anon2 = await anonymous(gw2, topic);
  const want = ['alice: 1', 'bob: 1', 'Anonymous: 2'];
  assert.ok(await viewerSees(gw1, topic, 0, want, 5000), 'presence on gw1 before the failover');
  assert.ok(await viewerSees(gw2, topic, 1, want, 5000), 'presence on gw2 before the failover');
  assert.ok(await crosses(alice, bob, topic, 3000) && await crosses(bob, alice, topic, 3000), 'messages before the failover');
  assert.ok(await crosses(alice, anon2, topic, 3000) && await crosses(bob, anon1, topic, 3000), 'anonymous viewers get them');
  for (const g of [gw1, gw2]) assert.equal(await ready(g), 200);

  const r = await failover(set, { gateways: [gw1, gw2], a: alice, b: bob, topic, want, n: 100 });
  t.diagnostic(`${r.old} killed, promotion ${r.promotionMs} ms later; messages both ways after ${r.crossedMs} ms, presence complete after ${r.ms} ms (503 seen on ${r.seen503.join(', ')})`);
  assert.equal(r.promoted, r.replica, 'the replica was promoted');
  assert.deepEqual(r.seen503, ['stls-gw1', 'stls-gw2'], 'readiness was 503 on both nodes meanwhile');
  assert.ok(await crosses(alice, anon2, topic, 3000) && await crosses(bob, anon1, topic, 3000), 'anonymous viewers get them after the failover');
  assert.ok(r.ms <= 10000, `${r.ms} ms > 10000 ms`);
  for (const c of [alice, bob, anon1, anon2]) assert.equal(c.closeInfo, null);
});

test('TLS sentinel: a wrong CA is refused, logged (certificate) and retried; readiness 503', async (t) => {
  await refused(t, PREFIX, { ...env, GATEWAY_REDIS_TLS_CA_FILE: certs.otherCa }, /UnknownIssuer|certificate/);
});
