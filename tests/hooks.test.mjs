// The publish hook (DESIGN §12), end to end: real redis, real gateways, raw sockets where exact
// frames and their order matter, the real phoenix client for the long ordering run.
// The last test puts the example application behind both hooks (publish and events) of two gateways.
// Two applications: the example application (examples/app/server.mjs) where its behaviour is
// what is tested (it verifies the signature, stores messages, refuses blocked words, trims and
// acks); an in-test node http server where a test must control the answer. The in-test server
// checks every request's x-gateway-signature and answers as the pushed body tells it ("refuse:<why>",
// "sleep:<ms>:<text>" (then broadcast with body <text>), "status:<code>", "notjson", "unknown",
// anything else: broadcast).
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import http from 'node:http';
import {
  connect, createRoom, disconnectAll, hs256, join, push, rawConnect, runCli, sleep, startGateway, startRedis, teardown, test,
  waitFor,
} from './lib/harness.mjs';
import { startExampleApp } from './lib/app.mjs';

/** `sha256=<hex HMAC-SHA256(secret, body)>`, as the gateway signs. */
const sign = (secret, body) => `sha256=${crypto.createHmac('sha256', secret).update(body).digest('hex')}`;

const PREFIX = 'hk';
const SECRET = 'hook-secret-for-the-e2e-tests-0123456789';
const TIMEOUT_MS = 1000;

/**
 * The application: records each request ({body, sigOk, at}), answers by the push's body.
 * `mode = 'hang'` makes it never answer; `stop()` closes it and every kept-alive connection.
 * `busiest[conn]`: the most requests of one connection it held unanswered at once.
 */
async function application() {
  const app = { requests: [], mode: 'normal', hanging: [], open: {}, busiest: {} };
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', async () => {
      const raw = Buffer.concat(chunks);
      const want = `sha256=${crypto.createHmac('sha256', SECRET).update(raw).digest('hex')}`;
      const body = JSON.parse(raw.toString());
      app.requests.push({
        body,
        sigOk: req.headers['x-gateway-signature'] === want,
        contentType: req.headers['content-type'],
        method: req.method,
        at: Date.now(),
      });
      if (app.mode === 'hang') {
        app.hanging.push(res);
        return;
      }
      const text = typeof body.body === 'string' ? body.body : '';
      const conn = body.conn;
      app.open[conn] = (app.open[conn] ?? 0) + 1;
      app.busiest[conn] = Math.max(app.busiest[conn] ?? 0, app.open[conn]);
      const json = (o, status = 200) => {
        app.open[conn] -= 1;
        res.writeHead(status, { 'content-type': 'application/json' });
        res.end(JSON.stringify(o));
      };
      const [cmd, arg, rest] = text.split(':');
      if (cmd === 'sleep') {
        await sleep(Number(arg));
        return json({ result: 'broadcast', ...(rest ? { body: rest } : {}) });
      }
      if (cmd === 'refuse') return json({ result: 'refuse', reason: arg === 'long' ? 'x'.repeat(300) : arg });
      if (cmd === 'status') return json({ result: 'broadcast' }, Number(arg));
      if (cmd === 'notjson') {
        app.open[conn] -= 1;
        res.writeHead(200, { 'content-type': 'text/plain' });
        return res.end('broadcast');
      }
      if (cmd === 'unknown') return json({ result: 'maybe' });
      return json({ result: 'broadcast' });
    });
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  app.url = `http://127.0.0.1:${server.address().port}/publish`;
  app.stop = () => new Promise((r) => {
    for (const res of app.hanging) res.destroy();
    server.close(r);
    server.closeAllConnections();
  });
  return app;
}

const hookEnv = (url, extra = {}) => ({
  GATEWAY_HOOKS_PUBLISH_URL: url,
  GATEWAY_HOOKS_SECRET: SECRET,
  GATEWAY_HOOKS_TIMEOUT_MS: String(TIMEOUT_MS),
  GATEWAY_HOOKS_PUBLISH_EVENTS: '["new_msg", "reaction"]',
  GATEWAY_ROOMS_CLIENT_EVENTS: '["new_msg", "typing"]',
  GATEWAY_ROOMS_ANONYMOUS_EVENTS: '["reaction"]',
  GATEWAY_SERVER_PUSH_RATE_PER_S: '5',
  GATEWAY_SERVER_PUSH_BURST: '8',
  ...extra,
});

