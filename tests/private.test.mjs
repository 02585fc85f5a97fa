// Private rooms (DESIGN §11): the record's `access`, the token claim `rooms`, the join refusals
// (which write nothing to Redis and count as refused joins), across two gateways.
// This file uses its own redis, so keyspace and command-count comparisons are exact.
import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  test, startRedis, startGateway, teardown, hs256, claims, rawConnect, wsUrl, sleep, waitFor,
  connect, join, runCli,
} from './lib/harness.mjs';

const PREFIX = 'pv';
const ADMIN_TOKEN = 'admin-token-private-tests';
let redis; let g1; let g2;

before(async () => {
  redis = await startRedis();
  const env = { GATEWAY_ADMIN_TOKEN: ADMIN_TOKEN };
  g1 = await startGateway({ redisPort: redis.port, prefix: PREFIX, env, name: 'pv1' });
  g2 = await startGateway({ redisPort: redis.port, prefix: PREFIX, env, name: 'pv2' });
});
after(() => teardown({ gateways: [g1, g2], redis }));

const cli = (args) => runCli(redis, PREFIX, args);

const api = (method, path, body) => fetch(`${g1.adminUrl}${path}`, {
  method,
  headers: { authorization: `Bearer ${ADMIN_TOKEN}`, 'content-type': 'application/json' },
  body: body === undefined ? undefined : JSON.stringify(body),
});

const token = (sub, rooms) => hs256(claims(sub, `user-${sub}`, rooms === undefined ? {} : { rooms }));
const reasonOf = (rep) => rep[4].response.reason;

/** `INFO commandstats` calls of one command (0 when never called). */
function calls(cmd) {
  const m = redis.cli('INFO', 'commandstats').match(new RegExp(`cmdstat_${cmd}:calls=(\\d+)`));
  return m ? Number(m[1]) : 0;
}

test('CLI and admin API: rooms are public by default, private on request, and show their access', async () => {
  assert.equal(cli(['rooms', 'create', 'cli-pub']).code, 0);
  const made = cli(['rooms', 'create', 'cli-priv', '--name', 'Back stage', '--private']);
  assert.equal(made.code, 0, made.out);
  assert.match(made.out, /private/);
  assert.equal(redis.cli('HGET', `${PREFIX}:room:{cli-priv}`, 'access'), 'private');
  assert.equal(redis.cli('HGET', `${PREFIX}:room:{cli-pub}`, 'access'), 'public');
  assert.match(cli(['rooms', 'show', 'cli-priv']).out, /access: private/);
  assert.match(cli(['rooms', 'show', 'cli-pub']).out, /access: public/);

  assert.equal((await api('POST', '/api/rooms', { id: 'api-priv', name: 'VIP', access: 'private' })).status, 201);
  assert.equal((await api('POST', '/api/rooms', { id: 'api-pub' })).status, 201);
  assert.equal((await api('POST', '/api/rooms', { id: 'api-bad', access: 'secret' })).status, 400);
  assert.equal((await (await api('GET', '/api/rooms/api-priv')).json()).room.access, 'private');
  assert.equal((await (await api('GET', '/api/rooms/api-pub')).json()).room.access, 'public');
  const list = await (await api('GET', '/api/rooms')).json();
  assert.equal(list.find((r) => r.id === 'cli-priv').access, 'private');
  assert.equal(list.find((r) => r.id === 'cli-pub').access, 'public');
  // a record without the field (made by hand) is public
  redis.cli('HSET', `${PREFIX}:room:{by-hand}`, 'name', 'x');
  assert.equal((await (await api('GET', '/api/rooms/by-hand')).json()).room.access, 'public');
  // `rooms list`: the access is the last column
  const rows = cli(['rooms', 'list']).out;
  assert.match(rows, /^ID\tNAME\tCREATED \(UTC\)\tACCESS\n/);
  assert.match(rows, /^cli-priv\tBack stage\t\S+Z\tprivate$/m);
  assert.match(rows, /^cli-pub\tcli-pub\t\S+Z\tpublic$/m);
  assert.match(rows, /^by-hand\tx\t\S+Z\tpublic$/m);
});

