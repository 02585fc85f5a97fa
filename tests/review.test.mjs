// Regression tests for the defects of the code review (issue 7) that live in the node's fan-out
// layer: ghost presence after a timed-out cold join, the per-room heartbeat, subscriptions across a
// pub/sub reconnect, join floods to rooms that do not exist, cold joins on a slow Redis, and the
// re-snapshot back-off. Each runs against a real redis-server and a real gateway process.
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { createRoom, hs256, rawConnect, sleep, startGateway, startRedis, teardown, test, waitFor } from './lib/harness.mjs';
import { commandCalls } from './lib/presence.mjs';

let redis;
const gateways = [];
before(async () => { redis = await startRedis(); });
after(async () => {
  try { redis?.cli('CLIENT', 'UNPAUSE'); } catch { /* already gone */ }
  await teardown({ gateways, redis });
});

const token = (sub) => hs256({ sub, username: `user-${sub}`, exp: Math.floor(Date.now() / 1000) + 600 });
const FAST = { GATEWAY_PRESENCE_TTL_MS: '3000', GATEWAY_PRESENCE_HEARTBEAT_INTERVAL_MS: '1000', GATEWAY_REDIS_COMMAND_TIMEOUT_MS: '1000' };
async function gateway(prefix, env = {}) {
  // one gateway at a time: the Redis command counts some tests read are global
  while (gateways.length) await gateways.pop().stop();
  const gw = await startGateway({ redisPort: redis.port, prefix, env: { ...FAST, ...env } });
  gateways.push(gw);
  return gw;
}
const url = (gw, sub) => `${gw.publicUrl}/websocket?vsn=2.0.0${sub ? `&token=${token(sub)}` : ''}`;
/** A join and its reply, waiting up to `ms`. */
const joinWait = (s, topic, ref, ms) => { s.send([ref, ref, topic, 'phx_join', {}]); return s.reply(ref, ms); };
const presenceUsers = (prefix, room) => redis.lines('HVALS', `${prefix}:room:{${room}}:presence`).map((m) => JSON.parse(m).user_id);

test('item 4: a signed-in cold join that timed out leaves no ghost, even when the room is joined again', { timeout: 60000 }, async () => {
  const gw = await gateway('rv4');
  createRoom(redis, 'rv4', 'cold');
  const ghost = await rawConnect(url(gw, 'ghost'));
  // writes (the join script) wait 3 s; the gateway's deadline is 1 s
  redis.cli('CLIENT', 'PAUSE', '3000', 'WRITE');
  const r = await joinWait(ghost, 'rooms:cold', '1', 5000);
  assert.deepEqual(r[4], { status: 'error', response: { reason: 'presence unavailable' } });
  ghost.ws.close();
  await sleep(2500); // the paused script runs now
  const later = await rawConnect(url(gw, 'later'));
  assert.equal((await later.join('rooms:cold', '2'))[4].status, 'ok');
  // TTL + heartbeats: the first connection must be gone, the second present
  await sleep(3000 + 2 * 1000 + 500);
  assert.deepEqual(presenceUsers('rv4', 'cold'), ['later']);
});

test('item 8: one room whose heartbeat fails does not stop the others from being renewed and re-asserted', { timeout: 60000 }, async () => {
  const gw = await gateway('rv8');
  createRoom(redis, 'rv8', 'bad');
  createRoom(redis, 'rv8', 'good');
  const u = await rawConnect(url(gw, 'u8'));
  assert.equal((await u.join('rooms:bad', '1'))[4].status, 'ok');
  assert.equal((await u.join('rooms:good', '2'))[4].status, 'ok');
  const field = (room) => redis.lines('HKEYS', `rv8:room:{${room}}:presence`).find((k) => k.startsWith(`${gw.node}.`));
  const conn = await waitFor(() => field('good'), 5000, 'presence written');
  // the bad room's keys get the wrong type: its heartbeat script fails with WRONGTYPE
  redis.cli('DEL', 'rv8:room:{bad}:anon');
  redis.cli('SET', 'rv8:room:{bad}:anon', 'not-a-hash');
  // the good room loses this node's entry and lease (as if swept): its heartbeat must notice
  redis.cli('HDEL', 'rv8:room:{good}:presence', conn);
  redis.cli('ZREM', 'rv8:room:{good}:nodes', gw.node);
  await waitFor(() => field('good') === conn, 6000, 'the good room re-asserted by sync after its heartbeat reported the lease lost');
  await waitFor(() => /heartbeat failed for some rooms.*failed=1 rooms=2/.test(gw.stderr()), 3000, 'the bad room reported failed, alone');
});

