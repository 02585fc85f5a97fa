// Acceptance 4: one Redis pub/sub channel per room, subscribed by a node only while
// it has local members in the room, unsubscribed GATEWAY_ROOMS_UNSUBSCRIBE_DELAY_MS
// after the last one leaves.
import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  test, startRedis, startGateway, createRoom, teardown, uid, sleep, waitFor,
  rawConnect, wsUrl, hs256,
} from './lib/harness.mjs';

const PREFIX = 'ps';
const DELAY = 800;
let redis; let A; let B;

before(async () => {
  redis = await startRedis();
  const env = { GATEWAY_ROOMS_UNSUBSCRIBE_DELAY_MS: String(DELAY) };
  [A, B] = await Promise.all([
    startGateway({ redisPort: redis.port, prefix: PREFIX, name: 'A', env }),
    startGateway({ redisPort: redis.port, prefix: PREFIX, name: 'B', env }),
  ]);
});
after(() => teardown({ gateways: [A, B], redis }));

const chan = (room) => `${PREFIX}:room:{${room}}:events`;
const roomChannels = () => redis.lines('PUBSUB', 'CHANNELS', `${PREFIX}:room:*`).sort();
const probe = (gw) => `${PREFIX}:node:${gw.node}:probe`;

/**
 * Per-node check through CLIENT LIST: the node's subscriber connection is named
 * <prefix>-sub-<node> (CLIENT SETNAME) and its sub= count is `rooms` room channels plus
 * the optional probe channel plus the control channel `<prefix>:control`. Problems are collected (not thrown) so that one run
 * reports the pub/sub behaviour and the naming separately; the test fails at the end.
 */
function checkSubCount(problems, gw, rooms, when) {
  const name = `${PREFIX}-sub-${gw.node}`;
  const list = redis.clients().filter((c) => c.name === name);
  if (list.length !== 1) {
    problems.push(`${when}: expected exactly one redis client named ${name} (CLIENT SETNAME), found ${list.length}${problems.length ? '' : `; CLIENT LIST:\n${redis.cli('CLIENT', 'LIST')}`}`);
    return;
  }
  const c = list[0];
  const probes = redis.numsub(probe(gw))[probe(gw)] > 0 ? 1 : 0;
  // every node also listens on the node-wide control channel (disconnects), from start-up
  const expected = rooms + probes + 1;
  if (Number(c.sub) !== expected) {
    problems.push(`${when}: node ${gw.name} subscriber has sub=${c.sub}, expected ${rooms} room channel(s) + ${probes} probe + 1 control = ${expected}`);
  }
  if (Number(c.psub || 0) !== 0) problems.push(`${when}: node ${gw.name} uses pattern subscriptions (psub=${c.psub})`);
}

