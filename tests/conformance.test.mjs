// WebSocket conformance of the gateway (DESIGN §14), with frames written by hand over a plain TCP
// socket (`ws` refuses to send the invalid close frames these tests need): close-code validation,
// every close ending its session, the deadline of a fragmented message, UTF-8 of text.
import { once } from 'node:events';
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import net from 'node:net';
import { createRoom, hs256, sleep, startGateway, startRedis, teardown, test, waitFor } from './lib/harness.mjs';

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

/** A client frame, masked as RFC 6455 requires. */
function clientFrame(opcode, payload = Buffer.alloc(0), fin = true) {
  const body = Buffer.from(payload);
  const n = body.length;
  const head = n < 126 ? Buffer.from([0, n]) : Buffer.from([0, 126, n >> 8, n & 0xff]);
  head[0] = (fin ? 0x80 : 0) | opcode;
  head[1] |= 0x80;
  const mask = crypto.randomBytes(4);
  return Buffer.concat([head, mask, body.map((b, i) => b ^ mask[i & 3])]);
}

const closePayload = (code, reason = Buffer.alloc(0)) => Buffer.concat([Buffer.from([code >> 8, code & 0xff]), Buffer.from(reason)]);

/**
 * A WebSocket client on a bare TCP socket: `send(opcode, payload, fin)` writes a frame,
 * `frames` holds the server's frames ({fin, opcode, payload}), `closeFrame()` waits for the
 * server's close frame, `ended` resolves when the TCP connection is closed.
 */
async function rawClient(query = 'vsn=2.0.0') {
  const [host, port] = gw.publicAddr.split(':');
  const sock = net.connect({ host, port: Number(port) });
  await once(sock, 'connect');
  const key = crypto.randomBytes(16).toString('base64');
  sock.write(`GET /socket/websocket?${query} HTTP/1.1\r\nHost: ${gw.publicAddr}\r\nUpgrade: websocket\r\n`
    + `Connection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n\r\n`);
  const c = { sock, frames: [], waiters: new Set() };
  let buf = Buffer.alloc(0);
  let upgraded;
  const upgrade = new Promise((resolve, reject) => { upgraded = { resolve, reject }; });
  let headers = true;
  sock.on('data', (d) => {
    buf = Buffer.concat([buf, d]);
    if (headers) {
      const end = buf.indexOf('\r\n\r\n');
      if (end < 0) return;
      const status = buf.subarray(0, end).toString().split(' ')[1];
      if (status !== '101') upgraded.reject(new Error(`upgrade answered ${buf.subarray(0, end)}`));
      buf = buf.subarray(end + 4);
      headers = false;
      upgraded.resolve();
    }
    for (;;) {
      if (buf.length < 2) break;
      let len = buf[1] & 0x7f;
      let at = 2;
      if (len === 126) { if (buf.length < 4) break; len = buf.readUInt16BE(2); at = 4; }
      if (len === 127) { if (buf.length < 10) break; len = Number(buf.readBigUInt64BE(2)); at = 10; }
      if (buf.length < at + len) break;
      c.frames.push({ fin: (buf[0] & 0x80) !== 0, opcode: buf[0] & 0x0f, payload: buf.subarray(at, at + len), at: Date.now() });
      buf = buf.subarray(at + len);
    }
    for (const w of c.waiters) w();
  });
  sock.on('error', () => { /* the end is seen through `ended` */ });
  c.ended = new Promise((resolve) => sock.on('close', () => { c.endedAt = Date.now(); for (const w of c.waiters) w(); resolve(); }));
  await upgrade;
  c.send = (opcode, payload, fin = true) => sock.write(clientFrame(opcode, payload, fin));
  c.text = (v) => c.send(OP.text, Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)));
  /** The first server frame matching `pred`, waited for up to `ms`. */
  c.next = (pred, ms = 3000, what = 'frame') => new Promise((resolve, reject) => {
    const check = () => {
      const f = c.frames.find(pred);
      if (f) { clearTimeout(timer); c.waiters.delete(check); resolve(f); return; }
      if (c.endedAt) { clearTimeout(timer); c.waiters.delete(check); reject(new Error(`connection ended before ${what}; frames ${JSON.stringify(c.frames.map(show))}`)); }
    };
    const timer = setTimeout(() => { c.waiters.delete(check); reject(new Error(`no ${what} within ${ms} ms; frames ${JSON.stringify(c.frames.map(show))}`)); }, ms);
    c.waiters.add(check);
    check();
  });
  /** The server's close frame: {code (undefined for none), reason, at}. */
  c.closeFrame = async (ms = 3000) => {
    const f = await c.next((x) => x.opcode === OP.close, ms, 'close frame');
    return { code: f.payload.length >= 2 ? f.payload.readUInt16BE(0) : undefined, length: f.payload.length, at: f.at };
  };
  c.json = (pred, ms) => c.next((f) => f.opcode === OP.text && pred(JSON.parse(f.payload.toString())), ms, 'text frame')
    .then((f) => JSON.parse(f.payload.toString()));
  return c;
}

const show = (f) => ({ op: f.opcode, fin: f.fin, payload: f.payload.toString('hex').slice(0, 40) });

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
  viewer.sock.destroy();
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
