// The events hook (DESIGN §12): member_added / member_removed / room_occupied / room_vacated,
// each reported exactly once across nodes by the node whose script call made the change. A node
// http server plays the application: it checks every request's x-gateway-signature, records the
// batches, and can be told to answer 500 to the next requests of one room. Real redis, three real
// gateways (a fourth SIGKILLed, a fifth SIGKILLed while its own application is down — its events
// reach the application through the room's outbox and a survivor — a sixth drained with SIGTERM),
// raw sockets.
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import http from 'node:http';
import {
  anonymous, claims, createRoom, hs256, member, rawConnect, sleep, startGateway, startRedis,
  teardown, test, waitFor, wsUrl,
} from './lib/harness.mjs';

const PREFIX = 'ev';
const SECRET = 'events-hook-secret-for-the-e2e-tests-0123';
const ADMIN_TOKEN = 'admin-token-events-tests';
const TTL = 1500;
const HB = 500;

/** The application: every request as {events, sigOk, raw, status}; `fail(room, n)` answers 500 to
 * the next n requests holding an event of `room`. */
async function application() {
  const app = { requests: [], failing: new Map() };
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const raw = Buffer.concat(chunks);
      const want = `sha256=${crypto.createHmac('sha256', SECRET).update(raw).digest('hex')}`;
      let events = null;
      try { events = JSON.parse(raw.toString()).events; } catch { /* recorded as null */ }
      let status = 200;
      for (const room of new Set((events || []).map((e) => e.room))) {
        const n = app.failing.get(room) || 0;
        if (n > 0) {
          app.failing.set(room, n - 1);
          status = 500;
        }
      }
      app.requests.push({
        events, raw: raw.toString(), status, at: Date.now(),
        sigOk: req.headers['x-gateway-signature'] === want,
        contentType: req.headers['content-type'],
        method: req.method,
      });
      res.writeHead(status, { 'content-type': 'text/plain' });
      res.end(status === 200 ? 'ok' : 'try again');
    });
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  app.url = `http://127.0.0.1:${server.address().port}/events`;
  app.fail = (room, n) => app.failing.set(room, n);
  /** Events of `room` the application accepted (2xx), each id once, in seq order. */
  app.events = (room) => {
    const seen = new Map();
    for (const r of app.requests) {
      if (r.status !== 200) continue;
      for (const e of r.events || []) if (e.room === room && !seen.has(e.id)) seen.set(e.id, e);
    }
    return [...seen.values()].sort((a, b) => a.seq - b.seq);
  };
  /** Every copy of `room`'s events the application was sent, retries included. */
  app.copies = (room) => app.requests.flatMap((r) => (r.events || []).filter((e) => e.room === room));
  app.stop = () => new Promise((r) => { server.close(r); server.closeAllConnections(); });
  return app;
}

const short = (e) => (e.user ? `${e.type}:${e.user.id}` : e.type);
const metric = async (g, name, labels) => {
  const text = await (await fetch(`${g.adminUrl}/metrics`)).text();
  const want = Object.entries(labels).map(([k, v]) => `${k}="${v}"`);
  const line = text.split('\n').find((l) => l.startsWith(`${name}{`) && want.every((w) => l.includes(w)));
  return line ? Number(line.split(' ').pop()) : 0;
};

let redis; let app; let A; let B; let C;
const extra = [];
const env = () => ({
  GATEWAY_HOOKS_EVENTS_URL: app.url,
  GATEWAY_HOOKS_SECRET: SECRET,
  GATEWAY_HOOKS_EVENTS_INTERVAL_MS: '50',
  GATEWAY_HOOKS_TIMEOUT_MS: '1000',
  GATEWAY_PRESENCE_TTL_MS: String(TTL),
  GATEWAY_PRESENCE_HEARTBEAT_INTERVAL_MS: String(HB),
  GATEWAY_AUTH_LEEWAY_S: '1',
  GATEWAY_ADMIN_TOKEN: ADMIN_TOKEN,
});
const gateway = (name) => startGateway({ redisPort: redis.port, prefix: PREFIX, env: env(), name });

before(async () => {
  redis = await startRedis();
  app = await application();
  [A, B, C] = await Promise.all(['eva', 'evb', 'evc'].map(gateway));
});
after(async () => {
  await teardown({ gateways: [A, B, C, ...extra], redis });
  await app?.stop();
});

const room = (id) => {
  createRoom(redis, PREFIX, id);
  return `rooms:${id}`;
};
const until = (what, pred, ms = 8000) => waitFor(pred, ms, what);