test('PUBSUB CHANNELS / NUMSUB per room and per node, with delayed unsubscribe', async () => {
  const r1 = uid('p1'); const r2 = uid('p2');
  createRoom(redis, PREFIX, r1);
  createRoom(redis, PREFIX, r2);
  const t1 = `rooms:${r1}`; const t2 = `rooms:${r2}`;

  // No room channel before anyone joins.
  assert.deepEqual(roomChannels(), []);

  // Node A: a1 in r1 and r2, a2 in r2 (anonymous). Node B: b1 (signed in) and b2 in r2.
  const a1 = await rawConnect(wsUrl(A, { token: hs256('sub-a1') }));
  const a2 = await rawConnect(wsUrl(A));
  const b1 = await rawConnect(wsUrl(B, { token: hs256('sub-b1') }));
  const b2 = await rawConnect(wsUrl(B));
  for (const [c, topic, ref] of [[a1, t1, '1'], [a1, t2, '2'], [a2, t2, '1'], [b1, t2, '1'], [b2, t2, '1']]) {
    const rep = await c.join(topic, ref);
    assert.equal(rep[4].status, 'ok', `join ${topic}: ${JSON.stringify(rep)}`);
  }

  await waitFor(() => roomChannels().length === 2 && redis.numsub(chan(r2))[chan(r2)] === 2, 3000, 'subscriptions to settle');
  assert.deepEqual(roomChannels(), [chan(r1), chan(r2)].sort());
  assert.deepEqual(redis.numsub(chan(r1), chan(r2)), { [chan(r1)]: 1, [chan(r2)]: 2 });
  const problems = [];
  checkSubCount(problems, A, 2, 'A in r1+r2');
  checkSubCount(problems, B, 1, 'B in r2');

  // The channel really carries the room's events: a message from A reaches B's members.
  a1.send(['2', '10', t2, 'new_msg', { body: 'via redis' }]);
  assert.equal((await a1.reply('10'))[4].status, 'ok');
  await b2.next((f) => f[2] === t2 && f[3] === 'new_msg' && f[4].body === 'via redis', 3000, 'new_msg on B');

  // b1 leaves r2, but b2 (also on B) is still there: B must stay subscribed, even after the delay.
  b1.send(['1', '5', t2, 'phx_leave', {}]);
  assert.equal((await b1.reply('5'))[4].status, 'ok');
  await sleep(DELAY + 500);
  assert.equal(redis.numsub(chan(r2))[chan(r2)], 2, 'B unsubscribed although it still has a local member in r2');

  // b2 goes away (socket closed, no phx_leave): within the delay B is still subscribed...
  const tGone = Date.now();
  b2.close();
  await b2.closed;
  await sleep(50);
  const early = redis.numsub(chan(r2))[chan(r2)];
  if (Date.now() - tGone < DELAY / 2) {
    assert.equal(early, 2, 'B unsubscribed immediately; it must wait GATEWAY_ROOMS_UNSUBSCRIBE_DELAY_MS');
  }
  // ...and after the delay r2 has exactly one subscriber (A).
  await waitFor(() => redis.numsub(chan(r2))[chan(r2)] === 1, DELAY + 3000, 'r2 to drop to 1 subscriber');
  assert.ok(Date.now() - tGone >= DELAY * 0.6, `B unsubscribed after ${Date.now() - tGone} ms, before the ${DELAY} ms delay`);
  assert.deepEqual(roomChannels(), [chan(r1), chan(r2)].sort());
  checkSubCount(problems, A, 2, 'A in r1+r2 after B left');
  checkSubCount(problems, B, 0, 'B after its members left');

  // Everyone leaves: a1 by phx_leave on both topics, a2 by closing.
  a1.send(['1', '20', t1, 'phx_leave', {}]);
  a1.send(['2', '21', t2, 'phx_leave', {}]);
  assert.equal((await a1.reply('20'))[4].status, 'ok');
  assert.equal((await a1.reply('21'))[4].status, 'ok');
  a2.close();
  await waitFor(() => roomChannels().length === 0, DELAY + 3000, 'no room channel left');
  assert.deepEqual(redis.numsub(chan(r1), chan(r2)), { [chan(r1)]: 0, [chan(r2)]: 0 });
  checkSubCount(problems, A, 0, 'A after everyone left');
  checkSubCount(problems, B, 0, 'B after everyone left');
  assert.deepEqual(problems, [], `per-node subscriber checks failed:\n${problems.join('\n')}`);
});

test('rejoining within the unsubscribe delay keeps the subscription (no flapping)', async () => {
  const r = uid('flap');
  createRoom(redis, PREFIX, r);
  const c = await rawConnect(wsUrl(A));
  assert.equal((await c.join(`rooms:${r}`, '1'))[4].status, 'ok');
  await waitFor(() => redis.numsub(chan(r))[chan(r)] === 1, 3000, 'subscription');
  c.send(['1', '2', `rooms:${r}`, 'phx_leave', {}]);
  assert.equal((await c.reply('2'))[4].status, 'ok');
  await sleep(DELAY / 4);
  assert.equal((await c.join(`rooms:${r}`, '3'))[4].status, 'ok');
  await sleep(DELAY + 500);
  assert.equal(redis.numsub(chan(r))[chan(r)], 1, 'the node unsubscribed although a member rejoined within the delay');
  // and the rejoined member still gets events
  const w = await rawConnect(wsUrl(B, { token: hs256('sub-flap') }));
  assert.equal((await w.join(`rooms:${r}`, '1'))[4].status, 'ok');
  w.send(['1', '2', `rooms:${r}`, 'new_msg', { body: 'after rejoin' }]);
  assert.equal((await w.reply('2'))[4].status, 'ok');
  await c.next((f) => f[3] === 'new_msg' && f[4].body === 'after rejoin', 3000, 'new_msg after rejoin');
});
