// Redis cost of presence, read from INFO commandstats (scripts run by EVALSHA; commands a script
// runs are counted under their own names too, so HGETALL here means "somebody took a snapshot").
// Each test has its own redis-server: commandstats are server-wide.
import { after } from 'node:test';
import assert from 'node:assert/strict';
import {
  test, startRedis, startGateway, createRoom, teardown, hs256, claims, uid, waitFor, sleep,
} from './lib/harness.mjs';
import { lightOpen, lightCrowd, pool, closeAllLight, commandCalls, anonTotal } from './lib/presence.mjs';

const PREFIX = 'pc';
const gateways = [];
const redises = [];

after(async () => {
  closeAllLight();
  await teardown({ gateways });
  await Promise.all(redises.map((r) => r.stop().catch(() => r.kill())));
});

async function setup(n, env) {
  const redis = await startRedis();
  redises.push(redis);
  const gws = await Promise.all(Array.from({ length: n }, (_, i) => startGateway({
    redisPort: redis.port, prefix: PREFIX, name: `cost-${redises.length}-${i + 1}`, env,
  })));
  gateways.push(...gws);
  return { redis, gws };
}

const scriptCalls = (s) => (s.evalsha || 0) + (s.eval || 0);
const token = (sub) => hs256(claims(sub, `name-${sub}`));

// no heartbeat inside the measured windows
const QUIET = { GATEWAY_PRESENCE_HEARTBEAT_INTERVAL_MS: '60000', GATEWAY_PRESENCE_TTL_MS: '180000' };

test('warm room: one script call per signed-in join and per leave; anonymous joins read nothing', async (t) => {
  const { redis, gws: [gw] } = await setup(1, QUIET);
  const room = uid('warm');
  const topic = `rooms:${room}`;
  createRoom(redis, PREFIX, room);
  const keeper = await lightOpen(gw, { token: token('keeper') });
  await keeper.join(topic); // the room is warm on this gateway from now on
  await sleep(300);

  // (a) N signed-in joins → N script calls
  const N = 10;
  const users = await pool(N, N, (i) => lightOpen(gw, { token: token(`u${i}`) }));
  redis.cli('CONFIG', 'RESETSTAT');
  for (const u of users) await u.join(topic);
  await sleep(300);
  const joins = commandCalls(redis);
  t.diagnostic(`${N} signed-in joins → evalsha ${joins.evalsha || 0}, eval ${joins.eval || 0}; commandstats ${JSON.stringify(joins)}`);
  assert.equal(scriptCalls(joins), N, `script calls for ${N} warm signed-in joins: ${JSON.stringify(joins)}`);
  assert.equal(joins.hgetall || 0, 0, 'a warm join must not snapshot');
  assert.equal(joins.hset || 0, 0, 'no events hook: no outbox write');

  // N leaves (half phx_leave, half closed sockets) → N script calls
  redis.cli('CONFIG', 'RESETSTAT');
  users.forEach((u, i) => {
    if (i % 2) u.ws.send(JSON.stringify(['1', '2', topic, 'phx_leave', {}]));
    else u.close();
  });
  await waitFor(() => redis.cli('HLEN', `${PREFIX}:room:{${room}}:presence`) === '1', 3000, 'only the keeper left in :presence');
  await sleep(300);
  const leaves = commandCalls(redis);
  t.diagnostic(`${N} signed-in leaves → evalsha ${leaves.evalsha || 0}, eval ${leaves.eval || 0}; commandstats ${JSON.stringify(leaves)}`);
  assert.equal(scriptCalls(leaves), N, `script calls for ${N} leaves: ${JSON.stringify(leaves)}`);

  // (c) K anonymous joins within a few ms in the warm room: no read, one batched write (or two)
  const K = 20;
  const anons = await pool(K, K, () => lightOpen(gw));
  redis.cli('CONFIG', 'RESETSTAT');
  const t0 = Date.now();
  for (const a of anons) a.sendJoin(topic);
  const sentMs = Date.now() - t0;
  await Promise.all(anons.map((a) => a.reply('1')));
  await waitFor(() => anonTotal(redis, PREFIX, room) === K, 3000, `anon hash = ${K}`);
  await sleep(200);
  const anon = commandCalls(redis);
  t.diagnostic(`${K} anonymous joins sent within ${sentMs} ms → evalsha ${anon.evalsha || 0}, eval ${anon.eval || 0}; commandstats ${JSON.stringify(anon)}`);
  assert.ok(scriptCalls(anon) >= 1 && scriptCalls(anon) <= 2, `script calls for ${K} anonymous joins: ${JSON.stringify(anon)}`);
  assert.equal(anon.hgetall || 0, 0, 'no snapshot (HGETALL) for warm anonymous joins');
  assert.equal(anon.hget || 0, 0, 'no HGET for warm anonymous joins');
  // every GET comes from inside the batched write (join.lua reads its seq), none from the joins
  assert.ok((anon.get || 0) <= scriptCalls(anon), `GET calls ${anon.get} > script calls`);
  // nothing but the batched script's own commands (+ our INFO, the probe PUBLISH, the node record SET)
  // (hkeys: the scripts check the anonymous fields, one per node, against the live leases)
  const allowed = new Set(['evalsha', 'eval', 'exists', 'time', 'zrangebyscore', 'zscore', 'zadd', 'hincrby',
    'get', 'set', 'incr', 'hvals', 'hkeys', 'publish', 'pexpire', 'info', 'config',
    // hlen: the events hook's occupied/vacated edge reads the signed-in count (lua/common.lua)
    'hlen']);
  const unexpected = Object.keys(anon).filter((c) => !allowed.has(c.split('|')[0]));
  assert.deepEqual(unexpected, [], `unexpected commands for warm anonymous joins: ${JSON.stringify(anon)}`);

  // the method sees snapshots: an anonymous join of a COLD room takes one (HGETALL inside snapshot.lua)
  const cold = uid('cold');
  createRoom(redis, PREFIX, cold);
  redis.cli('CONFIG', 'RESETSTAT');
  const c = await lightOpen(gw);
  await c.join(`rooms:${cold}`);
  await sleep(200);
  const coldStats = commandCalls(redis);
  t.diagnostic(`cold-room anonymous join → ${JSON.stringify(coldStats)}`);
  assert.ok((coldStats.hgetall || 0) >= 1, 'a cold join snapshots (sanity check of the measurement)');
});

