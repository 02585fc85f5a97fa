// Room history and lossless reconnect (DESIGN §9): every broadcast is appended to the room's
// Redis stream and published in one script call, its payload carrying the stream "id"; a join
// gets the last rooms.history_on_join (20) events after its reply; a join with {"since": id} gets
// everything after it ("recovered": true) or, past the cap, "recovered": false and the last 20;
// per channel the ids are strictly increasing; a warm room answers from memory (no XRANGE /
// XREVRANGE in INFO commandstats). Real redis-server, real gateways, raw frames and phoenix.js.
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import {
  GATEWAY_BIN, test, startRedis, startGateway, createRoom, teardown, connect, join, record,
  hs256, claims, uid, sleep, waitFor, rawConnect, wsUrl,
} from './lib/harness.mjs';
import { commandCalls } from './lib/presence.mjs';

const PREFIX = 'hs';
const ADMIN_TOKEN = 'history-admin-token';
// the tests send hundreds of messages: lift the per-socket push rate limit (as scripts/bench.sh does)
const ENV = {
  GATEWAY_SERVER_PUSH_RATE_PER_S: '100000',
  GATEWAY_SERVER_PUSH_BURST: '100000',
  GATEWAY_ADMIN_TOKEN: ADMIN_TOKEN,
};
let redis; let A; let B;

before(async () => {
  redis = await startRedis();
  [A, B] = await Promise.all([
    startGateway({ redisPort: redis.port, prefix: PREFIX, name: 'A', env: ENV }),
    startGateway({ redisPort: redis.port, prefix: PREFIX, name: 'B', env: ENV }),
  ]);
});
after(() => teardown({ gateways: [A, B], redis }));

const ID = /^\d+-\d+$/;
/** Compares stream ids numerically: <0, 0, >0. */
function cmpId(a, b) {
  const [am, as] = a.split('-').map(BigInt);
  const [bm, bs] = b.split('-').map(BigInt);
  if (am !== bm) return am < bm ? -1 : 1;
  if (as !== bs) return as < bs ? -1 : 1;
  return 0;
}
function assertIncreasing(ids, what) {
  for (let i = 1; i < ids.length; i++) {
    assert.ok(cmpId(ids[i - 1], ids[i]) < 0, `${what}: ids not strictly increasing at ${i}: ${ids[i - 1]} then ${ids[i]}`);
  }
}

const writerToken = (sub) => hs256(claims(sub, `writer-${sub}`));
/** Live broadcasts (both refs null) of `topic` a raw client received. */
const live = (c, topic) => c.frames.filter((f) => Array.isArray(f) && f[0] === null && f[1] === null && f[2] === topic && f[3] === 'new_msg');
/** History frames of the channel joined with `jr` (join_ref set, ref null). */
const hist = (c, topic, jr) => c.frames.filter((f) => Array.isArray(f) && f[0] === jr && f[1] === null && f[2] === topic && f[3] === 'new_msg');
/** The raw text of each frame `pred` picks (to compare bytes). */
const rawOf = (c, pred) => c.raw.filter((t) => { try { return pred(JSON.parse(t)); } catch { return false; } });

/** A signed-in raw writer joined to `topic`. */
async function writer(gw, topic, sub = uid('w')) {
  const c = await rawConnect(wsUrl(gw, { token: writerToken(sub) }));
  assert.equal((await c.join(topic, '1'))[4].status, 'ok');
  return c;
}

/** Sends n new_msg pushes without waiting, then waits for every ok reply. */
async function send(c, topic, n, tag) {
  const refs = [];
  for (let i = 0; i < n; i++) {
    const ref = `${tag}-${i}`;
    refs.push(ref);
    c.send(['1', ref, topic, 'new_msg', { body: `${tag} ${i}` }]);
  }
  for (const ref of refs) {
    const r = await c.reply(ref, 15000);
    assert.equal(r[4].status, 'ok', `push ${ref}: ${JSON.stringify(r)}`);
  }
}

/** A raw client (anonymous unless `token`) joined to `topic` with `payload`; returns [conn, reply]. */
async function viewer(gw, topic, { token, payload = {}, jr = '1' } = {}) {
  const c = await rawConnect(wsUrl(gw, token ? { token } : {}));
  const reply = await c.join(topic, jr, payload);
  return [c, reply];
}

