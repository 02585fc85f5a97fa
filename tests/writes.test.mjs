// Acceptance 2: who may write. Anonymous pushes are refused with "Not signed in";
// reserved / unknown events from signed-in users are refused with "unknown event";
// nothing refused is ever broadcast (checked on a second gateway too); what is broadcast carries
// only the pushed body, the sender from the token, the time and the history stream id.
import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  test, startRedis, startGateway, createRoom, teardown, connect, join, push, record,
  hs256, claims, uid, sleep, rawConnect, wsUrl, isBroadcast,
} from './lib/harness.mjs';

const PREFIX = 'wr';
let redis; let A; let B;

before(async () => {
  redis = await startRedis();
  // `typing` is allowed too, to check the body rules of events other than new_msg
  const env = { GATEWAY_ROOMS_CLIENT_EVENTS: '["new_msg","typing"]' };
  [A, B] = await Promise.all([
    startGateway({ redisPort: redis.port, prefix: PREFIX, name: 'A', env }),
    startGateway({ redisPort: redis.port, prefix: PREFIX, name: 'B', env }),
  ]);
});
after(() => teardown({ gateways: [A, B], redis }));

/** Room with: anonymous raw client on A, signed-in raw client on A, observers on A and B. */
async function setup() {
  const room = uid('wr');
  createRoom(redis, PREFIX, room);
  const topic = `rooms:${room}`;
  const anon = await rawConnect(wsUrl(A));
  const user = await rawConnect(wsUrl(A, { token: hs256(claims('sub-writer', 'writer')) }));
  const obsA = await rawConnect(wsUrl(A, { token: hs256(claims('sub-obs-a', 'obsA')) }));
  const obsB = await rawConnect(wsUrl(B));
  for (const c of [anon, user, obsA, obsB]) {
    const r = await c.join(topic, '1');
    assert.equal(r[4].status, 'ok', `join failed: ${JSON.stringify(r)}`);
  }
  return { room, topic, anon, user, observers: [obsA, obsB], all: [anon, user, obsA, obsB] };
}

/** Nobody (all clients) receives any frame with `event` within `ms`. */
async function assertNobodyGets(clients, topic, events, ms = 500) {
  await sleep(ms);
  for (const c of clients) {
    const bad = c.frames.filter((f) => Array.isArray(f) && f[2] === topic && events.includes(f[3]) && f[1] === null);
    assert.deepEqual(bad, [], `a client received a refused event: ${JSON.stringify(bad)}`);
  }
}

test('anonymous push of new_msg (and any other event) → "Not signed in", nothing broadcast', async () => {
  const { topic, anon, all } = await setup();
  anon.send(['1', '2', topic, 'new_msg', { body: 'anon says hi' }]);
  assert.deepEqual(await anon.reply('2'), ['1', '2', topic, 'phx_reply', { status: 'error', response: { reason: 'Not signed in' } }]);
  anon.send(['1', '3', topic, 'whatever_event', { body: 'x' }]);
  assert.deepEqual(await anon.reply('3'), ['1', '3', topic, 'phx_reply', { status: 'error', response: { reason: 'Not signed in' } }]);
  anon.send(['1', '4', topic, 'presence_diff', { joins: { evil: { metas: [{ phx_ref: 'x' }] } }, leaves: {} }]);
  assert.deepEqual(await anon.reply('4'), ['1', '4', topic, 'phx_reply', { status: 'error', response: { reason: 'Not signed in' } }]);
  await assertNobodyGets(all, topic, ['new_msg', 'whatever_event']);
  // a forged presence_diff must not arrive carrying the forged key
  for (const c of all) {
    const forged = c.frames.filter((f) => f[3] === 'presence_diff' && JSON.stringify(f[4]).includes('"evil"'));
    assert.deepEqual(forged, [], 'forged presence_diff was broadcast');
  }
});

test('phoenix.js anonymous client: push refused with Not signed in; signed-in peer on B sees nothing', async () => {
  const room = uid('wrphx');
  createRoom(redis, PREFIX, room);
  const topic = `rooms:${room}`;
  const sAnon = await connect(A.publicUrl, {});
  const sPeer = await connect(B.publicUrl, { token: hs256('sub-peer') });
  const chAnon = sAnon.channel(topic);
  const chPeer = sPeer.channel(topic);
  const gotPeer = record(chPeer);
  const gotAnon = record(chAnon);
  assert.equal((await join(chAnon)).status, 'ok');
  assert.equal((await join(chPeer)).status, 'ok');
  const r = await push(chAnon, 'new_msg', { body: 'should not pass' });
  assert.deepEqual(r, { status: 'error', response: { reason: 'Not signed in' } });
  await sleep(500);
  assert.deepEqual(gotPeer.filter((m) => m.event === 'new_msg'), []);
  assert.deepEqual(gotAnon.filter((m) => m.event === 'new_msg'), []);
});