let redis;
let appSrv;
let gw;
/** The example application, and a gateway whose publish hook it serves. */
let example;
let gwEx;
before(async () => {
  redis = await startRedis();
  appSrv = await application();
  example = await startExampleApp({ secret: SECRET, words: ['spam', 'scam'] });
  gw = await startGateway({ redisPort: redis.port, prefix: PREFIX, env: hookEnv(appSrv.url) });
  gwEx = await startGateway({
    redisPort: redis.port, prefix: PREFIX, name: 'example-app', env: hookEnv(`${example.url}/hooks/publish`),
  });
  for (const r of ['hall', 'side', 'third', 'shop']) createRoom(redis, PREFIX, r);
});
after(async () => {
  await disconnectAll();
  await teardown({ gateways: [gw, gwEx], redis });
  await appSrv.stop();
  await example.stop();
});

const url = (g, sub) => `${g.publicUrl}/websocket?vsn=2.0.0${sub ? `&token=${hs256({ sub, username: `user-${sub}`, exp: Math.floor(Date.now() / 1000) + 600 })}` : ''}`;
const metricsText = async (g) => (await fetch(`${g.adminUrl}/metrics`)).text();
const metric = (text, name, labels) => {
  const l = Object.entries(labels).map(([k, v]) => `${k}="${v}"`).join(',');
  const m = text.match(new RegExp(`^${name}\\{${l}\\} (\\S+)$`, 'm'));
  return m ? Number(m[1]) : undefined;
};

/** A socket of `sub` (anonymous without) joined to `topics`. */
async function joined(g, sub, topics) {
  const s = await rawConnect(url(g, sub));
  for (const [i, t] of topics.entries()) assert.equal((await s.join(t, `j${i}`))[4].status, 'ok');
  return s;
}

test('hook metrics exist at zero on a fresh gateway', async () => {
  const text = await metricsText(gw);
  for (const hook of ['publish', 'events']) {
    for (const outcome of ['ok', 'refused', 'http_error', 'timeout', 'invalid', 'overloaded']) {
      assert.equal(metric(text, 'gateway_hook_requests_total', { hook, outcome }), 0, `${hook}/${outcome}`);
    }
    assert.equal(metric(text, 'gateway_hook_duration_seconds_count', { hook }), 0);
  }
  for (const result of ['sent', 'retried', 'dropped']) {
    assert.equal(metric(text, 'gateway_hook_events_total', { result }), 0, result);
  }
});

test('the request: signed, JSON, room id, sender, conn and node; a broadcast reaches the room', async () => {
  const a = await joined(gw, 'ann', ['rooms:hall']);
  const watcher = await joined(gw, 'wat', ['rooms:hall']);
  const before = appSrv.requests.length;
  a.send(['j0', 'p1', 'rooms:hall', 'new_msg', { body: 'hello', extra: 'dropped' }]);
  assert.equal((await a.reply('p1'))[4].status, 'ok');
  const f = await watcher.next((x) => x[3] === 'new_msg' && x[4].body === 'hello');
  assert.deepEqual(f[4].user, { id: 'ann', username: 'user-ann' });
  const req = appSrv.requests[before];
  assert.ok(req.sigOk, 'x-gateway-signature is HMAC-SHA256 of the raw body');
  assert.equal(req.method, 'POST');
  assert.equal(req.contentType, 'application/json');
  assert.deepEqual(Object.keys(req.body).sort(), ['at', 'body', 'conn', 'event', 'node', 'room', 'user']);
  assert.equal(req.body.room, 'hall');
  assert.equal(req.body.event, 'new_msg');
  assert.equal(req.body.body, 'hello');
  assert.deepEqual(req.body.user, { id: 'ann', username: 'user-ann' });
  assert.equal(req.body.node, gw.node);
  assert.ok(req.body.conn.startsWith(`${gw.node}.`), req.body.conn);
  assert.ok(Math.abs(req.body.at - Date.now()) < 5000);

  // an anonymous push of an anonymous event: user null
  const anon = await joined(gw, null, ['rooms:hall']);
  anon.send(['j0', 'r1', 'rooms:hall', 'reaction', { body: '👍' }]);
  assert.equal((await anon.reply('r1'))[4].status, 'ok');
  await watcher.next((x) => x[3] === 'reaction' && x[4].body === '👍');
  assert.equal(appSrv.requests.at(-1).body.user, null);
  assert.ok(appSrv.requests.every((q) => q.sigOk));
});