test('with an events hook: still one script call per warm signed-in join and leave; the outbox write is inside it, the acknowledgement one HDEL per batch', async (t) => {
  const http = await import('node:http');
  const rx = http.createServer((req, res) => { req.resume(); req.on('end', () => { res.writeHead(204); res.end(); }); });
  await new Promise((r) => rx.listen(0, '127.0.0.1', r));
  try {
    const { redis, gws: [gw] } = await setup(1, {
      ...QUIET,
      GATEWAY_HOOKS_EVENTS_URL: `http://127.0.0.1:${rx.address().port}/events`,
      GATEWAY_HOOKS_SECRET: 'presence-cost-events-hook-secret-0123456789',
    });
    const room = uid('hooked');
    const topic = `rooms:${room}`;
    createRoom(redis, PREFIX, room);
    const keeper = await lightOpen(gw, { token: token('keeper') });
    await keeper.join(topic);
    await sleep(300);
    const N = 10;
    const users = await pool(N, N, (i) => lightOpen(gw, { token: token(`h${i}`) }));
    redis.cli('CONFIG', 'RESETSTAT');
    for (const u of users) await u.join(topic);
    await sleep(400);
    const joins = commandCalls(redis);
    t.diagnostic(`${N} signed-in joins (events hook on) → commandstats ${JSON.stringify(joins)}`);
    assert.equal(scriptCalls(joins), N, `script calls for ${N} warm signed-in joins: ${JSON.stringify(joins)}`);
    assert.equal(joins.hset || 0, N, 'one outbox write per join (each a member_added)');
    assert.equal(joins.hgetall || 0, 0, 'no outbox read: no dead node');
    assert.ok((joins.hdel || 0) >= 1 && joins.hdel <= N, `acknowledged in batches: ${joins.hdel} HDEL`);
    await waitFor(() => redis.cli('HLEN', `${PREFIX}:room:{${room}}:unacked`) === '0', 3000, 'the outbox to empty');
    redis.cli('CONFIG', 'RESETSTAT');
    for (const u of users) u.close();
    await waitFor(() => redis.cli('HLEN', `${PREFIX}:room:{${room}}:presence`) === '1', 3000, 'only the keeper left');
    await sleep(400);
    const leaves = commandCalls(redis);
    t.diagnostic(`${N} signed-in leaves (events hook on) → commandstats ${JSON.stringify(leaves)}`);
    assert.equal(scriptCalls(leaves), N, `script calls for ${N} leaves: ${JSON.stringify(leaves)}`);
    assert.equal(leaves.hset || 0, N, 'one outbox write per leave (each a member_removed)');
    await waitFor(() => redis.cli('HLEN', `${PREFIX}:room:{${room}}:unacked`) === '0', 3000, 'the outbox to empty');
  } finally {
    await new Promise((r) => { rx.close(r); rx.closeAllConnections(); });
  }
});

