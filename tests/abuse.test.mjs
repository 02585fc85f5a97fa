// Regression tests for the abuse defects of issue 18 (DESIGN §14): replies queued before a close
// the gateway starts go out first, joins are rate limited, refs are bounded, token expiry does not
// wait on a paused Redis, an old Redis is refused at start, and a drain reaches sockets that finish
// upgrading late. Real redis-server, real gateway processes, raw sockets.
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { createRoom, hs256, rawConnect, sleep, startGateway, startRedis, teardown, test, waitFor, WebSocket } from './lib/harness.mjs';
import { commandCalls } from './lib/presence.mjs';
import { clientFrame, wireConnect } from './lib/wire.mjs';

let redis;
let gw;
const extra = [];
before(async () => {
  redis = await startRedis();
  gw = await startGateway({ redisPort: redis.port, prefix: 'ab', env: { GATEWAY_AUTH_LEEWAY_S: '1' } });
  createRoom(redis, 'ab', 'hall');
});
after(async () => {
  try { redis?.cli('CLIENT', 'UNPAUSE'); } catch { /* gone */ }
  await teardown({ gateways: [gw, ...extra], redis });
});

const nowS = () => Math.floor(Date.now() / 1000);
const tok = (sub, ttlS = 600) => hs256({ sub, username: `user-${sub}`, exp: nowS() + ttlS });
const url = (g, token) => `${g.publicUrl}/websocket?vsn=2.0.0${token ? `&token=${token}` : ''}`;
const metric = async (g, re) => {
  const m = re.exec(await (await fetch(`${g.adminUrl}/metrics`)).text());
  return m ? Number(m[1]) : NaN;
};

test('the refused join that crosses the limit gets its reply before the 4009 close', { timeout: 30000 }, async () => {
  const s = await wireConnect(url(gw));
  // invalid topics are refused before the join bucket, so 31 of them in one write reach the limit
  const frames = [];
  for (let i = 1; i <= 31; i++) frames.push(clientFrame(1, [String(i), String(i), `rooms:bad id ${i}`, 'phx_join', {}]));
  s.write(Buffer.concat(frames));
  const closeFrame = await s.close;
  assert.equal(closeFrame?.code, 4009);
  const replies = s.texts().filter((f) => f[3] === 'phx_reply');
  assert.equal(replies.length, 31, `every refused join is answered, the 31st included: ${JSON.stringify(replies.map((r) => r[1]))}`);
  assert.deepEqual(replies[30], ['31', '31', 'rooms:bad id 31', 'phx_reply', { status: 'error', response: { reason: 'invalid room id' } }]);
  const last = s.frames.findIndex((f) => f.opcode === 8);
  assert.ok(s.frames.slice(0, last).filter((f) => f.opcode === 1).length === 31, 'the replies come before the close frame');
  s.destroy();
});

test('a heartbeat and a malformed frame in one write: the heartbeat is answered, then 1007', { timeout: 30000 }, async () => {
  const s = await wireConnect(url(gw));
  s.write(Buffer.concat([
    clientFrame(1, [null, 'hb1', 'phoenix', 'heartbeat', {}]),
    clientFrame(1, 'this is not a phoenix frame'),
  ]));
  const closeFrame = await s.close;
  assert.equal(closeFrame?.code, 1007);
  assert.deepEqual(s.texts(), [[null, 'hb1', 'phoenix', 'phx_reply', { status: 'ok', response: {} }]]);
  s.destroy();
});

test('refs longer than 64 bytes are malformed (1007): a reply never echoes an unbounded ref', { timeout: 30000 }, async () => {
  const ok = await rawConnect(url(gw));
  const r64 = 'r'.repeat(64);
  ok.send([null, r64, 'phoenix', 'heartbeat', {}]);
  assert.equal((await ok.reply(r64))[4].status, 'ok');
  ok.send([null, `${r64}x`, 'phoenix', 'heartbeat', {}]);
  assert.equal((await ok.closed).code, 1007);
  const jr = await rawConnect(url(gw));
  jr.send(['j'.repeat(4096), '1', 'rooms:hall', 'phx_join', {}]);
  assert.equal((await jr.closed).code, 1007);
  assert.ok(!jr.frames.some((f) => f[3] === 'phx_reply'), 'the join was not acted upon');
});