test('a late joiner gets exactly the last 20, oldest first, as the bytes live viewers got; warm and cold nodes alike', async (t) => {
  const room = uid('late');
  createRoom(redis, PREFIX, room);
  const topic = `rooms:${room}`;
  const w = await writer(A, topic);
  const [watcher] = await viewer(B, topic);
  await send(w, topic, 30, 'm');
  await waitFor(() => live(watcher, topic).length === 30, 5000, '30 live messages on B');
  const liveIds = live(watcher, topic).map((f) => f[4].id);
  for (const i of liveIds) assert.match(i, ID);
  assertIncreasing(liveIds, 'live');
  // the payload is {body, user, at, id}: the id is the Redis stream id
  const stream = redis.lines('XRANGE', `${PREFIX}:room:{${room}}:history`, '-', '+').filter((l) => ID.test(l));
  assert.deepEqual(stream.slice(-30), liveIds, 'the stream order is the delivery order');
  assert.deepEqual(Object.keys(live(watcher, topic)[0][4]), ['at', 'body', 'user', 'id']);

  // warm on A (the writer is there), warm on B (the watcher), and a room cold on a third node
  const C = await startGateway({ redisPort: redis.port, prefix: PREFIX, name: 'C', env: ENV });
  try {
    for (const [name, gw] of [['A', A], ['B', B], ['C (cold)', C]]) {
      const [late, reply] = await viewer(gw, topic, { jr: '7' });
      assert.deepEqual(reply[4], { status: 'ok', response: { auth: 'anonymous' } }, `${name}: no "recovered" without since`);
      await waitFor(() => hist(late, topic, '7').length === 20, 3000, `${name}: 20 history frames`);
      const h = hist(late, topic, '7');
      assert.deepEqual(h.map((f) => f[4].id), liveIds.slice(-20), `${name}: the last 20, oldest first`);
      assert.deepEqual(h.map((f) => f[4]), live(watcher, topic).slice(-20).map((f) => f[4]), `${name}: same payloads`);
      // the same bytes, but for the channel's join_ref in place of the broadcast's null
      const histRaw = rawOf(late, (f) => f[0] === '7' && f[3] === 'new_msg').map((s) => s.slice('["7",null,'.length));
      const liveRaw = rawOf(watcher, (f) => f[0] === null && f[3] === 'new_msg').slice(-20).map((s) => s.slice('[null,null,'.length));
      assert.deepEqual(histRaw, liveRaw, `${name}: history frames are the live frames' bytes`);
      // the reply, presence_state and presence_count come first, then the history
      const order = late.frames.filter((f) => f[2] === topic).map((f) => f[3]);
      assert.deepEqual(order.slice(0, 3), ['phx_reply', 'presence_state', 'presence_count'], name);
      assert.equal(late.frames.filter((f) => f[3] === 'new_msg').length, 20, `${name}: nothing else`);
      late.close();
    }
    t.diagnostic(`30 sent, 20 in each late joiner's history, on warm A and B and cold C`);
  } finally {
    await C.stop();
  }
  // then live: a new message follows the history, with a greater id
  const [late] = await viewer(B, topic, { jr: '9' });
  await waitFor(() => hist(late, topic, '9').length === 20, 3000, 'history');
  await send(w, topic, 1, 'after');
  const f = await late.next((x) => x[0] === null && x[3] === 'new_msg', 3000, 'the live message');
  assert.equal(f[4].body, 'after 0');
  assert.ok(cmpId(f[4].id, liveIds.at(-1)) > 0);
});

