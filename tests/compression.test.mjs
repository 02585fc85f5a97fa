// permessage-deflate (`server.compression`): the real phoenix.js client on `ws` (which offers the
// extension) negotiates it, gets a big room's presence_state and large broadcasts compressed, and
// its own large pushes are inflated; a raw client checks the bytes (RSV1, inflating with Node's
// zlib) and what a hostile client can send: a bomb past the message limit (1009), data that is
// not DEFLATE (1007), RSV1 where it may not be (1002). With the setting off nothing is negotiated.
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import zlib from 'node:zlib';
import { Presence } from 'phoenix';
import {
  claims, connect, createRoom, disconnectAll, hs256, join, push, rawConnect, record, startGateway,
  startRedis, teardown, test, waitFor, wsUrl,
} from './lib/harness.mjs';
import { clientFrame, wireConnect } from './lib/wire.mjs';

const OFFER = { 'Sec-WebSocket-Extensions': 'permessage-deflate; client_max_window_bits' };
const MEMBERS = 40;

let redis;
let gw;
let plain;
const members = [];
before(async () => {
  redis = await startRedis();
  gw = await startGateway({ redisPort: redis.port, prefix: 'zc', name: 'deflate', env: { GATEWAY_SERVER_COMPRESSION: 'true' } });
  plain = await startGateway({ redisPort: redis.port, prefix: 'zc', name: 'plain' });
  createRoom(redis, 'zc', 'big');
  // signed-in members with long names: the room's presence_state is well over 1 KiB
  for (let i = 0; i < MEMBERS; i++) {
    const c = await rawConnect(wsUrl(gw, { token: hs256(claims(`m${i}`, `member number ${i} `.padEnd(60, '.'))) }));
    const rep = await c.join('rooms:big', '1');
    assert.equal(rep[4].status, 'ok');
    members.push(c);
  }
});
after(async () => {
  for (const c of members) c.close();
  await disconnectAll();
  await teardown({ gateways: [gw, plain], redis });
});

/** `gateway_connections_compressed` of gateway `g`. */
async function compressedSockets(g) {
  const text = await (await fetch(`${g.adminUrl}/metrics`)).text();
  const m = text.match(/^gateway_connections_compressed (\S+)$/m);
  assert.ok(m, 'the metric is exported');
  return Number(m[1]);
}

/** A compressed message's payload as a permessage-deflate sender puts it in a frame. */
const deflated = (data) => {
  const c = zlib.deflateRawSync(Buffer.from(data), { finishFlush: zlib.constants.Z_SYNC_FLUSH });
  assert.deepEqual([...c.subarray(-4)], [0, 0, 0xff, 0xff]);
  return c.subarray(0, c.length - 4);
};
/** A compressed frame's payload inflated as a receiver does (the sync tail appended). */
const inflated = (payload) => zlib.inflateRawSync(Buffer.concat([payload, Buffer.from([0, 0, 0xff, 0xff])]),
  { finishFlush: zlib.constants.Z_SYNC_FLUSH }).toString();

/** A raw client that offered permessage-deflate; `json(pred)` waits for a (possibly compressed) text message. */
async function wire(g, { token, headers = OFFER } = {}) {
  const q = token ? `vsn=2.0.0&token=${encodeURIComponent(token)}` : 'vsn=2.0.0';
  const c = await wireConnect(`ws://${g.publicAddr}/socket/websocket?${q}`, { headers });
  c.messages = () => c.frames.filter((f) => f.opcode === 1)
    .map((f) => ({ rsv1: f.rsv1, size: f.payload.length, msg: JSON.parse(f.rsv1 ? inflated(f.payload) : f.payload.toString()) }));
  c.json = async (pred, what) => {
    let found;
    await waitFor(() => (found = c.messages().find((m) => pred(m.msg))) || c.endedAt, 5000, what);
    if (!found) throw new Error(`connection ended before ${what}: close ${JSON.stringify(c.closeFrame)}`);
    return found;
  };
  return c;
}

test('phoenix.js on ws negotiates compression; a big presence_state arrives whole and Presence lists everyone', { timeout: 30000 }, async () => {
  const before = await compressedSockets(gw);
  const socket = await connect(`${gw.publicUrl}`, { token: hs256(claims('viewer', 'Viewer')) });
  assert.match(socket.conn.extensions, /permessage-deflate/, 'the ws transport negotiated the extension');
  await waitFor(async () => (await compressedSockets(gw)) === before + 1, 3000, 'gateway_connections_compressed counts it');
  const ch = socket.channel('rooms:big', {});
  const presence = new Presence(ch);
  const got = record(ch);
  assert.equal((await join(ch)).status, 'ok');
  await waitFor(() => presence.list().length === MEMBERS + 1, 5000, 'every member listed');
  const names = presence.list((id, { metas }) => metas[0].username);
  assert.ok(names.includes(`member number 7 `.padEnd(60, '.')), 'a member as the room holds it');
  // a large push from this client (ws compresses messages of 1 KiB and more) is inflated, broadcast,
  // and reaches members whole; a small one too
  const body = 'compressible text '.repeat(200);
  assert.equal((await push(ch, 'new_msg', { body })).status, 'ok');
  assert.equal((await push(ch, 'new_msg', { body: 'short' })).status, 'ok');
  await waitFor(() => got.filter((m) => m.event === 'new_msg').length === 2, 5000, 'both broadcasts back');
  assert.deepEqual(got.filter((m) => m.event === 'new_msg').map((m) => m.payload.body.length), [body.length, 5]);
  const m = members[3];
  await m.next((f) => f[3] === 'new_msg' && f[4].body === body, 5000, 'the large broadcast at a member');
  socket.disconnect();
  await waitFor(async () => (await compressedSockets(gw)) === before, 3000, 'gateway_connections_compressed back when it closes');
});

