// Presence under failure: a SIGKILLed gateway's viewers vanish within TTL + one heartbeat; an
// explicit phx_leave and a SIGTERM drain remove presence at once (not by TTL).
import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  test, startRedis, startGateway, createRoom, teardown, hs256, claims, uid, wsUrl, rawConnect,
  waitFor, sleep,
} from './lib/harness.mjs';
import {
  observer, waitRows, waitCount, norm, roomKeys, respClient, closeAllResp, nodeTraces,
} from './lib/presence.mjs';

const PREFIX = 'pf';
const TTL = 3000;
const HB = 1000;
const MARGIN = 1500;
const FAST = { GATEWAY_PRESENCE_TTL_MS: String(TTL), GATEWAY_PRESENCE_HEARTBEAT_INTERVAL_MS: String(HB) };

const started = [];
let redis;

before(async () => {
  redis = await startRedis();
});
after(async () => {
  closeAllResp();
  await teardown({ gateways: started, redis });
});

async function gateway(name, env = {}) {
  const g = await startGateway({ redisPort: redis.port, prefix: PREFIX, name, env });
  started.push(g);
  return g;
}

async function rawJoin(gw, topic, sub, username) {
  const token = sub === undefined ? undefined : hs256(claims(sub, username));
  const c = await rawConnect(wsUrl(gw, { token }));
  const rep = await c.join(topic, '1');
  assert.equal(rep[4].status, 'ok', `join: ${JSON.stringify(rep)}`);
  return c;
}

test('SIGKILL: the dead gateway\'s users and anonymous viewers leave within TTL + one heartbeat', async (t) => {
  // Y's heartbeat runs half an interval out of phase with X's, so X's lapsed lease is found by a
  // heartbeat that does not coincide with the expiry (not the lucky case)
  const gy = await gateway('kill-y', FAST);
  await sleep(HB / 2);
  const gx = await gateway('kill-x', FAST);
  const rc = await respClient(redis.port);
  const room = uid('kill');
  const topic = `rooms:${room}`;
  const keys = roomKeys(PREFIX, room);
  createRoom(redis, PREFIX, room);

  const obs = await observer(gy.publicUrl, topic, { sub: 'watcher', username: 'watcher' });
  await rawJoin(gy, topic); // one anonymous viewer that survives on Y
  await rawJoin(gx, topic, 'ux1', 'xavier');
  await rawJoin(gx, topic, 'ux2', 'xena');
  for (let i = 0; i < 3; i++) await rawJoin(gx, topic);

  await waitRows(obs, ['watcher: 1', 'xavier: 1', 'xena: 1', 'Anonymous: 4'], 5000, 'before the kill');
  await waitCount(obs, { anonymous: 4, users: 3 }, 5000, 'count before the kill');
  // X's state is in Redis
  await waitFor(async () => (await rc.cmd('HGET', keys.anon, gx.node)) === '3', 3000, 'anon field of X = 3');
  assert.match(await nodeTraces(rc, PREFIX, room, gx.node), /presence fields .*lease/);

  const leaseBefore = Number(await rc.cmd('ZSCORE', keys.nodes, gx.node));
  const t0 = Date.now();
  await gx.kill();
  const bound = TTL + HB + MARGIN;
  const wantRows = ['watcher: 1', 'Anonymous: 1'];
  await waitRows(obs, wantRows, bound + 500, 'after SIGKILL of X');
  await waitCount(obs, { anonymous: 1, users: 1, connections: 2 }, Math.max(100, bound + 500 - (Date.now() - t0)), 'count after SIGKILL');
  const rowsAt = obs.syncs.find((s) => s.at >= t0 && JSON.stringify(norm(s.rows)) === JSON.stringify([...wantRows].sort())).at - t0;
  const countAt = obs.counts.find((c) => c.at >= t0 && c.anonymous === 1 && c.users === 1).at - t0;
  const msg = `SIGKILL → observer render correct after ${rowsAt} ms, presence_count correct after ${countAt} ms `
    + `(X's lease expired ${leaseBefore - t0} ms after the kill; bound TTL ${TTL} + heartbeat ${HB} + margin ${MARGIN} = ${bound} ms)`;
  t.diagnostic(msg);
  assert.ok(rowsAt <= bound, `render took ${rowsAt} ms > ${bound} ms`);
  assert.ok(countAt <= bound, `presence_count took ${countAt} ms > ${bound} ms`);
  // never a negative count on the way
  assert.ok(obs.counts.every((c) => c.anonymous >= 0 && c.users >= 0));

  // Redis holds nothing of X
  assert.equal(await nodeTraces(rc, PREFIX, room, gx.node), '', 'Redis still holds presence of the killed node');
  assert.deepEqual(await rc.cmd('HGETALL', keys.anon), [gy.node, '1']);
  assert.equal((await rc.cmd('HKEYS', keys.presence)).length, 1);
});