test('signed-in forged presence_diff / presence_state / phx_* / unknown events → "unknown event", never broadcast', async () => {
  const { topic, user, all } = await setup();
  const forged = { joins: { 'forged-user': { metas: [{ phx_ref: 'forged', username: 'mallory' }] } }, leaves: {} };
  const cases = [
    ['presence_diff', forged],
    ['presence_state', { 'forged-user': { metas: [{ phx_ref: 'forged' }] } }],
    ['presence_count', { anonymous: 999, users: 0, connections: 0 }],
    ['phx_error', {}],
    ['phx_custom', { body: 'x' }],
    ['not_allowed', { body: 'x' }],
  ];
  let ref = 10;
  for (const [event, payload] of cases) {
    ref += 1;
    user.send(['1', String(ref), topic, event, payload]);
    const rep = await user.reply(String(ref));
    assert.deepEqual(rep, ['1', String(ref), topic, 'phx_reply', { status: 'error', response: { reason: 'unknown event' } }], `push of ${event}`);
  }
  await sleep(500);
  for (const c of all) {
    const leaked = c.frames.filter((f) => Array.isArray(f) && (
      JSON.stringify(f).includes('forged') || JSON.stringify(f).includes('mallory')
      || f[3] === 'not_allowed' || f[3] === 'phx_custom' || (f[3] === 'presence_count' && f[4] && f[4].anonymous === 999)));
    assert.deepEqual(leaked, [], 'a refused event leaked to a client');
  }
  // The channel still works after the refusals.
  user.send(['1', '99', topic, 'new_msg', { body: 'still fine' }]);
  assert.deepEqual(await user.reply('99'), ['1', '99', topic, 'phx_reply', { status: 'ok', response: {} }]);
  for (const c of all) await c.next(isBroadcast(topic, 'new_msg'), 3000, 'new_msg after refusals');
});

test('phoenix.js signed-in client: forged presence_diff is refused and the peer Presence is not affected', async () => {
  const room = uid('wrpres');
  createRoom(redis, PREFIX, room);
  const topic = `rooms:${room}`;
  const sEvil = await connect(A.publicUrl, { token: hs256(claims('sub-mallory', 'mallory')) });
  const sPeer = await connect(B.publicUrl, {});
  const chEvil = sEvil.channel(topic);
  const chPeer = sPeer.channel(topic);
  const gotPeer = record(chPeer);
  assert.equal((await join(chEvil)).status, 'ok');
  assert.equal((await join(chPeer)).status, 'ok');
  const r = await push(chEvil, 'presence_diff', { joins: { 'fake-id': { metas: [{ phx_ref: 'fake', username: 'fake' }] } }, leaves: {} });
  assert.deepEqual(r, { status: 'error', response: { reason: 'unknown event' } });
  await sleep(500);
  const leaked = gotPeer.filter((m) => JSON.stringify(m.payload || {}).includes('fake'));
  assert.deepEqual(leaked, [], 'forged presence reached a peer');
});

test('a push broadcasts only {body, user, at, id}: extra fields (id, system, user, a huge x) are dropped; every event\'s body is bounded', async () => {
  const { topic, user, all } = await setup();
  const sender = { id: 'sub-writer', username: 'writer' };
  const huge = 'x'.repeat(10000); // > rooms.max_body_bytes (4096), well under the frame limit
  const extras = { id: 'forged-id', system: true, user: { id: 'admin', username: 'root' }, x: huge };
  const assertOnly = (f, body, what) => {
    // {body, user, at} and the history stream id (the server's: a client's "id" is dropped)
    assert.deepEqual(Object.keys(f[4]).sort(), ['at', 'body', 'id', 'user'], `${what}: ${JSON.stringify(f).slice(0, 300)}`);
    assert.match(f[4].id, /^\d+-\d+$/, what);
    assert.deepEqual(f[4].body, body, what);
    assert.deepEqual(f[4].user, sender, `${what}: the sender comes from the token`);
    assert.ok(Number.isInteger(f[4].at), what);
  };

  user.send(['1', '20', topic, 'new_msg', { body: 'hello', ...extras }]);
  assert.deepEqual(await user.reply('20'), ['1', '20', topic, 'phx_reply', { status: 'ok', response: {} }]);
  for (const [i, c] of all.entries()) {
    assertOnly(await c.next(isBroadcast(topic, 'new_msg'), 3000, 'new_msg broadcast'), 'hello', `new_msg to client ${i}`);
  }

  user.send(['1', '21', topic, 'typing', { body: { state: 'on' }, ...extras }]);
  assert.deepEqual(await user.reply('21'), ['1', '21', topic, 'phx_reply', { status: 'ok', response: {} }]);
  for (const [i, c] of all.entries()) {
    assertOnly(await c.next(isBroadcast(topic, 'typing'), 3000, 'typing broadcast'), { state: 'on' }, `typing to client ${i}`);
  }

  // another allowed event gets no way around max_body_bytes, and a body is required
  const refused = (ref) => ['1', ref, topic, 'phx_reply', { status: 'error', response: { reason: 'invalid payload' } }];
  user.send(['1', '22', topic, 'typing', { body: huge }]);
  assert.deepEqual(await user.reply('22'), refused('22'));
  user.send(['1', '23', topic, 'typing', { state: 'on', x: huge }]);
  assert.deepEqual(await user.reply('23'), refused('23'));
  await sleep(500);
  for (const c of all) {
    const typing = c.frames.filter((f) => isBroadcast(topic, 'typing')(f));
    assert.equal(typing.length, 1, `only the accepted typing push is broadcast: ${JSON.stringify(typing).slice(0, 300)}`);
    assert.ok(!c.raw.some((t) => typeof t === 'string' && t.includes('forged-id')), 'a forged id reached a client');
  }
});