test('joins are rate limited per socket: "rate limited", nothing written, the channel kept, leaves honoured', { timeout: 30000 }, async () => {
  const s = await rawConnect(url(gw, tok('joiner')));
  const watcher = await rawConnect(url(gw));
  assert.equal((await watcher.join('rooms:hall', 'w'))[4].status, 'ok');
  assert.equal((await s.join('rooms:hall', '1'))[4].status, 'ok');
  await sleep(300);
  const before = commandCalls(redis);
  // 100 re-joins of the joined topic at once (the burst is 30, one token already spent)
  for (let i = 0; i < 100; i++) s.send([`j${i}`, `j${i}`, 'rooms:hall', 'phx_join', {}]);
  const replies = [];
  for (let i = 0; i < 100; i++) replies.push((await s.reply(`j${i}`, 5000))[4]);
  const ok = replies.filter((r) => r.status === 'ok').length;
  const limited = replies.filter((r) => r.status === 'error' && r.response.reason === 'rate limited').length;
  assert.equal(ok + limited, 100, JSON.stringify(replies.filter((r) => r.status === 'error' && r.response.reason !== 'rate limited')));
  assert.ok(ok >= 29 && ok <= 33, `29 tokens left in the burst (+ a refill), got ${ok} ok`);
  await sleep(300);
  const afterCalls = commandCalls(redis);
  const evals = (afterCalls.evalsha ?? 0) - (before.evalsha ?? 0);
  // a re-join is a leave and a join: two script calls each, none for a rate-limited one
  assert.ok(evals <= 2 * ok + 4, `${evals} EVALSHA for ${ok} accepted re-joins (limited ones must write nothing)`);
  assert.equal(s.closeInfo, null, 'rate-limited joins are not refused joins: no 4009');
  // the channel is the last accepted join's: its pushes are answered, and it has one presence entry
  const lastOk = replies.map((r, i) => (r.status === 'ok' ? i : -1)).filter((i) => i >= 0).pop();
  s.send([`j${lastOk}`, 'p1', 'rooms:hall', 'new_msg', { body: 'still joined' }]);
  assert.equal((await s.reply('p1'))[4].status, 'ok');
  await watcher.next((f) => f[3] === 'new_msg' && f[4].body === 'still joined', 3000);
  const users = redis.lines('HVALS', 'ab:room:{hall}:presence').map((m) => JSON.parse(m).user_id);
  assert.deepEqual(users, ['joiner']);
  assert.ok(await metric(gw, /gateway_joins_total\{result="rate_limited"\} (\d+)/) >= limited);
  // a leave is honoured with an empty bucket
  s.send([`j${lastOk}`, 'bye', 'rooms:hall', 'phx_leave', {}]);
  assert.equal((await s.reply('bye'))[4].status, 'ok');
  await waitFor(() => redis.cli('HLEN', 'ab:room:{hall}:presence') === '0', 3000, 'presence left');
  // and the bucket refills
  await sleep(1100);
  assert.equal((await s.join('rooms:hall', 'again'))[4].status, 'ok');
});