test('on the wire: large frames carry RSV1 and inflate to the JSON; small ones are plain', { timeout: 20000 }, async () => {
  const c = await wire(gw, { token: hs256(claims('wired', 'Wired')) });
  assert.match(c.response, /sec-websocket-extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover/i);
  c.write(clientFrame(1, ['1', '1', 'rooms:big', 'phx_join', {}]));
  const reply = await c.json((f) => f[3] === 'phx_reply' && f[1] === '1', 'join reply');
  assert.equal(reply.rsv1, false, 'a small reply is not compressed');
  assert.equal(reply.msg[4].status, 'ok');
  const state = await c.json((f) => f[3] === 'presence_state', 'presence_state');
  assert.equal(state.rsv1, true, 'presence_state is compressed');
  assert.equal(state.msg[0], '1', 'with this socket\'s join_ref');
  assert.ok(Object.keys(state.msg[4]).length >= MEMBERS, 'every member in it');
  const plainSize = JSON.stringify(state.msg).length;
  assert.ok(state.size * 3 < plainSize, `compressed ${state.size} bytes of ${plainSize}`);
  // a compressed push, in two fragments (RSV1 on the first only), is taken and broadcast
  const body = 'x'.repeat(3000);
  const z = deflated(JSON.stringify(['1', '2', 'rooms:big', 'new_msg', { body }]));
  c.write(Buffer.concat([
    clientFrame(1, z.subarray(0, 10), { fin: false, rsv1: true }),
    clientFrame(0, z.subarray(10)),
  ]));
  const ok = await c.json((f) => f[3] === 'phx_reply' && f[1] === '2', 'push reply');
  assert.equal(ok.msg[4].status, 'ok');
  const echo = await c.json((f) => f[3] === 'new_msg' && f[4].body === body, 'the broadcast');
  assert.equal(echo.rsv1, true, 'a large broadcast is compressed');
  c.destroy();
});

test('a compressed bomb past server.max_frame_bytes closes 1009, garbage 1007, misplaced RSV1 1002', { timeout: 20000 }, async () => {
  // 1 MB of one character inflates past the 64 KiB limit from about a kilobyte
  const bomb = deflated(JSON.stringify(['1', '1', 'rooms:big', 'phx_join', { pad: 'a'.repeat(1 << 20) }]));
  assert.ok(bomb.length < 8192);
  for (const [what, frame, code] of [
    ['a bomb', clientFrame(1, bomb, { rsv1: true }), 1009],
    ['not DEFLATE', clientFrame(1, Buffer.from([0xff, 0xff, 0xff, 0xff, 0xff]), { rsv1: true }), 1007],
    ['RSV1 on a ping', clientFrame(9, Buffer.from('p'), { rsv1: true }), 1002],
    ['RSV1 on a continuation', Buffer.concat([clientFrame(1, deflated('["1"'), { fin: false, rsv1: true }), clientFrame(0, Buffer.from('x'), { rsv1: true })]), 1002],
  ]) {
    const c = await wire(gw);
    c.write(frame);
    const closed = await c.close;
    assert.equal(closed && closed.code, code, what);
    await c.ended;
  }
  // without the extension negotiated, RSV1 is a protocol error
  const c = await wire(gw, { headers: {} });
  assert.doesNotMatch(c.response, /sec-websocket-extensions/i);
  c.write(clientFrame(1, deflated('["1","1","rooms:big","phx_join",{}]'), { rsv1: true }));
  assert.equal((await c.close).code, 1002);
});

test('with server.compression off (the default) an offer is not taken and frames are plain', { timeout: 20000 }, async () => {
  const c = await wire(plain, { token: hs256(claims('p1', 'Plain')) });
  assert.doesNotMatch(c.response, /sec-websocket-extensions/i);
  c.write(clientFrame(1, ['1', '1', 'rooms:big', 'phx_join', {}]));
  const state = await c.json((f) => f[3] === 'presence_state', 'presence_state');
  assert.equal(state.rsv1, false);
  assert.ok(Object.keys(state.msg[4]).length >= MEMBERS);
  c.destroy();
  const socket = await connect(`${plain.publicUrl}`, {});
  assert.equal(socket.conn.extensions, '', 'phoenix.js on ws runs uncompressed');
  assert.equal(await compressedSockets(plain), 0);
  socket.disconnect();
});

test('offers: a server window of 15 bits is repeated in the answer, a smaller one is declined', { timeout: 20000 }, async () => {
  const ext = (c) => (c.response.match(/^sec-websocket-extensions: (.*)$/im) || [])[1];
  const a = await wire(gw, { headers: { 'Sec-WebSocket-Extensions': 'permessage-deflate; server_max_window_bits=15' } });
  assert.equal(ext(a), 'permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=15');
  a.destroy();
  // the first acceptable offer wins; one asking for a 10-bit server window is skipped
  const b = await wire(gw, { headers: { 'Sec-WebSocket-Extensions': 'permessage-deflate; server_max_window_bits=10, permessage-deflate; client_max_window_bits' } });
  assert.equal(ext(b), 'permessage-deflate; server_no_context_takeover; client_no_context_takeover');
  b.destroy();
  const c = await wire(gw, { headers: { 'Sec-WebSocket-Extensions': 'permessage-deflate; server_max_window_bits=10' } });
  assert.equal(ext(c), undefined, 'declined: the socket runs uncompressed');
  c.write(clientFrame(1, ['1', '1', 'rooms:big', 'phx_join', {}]));
  const state = await c.json((f) => f[3] === 'presence_state', 'presence_state');
  assert.equal(state.rsv1, false);
  c.destroy();
});
