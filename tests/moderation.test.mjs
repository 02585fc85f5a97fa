// Kicks, bans and disconnects (DESIGN §11), ordered through the admin API and the CLI and carried
// out on every node: phx_close with the channel's join_ref, presence leaving everywhere, 4003
// closes, bans that refuse and then expire.
import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  test, startRedis, startGateway, teardown, hs256, claims, rawConnect, wsUrl, sleep, waitFor,
  tryUpgrade, connect, join, runCli,
} from './lib/harness.mjs';

const PREFIX = 'md';
const ADMIN_TOKEN = 'admin-token-moderation-tests';
// the contract's bound: 1 s plus presence.diff_interval_ms (50 ms), with room for a busy machine
const WITHIN_MS = 1050;
let redis; let g1; let g2;

before(async () => {
  redis = await startRedis();
  const env = { GATEWAY_ADMIN_TOKEN: ADMIN_TOKEN };
  g1 = await startGateway({ redisPort: redis.port, prefix: PREFIX, env, name: 'md1' });
  g2 = await startGateway({ redisPort: redis.port, prefix: PREFIX, env, name: 'md2' });
});
after(() => teardown({ gateways: [g1, g2], redis }));

const cli = (args) => runCli(redis, PREFIX, args);

const api = (method, path, body, g = g1) => fetch(`${g.adminUrl}${path}`, {
  method,
  headers: { authorization: `Bearer ${ADMIN_TOKEN}`, 'content-type': 'application/json' },
  body: body === undefined ? undefined : JSON.stringify(body),
});

function room(id) {
  const r = cli(['rooms', 'create', id]);
  assert.equal(r.code, 0, r.out);
  return `rooms:${id}`;
}

const tok = (sub) => hs256(claims(sub, `user-${sub}`));
const isClose = (topic, joinRef) => (f) => f[3] === 'phx_close' && f[2] === topic && f[0] === joinRef;
const leavesUser = (topic, sub) => (f) => f[3] === 'presence_diff' && f[2] === topic && f[4].leaves[sub];

test('kick: every channel of the user in the room, on both nodes, gets phx_close with its join_ref and leaves presence', async () => {
  const topic = room('stage');
  const other = room('lounge');
  // alice: one socket on each node, with different join_refs; the g1 socket is also in the lounge
  const a1 = await rawConnect(wsUrl(g1, { token: tok('alice') }));
  assert.equal((await a1.join(topic, 'j1'))[4].status, 'ok');
  assert.equal((await a1.join(other, 'j2'))[4].status, 'ok');
  const a2 = await rawConnect(wsUrl(g2, { token: tok('alice') }));
  assert.equal((await a2.join(topic, 'k7'))[4].status, 'ok');
  // an anonymous socket signed in as alice on one channel only (guardian_token)
  const a3 = await rawConnect(wsUrl(g2));
  assert.equal((await a3.join(topic, 'g3', { guardian_token: tok('alice') }))[4].status, 'ok');
  // watchers on both nodes
  const w1 = await rawConnect(wsUrl(g1, { token: tok('bob') }));
  assert.equal((await w1.join(topic, '1'))[4].status, 'ok');
  const w2 = await rawConnect(wsUrl(g2, { token: tok('carol') }));
  assert.equal((await w2.join(topic, '1'))[4].status, 'ok');
  await sleep(200);

  const t0 = Date.now();
  const r = await api('POST', '/api/rooms/stage/kick', { user: 'alice' });
  assert.equal(r.status, 200);
  assert.deepEqual(await r.json(), { kicked: 3 });
  await a1.next(isClose(topic, 'j1'), WITHIN_MS, 'phx_close j1');
  await a2.next(isClose(topic, 'k7'), WITHIN_MS, 'phx_close k7');
  await a3.next(isClose(topic, 'g3'), WITHIN_MS, 'phx_close g3');
  // all three of her connections leave (in one diff or several: the nodes' leaves are separate
  // changes), seen by the watchers on both nodes
  const aliceLeft = (w) => w.frames
    .filter(leavesUser(topic, 'alice'))
    .reduce((n, f) => n + f[4].leaves.alice.metas.length, 0);
  await waitFor(() => aliceLeft(w1) === 3 && aliceLeft(w2) === 3, WITHIN_MS, 'alice leaving on both nodes');
  assert.ok(Date.now() - t0 < 2000);
  // Redis presence holds nobody called alice
  const metas = redis.cli('HVALS', `${PREFIX}:room:{stage}:presence`);
  assert.doesNotMatch(metas, /"alice"/);
  // her sockets and her other channel stay: a push in the lounge still goes through
  assert.equal(a1.closeInfo, null);
  assert.equal(a2.closeInfo, null);
  a1.send(['j2', 'p1', other, 'new_msg', { body: 'still here' }]);
  assert.equal((await a1.reply('p1'))[4].status, 'ok');
  // a push on the kicked channel is not published
  a1.send(['j1', 'p2', topic, 'new_msg', { body: 'sneaky' }]);
  assert.equal((await a1.reply('p2'))[4].status, 'error');
  await sleep(200);
  assert.ok(!w1.frames.some((f) => f[3] === 'new_msg' && f[4].body === 'sneaky'));
  // no ban: she may come back at once
  assert.equal((await a1.join(topic, 'j9'))[4].status, 'ok');
  // the watchers were not touched
  assert.ok(!w1.frames.some((f) => f[3] === 'phx_close'));
  assert.ok(!w2.frames.some((f) => f[3] === 'phx_close'));
});

