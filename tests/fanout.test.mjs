// Acceptance 1: a signed-in phoenix.js 1.8.16 client on gateway A pushes new_msg;
// a signed-in and an anonymous phoenix.js client on gateway B receive it.
import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  test, startRedis, startGateway, createRoom, teardown, connect, join, push, record,
  hs256, claims, uid, waitFor, sleep, rawConnect, wsUrl, isBroadcast,
} from './lib/harness.mjs';

const PREFIX = 'fan';
let redis; let A; let B;

before(async () => {
  redis = await startRedis();
  [A, B] = await Promise.all([
    startGateway({ redisPort: redis.port, prefix: PREFIX, name: 'A' }),
    startGateway({ redisPort: redis.port, prefix: PREFIX, name: 'B' }),
  ]);
});
after(() => teardown({ gateways: [A, B], redis }));

test('rooms create CLI makes the room hash (name, created_at)', () => {
  const room = uid('cli');
  createRoom(redis, PREFIX, room);
  const key = `${PREFIX}:room:{${room}}`;
  assert.equal(redis.cli('TYPE', key), 'hash');
  const fields = redis.lines('HKEYS', key);
  assert.ok(fields.includes('name'), `room hash fields ${JSON.stringify(fields)} lack name`);
  assert.ok(fields.includes('created_at'), `room hash fields ${JSON.stringify(fields)} lack created_at`);
});

test('phoenix.js: new_msg from a signed-in user on A reaches signed-in and anonymous clients on B', async () => {
  const room = uid('fan');
  createRoom(redis, PREFIX, room);
  const topic = `rooms:${room}`;

  const alice = claims('u-alice-1', 'alice');
  const bob = claims('u-bob-2', 'bob');
  const sAlice = await connect(A.publicUrl, { token: hs256(alice) });
  const sBob = await connect(B.publicUrl, { token: hs256(bob) });
  const sAnon = await connect(B.publicUrl, {});

  const chAlice = sAlice.channel(topic);
  const chBob = sBob.channel(topic);
  const chAnon = sAnon.channel(topic);
  const gotAlice = record(chAlice);
  const gotBob = record(chBob);
  const gotAnon = record(chAnon);

  const [jA, jB, jN] = await Promise.all([join(chAlice), join(chBob), join(chAnon)]);
  assert.deepEqual(jA, { status: 'ok', response: { auth: 'user', user: { id: 'u-alice-1', username: 'alice' } } });
  assert.deepEqual(jB, { status: 'ok', response: { auth: 'user', user: { id: 'u-bob-2', username: 'bob' } } });
  assert.deepEqual(jN, { status: 'ok', response: { auth: 'anonymous' } });

  // every successful join is followed by presence_state
  await waitFor(() => gotAnon.some((m) => m.event === 'presence_state'), 3000, 'presence_state on the anonymous channel');
  await waitFor(() => gotBob.some((m) => m.event === 'presence_state'), 3000, 'presence_state on bob\'s channel');

  const t0 = Date.now();
  const reply = await push(chAlice, 'new_msg', { body: 'hello from A' });
  const t1 = Date.now();
  assert.deepEqual(reply, { status: 'ok', response: {} });

  const expectMsg = (got, who) => waitFor(() => got.find((m) => m.event === 'new_msg'), 3000, `new_msg at ${who}`);
  for (const [got, who] of [[gotBob, 'bob (B, signed in)'], [gotAnon, 'anonymous (B)'], [gotAlice, 'alice (A, sender)']]) {
    const m = await expectMsg(got, who);
    const { at, id, ...rest } = m.payload;
    assert.deepEqual(rest, { body: 'hello from A', user: { id: 'u-alice-1', username: 'alice' } }, `payload at ${who}`);
    assert.match(id, /^\d+-\d+$/, `the history stream id at ${who}`);
    assert.ok(Number.isInteger(at), `at must be an integer of ms, got ${JSON.stringify(at)}`);
    assert.ok(at >= t0 - 5000 && at <= t1 + 5000, `at=${at} not near the push time [${t0},${t1}]`);
    assert.equal(m.ref, null, `broadcast ref must be null at ${who}`);
  }
  // exactly once each
  await sleep(300);
  for (const [got, who] of [[gotBob, 'bob'], [gotAnon, 'anon'], [gotAlice, 'alice']]) {
    assert.equal(got.filter((m) => m.event === 'new_msg').length, 1, `${who} must receive the message exactly once`);
  }
});

test('raw frames: broadcast is [null,null,topic,"new_msg",{body,user,at,id}] and a forged user field is ignored', async () => {
  const room = uid('fanraw');
  createRoom(redis, PREFIX, room);
  const topic = `rooms:${room}`;
  const sender = await rawConnect(wsUrl(A, { token: hs256(claims('sub-carol', 'carol')) }));
  const watcher = await rawConnect(wsUrl(B));
  assert.equal((await sender.join(topic, '1'))[4].status, 'ok');
  assert.equal((await watcher.join(topic, '1'))[4].status, 'ok');

  sender.send(['1', '2', topic, 'new_msg', { body: 'x', user: { id: 'admin', username: 'root' } }]);
  const rep = await sender.reply('2');
  assert.deepEqual(rep, ['1', '2', topic, 'phx_reply', { status: 'ok', response: {} }]);

  const f = await watcher.next(isBroadcast(topic, 'new_msg'), 3000, 'new_msg broadcast on B');
  assert.equal(f.length, 5);
  const { at, id, ...rest } = f[4];
  assert.deepEqual(rest, { body: 'x', user: { id: 'sub-carol', username: 'carol' } });
  assert.match(id, /^\d+-\d+$/, 'the payload carries its history stream id');
  assert.deepEqual(Object.keys(f[4]), ['at', 'body', 'user', 'id'], 'the id comes last');
  assert.ok(Number.isInteger(at));
});

test('fan-out is per room: members of another room receive nothing', async () => {
  const r1 = uid('iso'); const r2 = uid('iso');
  createRoom(redis, PREFIX, r1);
  createRoom(redis, PREFIX, r2);
  const sender = await rawConnect(wsUrl(A, { token: hs256('sub-dan') }));
  const other = await rawConnect(wsUrl(B));
  assert.equal((await sender.join(`rooms:${r1}`, '1'))[4].status, 'ok');
  assert.equal((await other.join(`rooms:${r2}`, '1'))[4].status, 'ok');
  sender.send(['1', '2', `rooms:${r1}`, 'new_msg', { body: 'only r1' }]);
  assert.equal((await sender.reply('2'))[4].status, 'ok');
  await sender.next(isBroadcast(`rooms:${r1}`, 'new_msg'), 3000, 'own broadcast');
  await sleep(500);
  assert.deepEqual(other.frames.filter((f) => f[3] === 'new_msg'), [], 'a member of r2 must not get r1 messages');
});