test('refuse: the reason (cut to 200 characters), nothing broadcast or stored', async () => {
  const a = await joined(gw, 'bob', ['rooms:side']);
  const watcher = await joined(gw, 'wat2', ['rooms:side']);
  const streamLen = () => Number(redis.cli('XLEN', `${PREFIX}:room:{side}:history`) || 0);
  const stored = streamLen();
  a.send(['j0', 'f1', 'rooms:side', 'new_msg', { body: 'refuse:no spam here' }]);
  assert.deepEqual((await a.reply('f1'))[4], { status: 'error', response: { reason: 'no spam here' } });
  a.send(['j0', 'f2', 'rooms:side', 'new_msg', { body: 'refuse:long' }]);
  assert.deepEqual((await a.reply('f2'))[4], { status: 'error', response: { reason: 'x'.repeat(200) } });
  // a marker that is broadcast, after which nothing of the above may have arrived
  a.send(['j0', 'm', 'rooms:side', 'new_msg', { body: 'marker' }]);
  await watcher.next((x) => x[3] === 'new_msg' && x[4].body === 'marker');
  assert.deepEqual(watcher.frames.filter((x) => x[3] === 'new_msg').map((x) => x[4].body), ['marker']);
  assert.equal(streamLen(), stored + 1, 'only the marker was stored');
});

test('a non-2xx status, an answer that is not JSON, an unknown result, a timeout: "unavailable", nothing broadcast', async () => {
  const a = await joined(gw, 'cat', ['rooms:third']);
  const watcher = await joined(gw, 'wat3', ['rooms:third']);
  const cases = [['s', 'status:500'], ['n', 'notjson'], ['u', 'unknown'], ['s4', 'status:404']];
  for (const [ref, body] of cases) {
    a.send(['j0', ref, 'rooms:third', 'new_msg', { body }]);
    assert.deepEqual((await a.reply(ref))[4], { status: 'error', response: { reason: 'unavailable' } }, body);
  }
  const t0 = Date.now();
  a.send(['j0', 't', 'rooms:third', 'new_msg', { body: `sleep:${TIMEOUT_MS + 700}:late` }]);
  assert.deepEqual((await a.reply('t', 5000))[4], { status: 'error', response: { reason: 'unavailable' } });
  const took = Date.now() - t0;
  assert.ok(took >= TIMEOUT_MS - 50 && took < TIMEOUT_MS + 600, `timed out after ${took} ms`);
  // the late answer (broadcast with a body) is ignored
  await sleep(1000);
  assert.deepEqual(watcher.frames.filter((x) => x[3] === 'new_msg'), []);
  const text = await metricsText(gw);
  assert.ok(metric(text, 'gateway_hook_requests_total', { hook: 'publish', outcome: 'http_error' }) >= 2);
  assert.ok(metric(text, 'gateway_hook_requests_total', { hook: 'publish', outcome: 'invalid' }) >= 2);
  assert.ok(metric(text, 'gateway_hook_requests_total', { hook: 'publish', outcome: 'timeout' }) >= 1);
  assert.ok(metric(text, 'gateway_hook_requests_total', { hook: 'publish', outcome: 'refused' }) >= 2);
  assert.ok(metric(text, 'gateway_hook_requests_total', { hook: 'publish', outcome: 'ok' }) >= 3);
  assert.ok(metric(text, 'gateway_hook_duration_seconds_count', { hook: 'publish' }) >= 8);
  assert.ok(metric(text, 'gateway_pushes_total', { result: 'refused' }) >= 2);
});

