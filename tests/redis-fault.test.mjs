// Redis unavailable, then back without this node's presence (a restart from an older snapshot): open
// sockets stay open, joins and pushes get an error reply instead of hanging, readiness turns red; when
// Redis returns the node re-subscribes, re-asserts its presence and turns ready again. Redis back
// empty (no persistence): the rooms are gone, so their channels close and nothing of them is
// written back.
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { once } from 'node:events';
import { createRoom, freePort, hs256, rawConnect, sleep, startGateway, startRedis, teardown, test, waitFor } from './lib/harness.mjs';

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

const restartRedis = (args = []) => {
  restarted = spawn('redis-server', ['--port', String(redis.port), '--save', '', '--appendonly', 'no', '--bind', '127.0.0.1', ...args], { stdio: 'ignore' });
  return waitFor(() => { try { return redis.cli('PING') === 'PONG'; } catch { return false; } }, 5000, 'redis back');
};

/** A second redis-server on a free port that loads the snapshot in `dir` (and writes nothing). */
async function startRedisFromSnapshot(dir) {
  const port = await freePort();
  const proc = spawn('redis-server', ['--port', String(port), '--save', '', '--appendonly', 'no', '--bind', '127.0.0.1', '--dir', dir], { stdio: 'ignore' });
  const cli = (...args) => execFileSync('redis-cli', ['-p', String(port), '--raw', ...args], { encoding: 'utf8' }).trim();
  await waitFor(() => { try { return cli('PING') === 'PONG'; } catch { return false; } }, 5000, 'snapshot redis');
  return { cli, stop: async () => { proc.kill('SIGKILL'); await once(proc, 'exit'); } };
}

test('Redis down: sockets stay, joins and pushes fail fast; Redis back without our presence: presence re-asserted, ready again', { timeout: 60000 }, async (t) => {
  createRoom(redis, 'flt', 'hall');
  // the snapshot Redis comes back from: the room record, none of the presence written below
  redis.cli('SAVE');
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
  // an anonymous viewer may still join the warm room to watch (no Redis read needed) ...
  const late = await rawConnect(`${gw.publicUrl}/websocket?vsn=2.0.0`);
  assert.equal((await late.join('rooms:hall', '1'))[4].status, 'ok');
  // heartbeats still work and nobody was disconnected
  user.send([null, '3', 'phoenix', 'heartbeat', {}]);
  assert.equal((await user.reply('3'))[4].status, 'ok');
  assert.equal(user.closeInfo, null);
  assert.equal(anon.closeInfo, null);

  // the snapshot holds the room and none of our presence (read on another port: once Redis is back
  // on its own port the gateway may re-assert its presence before a check could look)
  const peek = await startRedisFromSnapshot(redis.dir);
  try {
    assert.equal(peek.cli('EXISTS', 'flt:room:{hall}'), '1');
    assert.equal(peek.cli('EXISTS', 'flt:room:{hall}:presence'), '0');
  } finally {
    await peek.stop();
  }
  // Redis comes back on the same port from that snapshot
  await restartRedis(['--dir', redis.dir]);
  t0 = Date.now();
  await waitFor(async () => (await ready()) === 200, 10000, 'readiness to turn green again');
  // the node re-asserts its presence (sync): the user's meta and the anonymous count
  await waitFor(() => redis.lines('HKEYS', 'flt:room:{hall}:presence').some((k) => k.startsWith(`${gw.node}.`))
    // ... and is counted once Redis is back: the two anonymous viewers
    && redis.cli('HGET', 'flt:room:{hall}:anon', gw.node) === '2'
    && redis.cli('ZSCORE', 'flt:room:{hall}:nodes', gw.node) !== '', 10000, 'presence re-asserted');
  t.diagnostic(`ready and presence re-asserted ${Date.now() - t0} ms after Redis returned`);

  // messages flow again
  await waitFor(async () => {
    const ref = String(Math.floor(Math.random() * 1e9));
    user.send(['1', ref, 'rooms:hall', 'new_msg', { body: 'back' }]);
    return (await user.reply(ref, 3000))[4].status === 'ok';
  }, 10000, 'pushes to work again');
  await anon.next((f) => f[3] === 'new_msg' && f[4].body === 'back', 5000);
  await sleep(100);
  assert.equal(user.closeInfo, null);
});

test('Redis back empty: the room is gone, its channels close and nothing of it is written back', { timeout: 60000 }, async () => {
  restarted?.kill('SIGKILL');
  await waitFor(() => { try { redis.cli('PING'); return false; } catch { return true; } }, 5000, 'previous redis gone');
  await restartRedis();
  await waitFor(async () => (await ready()) === 200, 10000, 'ready');
  createRoom(redis, 'flt', 'gone');
  const token = hs256({ sub: '6', username: 'six', exp: Math.floor(Date.now() / 1000) + 600 });
  const user = await rawConnect(`${gw.publicUrl}/websocket?vsn=2.0.0&token=${token}`);
  const anon = await rawConnect(`${gw.publicUrl}/websocket?vsn=2.0.0`);
  assert.equal((await user.join('rooms:gone', '7'))[4].status, 'ok');
  assert.equal((await anon.join('rooms:gone', '8'))[4].status, 'ok');
  await waitFor(() => redis.cli('HGET', 'flt:room:{gone}:anon', gw.node) === '1', 5000, 'anonymous count written');

  restarted.kill('SIGKILL');
  await waitFor(async () => (await ready()) === 503, 5000, 'readiness to turn red');
  await restartRedis();
  // the node finds the room record gone (sync, heartbeat or snapshot): as if it had been deleted
  await user.next((f) => f[3] === 'phx_close' && f[2] === 'rooms:gone', 10000);
  await anon.next((f) => f[3] === 'phx_close' && f[2] === 'rooms:gone', 5000);
  await waitFor(async () => (await ready()) === 200, 10000, 'ready again');
  // several heartbeats later, no key of the room exists: nothing was written back into it
  await sleep(1500);
  assert.deepEqual(redis.scanAll('flt:room:{gone}*'), []);
  // and the room stays gone for joins
  const again = await user.join('rooms:gone', '9');
  assert.deepEqual(again[4], { status: 'error', response: { reason: 'Room does not exist' } });
  assert.equal(user.closeInfo, null);
});