test('heartbeat cost per interval = rooms × nodes, independent of sockets', { timeout: 60000 }, async (t) => {
  const HB = 500;
  const { redis, gws: [g1, g2] } = await setup(2, {
    GATEWAY_PRESENCE_HEARTBEAT_INTERVAL_MS: String(HB), GATEWAY_PRESENCE_TTL_MS: '3000',
  });
  const ROOMS = 3;
  const NODES = 2;
  const rooms = Array.from({ length: ROOMS }, () => uid('hb'));
  for (const r of rooms) createRoom(redis, PREFIX, r);
  const WINDOW = 3000;
  const intervals = WINDOW / HB;

  const measure = async (perRoom) => {
    // settle: every room's anon total reached, then a pause for pending batches
    await waitFor(() => rooms.every((r) => anonTotal(redis, PREFIX, r) === perRoom), 5000, `anon = ${perRoom} in every room`);
    await sleep(HB + 200);
    redis.cli('CONFIG', 'RESETSTAT');
    await sleep(WINDOW);
    const s = commandCalls(redis);
    return { calls: scriptCalls(s), stats: s };
  };

  // 3 sockets per room: 2 on gateway 1, 1 on gateway 2
  for (const r of rooms) {
    await lightCrowd(g1, `rooms:${r}`, 2);
    await lightCrowd(g2, `rooms:${r}`, 1);
  }
  const small = await measure(3);
  // 30 sockets per room: 15 + 15
  for (const r of rooms) {
    await lightCrowd(g1, `rooms:${r}`, 13);
    await lightCrowd(g2, `rooms:${r}`, 14);
  }
  const big = await measure(30);

  const expected = ROOMS * NODES * intervals;
  const perInterval = (n) => (n / intervals).toFixed(2);
  t.diagnostic(`heartbeat ${HB} ms, ${ROOMS} rooms × ${NODES} nodes, window ${WINDOW} ms (${intervals} intervals): `
    + `3 sockets/room → ${small.calls} evalsha (${perInterval(small.calls)}/interval); `
    + `30 sockets/room → ${big.calls} evalsha (${perInterval(big.calls)}/interval); expected ≈ ${expected} (${ROOMS * NODES}/interval)`);
  t.diagnostic(`commandstats (3/room) ${JSON.stringify(small.stats)}`);
  t.diagnostic(`commandstats (30/room) ${JSON.stringify(big.stats)}`);
  const lo = ROOMS * NODES * (intervals - 1);
  const hi = ROOMS * NODES * (intervals + 1);
  for (const [name, m] of [['3 sockets/room', small], ['30 sockets/room', big]]) {
    assert.ok(m.calls >= lo && m.calls <= hi, `${name}: ${m.calls} script calls in ${WINDOW} ms, want ${lo}..${hi}`);
  }
  assert.ok(Math.abs(big.calls - small.calls) <= ROOMS * NODES,
    `cost grew with sockets: ${small.calls} → ${big.calls}`);
});
