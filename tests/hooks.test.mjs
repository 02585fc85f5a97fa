// The publish hook (DESIGN §12): a node http server plays the application. It checks every
// request's x-gateway-signature and answers as the pushed body tells it ("ack", "refuse:<why>",
// "replace:<body>", "sleep:<ms>:<text>", "status:<code>", "notjson", anything else: broadcast).
// Real redis, real gateways, raw sockets (exact frames and their order matter here).
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import http from 'node:http';
import {
  createRoom, hs256, rawConnect, sleep, startGateway, startRedis, teardown, test, waitFor,
} from './lib/harness.mjs';

const PREFIX = 'hk';
const SECRET = 'hook-secret-for-the-e2e-tests-0123456789';
const TIMEOUT_MS = 1000;

/**
 * The application: records each request ({body, sigOk, at}), answers by the push's body.
 * `mode = 'hang'` makes it never answer; `stop()` closes it and every kept-alive connection.
 */
async function application() {
  const app = { requests: [], mode: 'normal', hanging: [] };
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
      const json = (o, status = 200) => {
        res.writeHead(status, { 'content-type': 'application/json' });
        res.end(JSON.stringify(o));
      };
      const [cmd, arg, rest] = text.split(':');
      if (cmd === 'sleep') {
        await sleep(Number(arg));
        return json({ result: 'broadcast', ...(rest ? { body: rest } : {}) });
      }
      if (cmd === 'ack') return json({ result: 'ack' });
      if (cmd === 'refuse') return json({ result: 'refuse', reason: arg === 'long' ? 'x'.repeat(300) : arg });
      if (cmd === 'replace') return json({ result: 'broadcast', body: arg === 'empty' ? '' : arg });
      if (cmd === 'status') return json({ result: 'broadcast' }, Number(arg));
      if (cmd === 'notjson') {
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
before(async () => {
  redis = await startRedis();
  appSrv = await application();
  gw = await startGateway({ redisPort: redis.port, prefix: PREFIX, env: hookEnv(appSrv.url) });
  for (const r of ['hall', 'side', 'third']) createRoom(redis, PREFIX, r);
});
after(async () => {
  await teardown({ gateways: [gw], redis });
  await appSrv.stop();
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

test('the request: signed, JSON, room id, sender, conn and node; broadcast and a replaced body reach the room', async () => {
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

  // the application's body replaces the client's
  a.send(['j0', 'p2', 'rooms:hall', 'new_msg', { body: 'replace:cleaned' }]);
  assert.equal((await a.reply('p2'))[4].status, 'ok');
  const r = await watcher.next((x) => x[3] === 'new_msg' && x[4].body === 'cleaned');
  assert.deepEqual(r[4].user, { id: 'ann', username: 'user-ann' });
  // ...under the same body rules: an empty new_msg body is refused
  a.send(['j0', 'p3', 'rooms:hall', 'new_msg', { body: 'replace:empty' }]);
  assert.deepEqual((await a.reply('p3'))[4], { status: 'error', response: { reason: 'invalid payload' } });

  // an anonymous push of an anonymous event: user null
  const anon = await joined(gw, null, ['rooms:hall']);
  anon.send(['j0', 'r1', 'rooms:hall', 'reaction', { body: '👍' }]);
  assert.equal((await anon.reply('r1'))[4].status, 'ok');
  await watcher.next((x) => x[3] === 'reaction' && x[4].body === '👍');
  assert.equal(appSrv.requests.at(-1).body.user, null);
  assert.ok(appSrv.requests.every((q) => q.sigOk));
  await sleep(150);
  assert.ok(!watcher.frames.some((x) => x[3] === 'new_msg' && ['replace:cleaned', 'replace:empty', ''].includes(x[4].body)));
});

test('ack: ok, nothing broadcast or stored; refuse: the reason (cut to 200), nothing broadcast', async () => {
  const a = await joined(gw, 'bob', ['rooms:side']);
  const watcher = await joined(gw, 'wat2', ['rooms:side']);
  const streamLen = () => Number(redis.cli('XLEN', `${PREFIX}:room:{side}:history`) || 0);
  const stored = streamLen();
  a.send(['j0', 'a1', 'rooms:side', 'new_msg', { body: 'ack:quiet' }]);
  assert.deepEqual((await a.reply('a1'))[4], { status: 'ok', response: {} });
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
