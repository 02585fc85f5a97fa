// Raw-frame protocol tests: vsn negotiation, join/leave/close, duplicate join,
// frame size limit, malformed frames, unmatched topics.
import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  test, startRedis, startGateway, createRoom, teardown, uid, sleep,
  rawConnect, tryUpgrade, wsUrl, hs256, claims, isBroadcast,
} from './lib/harness.mjs';

const PREFIX = 'pr';
const SMALL_MAX = 4096;
let redis; let gw; let small;

before(async () => {
  redis = await startRedis();
  [gw, small] = await Promise.all([
    startGateway({ redisPort: redis.port, prefix: PREFIX, name: 'default' }),
    startGateway({ redisPort: redis.port, prefix: PREFIX, name: 'small-frames', env: { GATEWAY_SERVER_MAX_FRAME_BYTES: String(SMALL_MAX) } }),
  ]);
});
after(() => teardown({ gateways: [gw, small], redis }));

function newRoom() {
  const id = uid('pr');
  createRoom(redis, PREFIX, id);
  return `rooms:${id}`;
}

test('vsn: missing or anything but 2.0.0 → HTTP 403; 2.0.0 → 101', async () => {
  const base = `${gw.publicUrl}/websocket`;
  for (const q of ['', '?vsn=1.0.0', '?vsn=3.0.0', '?vsn=2.1.0', '?vsn=abc', '?vsn=', '?token=x']) {
    const r = await tryUpgrade(`${base}${q}`);
    assert.equal(r.status, 403, `upgrade ${base}${q} → ${r.status}`);
  }
  const ok = await tryUpgrade(`${base}?vsn=2.0.0`);
  assert.equal(ok.status, 101);
  const ok2 = await tryUpgrade(`${base}?foo=bar&vsn=2.0.0`);
  assert.equal(ok2.status, 101);
});

test('join reply, then presence_state carrying the join_ref', async () => {
  const topic = newRoom();
  const c = await rawConnect(wsUrl(gw));
  c.send(['3', '3', topic, 'phx_join', {}]);
  const rep = await c.reply('3');
  assert.deepEqual(rep, ['3', '3', topic, 'phx_reply', { status: 'ok', response: { auth: 'anonymous' } }]);
  const ps = await c.next((f) => f[2] === topic && f[3] === 'presence_state', 3000, 'presence_state');
  assert.equal(ps[0], '3', `presence_state join_ref: ${JSON.stringify(ps)}`);
  assert.equal(typeof ps[4], 'object');
  assert.ok(c.frames.indexOf(rep) < c.frames.indexOf(ps), `presence_state must come after the join reply: ${JSON.stringify(c.frames)}`);
});

test('phx_leave → ok reply, then phx_close with the join_ref; no more room events afterwards', async () => {
  const topic = newRoom();
  const c = await rawConnect(wsUrl(gw));
  const writer = await rawConnect(wsUrl(gw, { token: hs256('sub-leave') }));
  assert.equal((await c.join(topic, '3'))[4].status, 'ok');
  assert.equal((await writer.join(topic, '1'))[4].status, 'ok');
  c.send(['3', '7', topic, 'phx_leave', {}]);
  const rep = await c.reply('7');
  assert.deepEqual(rep, ['3', '7', topic, 'phx_reply', { status: 'ok', response: {} }]);
  const close = await c.next((f) => f[2] === topic && f[3] === 'phx_close', 3000, 'phx_close');
  assert.equal(close[0], '3', `phx_close join_ref: ${JSON.stringify(close)}`);
  assert.deepEqual(close[4], {});
  assert.ok(c.frames.indexOf(rep) < c.frames.indexOf(close), 'phx_close must follow the leave reply');

  writer.send(['1', '2', topic, 'new_msg', { body: 'after leave' }]);
  assert.equal((await writer.reply('2'))[4].status, 'ok');
  await writer.next(isBroadcast(topic, 'new_msg'), 3000, 'writer gets own message');
  await sleep(400);
  assert.deepEqual(c.frames.filter((f) => f[3] === 'new_msg'), [], 'a left channel still receives room events');
  assert.equal(c.closeInfo, null, 'socket must stay open after phx_leave');
});

test('phx_leave of a topic that is not joined → ok reply', async () => {
  const c = await rawConnect(wsUrl(gw));
  c.send(['9', '9', newRoom(), 'phx_leave', {}]);
  const rep = await c.reply('9');
  assert.equal(rep[4].status, 'ok', JSON.stringify(rep));
});

