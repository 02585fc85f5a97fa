// Presence at scale: 1,000 anonymous viewers cost O(1) in Redis, and bursts of joins are
// coalesced into at most one presence_diff per diff interval per room.
import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  test, startRedis, startGateway, createRoom, teardown, uid, waitFor, sleep, hs256, claims,
} from './lib/harness.mjs';
import {
  observer, waitCount, roomKeys, lightCrowd, lightOpen, pool, closeAllLight, memoryUsage, anonTotal,
} from './lib/presence.mjs';

const PREFIX = 'pz';
const DIFF_INTERVAL = 50; // the default
const ANON_DIFF_INTERVAL = 1000; // the default presence.anonymous_diff_interval_ms
let redis; let gw1; let gw2;

before(async () => {
  redis = await startRedis();
  [gw1, gw2] = await Promise.all([
    startGateway({ redisPort: redis.port, prefix: PREFIX, name: 'scale-gw1' }),
    startGateway({ redisPort: redis.port, prefix: PREFIX, name: 'scale-gw2' }),
  ]);
});
after(async () => {
  closeAllLight();
  await teardown({ gateways: [gw1, gw2], redis });
});

function roomMemory(room) {
  const k = roomKeys(PREFIX, room);
  return memoryUsage(redis, [k.record, k.presence, k.anon, k.nodes, k.seq]);
}

test('1,000 anonymous viewers on two gateways: exact count, no per-viewer Redis state', { timeout: 90000 }, async (t) => {
  const room = uid('thousand');
  const topic = `rooms:${room}`;
  const k = roomKeys(PREFIX, room);
  createRoom(redis, PREFIX, room);

  // the observer is one of the anonymous viewers (a signed-in one would add a presence field)
  const obs = await observer(gw1.publicUrl, topic);
  const first1 = await lightCrowd(gw1, topic, 4);
  const first2 = await lightCrowd(gw2, topic, 5);
  await waitCount(obs, { anonymous: 10, users: 0 }, 5000, 'count at 10');
  await waitFor(() => anonTotal(redis, PREFIX, room) === 10 && redis.cli('HLEN', k.anon) === '2', 5000, 'anon hash = 10 over 2 nodes');
  await waitFor(() => (obs.metas('') || []).length === 10, 5000, '"" key with 10 metas');
  await sleep(200);
  const m10 = roomMemory(room);
  const anon10 = redis.lines('HGETALL', k.anon);

  const t0 = Date.now();
  const more = await Promise.all([lightCrowd(gw1, topic, 495), lightCrowd(gw2, topic, 495)]);
  const joinMs = Date.now() - t0;
  assert.equal(first1.length + first2.length + more[0].length + more[1].length + 1, 1000);

  await waitCount(obs, { anonymous: 1000, users: 0, connections: 1000 }, 10000, 'count at 1000');
  await waitFor(() => (obs.metas('') || []).length === 1000, 10000, `"" key with 1000 metas (now ${(obs.metas('') || []).length})`);
  const refs = new Set(obs.metas('').map((m) => m.phx_ref));
  assert.equal(refs.size, 1000, 'the 1000 synthetic refs are distinct');
  await waitFor(() => anonTotal(redis, PREFIX, room) === 1000, 5000, 'anon hash sums to 1000');
  assert.equal(redis.cli('HLEN', k.presence), '0', 'no presence field for anonymous viewers');
  assert.ok(Number(redis.cli('HLEN', k.anon)) <= 2, `HLEN :anon = ${redis.cli('HLEN', k.anon)}`);
  const anon1000 = redis.lines('HGETALL', k.anon);
  assert.deepEqual(anon1000.filter((_, i) => i % 2 === 1).sort(), ['500', '500']);
  // a late joiner's state carries the full (capped) stack
  const late = await lightOpen(gw2, { trackAnon: true });
  await late.join(topic);
  await waitFor(() => late.stateSeen, 3000, 'late joiner state');
  assert.equal(late.anonMetas, 1000, 'late joiner: "" metas (cap 1000; the joiner itself is counted by the next diff)');
  // above the cap the count event is exact and the `""` list stays at the cap
  await waitCount(obs, { anonymous: 1001 }, 5000, 'count at 1001');
  await sleep(150);
  assert.equal(obs.metas('').length, 1000, '"" key stays at the cap of 1000');
  late.terminate();
  await waitCount(obs, { anonymous: 1000 }, 5000, 'count back at 1000');
  await waitFor(() => anonTotal(redis, PREFIX, room) === 1000, 5000, 'anon hash back to 1000');
  await sleep(200);
  const m1000 = roomMemory(room);

  const msg = `MEMORY USAGE of the room's keys: ${m10.total} B at 10 viewers ${JSON.stringify(m10.perKey)}; `
    + `${m1000.total} B at 1000 viewers ${JSON.stringify(m1000.perKey)}; difference ${m1000.total - m10.total} B; `
    + `anon hash ${JSON.stringify(anon10)} → ${JSON.stringify(anon1000)}; 990 joins took ${joinMs} ms`;
  t.diagnostic(msg);
  assert.ok(Math.abs(m1000.total - m10.total) <= 16, msg);
  for (const c of [...first1, ...first2, ...more.flat()]) c.terminate();
});

