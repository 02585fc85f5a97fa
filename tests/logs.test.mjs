// Logs a pipeline can read: with log.format = "json" (GATEWAY_LOG_FORMAT) every line a gateway
// writes on stderr, through a start, signed-in, anonymous and refused joins, a refused token and a
// SIGTERM drain, at debug level (the dependencies' events included), is one JSON object with a
// timestamp, level, target and fields.message, and no secret or token in it. The default stays
// human-readable text.
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { DEFAULT_SECRET, connect, createRoom, hs256, join, push, startGateway, startRedis, teardown, test } from './lib/harness.mjs';

let redis;
const gws = [];
before(async () => {
  redis = await startRedis();
  createRoom(redis, 'logs', 'lobby');
});
after(async () => { await teardown({ gateways: gws, redis }); });

const LEVELS = ['TRACE', 'DEBUG', 'INFO', 'WARN', 'ERROR'];

test('log.format = "json": every stderr line from start to drain is a JSON object with the required keys', { timeout: 60000 }, async () => {
  const g = await startGateway({
    redisPort: redis.port,
    prefix: 'logs',
    name: 'json',
    env: { GATEWAY_LOG_FORMAT: 'json', GATEWAY_LOG_LEVEL: 'debug', GATEWAY_SERVER_DRAIN_GRACE_MS: '100' },
  });
  gws.push(g);
  const token = hs256('7');
  const user = await connect(g.publicUrl, { token });
  const anon = await connect(g.publicUrl);
  const forged = await connect(g.publicUrl, { token: hs256('8', 'not-the-gateways-secret-0123456789abcdef') });
  const uc = user.channel('rooms:lobby', {});
  assert.equal((await join(uc)).status, 'ok');
  assert.equal((await join(anon.channel('rooms:lobby', {}))).status, 'ok');
  assert.equal((await join(forged.channel('rooms:lobby', {}))).status, 'ok');
  assert.equal((await join(anon.channel('rooms:missing', {}))).status, 'error');
  assert.equal((await push(uc, 'new_msg', { body: 'hello' })).status, 'ok');
  const exit = await g.stop(15000);
  assert.equal(exit.code, 0, JSON.stringify(exit));

  const lines = g.stderr().split('\n').filter((l) => l !== '');
  assert.ok(lines.length >= 5, `a start, joins and a drain log something:\n${g.stderr()}`);
  const bad = [];
  const events = [];
  for (const line of lines) {
    let e;
    try { e = JSON.parse(line); } catch { bad.push(`not JSON: ${line}`); continue; }
    if (typeof e !== 'object' || e === null || Array.isArray(e)) { bad.push(`not an object: ${line}`); continue; }
    if (typeof e.timestamp !== 'string' || !/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/.test(e.timestamp) || Number.isNaN(Date.parse(e.timestamp))) bad.push(`timestamp: ${line}`);
    if (!LEVELS.includes(e.level)) bad.push(`level: ${line}`);
    if (typeof e.target !== 'string' || !e.target) bad.push(`target: ${line}`);
    if (typeof e.fields !== 'object' || e.fields === null) bad.push(`fields: ${line}`);
    else if (typeof e.fields.message !== 'string') bad.push(`fields.message: ${line}`);
    events.push(e);
  }
  assert.deepEqual(bad, [], bad.join('\n'));
  // the lifecycle is there, with its fields as JSON fields
  const find = (msg) => events.find((e) => e.fields?.message === msg);
  const listening = find('gateway listening');
  assert.ok(listening, 'the start is logged');
  assert.equal(listening.fields.node, g.node);
  assert.equal(listening.target, 'gateway');
  assert.ok(find('SIGTERM: draining'), 'the drain is logged');
  const drained = find('drained');
  assert.ok(drained && typeof drained.fields.took_ms === 'number', 'numbers stay numbers');
  assert.ok(events.some((e) => e.level === 'DEBUG'), 'the level setting applies');
  // nothing secret: not the HS256 secret, not a token
  const all = g.stderr();
  assert.ok(!all.includes(DEFAULT_SECRET), 'the HS256 secret is never logged');
  assert.ok(!all.includes(token.split('.')[2]), 'tokens are never logged');
  user.disconnect();
  anon.disconnect();
  forged.disconnect();
});

test('the default log format is human-readable text', async () => {
  const g = await startGateway({ redisPort: redis.port, prefix: 'logs', name: 'text' });
  gws.push(g);
  await g.stop();
  const lines = g.stderr().split('\n').filter((l) => l !== '');
  const start = lines.find((l) => l.includes('gateway listening'));
  assert.ok(start, g.stderr());
  assert.match(start, /^\d{4}-\d\d-\d\dT[\d:.]+Z\s+INFO gateway: gateway listening node=/);
});