test('kick: 404 only for a room that does not exist; 0 when the user is not there; bad bodies 400', async () => {
  room('empty-kick');
  const r = await api('POST', '/api/rooms/empty-kick/kick', { user: 'nobody' });
  assert.equal(r.status, 200);
  assert.deepEqual(await r.json(), { kicked: 0 });
  assert.equal((await api('POST', '/api/rooms/no-such-room/kick', { user: 'x' })).status, 404);
  assert.equal((await api('POST', '/api/rooms/empty-kick/kick', {})).status, 400);
  assert.equal((await api('POST', '/api/rooms/empty-kick/kick', { user: 'x', ban_s: -1 })).status, 400);
  assert.equal((await api('POST', '/api/rooms/empty-kick/kick', { user: 'x', ban_s: 'soon' })).status, 400);
});

test('kick with ban_s: joins of that room by that user refused "Not allowed" until the ban expires', async () => {
  const topic = room('banned-room');
  const otherRoom = room('free-room');
  const d1 = await rawConnect(wsUrl(g1, { token: tok('dave') }));
  assert.equal((await d1.join(topic, '1'))[4].status, 'ok');
  const r = await api('POST', '/api/rooms/banned-room/kick', { user: 'dave', ban_s: 2 }, g2);
  assert.deepEqual(await r.json(), { kicked: 1 });
  await d1.next(isClose(topic, '1'), WITHIN_MS);
  const key = `${PREFIX}:room:{banned-room}:ban:dave`;
  const ttl = Number(redis.cli('TTL', key));
  assert.ok(ttl > 0 && ttl <= 2, `ban key TTL ${ttl}`);
  // refused on both nodes (warm on g1, cold on g2), by connection token and by guardian_token
  assert.equal((await d1.join(topic, '2'))[4].response.reason, 'Not allowed');
  const d2 = await rawConnect(wsUrl(g2, { token: tok('dave') }));
  assert.equal((await d2.join(topic, '1'))[4].response.reason, 'Not allowed');
  const anon = await rawConnect(wsUrl(g2));
  assert.equal((await anon.join(topic, '1', { guardian_token: tok('dave') }))[4].response.reason, 'Not allowed');
  // only that room, only that user
  assert.equal((await d2.join(otherRoom, '5'))[4].status, 'ok');
  const e = await rawConnect(wsUrl(g2, { token: tok('erin') }));
  assert.equal((await e.join(topic, '1'))[4].status, 'ok');
  // the refusal wrote nothing: no dave in the room's presence
  assert.doesNotMatch(redis.cli('HVALS', `${PREFIX}:room:{banned-room}:presence`), /"dave"/);
  // then it expires
  await waitFor(() => redis.cli('EXISTS', key) === '0', 4000, 'the ban to expire');
  assert.equal((await d1.join(topic, '3'))[4].status, 'ok');
});