test('coalescing: 500 anonymous joins in one second → ≤ 1000/anonymous_diff_interval + 2 diffs per observer', { timeout: 90000 }, async (t) => {
  const room = uid('burst');
  const topic = `rooms:${room}`;
  createRoom(redis, PREFIX, room);
  const OBSERVERS = 200;
  const JOINS = 500;

  const observers = await lightCrowd(gw1, topic, OBSERVERS, { trackAnon: true });
  await waitFor(() => observers.every((o) => o.lastCount && o.lastCount.anonymous === OBSERVERS), 10000,
    `every observer's presence_count = ${OBSERVERS}`);
  await waitFor(() => observers.every((o) => o.anonMetas === OBSERVERS), 5000, `every observer's "" metas = ${OBSERVERS}`);
  // the joiners' sockets are opened beforehand; only their joins fall into the window
  const joiners = await pool(JOINS, 50, (i) => lightOpen(i % 2 ? gw2 : gw1));
  await sleep(300);
  for (const o of observers) o.diffTimes.length = 0;

  const t0 = Date.now();
  const BATCH = 25;
  for (let i = 0; i < JOINS; i += BATCH) {
    for (const j of joiners.slice(i, i + BATCH)) j.sendJoin(topic);
    if (i + BATCH < JOINS) await sleep(38);
  }
  const sentMs = Date.now() - t0;
  await Promise.all(joiners.map((j) => j.reply('1', 15000)));
  const repliedMs = Date.now() - t0;
  await sleep(Math.max(0, t0 + 1000 - Date.now()));

  const perObserver = observers.map((o) => o.diffTimes.filter((x) => x >= t0 && x <= t0 + 1000).length);
  const max = Math.max(...perObserver);
  const min = Math.min(...perObserver);
  // only the anonymous list moves: at most one diff per anonymous diff interval (the window's
  // first one goes at once, the last may fall on its edge)
  const bound = 1000 / ANON_DIFF_INTERVAL + 2;

  const want = OBSERVERS + JOINS;
  await waitFor(() => observers.every((o) => o.anonMetas === want), 10000,
    `every observer's "" metas = ${want} (got ${JSON.stringify([...new Set(observers.map((o) => o.anonMetas))])})`);
  await waitFor(() => observers.every((o) => o.lastCount && o.lastCount.anonymous === want), 5000,
    `every observer's presence_count = ${want} (got ${JSON.stringify([...new Set(observers.map((o) => o.lastCount && o.lastCount.anonymous))])})`);
  const total = observers.reduce((a, o) => a + o.diffTimes.length, 0);
  const msg = `${JOINS} joins sent over ${sentMs} ms (all replied after ${repliedMs} ms); presence_diff frames per observer in [t0, t0+1s]: `
    + `max ${max}, min ${min} (bound ${bound}); total diffs to ${OBSERVERS} observers until settled ${total}; final anonymous ${want}`;
  t.diagnostic(msg);
  assert.ok(max <= bound, msg);
  assert.ok(min >= 1, 'every observer saw the burst');
  assert.equal(anonTotal(redis, PREFIX, room), want);
});