test('item 9: every room keeps its subscription across pub/sub reconnects during a burst of cold joins', { timeout: 60000 }, async () => {
  const gw = await gateway('rv9');
  const rooms = Array.from({ length: 30 }, (_, i) => `burst${i}`);
  for (const r of rooms) createRoom(redis, 'rv9', r);
  const sockets = await Promise.all(rooms.map(() => rawConnect(url(gw))));
  const joins = rooms.map((r, i) => joinWait(sockets[i], `rooms:${r}`, '1', 8000));
  for (let k = 0; k < 3; k++) {
    await sleep(15);
    redis.cli('CLIENT', 'KILL', 'TYPE', 'pubsub');
  }
  const replies = await Promise.all(joins);
  // rejoin what was refused while the connection was down (as phoenix.js does)
  for (let i = 0; i < rooms.length; i++) {
    if (replies[i][4].status !== 'ok') {
      await waitFor(async () => (await sockets[i].join(`rooms:${rooms[i]}`, String(Date.now())))[4].status === 'ok', 8000, 'rejoin');
    }
  }
  await waitFor(() => {
    const n = redis.lines('PUBSUB', 'NUMSUB', ...rooms.map((r) => `rv9:room:{${r}}:events`));
    return rooms.every((_, i) => n[2 * i + 1] === '1');
  }, 8000, 'one subscription per room');
  // and a message published to each room reaches its socket
  for (let i = 0; i < rooms.length; i++) {
    redis.cli('PUBLISH', `rv9:room:{${rooms[i]}}:events`, JSON.stringify([null, null, `rooms:${rooms[i]}`, 'new_msg', { body: `m${i}` }]));
    await sockets[i].next((f) => f[3] === 'new_msg' && f[4].body === `m${i}`, 3000);
  }
});

test('item 10: joins to rooms that do not exist make no subscription, are remembered, and a looping socket is closed (4009)', { timeout: 60000 }, async () => {
  const gw = await gateway('rv10', { GATEWAY_SERVER_MAX_REFUSED_JOINS_PER_MIN: '20' });
  createRoom(redis, 'rv10', 'live');
  const listener = await rawConnect(url(gw));
  assert.equal((await listener.join('rooms:live', '1'))[4].status, 'ok');
  const before = commandCalls(redis);
  const flood = await rawConnect(url(gw));
  for (let i = 0; i < 20; i++) {
    const r = await flood.join(`rooms:nope${i % 10}`, String(i + 1));
    assert.deepEqual(r[4], { status: 'error', response: { reason: 'Room does not exist' } });
    assert.deepEqual(redis.lines('PUBSUB', 'CHANNELS', 'rv10:room:{nope*'), [], 'no subscription for a missing room');
  }
  // the 21st refused join closes the socket
  flood.send(['21', '21', 'rooms:nope21', 'phx_join', {}]);
  const closed = await flood.closed;
  assert.equal(closed.code, 4009);
  const after = commandCalls(redis);
  // a cold join reads the room record (HGETALL: existence and access at once)
  const delta = (cmd) => (after[cmd] ?? 0) - (before[cmd] ?? 0);
  const lookups = delta('exists') + delta('hgetall');
  assert.ok(lookups <= 15, `10 distinct missing ids (+1 after the close) are looked up about once a second each, got ${lookups} EXISTS/HGETALL`);
  // the live room is untouched
  redis.cli('PUBLISH', 'rv10:room:{live}:events', JSON.stringify([null, null, 'rooms:live', 'new_msg', { body: 'still here' }]));
  await listener.next((f) => f[3] === 'new_msg' && f[4].body === 'still here', 3000);
  assert.deepEqual(redis.scanAll('rv10:room:{nope*'), []);
});