test('phx_leave removes presence from Redis at once (signed-in and anonymous)', async (t) => {
  // default TTL (15 s): anything that disappears within 500 ms was removed explicitly
  const gz = await gateway('leave-z');
  const rc = await respClient(redis.port);
  const room = uid('leave');
  const topic = `rooms:${room}`;
  const keys = roomKeys(PREFIX, room);
  createRoom(redis, PREFIX, room);

  const keeper = await rawJoin(gz, topic, 'keeper', 'keeper'); // keeps the room warm on Z
  const user = await rawJoin(gz, topic, 'leaver', 'leaver');
  const anon = await rawJoin(gz, topic);
  await waitFor(async () => (await rc.cmd('HGET', keys.anon, gz.node)) === '1', 3000, 'anon field = 1');
  const flat = await rc.cmd('HGETALL', keys.presence);
  let conn;
  for (let i = 0; i < flat.length; i += 2) if (JSON.parse(flat[i + 1]).user_id === 'leaver') conn = flat[i];
  assert.ok(conn && conn.startsWith(`${gz.node}.`), `presence field of the leaver: ${JSON.stringify(flat)}`);

  let t0 = Date.now();
  user.send(['1', '2', topic, 'phx_leave', {}]);
  await waitFor(async () => (await rc.cmd('HEXISTS', keys.presence, conn)) === 0, 500, 'signed-in presence field removed', 5);
  const signedMs = Date.now() - t0;
  const rep = await user.reply('2');
  assert.equal(rep[4].status, 'ok');

  t0 = Date.now();
  anon.send(['1', '2', topic, 'phx_leave', {}]);
  await waitFor(async () => (await rc.cmd('HGET', keys.anon, gz.node)) === null, 500, 'anon field removed', 5);
  const anonMs = Date.now() - t0;
  t.diagnostic(`phx_leave → gone from Redis: signed-in ${signedMs} ms, anonymous ${anonMs} ms`);
  assert.equal(keeper.closeInfo, null);
  // still exactly the keeper
  const rest = await rc.cmd('HVALS', keys.presence);
  assert.deepEqual(rest.map((m) => JSON.parse(m).user_id), ['keeper']);
});

test('SIGTERM removes the node\'s presence from Redis at once and closes sockets with 1012', async (t) => {
  const gz = await gateway('term-z'); // default TTL 15 s
  const gy = started.find((g) => g.name === 'kill-y' && !g.exitInfo) ?? await gateway('term-y');
  const rc = await respClient(redis.port);
  const room = uid('term');
  const topic = `rooms:${room}`;
  const keys = roomKeys(PREFIX, room);
  createRoom(redis, PREFIX, room);

  const obs = await observer(gy.publicUrl, topic, { sub: 'watcher2', username: 'watcher2' });
  const socks = [await rawJoin(gz, topic, 'uz', 'zed'), await rawJoin(gz, topic), await rawJoin(gz, topic)];
  await waitRows(obs, ['watcher2: 1', 'zed: 1', 'Anonymous: 2'], 5000, 'before SIGTERM');
  await waitFor(async () => (await rc.cmd('HGET', keys.anon, gz.node)) === '2', 3000, 'anon field of Z = 2');

  const t0 = Date.now();
  gz.proc.kill('SIGTERM');
  let goneMs;
  await waitFor(async () => {
    const tr = await nodeTraces(rc, PREFIX, room, gz.node);
    if (tr === '') goneMs = Date.now() - t0;
    return tr === '';
  }, 500, 'Z\'s presence, anon field and lease gone from Redis after SIGTERM', 5);
  await waitRows(obs, ['watcher2: 1'], 1500, 'observer after SIGTERM of Z');
  const renderMs = Date.now() - t0;
  const closes = await Promise.all(socks.map((s) => s.closed));
  const exit = await gz.exited;
  t.diagnostic(`SIGTERM → gone from Redis after ${goneMs} ms, observer render after ≤ ${renderMs} ms; close codes ${JSON.stringify(closes.map((c) => c.code))}; exit ${JSON.stringify(exit)}`);
  assert.deepEqual(closes.map((c) => c.code), [1012, 1012, 1012]);
});