test('token expiry closes sockets with 4001 on time while Redis is paused', { timeout: 60000 }, async () => {
  createRoom(redis, 'ab', 'exp');
  const exp = nowS() + 3;
  // channels signed in with their own short tokens: their leaves wait on Redis
  const holder = await rawConnect(url(gw));
  for (let i = 0; i < 4; i++) {
    holder.send([`g${i}`, `g${i}`, 'rooms:exp', 'phx_join', { guardian_token: hs256({ sub: `ch${i}`, username: 'c', exp }) }]);
    if (i === 0) assert.equal((await holder.reply('g0'))[4].status, 'ok');
  }
  const sockets = [];
  for (let i = 0; i < 4; i++) {
    const s = await rawConnect(url(gw, hs256({ sub: `sock${i}`, username: 's', exp })));
    assert.equal((await s.join('rooms:exp', '1'))[4].status, 'ok');
    sockets.push(s);
  }
  // pause every write (scripts included) from just before the deadlines until well after them
  const pauseAt = exp * 1000 - 300;
  await sleep(Math.max(0, pauseAt - Date.now()));
  redis.cli('CLIENT', 'PAUSE', '5000', 'WRITE');
  try {
    const closes = await Promise.all(sockets.map((s) => s.closed));
    for (const c of closes) {
      assert.equal(c.code, 4001);
      const late = c.at - exp * 1000;
      assert.ok(late <= 1000 + 1000 + 300, `closed ${late} ms after exp (leeway 1 s) with Redis paused`);
    }
  } finally {
    redis.cli('CLIENT', 'UNPAUSE');
  }
  await waitFor(() => redis.cli('HLEN', 'ab:room:{exp}:presence') === '0', 10000, 'presence left once Redis is back');
});

test('a Redis older than 7.0 is refused at start with a clear error', { timeout: 30000 }, async () => {
  // a real Redis behind a proxy that reports it as 6.2 (the same length, so RESP stays valid)
  const proxy = net.createServer((client) => {
    const upstream = net.connect(redis.port, '127.0.0.1');
    client.on('data', (d) => upstream.write(d));
    upstream.on('data', (d) => client.write(Buffer.from(d.toString('latin1').replace(/redis_version:7\.0\.(\d\d)/, 'redis_version:6.2.$1'), 'latin1')));
    const end = () => { client.destroy(); upstream.destroy(); };
    client.on('error', end); upstream.on('error', end); client.on('close', end); upstream.on('close', end);
  });
  await new Promise((r) => proxy.listen(0, '127.0.0.1', r));
  try {
    const version = /redis_version:(\S+)/.exec(redis.cli('INFO', 'server'))[1];
    assert.match(version, /^7\.0\.\d\d$/, 'this test rewrites a 7.0.x version with two patch digits');
    await assert.rejects(
      startGateway({ redisPort: proxy.address().port, prefix: 'old' }),
      (e) => /Redis 6\.2\.\d+ at .* is too old: the gateway needs Redis >= 7\.0/.test(e.message),
    );
    // the same Redis without the proxy is accepted
    const ok = await startGateway({ redisPort: redis.port, prefix: 'old' });
    extra.push(ok);
  } finally {
    proxy.close();
  }
});

test('SIGTERM: every socket the gateway accepted gets 1012, those still upgrading included', { timeout: 60000 }, async () => {
  // one worker thread, busy with a burst of upgrades while the drain (on the main thread) runs:
  // sockets whose 101 went out before the drain began register their sessions after it looked
  const g = await startGateway({
    redisPort: redis.port,
    prefix: 'ab',
    env: { GATEWAY_SERVER_SHUTDOWN_TIMEOUT_MS: '4000', GATEWAY_SERVER_WORKER_THREADS: '1' },
  });
  extra.push(g);
  const codes = [];
  let upgraded = 0;
  const all = Array.from({ length: 1500 }, () => new Promise((resolve) => {
    const ws = new WebSocket(url(g));
    let open = false;
    ws.on('upgrade', () => { open = true; upgraded += 1; });
    ws.on('close', (code) => { if (open) codes.push(code); resolve(); });
    ws.on('error', () => resolve());
  }));
  await waitFor(() => upgraded >= 300, 20000, '300 sockets upgraded', 1);
  g.proc.kill('SIGTERM');
  await g.exited;
  await Promise.race([Promise.all(all), sleep(5000)]);
  const byCode = {};
  for (const c of codes) byCode[c] = (byCode[c] ?? 0) + 1;
  assert.ok(codes.length >= 300);
  assert.deepEqual(Object.keys(byCode), ['1012'], `close codes of ${codes.length} accepted sockets: ${JSON.stringify(byCode)}`);
});