test('a user with tabs on two nodes is added once and removed once; the first and last viewer (anonymous included) occupy and vacate the room', async () => {
  const topic = room('tabs');
  const anon = await anonymous(A, topic);
  await until('room_occupied', () => app.events('tabs').length === 1);
  const t1 = await member(A, topic, 'alice', 'Alice');
  const t2 = await member(B, topic, 'alice', 'Alice');
  const t3 = await member(C, topic, 'alice', 'Alice');
  await until('member_added', () => app.events('tabs').length === 2);
  t1.close(); // a closed socket
  t2.send(['1', '9', topic, 'phx_leave', {}]); // a leave
  await t2.reply('9');
  await sleep(500);
  assert.deepEqual(app.events('tabs').map(short), ['room_occupied', 'member_added:alice'], 'no edge while a tab is left');
  t3.terminate(); // the last tab drops
  await until('member_removed', () => app.events('tabs').length === 3);
  anon.close();
  await until('room_vacated', () => app.events('tabs').length === 4);
  await sleep(300);
  const evs = app.events('tabs');
  assert.deepEqual(evs.map(short), ['room_occupied', 'member_added:alice', 'member_removed:alice', 'room_vacated']);
  assert.equal(app.copies('tabs').length, 4, 'each sent once');
  assert.deepEqual(evs[1].user, { id: 'alice', username: 'Alice' });
  assert.ok(!('user' in evs[0]) && !('user' in evs[3]), 'room events have no user');
  for (const e of evs) {
    assert.deepEqual(Object.keys(e).sort(), (e.user ? ['at', 'id', 'room', 'seq', 'type', 'user'] : ['at', 'id', 'room', 'seq', 'type']));
    assert.ok(Math.abs(e.at - Date.now()) < 60000, `at is epoch ms: ${e.at}`);
    assert.equal(e.room, 'tabs');
  }
  for (const r of app.requests) {
    assert.ok(r.sigOk, 'every request is signed with the hook secret');
    assert.equal(r.method, 'POST');
    assert.equal(r.contentType, 'application/json');
  }
});

test('a SIGKILLed node\'s users are reported once, by a survivor, after the TTL; a user with a tab elsewhere stays', { timeout: 30000 }, async () => {
  const K = await gateway('evk');
  extra.push(K);
  const topic = room('crash');
  const watcher = await anonymous(A, topic);
  await member(K, topic, 'bob', 'Bob');
  await member(K, topic, 'carol', 'Carol');
  const carol = await member(A, topic, 'carol', 'Carol');
  await until('joins', () => app.events('crash').length === 3);
  const killed = Date.now();
  await K.kill();
  await until('bob removed', () => app.events('crash').some((e) => short(e) === 'member_removed:bob'), TTL + 4 * HB + 4000);
  const took = Date.now() - killed;
  assert.ok(took >= TTL - 200, `reported after the lease lapsed (${took} ms)`);
  await sleep(3 * HB);
  assert.deepEqual(app.events('crash').map(short), ['room_occupied', 'member_added:bob', 'member_added:carol', 'member_removed:bob']);
  assert.equal(app.copies('crash').length, 4, 'bob\'s removal sent once, by one survivor');
  carol.close();
  watcher.close();
  await until('room_vacated', () => app.events('crash').at(-1)?.type === 'room_vacated');
  assert.deepEqual(app.events('crash').slice(4).map(short), ['member_removed:carol', 'room_vacated']);
});

test('a node SIGKILLed before it could post its events: a survivor posts them after the TTL, with their original ids, once; acknowledged events leave the outbox', { timeout: 40000 }, async () => {
  // the doomed node's events hook is an application that is down (500 to everything): its
  // events are surely unsent when it dies, and only the room's outbox in Redis still has them
  const down = await application();
  down.fail('doom', 1000);
  const K = await startGateway({ redisPort: redis.port, prefix: PREFIX, name: 'evdoom', env: { ...env(), GATEWAY_HOOKS_EVENTS_URL: down.url } });
  extra.push(K);
  try {
    const topic = room('doom');
    await member(K, topic, 'hank', 'Hank');
    const watcher = await anonymous(A, topic);
    await until('the doomed node tried to post', () => down.copies('doom').length >= 2);
    const sent = down.copies('doom');
    assert.deepEqual(sent.map(short), ['room_occupied', 'member_added:hank']);
    assert.equal(app.copies('doom').length, 0, 'nothing reached the application');
    assert.equal(Number(redis.cli('HLEN', `${PREFIX}:room:{doom}:unacked`)), 2, 'both wait in the outbox');
    const killed = Date.now();
    await K.kill();
    await until('hank removed', () => app.events('doom').some((e) => short(e) === 'member_removed:hank'), TTL + 4 * HB + 4000);
    assert.ok(Date.now() - killed >= TTL - 200, 'after the lease lapsed');
    await until('the taken-over events', () => app.events('doom').length === 3);
    const evs = app.events('doom');
    assert.deepEqual(evs.map(short), ['room_occupied', 'member_added:hank', 'member_removed:hank']);
    for (const e of sent) {
      const got = evs.find((x) => x.id === e.id);
      assert.ok(got, `${e.id} posted by a survivor with its original id`);
      assert.deepEqual(got, e, 'byte for byte the event the dead node had');
    }
    watcher.close();
    await until('room_vacated', () => app.events('doom').at(-1)?.type === 'room_vacated');
    await sleep(3 * HB);
    assert.equal(app.copies('doom').length, 4, 'each once');
    await until('the outbox empties (acknowledged)', () => redis.cli('HLEN', `${PREFIX}:room:{doom}:unacked`) === '0');
  } finally {
    await down.stop();
  }
});