test('a ban refusal counts toward server.max_refused_joins_per_min', async () => {
  const g = await startGateway({ redisPort: redis.port, prefix: PREFIX, name: 'md-limit', env: { GATEWAY_SERVER_MAX_REFUSED_JOINS_PER_MIN: '2', GATEWAY_ADMIN_TOKEN: ADMIN_TOKEN } });
  try {
    const topic = room('limit-ban');
    await api('POST', '/api/rooms/limit-ban/kick', { user: 'lou', ban_s: 30 });
    const c = await rawConnect(wsUrl(g, { token: tok('lou') }));
    for (let i = 1; i <= 3; i++) assert.equal((await c.join(topic, String(i)))[4].response.reason, 'Not allowed');
    assert.equal((await c.closed).code, 4009);
  } finally {
    await g.stop().catch(() => g.kill());
  }
});

test('disconnect: every socket of the user on both nodes closes with 4003 within 1 s; presence leaves; others stay', async () => {
  const topic = room('hall');
  const f1 = await rawConnect(wsUrl(g1, { token: tok('frank') }));
  assert.equal((await f1.join(topic, '1'))[4].status, 'ok');
  const f2 = await rawConnect(wsUrl(g2, { token: tok('frank') }));
  assert.equal((await f2.join(topic, '1'))[4].status, 'ok');
  const f3 = await rawConnect(wsUrl(g2, { token: tok('frank') })); // joined nothing
  const viaGuardian = await rawConnect(wsUrl(g1));
  assert.equal((await viaGuardian.join(topic, '1', { guardian_token: tok('frank') }))[4].status, 'ok');
  const w1 = await rawConnect(wsUrl(g1, { token: tok('gina') }));
  assert.equal((await w1.join(topic, '1'))[4].status, 'ok');
  const w2 = await rawConnect(wsUrl(g2));
  assert.equal((await w2.join(topic, '1'))[4].status, 'ok');
  await sleep(200);

  const t0 = Date.now();
  const r = await api('POST', '/api/users/frank/disconnect', {});
  assert.equal(r.status, 200);
  assert.deepEqual(await r.json(), { closed: 4 });
  for (const s of [f1, f2, f3, viaGuardian]) {
    const info = await s.closed;
    assert.equal(info.code, 4003);
    assert.ok(info.at - t0 < 1000, `closed after ${info.at - t0} ms`);
  }
  for (const w of [w1, w2]) await w.next(leavesUser(topic, 'frank'), WITHIN_MS, 'frank leaving');
  assert.equal(w1.closeInfo, null);
  assert.equal(w2.closeInfo, null);
  // no ban: frank signs in again at once
  const back = await rawConnect(wsUrl(g1, { token: tok('frank') }));
  assert.equal((await back.join(topic, '1'))[4].response.auth, 'user');
  // the close is counted under its own code
  const text = await (await fetch(`${g2.adminUrl}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith('gateway_closes_total{code="4003"}'));
  assert.ok(line && Number(line.split(' ').pop()) >= 2, `4003 closes on g2: ${line}`);
});

test('disconnect with ban_s: the user signs nothing in (auth_error "banned") until the ban expires', async () => {
  const topic = room('ban-hall');
  const h = await rawConnect(wsUrl(g2, { token: tok('hank') }));
  const r = await api('POST', '/api/users/hank/disconnect', { ban_s: 2 });
  assert.deepEqual(await r.json(), { closed: 1 });
  assert.equal((await h.closed).code, 4003);
  const key = `${PREFIX}:user:{hank}:ban`;
  const ttl = Number(redis.cli('TTL', key));
  assert.ok(ttl > 0 && ttl <= 2, `ban key TTL ${ttl}`);
  // a new socket with his token stays anonymous on both nodes
  for (const g of [g1, g2]) {
    const c = await rawConnect(wsUrl(g, { token: tok('hank') }));
    const rep = await c.join(topic, '1');
    assert.equal(rep[4].status, 'ok');
    assert.equal(rep[4].response.auth, 'anonymous');
    assert.equal(rep[4].response.auth_error, 'banned');
    // nor does his guardian_token sign a join in
    const a = await rawConnect(wsUrl(g));
    const gr = await a.join(topic, '1', { guardian_token: tok('hank') });
    assert.equal(gr[4].response.auth, 'anonymous');
    assert.equal(gr[4].response.auth_error, 'banned');
  }
  assert.doesNotMatch(redis.cli('HVALS', `${PREFIX}:room:{ban-hall}:presence`), /"hank"/);
  await waitFor(() => redis.cli('EXISTS', key) === '0', 4000, 'the ban to expire');
  const c = await rawConnect(wsUrl(g1, { token: tok('hank') }));
  assert.equal((await c.join(topic, '1'))[4].response.auth, 'user');
});

test('disconnect with ban_s and auth.reject_invalid_tokens = true: the upgrade gets HTTP 403 "banned"', async () => {
  const g = await startGateway({ redisPort: redis.port, prefix: PREFIX, name: 'md-strict', env: { GATEWAY_AUTH_REJECT_INVALID_TOKENS: 'true', GATEWAY_ADMIN_TOKEN: ADMIN_TOKEN } });
  try {
    const topic = room('strict-hall');
    const r = await api('POST', '/api/users/ivy/disconnect', { ban_s: 30 }, g);
    assert.deepEqual(await r.json(), { closed: 0 });
    const up = await tryUpgrade(wsUrl(g, { token: tok('ivy') }));
    assert.equal(up.status, 403);
    assert.match(up.body, /banned/);
    // a join signed with her guardian_token is refused too
    const c = await rawConnect(wsUrl(g));
    const rep = await c.join(topic, '1', { guardian_token: tok('ivy') });
    assert.equal(rep[4].status, 'error');
    assert.equal(rep[4].response.reason, 'banned');
    // others connect
    assert.equal((await tryUpgrade(wsUrl(g, { token: tok('jon') }))).status, 101);
  } finally {
    await g.stop().catch(() => g.kill());
  }
});

test('CLI: rooms kick and users disconnect, with counts and bans', async () => {
  const topic = room('cli-mod');
  const k1 = await rawConnect(wsUrl(g1, { token: tok('kim') }));
  assert.equal((await k1.join(topic, 'x1'))[4].status, 'ok');
  const out = cli(['rooms', 'kick', 'cli-mod', 'kim', '--ban-s', '5']);
  assert.equal(out.code, 0, out.out);
  assert.match(out.out, /1 channel closed/);
  await k1.next(isClose(topic, 'x1'), WITHIN_MS);
  assert.ok(Number(redis.cli('TTL', `${PREFIX}:room:{cli-mod}:ban:kim`)) > 0);
  assert.notEqual(cli(['rooms', 'kick', 'no-such', 'kim']).code, 0);

  const d = cli(['users', 'disconnect', 'kim', '--ban-s', '5']);
  assert.equal(d.code, 0, d.out);
  assert.match(d.out, /closed 1 socket/);
  assert.equal((await k1.closed).code, 4003);
  assert.ok(Number(redis.cli('TTL', `${PREFIX}:user:{kim}:ban`)) > 0);
});

test('phoenix.js: a kicked channel is closed and not rejoined; a disconnected socket gets 4003', async () => {
  const topic = room('pj-mod');
  const s = await connect(g1.publicUrl, { token: tok('lena') });
  const ch = s.channel(topic);
  assert.equal((await join(ch)).status, 'ok');
  let closed = false;
  ch.onClose(() => { closed = true; });
  await api('POST', '/api/rooms/pj-mod/kick', { user: 'lena' });
  await waitFor(() => closed, WITHIN_MS, 'the channel to close');
  await sleep(300);
  assert.equal(ch.state, 'closed', 'phoenix.js does not rejoin a closed channel');
  const codes = [];
  s.onClose((e) => codes.push(e.code));
  await api('POST', '/api/users/lena/disconnect', {});
  await waitFor(() => codes.length > 0, 1000, 'the socket to close');
  assert.equal(codes[0], 4003);
  s.disconnect();
});
