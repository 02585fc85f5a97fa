// Acceptance 3: room existence and room-id validation.
// This file uses its own redis, so a full SCAN before/after is an exact comparison.
import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  test, startRedis, startGateway, createRoom, teardown, connect, join,
  hs256, uid, sleep, rawConnect, wsUrl,
} from './lib/harness.mjs';

const PREFIX = 'rm';
let redis; let gw;

before(async () => {
  redis = await startRedis();
  gw = await startGateway({ redisPort: redis.port, prefix: PREFIX });
  // let any start-up writes (node record, probes) settle before the SCAN comparisons
  await sleep(300);
});
after(() => teardown({ gateways: [gw], redis }));

const INVALID = [
  'rooms:a}b',
  `rooms:${'a'.repeat(65)}`,
  'rooms:../x',
  'rooms:',
  'rooms:a{b',
  'rooms:a b',
  'rooms:a:b',
  'rooms:*',
  'rooms:é',
];

// Runs first in this file: no room has been joined yet, so nothing else writes keys.
test('invalid room ids → "invalid room id", and no Redis key is created', async () => {
  const anon = await rawConnect(wsUrl(gw));
  const user = await rawConnect(wsUrl(gw, { token: hs256('sub-validator') }));
  const before = redis.scanAll();
  let ref = 0;
  for (const c of [anon, user]) {
    for (const topic of INVALID) {
      ref += 1;
      const r = String(ref);
      c.send([r, r, topic, 'phx_join', {}]);
      const rep = await c.reply(r);
      assert.deepEqual(rep, [r, r, topic, 'phx_reply', { status: 'error', response: { reason: 'invalid room id' } }], `join ${JSON.stringify(topic)}`);
    }
  }
  // a push on an invalid topic must not reach Redis either
  user.send(['1', '900', 'rooms:a}b', 'new_msg', { body: 'x' }]);
  await user.reply('900', 1000).catch(() => {}); // answering a push is optional
  await sleep(200);
  const afterKeys = redis.scanAll();
  assert.deepEqual(afterKeys, before, 'invalid joins changed the Redis keyspace');
  assert.equal(anon.closeInfo, null, 'socket must stay open after refused joins');
});

test('join of a room that does not exist → "Room does not exist" (and it is not created)', async () => {
  const anon = await rawConnect(wsUrl(gw));
  const user = await rawConnect(wsUrl(gw, { token: hs256('sub-x') }));
  for (const c of [anon, user]) {
    const rep = await c.join('rooms:nope', '3');
    assert.deepEqual(rep, ['3', '3', 'rooms:nope', 'phx_reply', { status: 'error', response: { reason: 'Room does not exist' } }]);
  }
  assert.equal(redis.cli('EXISTS', `${PREFIX}:room:{nope}`), '0', 'a join must never create the room record');
  // nor any other key of it: anonymous clients may try any id, and nothing may pile up in Redis
  assert.deepEqual(redis.scanAll(`${PREFIX}:room:{nope}*`), [], 'a refused join left keys behind');
  // no presence_state for a refused join
  await sleep(200);
  assert.deepEqual(anon.frames.filter((f) => f[3] === 'presence_state'), []);
});

test('phoenix.js: join of a missing room gets error {reason:"Room does not exist"}', async () => {
  const s = await connect(gw.publicUrl, { token: hs256('sub-y') });
  const r = await join(s.channel(`rooms:${uid('missing')}`));
  assert.deepEqual(r, { status: 'error', response: { reason: 'Room does not exist' } });
});

test('a room id of exactly 64 allowed characters is valid', async () => {
  const id = `A-z_0${'9'.repeat(59)}`;
  assert.equal(id.length, 64);
  createRoom(redis, PREFIX, id);
  assert.equal(redis.cli('EXISTS', `${PREFIX}:room:{${id}}`), '1');
  const c = await rawConnect(wsUrl(gw));
  const rep = await c.join(`rooms:${id}`, '3');
  assert.deepEqual(rep, ['3', '3', `rooms:${id}`, 'phx_reply', { status: 'ok', response: { auth: 'anonymous' } }]);
});

test('topics not starting with "rooms:" → "unmatched topic"', async () => {
  const c = await rawConnect(wsUrl(gw, { token: hs256('sub-z') }));
  let ref = 100;
  for (const topic of ['foo:bar', 'room:lobby', 'lobby', 'Rooms:lobby']) {
    ref += 1;
    const r = String(ref);
    c.send([r, r, topic, 'phx_join', {}]);
    assert.deepEqual(await c.reply(r), [r, r, topic, 'phx_reply', { status: 'error', response: { reason: 'unmatched topic' } }], `join ${topic}`);
  }
});
