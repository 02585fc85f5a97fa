// Token lifetime, the push rate limit and anonymous events (DESIGN §10), with the real phoenix.js
// client where the client's behaviour matters and raw sockets where exact frames do.
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { connect, createRoom, hs256, join, rawConnect, sleep, startGateway, startRedis, teardown, test, waitFor } from './lib/harness.mjs';

let redis;
let gw;
before(async () => {
  redis = await startRedis();
  gw = await startGateway({
    redisPort: redis.port,
    prefix: 'lim',
    env: {
      GATEWAY_AUTH_LEEWAY_S: '1',
      GATEWAY_SERVER_PUSH_RATE_PER_S: '5',
      GATEWAY_SERVER_PUSH_BURST: '10',
      GATEWAY_ROOMS_ANONYMOUS_EVENTS: '["reaction"]',
    },
  });
  createRoom(redis, 'lim', 'hall');
});
after(() => teardown({ gateways: [gw], redis }));

const nowS = () => Math.floor(Date.now() / 1000);
const tok = (sub, ttlS) => hs256({ sub, username: `user-${sub}`, exp: nowS() + ttlS });
const wsUrl = (token) => `${gw.publicUrl}/websocket?vsn=2.0.0${token ? `&token=${token}` : ''}`;
const presenceUsers = () => redis.lines('HVALS', 'lim:room:{hall}:presence').map((m) => JSON.parse(m).user_id);

test('a connection token that expires closes the socket with 4001 within leeway + 1 s, and its presence leaves', { timeout: 30000 }, async () => {
  const exp = nowS() + 2;
  const s = await rawConnect(wsUrl(hs256({ sub: 'short', username: 'short', exp })));
  assert.equal((await s.join('rooms:hall', '1'))[4].response.auth, 'user');
  assert.ok(presenceUsers().includes('short'));
  const closed = await s.closed;
  const late = Date.now() - exp * 1000;
  assert.equal(closed.code, 4001);
  assert.ok(late >= 0 && late <= 1000 + 1000 + 300, `closed ${late} ms after exp (leeway 1 s)`);
  await waitFor(() => !presenceUsers().includes('short'), 3000, 'presence left');
});

test('a guardian_token that expires ends only its channel: phx_error, presence leaves; phoenix.js rejoins with a fresh token', { timeout: 30000 }, async () => {
  createRoom(redis, 'lim', 'other');
  const conn = await rawConnect(wsUrl(tok('long', 600)));
  assert.equal((await conn.join('rooms:other', '1'))[4].status, 'ok');
  // the same socket joins hall with a short per-channel token
  conn.send(['2', '2', 'rooms:hall', 'phx_join', { guardian_token: hs256({ sub: 'guest', username: 'guest', exp: nowS() + 2 }) }]);
  assert.equal((await conn.reply('2'))[4].response.user.id, 'guest');
  const err = await conn.next((f) => f[3] === 'phx_error' && f[2] === 'rooms:hall', 6000);
  assert.equal(err[0], '2', 'phx_error carries the channel join_ref');
  await waitFor(() => !presenceUsers().includes('guest'), 3000, 'guest presence left');
  assert.equal(conn.closeInfo, null, 'the socket stays open');
  // the other channel is untouched: it still gets messages
  redis.cli('PUBLISH', 'lim:room:{other}:events', JSON.stringify([null, null, 'rooms:other', 'new_msg', { body: 'still' }]));
  await conn.next((f) => f[3] === 'new_msg' && f[2] === 'rooms:other', 3000);

  // phoenix.js: a params function hands a fresh token on the automatic rejoin
  let n = 0;
  const socket = await connect(`${gw.publicUrl}`, { token: tok('pj', 600), rejoinAfterMs: () => 300 });
  const ch = socket.channel('rooms:hall', () => ({ guardian_token: hs256({ sub: `g${++n}`, username: 'g', exp: nowS() + (n === 1 ? 2 : 600) }) }));
  await join(ch);
  await waitFor(() => presenceUsers().includes('g2'), 10000, 'rejoined with a fresh token after phx_error');
  assert.ok(!presenceUsers().includes('g1'));
});