// A burst of anonymous joins spread over ~600 ms, seen by one anonymous observer: the `""` list moves
// at the anonymous cadence, while a signed-in join in the same window goes out at the diff cadence
// (carrying the anonymous change with it). With the setting at 0, the same burst moves the list
// at the diff cadence: the bound above is the setting's doing.
async function anonymousBurst(gw, room) {
  const topic = `rooms:${room}`;
  createRoom(redis, PREFIX, room);
  const obs = await lightOpen(gw, { trackAnon: true });
  await obs.join(topic);
  const joiners = await pool(40, 20, () => lightOpen(gw));
  const member = await lightOpen(gw, { token: hs256(claims('burst-user')) });
  // past the observer's own join's diff: the burst's first diff goes at once
  await sleep(ANON_DIFF_INTERVAL + 200);
  obs.diffLog.length = 0;
  const t0 = Date.now();
  for (let i = 0; i < 40; i += 4) {
    for (const j of joiners.slice(i, i + 4)) j.sendJoin(topic);
    await sleep(60);
  }
  await Promise.all(joiners.map((j) => j.reply('1', 10000)));
  const anonDiffs = obs.diffLog.filter((d) => d.at - t0 <= 700 && d.anon !== 0).length;
  // a signed-in join now, inside the anonymous interval: not held back
  const joinedAt = Date.now();
  await member.join(topic);
  await waitFor(() => obs.diffLog.some((d) => d.keys.includes('burst-user')), 5000, 'the signed-in join\'s diff');
  const memberDiff = obs.diffLog.find((d) => d.keys.includes('burst-user'));
  await waitFor(() => obs.anonMetas === 41, 5000, `the observer's "" metas = 41 (now ${obs.anonMetas})`);
  for (const c of [obs, member, ...joiners]) c.terminate();
  return { anonDiffs, memberLagMs: memberDiff.at - joinedAt, log: obs.diffLog.map((d) => ({ ...d, at: d.at - t0 })) };
}

test('anonymous-only diffs follow presence.anonymous_diff_interval_ms; a signed-in join is not held back', { timeout: 60000 }, async (t) => {
  const paced = await anonymousBurst(gw1, uid('paced'));
  t.diagnostic(`default (${ANON_DIFF_INTERVAL} ms): ${JSON.stringify(paced)}`);
  assert.equal(paced.anonDiffs, 1, `one diff moves "" in the burst's first 700 ms: ${JSON.stringify(paced.log)}`);
  assert.ok(paced.memberLagMs < ANON_DIFF_INTERVAL / 2, `the signed-in join's diff came ${paced.memberLagMs} ms after its reply`);

  const gw0 = await startGateway({
    redisPort: redis.port, prefix: PREFIX, name: 'scale-anon0',
    env: { GATEWAY_PRESENCE_ANONYMOUS_DIFF_INTERVAL_MS: '0' },
  });
  try {
    const eager = await anonymousBurst(gw0, uid('eager'));
    t.diagnostic(`0 ms: ${JSON.stringify(eager)}`);
    assert.ok(eager.anonDiffs >= 4, `with the setting at 0 the burst moves "" at the diff cadence: ${JSON.stringify(eager.log)}`);
  } finally {
    await teardown({ gateways: [gw0] });
  }
});