test('item 11: joins queued on one cold room fail together within the join deadline on a stalled Redis', { timeout: 60000 }, async () => {
  const gw = await gateway('rv11');
  createRoom(redis, 'rv11', 'slow');
  const sockets = await Promise.all(Array.from({ length: 40 }, (_, i) => rawConnect(url(gw, i % 2 ? `s${i}` : undefined))));
  redis.cli('CLIENT', 'PAUSE', '5000', 'WRITE');
  const t0 = Date.now();
  const replies = await Promise.all(sockets.map(async (s) => {
    const r = await joinWait(s, 'rooms:slow', '1', 15000);
    return { status: r[4].status, ms: Date.now() - t0 };
  }));
  const worst = Math.max(...replies.map((r) => r.ms));
  assert.ok(replies.every((r) => r.status === 'error'), JSON.stringify(replies));
  assert.ok(worst < 3000, `every join answered within two command deadlines (+1 s), worst ${worst} ms`);
  // heartbeats are answered meanwhile
  sockets[0].send([null, 'hb', 'phoenix', 'heartbeat', {}]);
  assert.equal((await sockets[0].reply('hb'))[4].status, 'ok');
  redis.cli('CLIENT', 'UNPAUSE');
  await waitFor(async () => (await sockets[1].join('rooms:slow', String(Date.now())))[4].status === 'ok', 8000, 'join after Redis recovers');
});

test('item 12: a failing re-snapshot backs off instead of retrying every 100 ms', { timeout: 60000 }, async () => {
  const gw = await gateway('rv12');
  createRoom(redis, 'rv12', 'snap');
  const s = await rawConnect(url(gw));
  assert.equal((await s.join('rooms:snap', '1'))[4].status, 'ok');
  // the snapshot script now fails (WRONGTYPE on the presence hash) ...
  redis.cli('DEL', 'rv12:room:{snap}:presence');
  redis.cli('SET', 'rv12:room:{snap}:presence', 'not-a-hash');
  // ... and a seq gap makes the node take one
  const seq = Number(redis.cli('GET', 'rv12:room:{snap}:seq'));
  const warnings = () => (gw.stderr().match(/re-snapshot failed/g) ?? []).length;
  const w0 = warnings();
  const c0 = commandCalls(redis).evalsha ?? 0;
  redis.cli('PUBLISH', 'rv12:room:{snap}:events', JSON.stringify({ seq: seq + 5, anon: 1, joins: {}, leaves: [] }));
  await sleep(3000);
  const calls = (commandCalls(redis).evalsha ?? 0) - c0;
  // heartbeats: 3; re-snapshots after 0.5, 1, 1 s (capped at the heartbeat interval) + jitter
  assert.ok(calls <= 10, `script calls in 3 s: ${calls} (a 100 ms retry loop makes ~30)`);
  assert.ok(warnings() - w0 <= 1, `one warning for the failure streak, got ${warnings() - w0}`);
});

test('a node whose lease another node swept re-asserts its entries on its next join (not only on a heartbeat)', { timeout: 60000 }, async () => {
  const slow = { GATEWAY_PRESENCE_TTL_MS: '20000', GATEWAY_PRESENCE_HEARTBEAT_INTERVAL_MS: '10000' };
  const a = await gateway('rvl', slow);
  const b = await startGateway({ redisPort: redis.port, prefix: 'rvl', env: { ...FAST, ...slow } });
  gateways.push(b);
  createRoom(redis, 'rvl', 'lease');
  for (const u of ['u1', 'u2']) {
    const s = await rawConnect(url(a, u));
    assert.equal((await s.join('rooms:lease', '1'))[4].status, 'ok');
  }
  const bs = await rawConnect(url(b, 'b1'));
  assert.equal((await bs.join('rooms:lease', '1'))[4].status, 'ok');
  // A's lease lapses (as after a long pause); B's next call sweeps A's users
  redis.cli('ZADD', 'rvl:room:{lease}:nodes', '1', a.node);
  const b2 = await rawConnect(url(b, 'b2'));
  assert.equal((await b2.join('rooms:lease', '1'))[4].status, 'ok');
  assert.deepEqual(presenceUsers('rvl', 'lease').sort(), ['b1', 'b2']);
  // A's next join finds its lease gone although it held one: it syncs, u1 and u2 come back
  const u3 = await rawConnect(url(a, 'u3'));
  assert.equal((await u3.join('rooms:lease', '1'))[4].status, 'ok');
  await waitFor(() => presenceUsers('rvl', 'lease').sort().join() === 'b1,b2,u1,u2,u3', 3000, 'A re-asserted its users');
});
