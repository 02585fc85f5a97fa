// Presence as the seed's unmodified client renders it: two gateways on one Redis, the real
// phoenix.js Presence helper and the seed's listBy chooser.
import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  test, startRedis, startGateway, createRoom, teardown, connect, join, hs256, claims, uid,
  rawConnect, wsUrl,
} from './lib/harness.mjs';
import { observer, waitRows, waitCount, norm, closeAllLight } from './lib/presence.mjs';

const PREFIX = 'ps';
let redis; let gw1; let gw2;

before(async () => {
  redis = await startRedis();
  [gw1, gw2] = await Promise.all([
    startGateway({ redisPort: redis.port, prefix: PREFIX, name: 'seed-gw1' }),
    startGateway({ redisPort: redis.port, prefix: PREFIX, name: 'seed-gw2' }),
  ]);
});
after(async () => {
  closeAllLight();
  await teardown({ gateways: [gw1, gw2], redis });
});

async function signedIn(gw, topic, sub, username) {
  const s = await connect(gw.publicUrl, { token: hs256(claims(sub, username)) });
  const ch = s.channel(topic, {});
  const r = await join(ch);
  assert.equal(r.status, 'ok', `join of ${username}: ${JSON.stringify(r)}`);
  return { socket: s, channel: ch };
}

async function anonymous(gw, topic) {
  const c = await rawConnect(wsUrl(gw));
  const rep = await c.join(topic, '1');
  assert.equal(rep[4].status, 'ok', `anonymous join: ${JSON.stringify(rep)}`);
  return c;
}

test('seed scenario: observer renders observer, test_user, test_user2 and "Anonymous: 2"', async (t) => {
  const room = uid('seed');
  const topic = `rooms:${room}`;
  createRoom(redis, PREFIX, room);

  await signedIn(gw1, topic, '1', 'test_user');
  await signedIn(gw2, topic, '2', 'test_user2');
  await anonymous(gw1, topic);
  await anonymous(gw2, topic);
  const obs = await observer(gw1.publicUrl, topic, { sub: '3', username: 'observer' });

  const want = ['observer: 1', 'test_user: 1', 'test_user2: 1', 'Anonymous: 2'];
  await waitRows(obs, want, 5000, 'observer render');
  t.diagnostic(`rendered: ${JSON.stringify(obs.rows)}`);
  // presence_count: the join-time event, then (throttled) broadcasts
  await waitCount(obs, { anonymous: 2, users: 3 }, 5000);
  t.diagnostic(`presence_count: ${JSON.stringify(obs.lastCount())}`);
  // the `""` key is a stack of distinct synthetic refs
  const anonMetas = obs.metas('');
  assert.deepEqual(anonMetas.map((m) => m.phx_ref).sort(), ['a1', 'a2']);
  // signed-in keys are the JWT subs
  const keys = [];
  obs.presence.list((k) => keys.push(k));
  assert.deepEqual(keys.sort(), ['', '1', '2', '3']);

  // the same view from the other gateway (a second observer there, signed in)
  const obs2 = await observer(gw2.publicUrl, topic, { sub: '4', username: 'observer2' });
  await waitRows(obs2, [...want, 'observer2: 1'], 5000, 'gw2 observer render');
  await waitRows(obs, [...want, 'observer2: 1'], 5000, 'gw1 observer sees observer2');
  await waitCount(obs, { anonymous: 2, users: 4 }, 5000);
});

test('two tabs of one user: one row, count 2 → 1 → gone, on both gateways', async (t) => {
  const room = uid('tabs');
  const topic = `rooms:${room}`;
  createRoom(redis, PREFIX, room);

  const o1 = await observer(gw1.publicUrl, topic, { sub: 'o1', username: 'obs-one' });
  const o2 = await observer(gw2.publicUrl, topic, { sub: 'o2', username: 'obs-two' });
  const tab1 = await signedIn(gw1, topic, '42', 'tabby');
  const tab2 = await signedIn(gw2, topic, '42', 'tabby');

  const both = ['obs-one: 1', 'obs-two: 1', 'tabby: 2'];
  await waitRows(o1, both, 5000, 'gw1 observer, two tabs');
  await waitRows(o2, both, 5000, 'gw2 observer, two tabs');
  const refs = o1.metas('42').map((m) => m.phx_ref);
  assert.equal(new Set(refs).size, 2, `two distinct phx_refs: ${JSON.stringify(refs)}`);
  assert.deepEqual(o1.metas('42').map((m) => m.username), ['tabby', 'tabby']);
  await waitCount(o1, { users: 3, connections: 4, anonymous: 0 });

  tab1.socket.disconnect();
  const one = ['obs-one: 1', 'obs-two: 1', 'tabby: 1'];
  await waitRows(o1, one, 5000, 'gw1 observer, one tab');
  await waitRows(o2, one, 5000, 'gw2 observer, one tab');
  await waitCount(o2, { users: 3, connections: 3 });

  tab2.socket.disconnect();
  const none = ['obs-one: 1', 'obs-two: 1'];
  await waitRows(o1, none, 5000, 'gw1 observer, no tab');
  await waitRows(o2, none, 5000, 'gw2 observer, no tab');
  await waitCount(o1, { users: 2, connections: 2 });
  await waitCount(o2, { users: 2, connections: 2 });
  assert.equal(o1.metas('42'), undefined);
  // nothing of user 42 is left in Redis
  const left = redis.lines('HVALS', `${PREFIX}:room:{${room}}:presence`).filter((m) => JSON.parse(m).user_id === '42');
  assert.deepEqual(left, []);
  t.diagnostic(`final render gw1 ${JSON.stringify(norm(o1.rows))} gw2 ${JSON.stringify(norm(o2.rows))}`);
});