test('per socket, replies and broadcasts keep the push order across channels while a slow hook answers; other sockets, heartbeats and joins do not wait', async () => {
  const a = await joined(gw, 'dan', ['rooms:hall', 'rooms:side']);
  const b = await joined(gw, 'eve', ['rooms:hall']);
  const c = await joined(gw, 'fay', []);
  const watcher = await joined(gw, 'wat4', ['rooms:hall', 'rooms:side']);
  const order = [];
  const track = (ref) => a.reply(ref, 5000).then((f) => { order.push(ref); return { f, at: Date.now() }; });
  const t0 = Date.now();
  a.send(['j0', 'n1', 'rooms:hall', 'new_msg', { body: 'sleep:600:first' }]);
  a.send(['j1', 'n2', 'rooms:side', 'typing', { body: 'not hooked' }]);
  a.send(['j1', 'n3', 'rooms:side', 'new_msg', { body: 'unknown' }]);
  a.send(['j0', 'n4', 'rooms:hall', 'new_msg', { body: 'second' }]);
  const replies = [track('n1'), track('n2'), track('n3'), track('n4')];
  // while dan waits: eve's push, fay's heartbeat and join are answered at once
  b.send(['j0', 'e1', 'rooms:hall', 'new_msg', { body: 'from eve' }]);
  assert.equal((await b.reply('e1'))[4].status, 'ok');
  c.send([null, 'hb', 'phoenix', 'heartbeat', {}]);
  await c.reply('hb');
  assert.equal((await c.join('rooms:third', 'cj'))[4].status, 'ok');
  // and dan's own heartbeat too: his reader keeps reading
  a.send([null, 'ahb', 'phoenix', 'heartbeat', {}]);
  await a.reply('ahb');
  const prompt = Date.now() - t0;
  assert.ok(prompt < 400, `other sockets and heartbeats answered in ${prompt} ms, not after the slow hook`);
  assert.deepEqual(order, [], 'nothing of dan released before push 1');
  const done = await Promise.all(replies);
  assert.deepEqual(order, ['n1', 'n2', 'n3', 'n4']);
  assert.ok(done[0].at - t0 >= 550, 'push 1 waited for the application');
  assert.equal(done[0].f[4].status, 'ok');
  assert.equal(done[1].f[4].status, 'ok');
  assert.deepEqual(done[2].f[4], { status: 'error', response: { reason: 'unavailable' } });
  assert.equal(done[3].f[4].status, 'ok');
  await watcher.next((x) => x[4]?.body === 'second');
  const dans = watcher.frames.filter((x) => ['new_msg', 'typing'].includes(x[3]) && x[4].user?.id === 'dan').map((x) => x[4].body);
  assert.deepEqual(dans, ['first', 'not hooked', 'second'], 'broadcasts in push order, across rooms');
  // the application saw dan's hooked pushes in order, one at a time
  const seen = appSrv.requests.filter((q) => q.body.user?.id === 'dan').map((q) => q.body.body);
  assert.deepEqual(seen, ['sleep:600:first', 'unknown', 'second']);
});

test('rate and body limits apply before the hook: the application sees no request for a refused push', async () => {
  const a = await joined(gw, 'gus', ['rooms:hall']);
  const mine = () => appSrv.requests.filter((q) => q.body.user?.id === 'gus').length;
  a.send(['j0', 'big', 'rooms:hall', 'new_msg', { body: 'x'.repeat(5000) }]);
  assert.deepEqual((await a.reply('big'))[4], { status: 'error', response: { reason: 'invalid payload' } });
  a.send(['j0', 'no', 'rooms:hall', 'forbidden', { body: 'x' }]);
  assert.equal((await a.reply('no'))[4].status, 'error');
  assert.equal(mine(), 0, 'an oversized or not allowed push never reaches the application');
  for (let i = 0; i < 12; i++) a.send(['j0', `q${i}`, 'rooms:hall', 'new_msg', { body: `m${i}` }]);
  const replies = [];
  for (let i = 0; i < 12; i++) replies.push((await a.reply(`q${i}`))[4]);
  const ok = replies.filter((r) => r.status === 'ok').length;
  const limited = replies.filter((r) => r.response.reason === 'rate limited').length;
  assert.equal(ok + limited, 12);
  assert.ok(limited >= 3, `burst of 8: ${limited} rate limited`);
  await sleep(100);
  assert.equal(mine(), ok, 'only the pushes within the limit reached the application');
});

