// WebSocket conformance of the gateway (DESIGN §14), with frames written by hand over a plain TCP
// socket (tests/lib/wire.mjs: `ws` refuses to send the invalid close frames these tests need):
// close-code validation, every close ending its session, the deadline of a fragmented message,
// UTF-8 of text.
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { createRoom, hs256, sleep, startGateway, startRedis, teardown, test, waitFor } from './lib/harness.mjs';
import { clientFrame, closePayload, wireConnect } from './lib/wire.mjs';

const IDLE_MS = 1500;
const OP = { continuation: 0, text: 1, binary: 2, close: 8, ping: 9, pong: 10 };

let redis;
let gw;
before(async () => {
  redis = await startRedis();
  gw = await startGateway({ redisPort: redis.port, prefix: 'wsc', env: { GATEWAY_SERVER_IDLE_TIMEOUT_MS: String(IDLE_MS) } });
  createRoom(redis, 'wsc', 'hall');
});
after(() => teardown({ gateways: [gw], redis }));

/** A raw client (tests/lib/wire.mjs) on the gateway; `next` waits for a server frame. */
async function rawClient(query = 'vsn=2.0.0') {
  const c = await wireConnect(`ws://${gw.publicAddr}/socket/websocket?${query}`);
  c.send = (opcode, payload, fin = true) => c.write(clientFrame(opcode, payload, { fin }));
  c.text = (v) => c.send(OP.text, v);
  /** The first server frame matching `pred`, waited for up to `ms`. */
  c.next = async (pred, ms = 3000, what = 'frame') => {
    let found;
    await waitFor(() => (found = c.frames.find(pred)) || c.endedAt, ms, what)
      .catch((e) => { throw new Error(`${e.message}; frames ${JSON.stringify(c.frames.map(show))}`); });
    if (!found) throw new Error(`connection ended before ${what}; frames ${JSON.stringify(c.frames.map(show))}`);
    return found;
  };
  /** The server's close frame: {code (undefined for none), length, at}. */
  c.closeFrame = async (ms = 3000) => {
    const f = await c.next((x) => x.opcode === OP.close, ms, 'close frame');
    return { code: f.payload.length >= 2 ? f.payload.readUInt16BE(0) : undefined, length: f.payload.length, at: f.at };
  };
  c.json = (pred, ms) => c.next((f) => f.opcode === OP.text && pred(JSON.parse(f.payload.toString())), ms, 'text frame')
    .then((f) => JSON.parse(f.payload.toString()));
  return c;
}

const show = (f) => ({ op: f.opcode, payload: f.payload.toString('hex').slice(0, 40) });

async function metric(name) {
  const text = await (await fetch(`${gw.adminUrl}/metrics`)).text();
  const m = text.match(new RegExp(`^${name.replace(/[{}"]/g, '\\$&')} (\\S+)$`, 'm'));
  return m ? Number(m[1]) : undefined;
}

const anonymous = () => metric('gateway_connections{kind="anonymous"}');
const signedIn = () => metric('gateway_connections{kind="signed_in"}');
const anonInRoom = () => Number(redis.cli('HGET', 'wsc:room:{hall}:anon', gw.node) || 0);

test('a close frame with code 0, then the TCP connection dropped: the session ends, its anonymous viewer leaves the room', { timeout: 20000 }, async () => {
  const viewer = await rawClient();
  viewer.text(['1', '1', 'rooms:hall', 'phx_join', {}]);
  const reply = await viewer.json((f) => f[3] === 'phx_reply' && f[1] === '1');
  assert.equal(reply[4].status, 'ok');
  await waitFor(() => anonInRoom() === 1, 3000, 'anonymous viewer counted in Redis');
  assert.equal(await anonymous(), 1);

  const sent = Date.now();
  await new Promise((resolve) => viewer.sock.write(clientFrame(OP.close, closePayload(0)), resolve));
  viewer.destroy();
  await waitFor(async () => anonInRoom() === 0 && (await anonymous()) === 0, 2000, 'anonymous count back to 0 and the connection gone from gateway_connections');
  assert.ok(Date.now() - sent <= 2000);
});