test('push rate limit: past the burst a socket gets "rate limited" and nothing is published; other sockets are unaffected', { timeout: 30000 }, async () => {
  const a = await rawConnect(wsUrl(tok('fast', 600)));
  const b = await rawConnect(wsUrl(tok('calm', 600)));
  const watcher = await rawConnect(wsUrl());
  for (const s of [a, b, watcher]) assert.equal((await s.join('rooms:hall', '1'))[4].status, 'ok');
  for (let i = 0; i < 14; i++) a.send(['1', `p${i}`, 'rooms:hall', 'new_msg', { body: `m${i}` }]);
  const replies = [];
  for (let i = 0; i < 14; i++) replies.push((await a.reply(`p${i}`))[4]);
  const ok = replies.filter((r) => r.status === 'ok').length;
  const limited = replies.filter((r) => r.status === 'error' && r.response.reason === 'rate limited').length;
  assert.equal(ok + limited, 14);
  assert.ok(ok >= 10 && ok <= 11, `burst of 10 (+ at most one refill), got ${ok} ok`);
  b.send(['1', 'q', 'rooms:hall', 'new_msg', { body: 'calm' }]);
  assert.equal((await b.reply('q'))[4].status, 'ok', 'another socket is unaffected');
  await watcher.next((f) => f[3] === 'new_msg' && f[4].body === 'calm', 3000);
  await sleep(200);
  const got = watcher.frames.filter((f) => f[3] === 'new_msg' && f[4].user?.id === 'fast').length;
  assert.equal(got, ok, 'refused pushes were not published');
  const metrics = await (await fetch(`${gw.adminUrl}/metrics`)).text();
  assert.match(metrics, new RegExp(`gateway_pushes_total\\{result="rate_limited"\\} ${limited}\\b`));
  // the bucket refills
  await sleep(600);
  a.send(['1', 'again', 'rooms:hall', 'new_msg', { body: 'later' }]);
  assert.equal((await a.reply('again'))[4].status, 'ok');
});

test('anonymous events: an anonymous socket may push rooms.anonymous_events (user null); everything else stays "Not signed in"', { timeout: 30000 }, async () => {
  const anon = await rawConnect(wsUrl());
  const watcher = await rawConnect(wsUrl(tok('w', 600)));
  for (const s of [anon, watcher]) assert.equal((await s.join('rooms:hall', '1'))[4].status, 'ok');
  anon.send(['1', 'r', 'rooms:hall', 'reaction', { body: '👍', user: { id: 'forged' } }]);
  assert.equal((await anon.reply('r'))[4].status, 'ok');
  const f = await watcher.next((x) => x[3] === 'reaction', 3000);
  assert.equal(f[4].body, '👍');
  assert.equal(f[4].user, null);
  anon.send(['1', 'm', 'rooms:hall', 'new_msg', { body: 'hi' }]);
  assert.deepEqual((await anon.reply('m'))[4], { status: 'error', response: { reason: 'Not signed in' } });
  anon.send(['1', 'x', 'rooms:hall', 'presence_diff', { joins: {}, leaves: {} }]);
  assert.deepEqual((await anon.reply('x'))[4], { status: 'error', response: { reason: 'Not signed in' } });
  // the body limit applies to anonymous events too
  anon.send(['1', 'big', 'rooms:hall', 'reaction', { body: 'x'.repeat(5000) }]);
  assert.deepEqual((await anon.reply('big'))[4], { status: 'error', response: { reason: 'invalid payload' } });
  // and a signed-in user may push it as well, with its identity
  watcher.send(['1', 'w', 'rooms:hall', 'reaction', { body: '🎉' }]);
  assert.equal((await watcher.reply('w'))[4].status, 'ok');
});