test('a dead application stalls only the pushes waiting on it: other rooms fan out, heartbeats and joins answer; over max_in_flight: unavailable at once', async () => {
  const dead = await application();
  const g2 = await startGateway({
    redisPort: redis.port,
    prefix: PREFIX,
    name: 'dead-hook',
    env: hookEnv(dead.url, { GATEWAY_HOOKS_MAX_IN_FLIGHT: '1', GATEWAY_HOOKS_TIMEOUT_MS: '3000' }),
  });
  try {
    dead.mode = 'hang';
    const a = await joined(g2, 'hal', ['rooms:hall']);
    const b = await joined(g2, 'ivy', ['rooms:side']);
    const watcher = await joined(g2, 'wat5', ['rooms:side', 'rooms:hall']);
    const t0 = Date.now();
    a.send(['j0', 'h1', 'rooms:hall', 'new_msg', { body: 'into the void' }]);
    await waitFor(() => dead.requests.length === 1, 2000, 'the hook request in flight');
    // the one request in flight is the node's limit: another socket's hooked push fails at once
    b.send(['j0', 'o1', 'rooms:side', 'new_msg', { body: 'overloaded' }]);
    assert.deepEqual((await b.reply('o1'))[4], { status: 'error', response: { reason: 'unavailable' } });
    // other rooms' fan-out goes on: a push that needs no hook, and a publish from elsewhere
    b.send(['j0', 'o2', 'rooms:side', 'typing', { body: 'still here' }]);
    assert.equal((await b.reply('o2'))[4].status, 'ok');
    await watcher.next((x) => x[3] === 'typing' && x[4].body === 'still here', 1000);
    // heartbeats and joins of the waiting socket itself are answered
    a.send([null, 'hb', 'phoenix', 'heartbeat', {}]);
    await a.reply('hb', 1000);
    assert.equal((await a.join('rooms:side', 'j9'))[4].status, 'ok');
    assert.ok(Date.now() - t0 < 1500, `all answered in ${Date.now() - t0} ms while the hook hangs`);
    const text = await metricsText(g2);
    assert.equal(metric(text, 'gateway_hook_requests_total', { hook: 'publish', outcome: 'overloaded' }), 1);
    // the application goes away altogether: the waiting push fails, later ones fail fast
    await dead.stop();
    assert.deepEqual((await a.reply('h1', 4000))[4], { status: 'error', response: { reason: 'unavailable' } });
    a.send(['j0', 'h2', 'rooms:hall', 'new_msg', { body: 'again' }]);
    assert.deepEqual((await a.reply('h2', 2000))[4], { status: 'error', response: { reason: 'unavailable' } });
    b.send(['j0', 'o3', 'rooms:side', 'typing', { body: 'and on' }]);
    await watcher.next((x) => x[3] === 'typing' && x[4].body === 'and on', 1000);
    // (the watcher's joins brought the rooms' history of the earlier tests: only hal's and ivy's count)
    assert.ok(!watcher.frames.some((x) => x[3] === 'new_msg' && ['hal', 'ivy'].includes(x[4].user?.id)), 'nothing hooked was broadcast');
  } finally {
    await g2.stop();
    await dead.stop().catch(() => {});
  }
});

test('the example application: verifies the signature, stores what it broadcasts, refuses a blocked word, trims a body, acks a command', async () => {
  const a = await joined(gwEx, 'kim', ['rooms:shop']);
  const watcher = await joined(gwEx, 'wat6', ['rooms:shop']);
  const streamLen = () => Number(redis.cli('XLEN', `${PREFIX}:room:{shop}:history`) || 0);
  const stored = streamLen();
  const ask = async (ref, body) => {
    a.send(['j0', ref, 'rooms:shop', 'new_msg', { body }]);
    return (await a.reply(ref))[4];
  };
  // broadcast as sent, and kept by the application
  assert.deepEqual(await ask('b1', 'fresh bread today'), { status: 'ok', response: {} });
  const b1 = await watcher.next((x) => x[3] === 'new_msg' && x[4].body === 'fresh bread today');
  assert.deepEqual(b1[4].user, { id: 'kim', username: 'user-kim' });
  // a blocked word (any case, a whole word): the application's reason, nothing broadcast or kept
  assert.deepEqual(await ask('w1', 'cheap SPAM, click here'), {
    status: 'error', response: { reason: 'message refused: it contains the blocked word "spam"' },
  });
  assert.deepEqual(await ask('w2', 'spammer is not a blocked word'), { status: 'ok', response: {} });
  // the application's body replaces the client's: trimmed
  assert.deepEqual(await ask('t1', '   hello there  \n'), { status: 'ok', response: {} });
  const t1 = await watcher.next((x) => x[3] === 'new_msg' && x[4].body === 'hello there');
  assert.deepEqual(t1[4].user, { id: 'kim', username: 'user-kim' }, 'sender and time stay the gateway\'s');
  // ...under the same body rules: a blank body trims to "", which no new_msg may carry
  assert.deepEqual(await ask('t2', '   '), { status: 'error', response: { reason: 'invalid payload' } });
  // a command: ack, the client gets ok, nothing is broadcast or stored
  assert.deepEqual(await ask('c1', '/away lunch'), { status: 'ok', response: {} });
  assert.deepEqual(await ask('m', 'marker'), { status: 'ok', response: {} });
  await watcher.next((x) => x[3] === 'new_msg' && x[4].body === 'marker');
  assert.deepEqual(
    watcher.frames.filter((x) => x[3] === 'new_msg').map((x) => x[4].body),
    ['fresh bread today', 'spammer is not a blocked word', 'hello there', 'marker'],
  );
  assert.equal(streamLen(), stored + 4, 'the room history holds the four broadcasts only');
  // the application's own store: the same four, as broadcast, with room id, sender, conn and node
  const kept = await example.messages('shop');
  assert.deepEqual(kept.map((m) => m.body), ['fresh bread today', 'spammer is not a blocked word', 'hello there', 'marker']);
  assert.deepEqual(kept[0].user, { id: 'kim', username: 'user-kim' });
  assert.equal(kept[0].room, 'shop');
  assert.equal(kept[0].node, gwEx.node);
  assert.equal(example.stderr(), '');
});