test('phoenix.js: a client that disconnects, misses 20 messages and reconnects gets exactly those 20, in order, recovered: true', async () => {
  const room = uid('rec');
  createRoom(redis, PREFIX, room);
  const topic = `rooms:${room}`;
  const w = await writer(A, topic);
  for (const anonymous of [false, true]) {
    const socket = await connect(B.publicUrl, anonymous ? {} : { token: hs256(claims(uid('u'), 'reader')) });
    let lastId = null;
    const channel = socket.channel(topic, () => (lastId ? { since: lastId } : {}));
    const got = [];
    channel.on('new_msg', (m) => { got.push(m); lastId = m.id; });
    const replies = [];
    channel.join().receive('ok', (r) => replies.push(r));
    await waitFor(() => replies.length === 1, 3000, 'first join');
    const before = got.length; // the room's history so far (the first round's messages)
    await send(w, topic, 5, `seen${anonymous}`);
    await waitFor(() => got.length === before + 5, 3000, '5 live messages');

    // the connection goes away; 20 messages are said meanwhile
    socket.disconnect();
    await sleep(100);
    await send(w, topic, 20, `missed${anonymous}`);
    socket.connect();
    await waitFor(() => replies.length === 2, 5000, 'the rejoin');
    assert.equal(replies[1].recovered, true, JSON.stringify(replies[1]));
    await waitFor(() => got.length === before + 25, 5000, 'the 20 missed');
    await sleep(200);
    const missed = got.slice(before + 5);
    assert.deepEqual(missed.map((m) => m.body), Array.from({ length: 20 }, (_, i) => `missed${anonymous} ${i}`));
    const ids = got.map((m) => m.id);
    assertIncreasing(ids, 'everything the channel got');
    assert.equal(new Set(ids).size, ids.length, 'no duplicate');
    // and live again
    await send(w, topic, 1, `again${anonymous}`);
    await waitFor(() => got.length === before + 26, 3000, 'live after the recovery');
    if (anonymous) {
      // an anonymous viewer recovers too, and its writes stay refused
      const r = await new Promise((resolve) => channel.push('new_msg', { body: 'x' }).receive('error', resolve).receive('ok', resolve));
      assert.deepEqual(r, { reason: 'Not signed in' });
    }
    socket.disconnect();
  }
});

test('an id older than the cap gives recovered: false and the last 20; a future id too; a bad since is refused and changes nothing', async (t) => {
  const room = uid('gap');
  createRoom(redis, PREFIX, room);
  const topic = `rooms:${room}`;
  const w = await writer(A, topic);
  await send(w, topic, 1, 'first');
  const first = (await w.next((f) => f[0] === null && f[3] === 'new_msg', 3000))[4].id;
  await send(w, topic, 120, 'm');
  await waitFor(() => live(w, topic).length === 121, 5000, 'own copies');
  const ids = live(w, topic).map((f) => f[4].id);
  const key = `${PREFIX}:room:{${room}}:history`;
  t.diagnostic(`stream after 121 messages with history_len 100: XLEN ${redis.cli('XLEN', key)}, MEMORY USAGE ${redis.cli('MEMORY', 'USAGE', key, 'SAMPLES', '0')} bytes`);

  // A: the room is warm (answered from memory); B: cold (one read)
  for (const [name, gw] of [['A (warm)', A], ['B (cold)', B]]) {
    const [c, reply] = await viewer(gw, topic, { payload: { since: first }, jr: '3' });
    assert.deepEqual(reply[4], { status: 'ok', response: { auth: 'anonymous', recovered: false } }, name);
    await waitFor(() => hist(c, topic, '3').length === 20, 3000, `${name}: the last 20`);
    assert.deepEqual(hist(c, topic, '3').map((f) => f[4].id), ids.slice(-20), name);
    // within the tail: recovered
    const [c2, reply2] = await viewer(gw, topic, { payload: { since: ids.at(-31) }, jr: '4' });
    assert.equal(reply2[4].response.recovered, true, name);
    await waitFor(() => hist(c2, topic, '4').length === 30, 3000, `${name}: 30 missed`);
    assert.deepEqual(hist(c2, topic, '4').map((f) => f[4].id), ids.slice(-30), name);
    // an id from far in the future: a gap
    const [c3, reply3] = await viewer(gw, topic, { payload: { since: `${Date.now() + 86400000}-0` }, jr: '5' });
    assert.equal(reply3[4].response.recovered, false, name);
    await waitFor(() => hist(c3, topic, '5').length === 20, 3000, `${name}: the last 20 after a future id`);
    // the newest id: nothing missed
    const [c4, reply4] = await viewer(gw, topic, { payload: { since: ids.at(-1) }, jr: '6' });
    assert.equal(reply4[4].response.recovered, true, name);
    await sleep(200);
    assert.equal(hist(c4, topic, '6').length, 0, name);
    for (const x of [c, c2, c3, c4]) x.close();
  }

  // a malformed since: a clear error, and the channel already joined stays as it was
  const [c, reply] = await viewer(B, topic, { jr: '1' });
  assert.equal(reply[4].status, 'ok');
  for (const [i, bad] of [[2, 'nope'], [3, 12], [4, '1-2-3'], [5, ['1-0']], [6, '']].entries()) {
    c.send([String(bad[0]), String(bad[0]), topic, 'phx_join', { since: bad[1] }]);
    assert.deepEqual((await c.reply(String(bad[0])))[4], { status: 'error', response: { reason: 'invalid since' } }, `since ${JSON.stringify(bad[1])} (${i})`);
  }
  await send(w, topic, 1, 'still');
  const f = await c.next((x) => x[0] === null && x[3] === 'new_msg' && x[4].body === 'still 0', 3000, 'the first channel still gets broadcasts');
  assert.match(f[4].id, ID);
  assert.equal(c.frames.filter((x) => x[3] === 'phx_close').length, 0, 'the joined channel was not replaced');
});