test('duplicate phx_join: new join answered, old channel gets phx_close with the OLD join_ref, events delivered once', async () => {
  const topic = newRoom();
  const c = await rawConnect(wsUrl(gw, { token: hs256(claims('sub-dup', 'dup')) }));
  assert.equal((await c.join(topic, '3'))[4].status, 'ok');
  c.send(['5', '5', topic, 'phx_join', {}]);
  const rep = await c.reply('5');
  assert.deepEqual(rep, ['5', '5', topic, 'phx_reply', { status: 'ok', response: { auth: 'user', user: { id: 'sub-dup', username: 'dup' } } }]);
  const close = await c.next((f) => f[2] === topic && f[3] === 'phx_close', 3000, 'phx_close of the old channel');
  assert.equal(close[0], '3', `phx_close must carry the OLD join_ref "3": ${JSON.stringify(close)}`);
  // presence_state for the new join carries the new join_ref
  await c.next((f) => f[2] === topic && f[3] === 'presence_state' && f[0] === '5', 3000, 'presence_state for join_ref 5');
  // nothing closes the new channel
  assert.deepEqual(c.frames.filter((f) => f[3] === 'phx_close' && f[0] !== '3'), []);

  // the new channel works and the room event arrives exactly once
  c.send(['5', '6', topic, 'new_msg', { body: 'dup' }]);
  assert.deepEqual(await c.reply('6'), ['5', '6', topic, 'phx_reply', { status: 'ok', response: {} }]);
  await c.next(isBroadcast(topic, 'new_msg'), 3000, 'broadcast');
  await sleep(400);
  assert.equal(c.frames.filter((f) => f[3] === 'new_msg').length, 1, 'duplicate join left two subscriptions: message delivered twice');
});

test('frame larger than the default 65536-byte limit → close 1009; a large frame under it is fine', async () => {
  const c = await rawConnect(wsUrl(gw));
  c.send([null, 'big-ok', 'phoenix', 'heartbeat', { pad: 'x'.repeat(60000) }]);
  assert.equal((await c.reply('big-ok'))[4].status, 'ok');
  c.send([null, 'too-big', 'phoenix', 'heartbeat', { pad: 'x'.repeat(65536 + 100) }]);
  const info = await Promise.race([c.closed, sleep(3000).then(() => null)]);
  assert.ok(info, 'socket not closed after an oversize frame');
  assert.equal(info.code, 1009, `close code ${info.code} ${info.reason}`);
  assert.deepEqual(c.frames.filter((f) => f[1] === 'too-big'), [], 'oversize frame was processed');
});

test('GATEWAY_SERVER_MAX_FRAME_BYTES is honoured (4096) → close 1009', async () => {
  const c = await rawConnect(wsUrl(small));
  c.send([null, 'ok-3000', 'phoenix', 'heartbeat', { pad: 'x'.repeat(3000) }]);
  assert.equal((await c.reply('ok-3000'))[4].status, 'ok');
  c.send([null, 'big-5000', 'phoenix', 'heartbeat', { pad: 'x'.repeat(5000) }]);
  const info = await Promise.race([c.closed, sleep(3000).then(() => null)]);
  assert.ok(info, 'socket not closed after a frame over GATEWAY_SERVER_MAX_FRAME_BYTES');
  assert.equal(info.code, 1009, `close code ${info.code} ${info.reason}`);
});

test('malformed frames → close 1007', async () => {
  const cases = [
    'not json at all',
    '{"topic":"phoenix","event":"heartbeat"}',
    '[null,"1","phoenix","heartbeat"]',
    '[1,2,3]',
    '"just a string"',
    '[null,"1","phoenix","heartbeat",{}',
  ];
  for (const text of cases) {
    const c = await rawConnect(wsUrl(gw));
    c.send(text);
    const info = await Promise.race([c.closed, sleep(3000).then(() => null)]);
    assert.ok(info, `socket not closed after malformed frame ${JSON.stringify(text)}; frames: ${JSON.stringify(c.frames)}`);
    assert.equal(info.code, 1007, `frame ${JSON.stringify(text)} → close ${info.code} ${info.reason}`);
  }
});

test('join of a non-rooms topic → "unmatched topic"', async () => {
  const c = await rawConnect(wsUrl(gw));
  const rep = await c.join('foo:bar', '4');
  assert.deepEqual(rep, ['4', '4', 'foo:bar', 'phx_reply', { status: 'error', response: { reason: 'unmatched topic' } }]);
  assert.equal(c.closeInfo, null);
});

test('push to a topic that was never joined → error "unmatched topic" (PHOENIX_PROTOCOL §2.3)', async () => {
  const c = await rawConnect(wsUrl(gw, { token: hs256('sub-unjoined') }));
  c.send([null, '7', 'foo:bar', 'new_msg', { body: 'x' }]);
  const rep = await c.reply('7');
  assert.equal(rep[2], 'foo:bar');
  assert.deepEqual(rep[4], { status: 'error', response: { reason: 'unmatched topic' } });
  const topic = newRoom();
  c.send(['1', '8', topic, 'new_msg', { body: 'x' }]);
  const rep2 = await c.reply('8');
  assert.deepEqual(rep2[4], { status: 'error', response: { reason: 'unmatched topic' } }, `push to unjoined ${topic}: ${JSON.stringify(rep2)}`);
});