test('the example application refuses a request signed with another secret (401): the client gets "unavailable", nothing is kept', async () => {
  const g = await startGateway({
    redisPort: redis.port,
    prefix: PREFIX,
    name: 'wrong-secret',
    env: hookEnv(`${example.url}/hooks/publish`, { GATEWAY_HOOKS_SECRET: 'not-the-secret-the-application-knows-0000' }),
  });
  try {
    const a = await joined(g, 'lou', ['rooms:shop']);
    const before = (await example.messages()).length;
    a.send(['j0', 'x1', 'rooms:shop', 'new_msg', { body: 'forged?' }]);
    assert.deepEqual((await a.reply('x1'))[4], { status: 'error', response: { reason: 'unavailable' } });
    assert.equal((await example.messages()).length, before, 'nothing stored');
    const text = await metricsText(g);
    assert.equal(metric(text, 'gateway_hook_requests_total', { hook: 'publish', outcome: 'http_error' }), 1);
    // and a request without any signature
    const res = await fetch(`${example.url}/hooks/publish`, { method: 'POST', body: '{"room":"shop"}' });
    assert.equal(res.status, 401);
  } finally {
    await g.stop();
  }
});

test('50 pushes of one phoenix.js socket, across two channels, while the application answers the earlier ones slower: every reply and broadcast in push order; a second socket is not held behind', { timeout: 60000 }, async () => {
  const ord = await application();
  const g = await startGateway({
    redisPort: redis.port,
    prefix: PREFIX,
    name: 'order',
    env: hookEnv(ord.url, { GATEWAY_SERVER_PUSH_RATE_PER_S: '1000', GATEWAY_SERVER_PUSH_BURST: '100' }),
  });
  try {
    const token = (sub) => hs256({ sub, username: `user-${sub}`, exp: Math.floor(Date.now() / 1000) + 600 });
    const open = async (sub, topics) => {
      const s = await connect(`${g.publicUrl}`, { token: token(sub) });
      const chans = {};
      for (const t of topics) {
        chans[t] = s.channel(`rooms:${t}`, {});
        assert.equal((await join(chans[t])).status, 'ok');
      }
      return { s, chans };
    };
    const A = await open('ord-a', ['hall', 'side']);
    const B = await open('ord-b', ['third']);
    const W = await open('ord-w', ['hall', 'side', 'third']);
    const N = 50;
    // push i: every fifth a `typing` (not hooked), the others new_msg whose answer takes
    // (N - i) * 3 ms plus up to 10 ms: were they asked at once, the answers would come back reversed
    const t0 = Date.now();
    const aOrder = [];
    const aReplies = [];
    for (let i = 0; i < N; i++) {
      const room = i % 2 ? 'side' : 'hall';
      const typing = i % 5 === 4;
      const body = typing ? `a${i}` : `sleep:${(N - i) * 3 + Math.floor(Math.random() * 10)}:a${i}`;
      aReplies.push(push(A.chans[room], typing ? 'typing' : 'new_msg', { body }, 20000).then((r) => { aOrder.push(i); return r; }));
    }
    // meanwhile another socket's pushes, answered after random delays
    const bOrder = [];
    const bReplies = [];
    for (let i = 0; i < 20; i++) {
      const body = `sleep:${Math.floor(Math.random() * 20)}:b${i}`;
      bReplies.push(push(B.chans.third, 'new_msg', { body }, 20000).then((r) => { bOrder.push({ i, at: Date.now() }); return r; }));
    }
    const bDone = await Promise.all(bReplies);
    const bTook = Date.now() - t0;
    const aDone = await Promise.all(aReplies);
    const aTook = Date.now() - t0;
    assert.ok(aDone.every((r) => r.status === 'ok'), JSON.stringify(aDone.filter((r) => r.status !== 'ok')));
    assert.ok(bDone.every((r) => r.status === 'ok'));
    assert.deepEqual(aOrder, [...Array(N).keys()], 'replies in push order');
    assert.deepEqual(bOrder.map((x) => x.i), [...Array(20).keys()]);
    assert.ok(aTook > 2500, `the application's answers took ${aTook} ms in all`);
    assert.ok(bTook < aTook / 2, `the other socket was done after ${bTook} ms, not behind the first (${aTook} ms)`);
    // the broadcasts, as one watcher socket got them across its channels
    await waitFor(() => W.s.received.filter((m) => m.payload?.user?.id === 'ord-a').length === N, 5000, 'all 50 broadcasts');
    const seen = W.s.received.filter((m) => ['new_msg', 'typing'].includes(m.event) && m.payload?.user?.id === 'ord-a');
    assert.deepEqual(seen.map((m) => m.payload.body), [...Array(N).keys()].map((i) => `a${i}`), 'broadcasts in push order');
    const bSeen = W.s.received.filter((m) => m.event === 'new_msg' && m.payload?.user?.id === 'ord-b');
    assert.deepEqual(bSeen.map((m) => m.payload.body), [...Array(20).keys()].map((i) => `b${i}`));
    // the application saw one request of a socket at a time, in push order
    const aConn = ord.requests.find((q) => q.body.user?.id === 'ord-a').body.conn;
    assert.equal(ord.busiest[aConn], 1);
    assert.deepEqual(
      ord.requests.filter((q) => q.body.conn === aConn).map((q) => q.body.body.split(':')[2]),
      [...Array(N).keys()].filter((i) => i % 5 !== 4).map((i) => `a${i}`),
    );
    assert.ok(ord.requests.every((q) => q.sigOk));
  } finally {
    await disconnectAll();
    await g.stop();
    await ord.stop();
  }
});