test('four writers on two gateways, 100 messages each at once: every viewer on both gateways sees the same 400 ids in the same strictly increasing order', async (t) => {
  const room = uid('conc');
  createRoom(redis, PREFIX, room);
  const topic = `rooms:${room}`;
  const viewers = [];
  for (const gw of [A, A, B, B]) viewers.push((await viewer(gw, topic))[0]);
  const writers = [];
  for (const gw of [A, A, B, B]) writers.push(await writer(gw, topic));
  const t0 = Date.now();
  await Promise.all(writers.map((w, i) => send(w, topic, 100, `w${i}`)));
  t.diagnostic(`400 pushes from 4 writers acknowledged in ${Date.now() - t0} ms`);
  const everyone = [...viewers, ...writers];
  for (const c of everyone) await waitFor(() => live(c, topic).length === 400, 10000, '400 messages');
  await sleep(200);
  const seqs = everyone.map((c) => live(c, topic).map((f) => f[4].id));
  assertIncreasing(seqs[0], 'the first viewer');
  for (const [i, s] of seqs.entries()) assert.deepEqual(s, seqs[0], `client ${i} saw another order`);
  const bodies = new Set(live(viewers[0], topic).map((f) => f[4].body));
  assert.equal(bodies.size, 400);
  // the stream holds them in that order too (its newest 100+)
  const stream = redis.lines('XRANGE', `${PREFIX}:room:{${room}}:history`, '-', '+').filter((l) => ID.test(l));
  assert.ok(stream.length >= 100, `stream keeps at least history_len: ${stream.length}`);
  assert.deepEqual(stream, seqs[0].slice(-stream.length));
  // a joiner now gets the last 20 of that order
  const [late] = await viewer(B, topic, { jr: '2' });
  await waitFor(() => hist(late, topic, '2').length === 20, 3000, 'late history');
  assert.deepEqual(hist(late, topic, '2').map((f) => f[4].id), seqs[0].slice(-20));
});

test('a warm room answers joins and recoveries from memory (no XRANGE/XREVRANGE); a cold room costs one read', async (t) => {
  const room = uid('cost');
  createRoom(redis, PREFIX, room);
  const topic = `rooms:${room}`;
  const w = await writer(A, topic);
  await send(w, topic, 40, 'm');
  await waitFor(() => live(w, topic).length === 40, 5000, 'own copies');
  const ids = live(w, topic).map((f) => f[4].id);

  redis.cli('CONFIG', 'RESETSTAT');
  const joins = [];
  for (let i = 0; i < 10; i++) joins.push(viewer(A, topic, { jr: 'j' }));
  for (let i = 0; i < 5; i++) joins.push(viewer(A, topic, { jr: 'r', payload: { since: ids[30 + i] } }));
  const done = await Promise.all(joins);
  for (const [i, [c, reply]] of done.entries()) {
    assert.equal(reply[4].status, 'ok');
    const jr = i < 10 ? 'j' : 'r';
    const want = i < 10 ? ids.slice(-20) : ids.slice(31 + (i - 10));
    await waitFor(() => hist(c, topic, jr).length === want.length, 3000, `history of join ${i}`);
    assert.deepEqual(hist(c, topic, jr).map((f) => f[4].id), want);
    if (i >= 10) assert.equal(reply[4].response.recovered, true);
  }
  await sleep(300);
  const warm = commandCalls(redis);
  t.diagnostic(`10 warm joins + 5 recoveries → commandstats ${JSON.stringify(warm)}`);
  for (const cmd of ['xrange', 'xrevrange', 'xinfo', 'xread']) {
    assert.equal(warm[cmd] || 0, 0, `${cmd} in a warm room: ${JSON.stringify(warm)}`);
  }

  // B has nobody in the room: its first join loads the tail (one script call: XINFO + XREVRANGE)
  redis.cli('CONFIG', 'RESETSTAT');
  const [c1] = await viewer(B, topic, { jr: 'c' });
  await waitFor(() => hist(c1, topic, 'c').length === 20, 3000, 'cold history');
  await sleep(200);
  const cold = commandCalls(redis);
  t.diagnostic(`a cold join → commandstats ${JSON.stringify(cold)}`);
  assert.equal(cold.xrevrange || 0, 1, JSON.stringify(cold));
  assert.equal(cold.xrange || 0, 0, JSON.stringify(cold));
  // and the second join on B is warm
  redis.cli('CONFIG', 'RESETSTAT');
  const [c2] = await viewer(B, topic, { jr: 'd', payload: { since: ids[25] } });
  await waitFor(() => hist(c2, topic, 'd').length === 14, 3000, 'warm recovery on B');
  await sleep(200);
  const again = commandCalls(redis);
  assert.equal((again.xrevrange || 0) + (again.xrange || 0), 0, JSON.stringify(again));
});

