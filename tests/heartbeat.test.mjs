// Acceptance 5: heartbeats and the idle timeout (GATEWAY_SERVER_IDLE_TIMEOUT_MS=1500).
import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  test, startRedis, startGateway, createRoom, teardown, connect, join, record,
  uid, sleep, waitFor, rawConnect, wsUrl, hs256,
} from './lib/harness.mjs';

const PREFIX = 'hb';
const IDLE = 1500;
let redis; let gw;

before(async () => {
  redis = await startRedis();
  gw = await startGateway({ redisPort: redis.port, prefix: PREFIX, env: { GATEWAY_SERVER_IDLE_TIMEOUT_MS: String(IDLE) } });
});
after(() => teardown({ gateways: [gw], redis }));

test('raw heartbeat gets [null,ref,"phoenix","phx_reply",{"status":"ok","response":{}}]', async () => {
  const c = await rawConnect(wsUrl(gw));
  c.send([null, '1', 'phoenix', 'heartbeat', {}]);
  assert.deepEqual(await c.reply('1'), [null, '1', 'phoenix', 'phx_reply', { status: 'ok', response: {} }]);
  // refs are opaque strings, echoed unchanged
  c.send([null, 'hb-xyz-42', 'phoenix', 'heartbeat', {}]);
  assert.deepEqual(await c.reply('hb-xyz-42'), [null, 'hb-xyz-42', 'phoenix', 'phx_reply', { status: 'ok', response: {} }]);
});

test('phoenix.js client with heartbeatIntervalMs 300 stays connected well past the idle timeout', async () => {
  const room = uid('hb');
  createRoom(redis, PREFIX, room);
  const s = await connect(gw.publicUrl, { token: hs256('sub-hb'), heartbeatIntervalMs: 300 });
  const ch = s.channel(`rooms:${room}`);
  const got = record(ch);
  assert.equal((await join(ch)).status, 'ok');
  const start = Date.now();
  await sleep(IDLE * 2 + 1000); // 4 s: > 2 idle timeouts
  const hbReplies = s.received.filter((m) => m.topic === 'phoenix' && m.event === 'phx_reply' && m.payload && m.payload.status === 'ok');
  assert.ok(hbReplies.length >= 6, `expected >= 6 heartbeat replies in ${Date.now() - start} ms, got ${hbReplies.length}`);
  const bad = s.events.filter((e) => e.type !== 'open');
  assert.deepEqual(bad, [], 'socket had transport errors/closes');
  assert.equal(s.events.filter((e) => e.type === 'open').length, 1, 'socket reconnected');
  assert.equal(s.isConnected(), true);
  assert.equal(ch.state, 'joined');
  assert.deepEqual(got.filter((m) => m.event === 'phx_error' || m.event === 'phx_close'), []);
});

test('a silent raw client is closed with code 4000 after the idle timeout', async () => {
  // autoPong off: the client sends no frames at all, not even pongs to server pings
  const c = await rawConnect(wsUrl(gw), { wsOptions: { autoPong: false } });
  const info = await Promise.race([
    c.closed,
    sleep(IDLE + 3000).then(() => null),
  ]);
  assert.ok(info, `socket still open ${IDLE + 3000} ms after connect; frames: ${JSON.stringify(c.frames)}`);
  assert.equal(info.code, 4000, `close code ${info.code} reason ${JSON.stringify(info.reason)}`);
  const elapsed = info.at - c.openedAt;
  assert.ok(elapsed >= IDLE - 200, `closed after ${elapsed} ms, before the ${IDLE} ms idle timeout`);
});

test('a silent but joined raw client is closed too; a raw client that heartbeats is not', async () => {
  const room = uid('hbj');
  createRoom(redis, PREFIX, room);
  const silent = await rawConnect(wsUrl(gw), { wsOptions: { autoPong: false } });
  const chatty = await rawConnect(wsUrl(gw), { wsOptions: { autoPong: false } });
  assert.equal((await silent.join(`rooms:${room}`, '1'))[4].status, 'ok');
  assert.equal((await chatty.join(`rooms:${room}`, '1'))[4].status, 'ok');
  let n = 0;
  const timer = setInterval(() => { n += 1; chatty.send([null, `h${n}`, 'phoenix', 'heartbeat', {}]); }, 400);
  try {
    const info = await waitFor(() => silent.closeInfo, IDLE + 3000, 'silent joined client to be closed');
    assert.equal(info.code, 4000);
    await sleep(Math.max(0, chatty.openedAt + IDLE * 2 + 300 - Date.now()));
    assert.equal(chatty.closeInfo, null, `heartbeating client was closed: ${JSON.stringify(chatty.closeInfo)}`);
    assert.ok(n >= 4);
    for (let i = 1; i <= n - 1; i++) await chatty.reply(`h${i}`, 1000);
  } finally {
    clearInterval(timer);
  }
});