test('a push whose channel is left, replaced or kicked while it waits on the application is not broadcast (unmatched topic); one queued behind it is never asked', async () => {
  const a = await joined(gw, 'ned', ['rooms:hall']);
  const watcher = await joined(gw, 'wat7', ['rooms:hall']);
  const asked = () => appSrv.requests.filter((q) => q.body.user?.id === 'ned').map((q) => q.body.body);
  a.send(['j0', 'p1', 'rooms:hall', 'new_msg', { body: 'sleep:600:gone1' }]);
  a.send(['j0', 'p2', 'rooms:hall', 'new_msg', { body: 'gone2' }]);
  await waitFor(() => asked().length === 1, 2000, 'the first push at the application');
  const t0 = Date.now();
  a.send(['j0', 'l1', 'rooms:hall', 'phx_leave', {}]);
  assert.equal((await a.reply('l1'))[4].status, 'ok');
  assert.ok(Date.now() - t0 < 400, 'the leave is answered at once');
  const unmatched = { status: 'error', response: { reason: 'unmatched topic' } };
  assert.deepEqual((await a.reply('p1', 3000))[4], unmatched);
  assert.deepEqual((await a.reply('p2', 3000))[4], unmatched);
  assert.deepEqual(asked(), ['sleep:600:gone1'], 'the push queued behind the left channel was not sent to the application');

  // a rejoin replaces the channel while a push of the old one waits: not broadcast either
  assert.equal((await a.join('rooms:hall', 'j5'))[4].status, 'ok');
  a.send(['j5', 'p3', 'rooms:hall', 'new_msg', { body: 'sleep:500:gone3' }]);
  await waitFor(() => asked().length === 2, 2000, 'the third push at the application');
  assert.equal((await a.join('rooms:hall', 'j6'))[4].status, 'ok');
  assert.deepEqual((await a.reply('p3', 3000))[4], unmatched);
  // the new channel's pushes go on
  a.send(['j6', 'p4', 'rooms:hall', 'new_msg', { body: 'after' }]);
  assert.equal((await a.reply('p4'))[4].status, 'ok');
  await watcher.next((x) => x[3] === 'new_msg' && x[4].body === 'after');

  // a kick while a push waits: not broadcast either
  a.send(['j6', 'p5', 'rooms:hall', 'new_msg', { body: 'sleep:500:gone5' }]);
  await waitFor(() => asked().length === 4, 2000, 'the fifth push at the application');
  const kick = runCli(redis, PREFIX, ['rooms', 'kick', 'hall', 'ned']);
  assert.equal(kick.code, 0, kick.out);
  await a.next((x) => x[3] === 'phx_close' && x[0] === 'j6');
  assert.deepEqual((await a.reply('p5', 3000))[4], unmatched);
  await sleep(100);
  const neds = watcher.frames.filter((x) => x[3] === 'new_msg' && x[4].user?.id === 'ned').map((x) => x[4].body);
  assert.deepEqual(neds, ['after'], 'nothing of a left, replaced or kicked channel was broadcast');
});