test('a node whose pub/sub connection was rebuilt reloads the tail: a late joiner still gets the right 20', async () => {
  const room = uid('pubsub');
  createRoom(redis, PREFIX, room);
  const topic = `rooms:${room}`;
  const w = await writer(A, topic);
  const [keeper] = await viewer(B, topic);
  await send(w, topic, 10, 'before');
  await waitFor(() => live(keeper, topic).length === 10, 3000, 'B has the first 10');
  // drop B's subscriber connection (only B's); publish while it is away
  const subName = `${PREFIX}-sub-${B.node}`;
  const sub = redis.clients().find((c) => c.name === subName);
  assert.ok(sub, 'B\'s subscriber connection');
  redis.cli('CLIENT', 'KILL', 'ID', sub.id);
  await send(w, topic, 15, 'during');
  await waitFor(() => redis.clients().some((c) => c.name === subName && c.id !== sub.id), 5000, 'B resubscribed');
  await sleep(300);
  await send(w, topic, 5, 'after');
  await waitFor(() => live(w, topic).length === 30, 3000, 'A has all 30');
  const ids = live(w, topic).map((f) => f[4].id);
  const stream = redis.lines('XRANGE', `${PREFIX}:room:{${room}}:history`, '-', '+').filter((l) => ID.test(l));
  assert.deepEqual(stream, ids);
  const [late] = await viewer(B, topic, { jr: '5' });
  await waitFor(() => hist(late, topic, '5').length === 20, 3000, 'late history on B');
  assert.deepEqual(hist(late, topic, '5').map((f) => f[4].id), ids.slice(-20));
  // and a recovery on B from an id B never saw live
  const [rec, reply] = await viewer(B, topic, { jr: '6', payload: { since: ids[12] } });
  assert.equal(reply[4].response.recovered, true);
  await waitFor(() => hist(rec, topic, '6').length === 17, 3000, 'recovery on B');
  assert.deepEqual(hist(rec, topic, '6').map((f) => f[4].id), ids.slice(13));
});