test('close codes: invalid ones fail with 1002, a non-UTF-8 reason with 1007, an empty close gets an empty close, a valid one is echoed; each ends its session', { timeout: 30000 }, async () => {
  const cases = [
    ...[999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535, 0, 1].map((code) => [`code ${code}`, closePayload(code), 1002]),
    ['one byte', Buffer.from([3]), 1002],
    ['reason not UTF-8', closePayload(1000, Buffer.from([0xce, 0xba, 0xff, 0x21])), 1007],
    ['no payload', Buffer.alloc(0), undefined],
    ...[1000, 1001, 1003, 1007, 1014, 3000, 4000, 4999].map((code) => [`valid ${code}`, closePayload(code, Buffer.from('bye ✓')), code]),
  ];
  for (const [what, payload, want] of cases) {
    const c = await rawClient(`vsn=2.0.0&token=${hs256('closer')}`);
    c.text(['1', '1', 'rooms:hall', 'phx_join', {}]);
    assert.equal((await c.json((f) => f[3] === 'phx_reply'))[4].status, 'ok', what);
    const sent = Date.now();
    c.send(OP.close, payload);
    const got = await c.closeFrame();
    assert.equal(got.code, want, `${what}: answered with ${got.code}`);
    if (want === undefined) assert.equal(got.length, 0, `${what}: the answer has no payload`);
    await c.ended;
    assert.ok(c.endedAt - sent < 1000, `${what}: TCP closed ${c.endedAt - sent} ms after the close`);
    const members = () => redis.lines('HKEYS', 'wsc:room:{hall}:presence').length;
    await waitFor(async () => members() === 0 && (await signedIn()) === 0, 1000, `${what}: presence left and the connection ended within 1 s`);
  }
});

test('a fragmented message kept open with pings and empty fragments is closed with 4000 idle_timeout after its first fragment', { timeout: 20000 }, async () => {
  const c = await rawClient();
  const first = Date.now();
  c.send(OP.text, Buffer.from('["1","1","phoenix",'), false);
  // pings and empty fragments, each well within the idle timeout of the previous frame
  const keepAlive = setInterval(() => {
    if (c.endedAt) return;
    c.send(OP.ping, Buffer.from('p'));
    c.send(OP.continuation, Buffer.alloc(0), false);
  }, IDLE_MS / 4);
  try {
    const got = await c.closeFrame(IDLE_MS * 3);
    assert.equal(got.code, 4000);
    const after = got.at - first;
    assert.ok(after >= IDLE_MS - 100 && after <= IDLE_MS + 700, `closed ${after} ms after the first fragment (idle ${IDLE_MS} ms)`);
    assert.ok(c.frames.some((f) => f.opcode === OP.pong), 'the pings were answered meanwhile');
    await c.ended;
    await waitFor(async () => (await anonymous()) === 0, 1000, 'session ended');
  } finally {
    clearInterval(keepAlive);
  }
});

test('text must be UTF-8: a message that is not fails with 1007, at the first fragment that cannot be completed', { timeout: 20000 }, async () => {
  const whole = await rawClient();
  whole.send(OP.text, Buffer.from([0x5b, 0x22, 0xff, 0x22, 0x5d]));
  assert.equal((await whole.closeFrame()).code, 1007);

  const fragmented = await rawClient();
  fragmented.send(OP.text, Buffer.from('["1","1","phoenix","heartbeat",{"x":"'), false);
  await sleep(50);
  // 0xf4 0x90 would be above U+10FFFF: no continuation can make it valid
  fragmented.send(OP.continuation, Buffer.from([0xf4, 0x90]), false);
  assert.equal((await fragmented.closeFrame(IDLE_MS / 2)).code, 1007);
  await fragmented.ended;
});