test('private room: anonymous → "Not signed in", no claim or another room → "Not allowed", listed or "*" → ok', async () => {
  assert.equal(cli(['rooms', 'create', 'vip', '--private']).code, 0);
  const anon = await rawConnect(wsUrl(g1));
  assert.equal(reasonOf(await anon.join('rooms:vip', '1')), 'Not signed in');
  const noClaim = await rawConnect(wsUrl(g1, { token: token('nc') }));
  assert.equal(reasonOf(await noClaim.join('rooms:vip', '1')), 'Not allowed');
  const other = await rawConnect(wsUrl(g1, { token: token('ot', ['elsewhere']) }));
  assert.equal(reasonOf(await other.join('rooms:vip', '1')), 'Not allowed');
  const listed = await rawConnect(wsUrl(g1, { token: token('li', ['x', 'vip']) }));
  assert.equal((await listed.join('rooms:vip', '1'))[4].status, 'ok');
  const star = await rawConnect(wsUrl(g2, { token: token('st', ['*']) }));
  assert.equal((await star.join('rooms:vip', '1'))[4].status, 'ok');
  // public rooms ignore the claim
  assert.equal(cli(['rooms', 'create', 'open-room']).code, 0);
  assert.equal((await anon.join('rooms:open-room', '2'))[4].status, 'ok');
  assert.equal((await noClaim.join('rooms:open-room', '2'))[4].status, 'ok');
  // the refused sockets stay open
  assert.equal(anon.closeInfo, null);
  assert.equal(noClaim.closeInfo, null);
});

test('`gateway token --rooms` mints the rooms claim: its token enters the listed private room', async () => {
  const minted = cli(['token', 'cli-user', '--rooms', 'vip,x']);
  assert.equal(minted.code, 0, minted.out);
  const jwt = minted.out.trim();
  const payload = JSON.parse(Buffer.from(jwt.split('.')[1], 'base64url').toString());
  assert.deepEqual(payload.rooms, ['vip', 'x']);
  const plain = cli(['token', 'cli-user2']);
  assert.equal(JSON.parse(Buffer.from(plain.out.trim().split('.')[1], 'base64url').toString()).rooms, undefined);
  const ws = await rawConnect(wsUrl(g1, { token: jwt }));
  assert.equal((await ws.join('rooms:vip', '1'))[4].status, 'ok');
  const without = await rawConnect(wsUrl(g1, { token: plain.out.trim() }));
  assert.equal(reasonOf(await without.join('rooms:vip', '1')), 'Not allowed');
});

test('the token that signs the join in decides: guardian_token over the connection token', async () => {
  assert.equal(cli(['rooms', 'create', 'gt-room', '--private']).code, 0);
  // anonymous connection, a guardian_token that lists the room
  const a = await rawConnect(wsUrl(g1));
  const ok = await a.join('rooms:gt-room', '1', { guardian_token: token('g1', ['gt-room']) });
  assert.equal(ok[4].status, 'ok');
  assert.equal(ok[4].response.user.id, 'g1');
  // a connection token that lists it, a guardian_token that does not
  const b = await rawConnect(wsUrl(g2, { token: token('g2', ['gt-room']) }));
  assert.equal(reasonOf(await b.join('rooms:gt-room', '1', { guardian_token: token('g3') })), 'Not allowed');
  // the other way round
  const c = await rawConnect(wsUrl(g2, { token: token('g4') }));
  assert.equal((await c.join('rooms:gt-room', '1', { guardian_token: token('g4', ['gt-room']) }))[4].status, 'ok');
  // a guardian_token that fails verification leaves the join anonymous: "Not signed in"
  const d = await rawConnect(wsUrl(g1, { token: token('g5', ['gt-room']) }));
  assert.equal(reasonOf(await d.join('rooms:gt-room', '1', { guardian_token: 'not-a-jwt' })), 'Not signed in');
});

test('phoenix.js: a private room refuses with {reason} and admits a listed token', async () => {
  assert.equal(cli(['rooms', 'create', 'pj-room', '--private']).code, 0);
  const anon = await connect(g1.publicUrl);
  assert.deepEqual(await join(anon.channel('rooms:pj-room')), { status: 'error', response: { reason: 'Not signed in' } });
  const user = await connect(g2.publicUrl, { token: token('pj', ['pj-room']) });
  const r = await join(user.channel('rooms:pj-room'));
  assert.equal(r.status, 'ok');
});