test('operations: admin API and CLI print recent events, the recoveries metric, an admin broadcast is kept, delete removes the history', async () => {
  const room = uid('ops');
  createRoom(redis, PREFIX, room);
  const topic = `rooms:${room}`;
  const metric = async (gw, outcome) => {
    const text = await (await fetch(`${gw.adminUrl}/metrics`)).text();
    const m = new RegExp(`^gateway_history_recoveries_total\\{outcome="${outcome}"\\} (\\d+)$`, 'm').exec(text);
    assert.ok(m, `gateway_history_recoveries_total{outcome="${outcome}"} is exported`);
    return Number(m[1]);
  };
  const before = { recovered: await metric(B, 'recovered'), gap: await metric(B, 'gap'), none: await metric(B, 'none') };
  const w = await writer(A, topic);
  await send(w, topic, 8, 'm');
  const api = (method, path, body) => fetch(`${A.adminUrl}${path}`, {
    method,
    headers: { authorization: `Bearer ${ADMIN_TOKEN}`, 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const b = await api('POST', `/api/rooms/${room}/broadcast`, { event: 'announcement', payload: { text: 'doors open', id: 'forged' } });
  assert.equal(b.status, 200);
  const bj = await b.json();
  assert.match(bj.id, ID);
  const ann = await w.next((f) => f[3] === 'announcement', 3000);
  assert.deepEqual(ann, [null, null, topic, 'announcement', { text: 'doors open', id: bj.id }]);
  await waitFor(() => live(w, topic).length === 8, 3000, 'own copies');
  const ids = live(w, topic).map((f) => f[4].id);

  const r = await api('GET', `/api/rooms/${room}/history?last=3`);
  assert.equal(r.status, 200);
  const h = await r.json();
  assert.deepEqual(h.events.map((e) => e.id), [ids[6], ids[7], bj.id]);
  assert.deepEqual(h.events[2], { id: bj.id, event: 'announcement', payload: { text: 'doors open', id: bj.id } });
  assert.deepEqual(h.events[0].payload, live(w, topic)[6][4]);
  assert.equal((await api('GET', `/api/rooms/${room}/history?last=0`)).status, 400);
  assert.equal((await api('GET', `/api/rooms/${room}/history?x=1`)).status, 400);
  assert.equal((await api('GET', '/api/rooms/nope/history')).status, 404);
  assert.equal((await fetch(`${A.adminUrl}/api/rooms/${room}/history`)).status, 401);

  const out = execFileSync(GATEWAY_BIN, ['rooms', 'history', room, '--last', '2'], {
    env: { ...process.env, GATEWAY_REDIS_URL: redis.url, GATEWAY_REDIS_PREFIX: PREFIX }, encoding: 'utf8',
  });
  const lines = out.trim().split('\n');
  assert.equal(lines.length, 2, out);
  assert.deepEqual(lines.map((l) => l.split('\t')[0]), [ids[7], bj.id]);
  assert.deepEqual(JSON.parse(lines[0].split('\t')[2]), live(w, topic)[7][4]);

  // recoveries on B are counted: one with events, one with a gap (an id the room cannot have
  // yet), one with nothing missed; since 1-0 in a never trimmed stream is everything: recovered
  const [c1] = await viewer(B, topic, { payload: { since: ids[5] } });
  const [c2] = await viewer(B, topic, { payload: { since: `${Date.now() + 86400000}-0` } });
  const [c3] = await viewer(B, topic, { payload: { since: bj.id } });
  const [c4, all] = await viewer(B, topic, { payload: { since: '1-0' }, jr: '4' });
  assert.equal(all[4].response.recovered, true);
  await waitFor(() => hist(c4, topic, '4').length + c4.frames.filter((f) => f[0] === '4' && f[3] === 'announcement').length === 9, 3000, 'all 9');
  await waitFor(async () => (await metric(B, 'recovered')) === before.recovered + 2, 3000, 'recoveries counted');
  assert.equal(await metric(B, 'gap'), before.gap + 1);
  assert.equal(await metric(B, 'none'), before.none + 1);
  for (const c of [c1, c2, c3, c4]) c.close();

  // delete removes the stream with the room
  const key = `${PREFIX}:room:{${room}}:history`;
  assert.equal(redis.cli('EXISTS', key), '1');
  assert.equal((await api('DELETE', `/api/rooms/${room}`)).status, 200);
  assert.equal(redis.cli('EXISTS', key), '0');
  // a push racing with the deletion writes nothing back
  w.send(['1', 'late', topic, 'new_msg', { body: 'too late' }]);
  await w.next((f) => f[3] === 'phx_close', 3000);
  await sleep(200);
  assert.equal(redis.cli('EXISTS', key), '0', 'no history written into a deleted room');
});

test('rooms.history_len = 0: a plain publish without id, no stream, no history; since answers recovered: false', async () => {
  const r2 = await startRedis();
  const off = await startGateway({ redisPort: r2.port, prefix: 'ho', name: 'off', env: { ...ENV, GATEWAY_ROOMS_HISTORY_LEN: '0' } });
  try {
    createRoom(r2, 'ho', 'quiet');
    const topic = 'rooms:quiet';
    const w = await writer(off, topic);
    await send(w, topic, 3, 'm');
    const f = await w.next((x) => x[0] === null && x[3] === 'new_msg', 3000);
    assert.deepEqual(Object.keys(f[4]).sort(), ['at', 'body', 'user']);
    assert.equal(r2.cli('EXISTS', 'ho:room:{quiet}:history'), '0');
    const [c, reply] = await viewer(off, topic, { payload: { since: '1-0' } });
    assert.equal(reply[4].response.recovered, false);
    const [c2] = await viewer(off, topic);
    await sleep(300);
    assert.equal(c.frames.filter((x) => x[3] === 'new_msg').length + c2.frames.filter((x) => x[3] === 'new_msg').length, 0);
  } finally {
    await off.stop();
    await r2.stop();
  }
});
