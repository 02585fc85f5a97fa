// Redis unavailable, then back empty (a restart without persistence): open sockets stay open, joins
// and pushes get an error reply instead of hanging, readiness turns red; when Redis returns the node
// re-subscribes, re-asserts its presence and turns ready again.
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createRoom, hs256, rawConnect, sleep, startGateway, startRedis, teardown, test, waitFor } from './lib/harness.mjs';

let redis;
let gw;
let restarted;

before(async () => {
  redis = await startRedis();
  gw = await startGateway({
    redisPort: redis.port,
    prefix: 'flt',
    env: { GATEWAY_PRESENCE_TTL_MS: '3000', GATEWAY_PRESENCE_HEARTBEAT_INTERVAL_MS: '500', GATEWAY_REDIS_COMMAND_TIMEOUT_MS: '1000' },
  });
});
after(async () => {
  restarted?.kill('SIGKILL');
  await teardown({ gateways: [gw], redis });
});

const ready = async () => (await fetch(`${gw.adminUrl}/health/ready`)).status;

test('Redis down: sockets stay, joins and pushes fail fast; Redis back empty: presence re-asserted, ready again', { timeout: 60000 }, async (t) => {
  createRoom(redis, 'flt', 'hall');
  const token = hs256({ sub: '5', username: 'five', exp: Math.floor(Date.now() / 1000) + 600 });
  const user = await rawConnect(`${gw.publicUrl}/websocket?vsn=2.0.0&token=${token}`);
  const anon = await rawConnect(`${gw.publicUrl}/websocket?vsn=2.0.0`);
  assert.equal((await user.join('rooms:hall', '1'))[4].status, 'ok');
  assert.equal((await anon.join('rooms:hall', '1'))[4].status, 'ok');
  await waitFor(() => redis.cli('HGET', 'flt:room:{hall}:anon', gw.node) === '1', 5000, 'anonymous count written');
  assert.equal(await ready(), 200);

  redis.kill();
  await waitFor(async () => (await ready()) === 503, 5000, 'readiness to turn red');

  // a push and a cold join answer with an error within the command deadline, not a hang
  let t0 = Date.now();
  user.send(['1', '2', 'rooms:hall', 'new_msg', { body: 'anyone?' }]);
  const pushReply = await user.reply('2', 5000);
  assert.equal(pushReply[4].status, 'error');
  t.diagnostic(`push answered after ${Date.now() - t0} ms: ${JSON.stringify(pushReply[4])}`);
  t0 = Date.now();
  const other = await rawConnect(`${gw.publicUrl}/websocket?vsn=2.0.0&token=${token}`);
  const coldJoin = await other.join('rooms:elsewhere', '1');
  assert.deepEqual(coldJoin[4], { status: 'error', response: { reason: 'presence unavailable' } });
  assert.ok(Date.now() - t0 < 3000, `join answered after ${Date.now() - t0} ms`);
  // heartbeats still work and nobody was disconnected
  user.send([null, '3', 'phoenix', 'heartbeat', {}]);
  assert.equal((await user.reply('3'))[4].status, 'ok');
  assert.equal(user.closeInfo, null);
  assert.equal(anon.closeInfo, null);

  // Redis comes back on the same port, empty
  restarted = spawn('redis-server', ['--port', String(redis.port), '--save', '', '--appendonly', 'no', '--bind', '127.0.0.1'], { stdio: 'ignore' });
  await waitFor(() => { try { return redis.cli('PING') === 'PONG'; } catch { return false; } }, 5000, 'redis back');
  t0 = Date.now();
  await waitFor(async () => (await ready()) === 200, 10000, 'readiness to turn green again');
  // the node re-asserts its presence (sync) into the empty Redis: the user's meta and the anonymous count
  await waitFor(() => redis.lines('HKEYS', 'flt:room:{hall}:presence').some((k) => k.startsWith(`${gw.node}.`))
    && redis.cli('HGET', 'flt:room:{hall}:anon', gw.node) === '1'
    && redis.cli('ZSCORE', 'flt:room:{hall}:nodes', gw.node) !== '', 10000, 'presence re-asserted');
  t.diagnostic(`ready and presence re-asserted ${Date.now() - t0} ms after Redis returned`);

  // the room record was lost with the restart; once re-created, messages flow again
  createRoom(redis, 'flt', 'hall');
  await waitFor(async () => {
    const ref = String(Math.floor(Math.random() * 1e9));
    user.send(['1', ref, 'rooms:hall', 'new_msg', { body: 'back' }]);
    return (await user.reply(ref, 3000))[4].status === 'ok';
  }, 10000, 'pushes to work again');
  await anon.next((f) => f[3] === 'new_msg' && f[4].body === 'back', 5000);
  await sleep(100);
  assert.equal(user.closeInfo, null);
});