test('the application answering 500 twice still gets every event: the same batch, same ids, retried; counters show it', { timeout: 30000 }, async () => {
  const topic = room('retry');
  const before = {
    retried: await metric(B, 'gateway_hook_events_total', { result: 'retried' }),
    sent: await metric(B, 'gateway_hook_events_total', { result: 'sent' }),
    failed: await metric(B, 'gateway_hook_requests_total', { hook: 'events', outcome: 'http_error' }),
  };
  app.fail('retry', 2);
  const t = Date.now();
  await member(B, topic, 'dave', 'Dave');
  await until('delivered after two failures', () => app.events('retry').length === 2, 10000);
  const reqs = app.requests.filter((r) => (r.events || []).some((e) => e.room === 'retry'));
  assert.deepEqual(reqs.map((r) => r.status), [500, 500, 200]);
  assert.equal(new Set(reqs.map((r) => r.raw)).size, 1, 'the same body every time (same ids)');
  assert.ok(reqs[1].at - reqs[0].at >= 900 && reqs[1].at - reqs[0].at <= 1800, `first retry within ~1 s: ${reqs[1].at - reqs[0].at} ms`);
  assert.ok(reqs[2].at - reqs[1].at >= 1800, `then doubling: ${reqs[2].at - reqs[1].at} ms`);
  assert.deepEqual(app.events('retry').map(short), ['room_occupied', 'member_added:dave']);
  assert.ok(Date.now() - t < 8000);
  assert.equal(await metric(B, 'gateway_hook_events_total', { result: 'retried' }) - before.retried, 4, '2 events × 2 retries');
  assert.equal(await metric(B, 'gateway_hook_events_total', { result: 'sent' }) - before.sent, 2);
  assert.equal(await metric(B, 'gateway_hook_requests_total', { hook: 'events', outcome: 'http_error' }) - before.failed, 2);
  assert.ok(await metric(B, 'gateway_hook_requests_total', { hook: 'events', outcome: 'ok' }) >= 1);
});

test('a kick and a token that expires give member_removed', { timeout: 30000 }, async () => {
  const topic = room('mod');
  const nowS = () => Math.floor(Date.now() / 1000);
  const exp = await rawConnect(wsUrl(A, { token: hs256(claims('erin', 'Erin', { exp: nowS() + 2 })) }));
  assert.equal((await exp.join(topic, '1'))[4].status, 'ok');
  await member(A, topic, 'frank', 'Frank');
  await member(B, topic, 'frank', 'Frank');
  await until('joins', () => app.events('mod').length === 3);
  const r = await fetch(`${A.adminUrl}/api/rooms/mod/kick`, {
    method: 'POST',
    headers: { authorization: `Bearer ${ADMIN_TOKEN}`, 'content-type': 'application/json' },
    body: JSON.stringify({ user: 'frank' }),
  });
  assert.equal(r.status, 200, await r.text());
  await until('frank removed', () => app.events('mod').some((e) => short(e) === 'member_removed:frank'));
  await until('erin removed on expiry', () => app.events('mod').some((e) => short(e) === 'member_removed:erin'), 8000);
  await until('room_vacated', () => app.events('mod').at(-1)?.type === 'room_vacated');
  assert.deepEqual(app.events('mod').map(short).sort(),
    ['member_added:erin', 'member_added:frank', 'member_removed:erin', 'member_removed:frank', 'room_occupied', 'room_vacated']);
  assert.equal(app.copies('mod').length, 6);
});

test('a draining node (SIGTERM) reports its users\' removal before it exits', { timeout: 30000 }, async () => {
  const D = await gateway('evd');
  extra.push(D);
  const topic = room('drain');
  await member(D, topic, 'gus', 'Gus');
  await until('gus added', () => app.events('drain').length === 2);
  const exit = await D.stop();
  assert.equal(exit.code, 0, JSON.stringify(exit));
  // recorded before the process was gone: nothing is awaited after the exit
  assert.deepEqual(app.events('drain').map(short), ['room_occupied', 'member_added:gus', 'member_removed:gus', 'room_vacated']);
});