test('a refused private join writes nothing to Redis, cold or warm, on either node', async () => {
  assert.equal(cli(['rooms', 'create', 'quiet', '--private']).code, 0);
  // cold on both nodes: the keyspace does not change (a join script would make the room's
  // presence keys; other rooms' heartbeats run scripts meanwhile, so script counts prove nothing)
  await sleep(100);
  const keysBefore = redis.scanAll(`${PREFIX}:room:{quiet}*`);
  for (const g of [g1, g2]) {
    const anon = await rawConnect(wsUrl(g));
    assert.equal(reasonOf(await anon.join('rooms:quiet', '1')), 'Not signed in');
    const u = await rawConnect(wsUrl(g, { token: token('q-out') }));
    assert.equal(reasonOf(await u.join('rooms:quiet', '1')), 'Not allowed');
  }
  assert.deepEqual(redis.scanAll(`${PREFIX}:room:{quiet}*`), keysBefore, 'a refused cold join left keys behind');

  // warm on g1 (a member is in), then refusals on both nodes: presence, anon counts, leases and
  // seq stay exactly as they were
  const insider = await rawConnect(wsUrl(g1, { token: token('q-in', ['quiet']) }));
  assert.equal((await insider.join('rooms:quiet', '1'))[4].status, 'ok');
  await sleep(200);
  const snap = () => ({
    presence: redis.cli('HGETALL', `${PREFIX}:room:{quiet}:presence`),
    anon: redis.cli('HGETALL', `${PREFIX}:room:{quiet}:anon`),
    nodes: redis.cli('ZRANGE', `${PREFIX}:room:{quiet}:nodes`, '0', '-1'),
    seq: redis.cli('GET', `${PREFIX}:room:{quiet}:seq`),
  });
  const before1 = snap();
  for (const g of [g1, g2]) {
    const anon = await rawConnect(wsUrl(g));
    assert.equal(reasonOf(await anon.join('rooms:quiet', '2')), 'Not signed in');
    const u = await rawConnect(wsUrl(g, { token: token('q-out2', ['other']) }));
    assert.equal(reasonOf(await u.join('rooms:quiet', '2')), 'Not allowed');
  }
  await sleep(300);
  assert.deepEqual(snap(), before1, 'a refused warm join changed the room');
  assert.deepEqual(insider.frames.filter((f) => f[3] === 'presence_diff'), [], 'nobody joined, nobody left');
});

test('a warm room answers access from memory: no record read per join', async () => {
  assert.equal(cli(['rooms', 'create', 'warm-vip', '--private']).code, 0);
  const first = await rawConnect(wsUrl(g1, { token: token('w0', ['warm-vip']) }));
  assert.equal((await first.join('rooms:warm-vip', '1'))[4].status, 'ok');
  const reads = calls('hgetall');
  for (let i = 0; i < 5; i++) {
    const anon = await rawConnect(wsUrl(g1));
    assert.equal(reasonOf(await anon.join('rooms:warm-vip', '1')), 'Not signed in');
    const u = await rawConnect(wsUrl(g1, { token: token(`w${i + 1}`, ['warm-vip']) }));
    assert.equal((await u.join('rooms:warm-vip', '1'))[4].status, 'ok');
  }
  assert.equal(calls('hgetall'), reads, 'joins of a warm room read the room record');
});

test('refused private joins count toward server.max_refused_joins_per_min (4009)', async () => {
  const g = await startGateway({ redisPort: redis.port, prefix: PREFIX, name: 'pv-limit', env: { GATEWAY_SERVER_MAX_REFUSED_JOINS_PER_MIN: '3' } });
  try {
    assert.equal(cli(['rooms', 'create', 'limit-vip', '--private']).code, 0);
    const c = await rawConnect(wsUrl(g, { token: token('lim') }));
    for (let i = 1; i <= 3; i++) assert.equal(reasonOf(await c.join('rooms:limit-vip', String(i))), 'Not allowed');
    assert.equal(c.closeInfo, null, 'three refusals are within the limit');
    assert.equal(reasonOf(await c.join('rooms:limit-vip', '4')), 'Not allowed');
    const closed = await c.closed;
    assert.equal(closed.code, 4009);
  } finally {
    await g.stop().catch(() => g.kill());
  }
});

test('a room deleted and created again as private is private on a node that held it warm', async () => {
  assert.equal(cli(['rooms', 'create', 'flip']).code, 0);
  const anon = await rawConnect(wsUrl(g2));
  assert.equal((await anon.join('rooms:flip', '1'))[4].status, 'ok');
  assert.equal(cli(['rooms', 'delete', 'flip']).code, 0);
  await anon.next((f) => f[3] === 'phx_close' && f[2] === 'rooms:flip');
  assert.equal(cli(['rooms', 'create', 'flip', '--private']).code, 0);
  await waitFor(async () => {
    const c = await rawConnect(wsUrl(g2));
    const rep = await c.join('rooms:flip', '9');
    c.close();
    return rep[4].response.reason === 'Not signed in';
  }, 3000, 'the re-created private room to refuse anonymous joins');
});