test('the example application\'s events hook: each event logged once (a retried batch, or one after a restart, adds nothing); bad signature 401, not JSON 400', async () => {
  const app = await startExampleApp({ secret: SECRET });
  let again;
  try {
    const post = (body, signature = sign(SECRET, body)) => fetch(`${app.url}/hooks/events`, {
      method: 'POST', headers: { 'content-type': 'application/json', 'x-gateway-signature': signature }, body,
    });
    const ev = (id, type, room, extra = {}) => ({ id, type, room, seq: Number(id.slice(1)), at: Date.now(), ...extra });
    const batch1 = JSON.stringify({ events: [ev('e1', 'room_occupied', 'r1'), ev('e2', 'member_added', 'r1', { user: { id: '7', username: 'ann' } })] });
    let res = await post(batch1);
    assert.equal(res.status, 200);
    assert.deepEqual(await res.json(), { received: 2, added: 2 });
    // the gateway's retry: the same events, the same ids
    assert.deepEqual(await (await post(batch1)).json(), { received: 2, added: 0 });
    assert.deepEqual(await (await post(JSON.stringify({ events: [ev('e2', 'member_added', 'r1'), ev('e3', 'room_occupied', 'r2')] }))).json(), { received: 2, added: 1 });
    assert.deepEqual((await app.events()).map((e) => e.id), ['e1', 'e2', 'e3']);
    assert.deepEqual((await app.events('r1')).map((e) => e.type), ['room_occupied', 'member_added']);
    assert.equal((await post(batch1, sign('another-secret-another-secret-0000', batch1))).status, 401);
    assert.equal((await post(batch1, 'sha256=')).status, 401);
    assert.equal((await post('{"events":')).status, 400);
    assert.equal((await post('{"events":[{"type":"member_added"}]}')).status, 400, 'an event without an id');
    // a restart over the same data directory still knows the ids
    const dataDir = app.dataDir;
    app.proc.kill('SIGTERM');
    await new Promise((r) => app.proc.on('exit', r));
    again = await startExampleApp({ secret: SECRET, args: ['--data-dir', dataDir] });
    const res2 = await fetch(`${again.url}/hooks/events`, {
      method: 'POST', headers: { 'x-gateway-signature': sign(SECRET, batch1) }, body: batch1,
    });
    assert.deepEqual(await res2.json(), { received: 2, added: 0 });
    assert.deepEqual((await again.events()).map((e) => e.id), ['e1', 'e2', 'e3']);
  } finally {
    await again?.stop();
    await app.stop();
  }
});

test('the example application behind both hooks of two gateways: a user with tabs on both is logged as one member_added and one member_removed, the room occupied and vacated around them, its message stored', async () => {
  const env = {
    ...hookEnv(`${example.url}/hooks/publish`),
    GATEWAY_HOOKS_EVENTS_URL: `${example.url}/hooks/events`,
    GATEWAY_HOOKS_EVENTS_INTERVAL_MS: '50',
  };
  const g1 = await startGateway({ redisPort: redis.port, prefix: PREFIX, name: 'example-both-1', env });
  const g2 = await startGateway({ redisPort: redis.port, prefix: PREFIX, name: 'example-both-2', env });
  try {
    createRoom(redis, PREFIX, 'market');
    const viewer = await joined(g1, undefined, ['rooms:market']);
    const tab1 = await joined(g1, 'zoe', ['rooms:market']);
    const tab2 = await joined(g2, 'zoe', ['rooms:market']);
    tab2.send(['j0', 'm1', 'rooms:market', 'new_msg', { body: 'two tabs, one member' }]);
    assert.equal((await tab2.reply('m1'))[4].status, 'ok');
    const types = async () => (await example.events('market')).sort((a, b) => a.seq - b.seq)
      .map((e) => (e.user ? `${e.type}:${e.user.id}` : e.type));
    await waitFor(async () => (await types()).length >= 2, 5000, 'the occupied and added events');
    tab1.close();
    await sleep(300);
    assert.deepEqual(await types(), ['room_occupied', 'member_added:zoe'], 'one tab left: zoe is still a member');
    tab2.close();
    await waitFor(async () => (await types()).length >= 3, 5000, 'member_removed');
    viewer.close();
    await waitFor(async () => (await types()).length >= 4, 5000, 'room_vacated');
    await sleep(300);
    assert.deepEqual(await types(), ['room_occupied', 'member_added:zoe', 'member_removed:zoe', 'room_vacated']);
    const events = await example.events('market');
    assert.equal(new Set(events.map((e) => e.id)).size, events.length, 'ids are unique');
    assert.deepEqual((await example.messages('market')).map((m) => m.body), ['two tabs, one member']);
    assert.equal(example.stderr(), '');
  } finally {
    await Promise.all([g1.stop(), g2.stop()]);
  }
});
