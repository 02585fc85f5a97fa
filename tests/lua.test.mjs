// The presence scripts themselves, run with EVAL against a real redis-server exactly as the
// gateway loads them (lua/common.lua prepended): sweeps, seq, idempotent leaves, the "leave the
// anonymous count alone" heartbeat, release-if-idle, that a snapshot of a missing room writes
// nothing, that a deleted room is never written back, that entries without a live lease are swept
// even when the lease set itself is gone, and that every renewed lease keeps a TTL; and publish.lua:
// its reply (the stream id, nil without a room record) and the frame it publishes; and the events
// hook's side of the scripts: the members hash, the edges each call reports, drift healing.
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { REPO_ROOT, sleep, startRedis, test, waitFor } from './lib/harness.mjs';

let redis;
before(async () => { redis = await startRedis(); });
after(() => redis?.stop());

const LUA = path.join(REPO_ROOT, 'lua');
const common = fs.readFileSync(path.join(LUA, 'common.lua'), 'utf8');
const script = (name) => common + fs.readFileSync(path.join(LUA, `${name}.lua`), 'utf8');
const keys = (room) => {
  const b = `lt:room:{${room}}`;
  return [b, `${b}:presence`, `${b}:anon`, `${b}:nodes`, `${b}:seq`, `${b}:events`, `${b}:members`];
};
const run = (name, room, ...argv) => redis.lines('EVAL', script(name), '7', ...keys(room), ...argv);
// What `gateway rooms delete` removes (gateway/src/catalog.rs): the record, presence, anon,
// nodes and members keys; the seq counter is left to expire by itself.
const adminDelete = (room) => {
  const k = keys(room);
  redis.cli('DEL', k[0], k[1], k[2], k[3], k[6]);
};
// The presence envelopes published on a room's channel, collected by a redis-cli SUBSCRIBE.
async function subscribe(room) {
  const channel = keys(room)[5];
  const proc = spawn('redis-cli', ['-h', '127.0.0.1', '-p', String(redis.port), '--raw', 'SUBSCRIBE', channel],
    { stdio: ['ignore', 'pipe', 'ignore'] });
  let out = '';
  proc.stdout.on('data', (d) => { out += d; });
  await waitFor(() => redis.numsub(channel)[channel] >= 1, 5000, 'the subscriber');
  const envelopes = () => out.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l));
  return {
    envelopes,
    async next(n) {
      await waitFor(() => envelopes().length >= n, 5000, `${n} envelopes on ${channel}`);
      return envelopes()[n - 1];
    },
    stop() { proc.kill(); },
  };
}
// How often Redis ran a command since the last CONFIG RESETSTAT (commands of scripts included).
const calls = (cmd) => {
  const m = redis.cli('INFO', 'commandstats').match(new RegExp(`^cmdstat_${cmd}:calls=(\\d+)`, 'm'));
  return m ? Number(m[1]) : 0;
};
// A script's whole reply as JSON (the script wrapped in a function whose result is encoded), for
// the nested edges part: [seq, at, type, user, username, ...] or {} (cjson's empty table).
const runJ = (name, room, ...argv) => JSON.parse(redis.cli('EVAL',
  `return cjson.encode((function()\n${script(name)}\nend)())`, '7', ...keys(room), ...argv));
// The edges of a reply part as [type, user] pairs (username checked separately).
const edgeList = (e) => {
  if (!Array.isArray(e)) return [];
  const out = [];
  for (let i = 2; i < e.length; i += 3) out.push(e[i + 1] ? `${e[i]}:${e[i + 1]}` : e[i]);
  return out;
};
const members = (room) => {
  const flat = redis.lines('HGETALL', keys(room)[6]).filter((x) => x !== '');
  return Object.fromEntries(flat.flatMap((v, i) => (i % 2 === 0 ? [[v, flat[i + 1]]] : [])));
};
const meta = (user) => JSON.stringify({ user_id: user, username: `n-${user}`, online_at: 1, node: 'x' });

test('snapshot of a room that does not exist writes nothing', () => {
  assert.deepEqual(run('snapshot', 'ghost', '30000').slice(0, 3), ['0', '0', '0']);
  assert.deepEqual(redis.scanAll('lt:room:{ghost}*'), []);
});

test('join, heartbeat and leave keep counts, leases and seq consistent', async () => {
  const [room] = keys('r1');
  redis.cli('HSET', room, 'name', 'r1');
  // join of a signed-in connection on node A, with a snapshot
  const j = run('join', 'r1', 'A', '60000', '120000', 'A.1', meta('u1'), '1');
  assert.equal(j[0], '1');
  const seq1 = Number(j[1]);
  assert.ok(seq1 > 1e15, `seq starts at the Redis time in µs: ${seq1}`);
  assert.ok(Number(redis.cli('PTTL', `${room}:seq`)) > 0, 'the seq key expires like the others');
  // anonymous viewers on node B, batched
  run('join', 'r1', 'B', '60000', '120000', '', '5', '0');
  assert.equal(redis.cli('HGET', `${room}:anon`, 'B'), '5');
  // heartbeat with '' leaves the count alone (a batch of the node is in flight)
  const hb = run('heartbeat', 'r1', 'B', '60000', '120000', '');
  assert.equal(hb[0], '1', 'B had its lease');
  assert.equal(redis.cli('HGET', `${room}:anon`, 'B'), '5');
  // a heartbeat with a count re-asserts it
  run('heartbeat', 'r1', 'B', '60000', '120000', '3');
  assert.equal(redis.cli('HGET', `${room}:anon`, 'B'), '3');
  // leaves are idempotent: a retry changes nothing and publishes nothing
  const l1 = run('leave', 'r1', 'A', '60000', '120000', 'A.1', '0', '0');
  assert.ok(Number(l1[0]) > 0);
  const l2 = run('leave', 'r1', 'A', '60000', '120000', 'A.1', '0', '0');
  assert.equal(l2[0], '0');
  // an anonymous leave never goes below zero
  run('leave', 'r1', 'B', '60000', '120000', '', '10', '0');
  assert.equal(redis.cli('HGET', `${room}:anon`, 'B'), '');
});

test('a lapsed lease is swept by the next script, and the swept node learns it lost its entries', async () => {
  const [room] = keys('r2');
  redis.cli('HSET', room, 'name', 'r2');
  run('join', 'r2', 'A', '200', '60000', 'A.1', meta('u1'), '0');
  run('join', 'r2', 'A', '200', '60000', '', '4', '0');
  run('join', 'r2', 'B', '60000', '60000', 'B.1', meta('u2'), '0');
  await sleep(300);
  // B's heartbeat sweeps A: its meta, its anonymous count, its lease
  run('heartbeat', 'r2', 'B', '60000', '60000', '0');
  assert.deepEqual(redis.lines('HKEYS', `${room}:presence`), ['B.1']);
  assert.equal(redis.cli('HGET', `${room}:anon`, 'A'), '');
  assert.equal(redis.cli('ZSCORE', `${room}:nodes`, 'A'), '');
  // A comes back to life: its next join reports lost = 1 only if it is the one that swept itself
  run('join', 'r2', 'A', '200', '60000', 'A.2', meta('u3'), '0');
  await sleep(300);
  const j = run('join', 'r2', 'A', '60000', '60000', 'A.3', meta('u4'), '0');
  assert.equal(j[4], '1', 'A swept its own lapsed lease and must re-sync');
  assert.ok(!redis.lines('HKEYS', `${room}:presence`).includes('A.2'));
});

test('release-if-idle drops the lease only when the node holds nothing in the room', () => {
  const [room] = keys('r3');
  redis.cli('HSET', room, 'name', 'r3');
  run('join', 'r3', 'A', '60000', '60000', 'A.1', meta('u1'), '0');
  run('leave', 'r3', 'A', '60000', '60000', '', '0', '1');
  assert.notEqual(redis.cli('ZSCORE', `${room}:nodes`, 'A'), '', 'A still holds A.1: lease kept');
  run('leave', 'r3', 'A', '60000', '60000', 'A.1', '0', '0');
  run('leave', 'r3', 'A', '60000', '60000', '', '0', '1');
  assert.equal(redis.cli('ZSCORE', `${room}:nodes`, 'A'), '', 'idle: lease released');
});

test('sync replaces a node\'s entries in one step and can release everything', () => {
  const [room] = keys('r4');
  redis.cli('HSET', room, 'name', 'r4');
  run('join', 'r4', 'A', '60000', '60000', 'A.1', meta('u1'), '0');
  run('join', 'r4', 'A', '60000', '60000', 'A.2', meta('u2'), '0');
  run('sync', 'r4', 'A', '60000', '60000', '7', '0', '', 'A.2', meta('u2'), 'A.3', meta('u3'));
  assert.deepEqual(redis.lines('HKEYS', `${room}:presence`).sort(), ['A.2', 'A.3']);
  assert.equal(redis.cli('HGET', `${room}:anon`, 'A'), '7');
  run('sync', 'r4', 'A', '60000', '60000', '0', '1', '');
  assert.deepEqual(redis.lines('HKEYS', `${room}:presence`), []);
  assert.equal(redis.cli('HGET', `${room}:anon`, 'A'), '');
  assert.equal(redis.cli('ZSCORE', `${room}:nodes`, 'A'), '');
});

test('a released node keeps no anonymous count, even when sync was told to leave the count alone', () => {
  const [room] = keys('r5');
  redis.cli('HSET', room, 'name', 'r5');
  run('join', 'r5', 'A', '60000', '60000', '', '4', '0');
  run('join', 'r5', 'B', '60000', '60000', '', '1', '0');
  const r = run('sync', 'r5', 'A', '60000', '60000', '', '1', '');
  assert.equal(redis.cli('HGET', `${room}:anon`, 'A'), '', 'a count without a lease is not live');
  assert.equal(redis.cli('ZSCORE', `${room}:nodes`, 'A'), '');
  assert.deepEqual(r.slice(1, 3), ['1', '1']);
  assert.ok(Number(r[0]) > 0, 'the change is published');
});

test('a deleted room is not written back by a node that missed the delete: heartbeat, sync and leave write nothing', () => {
  const R = 'gone1';
  const k = keys(R);
  redis.cli('HSET', k[0], 'name', R);
  run('join', R, 'A', '60000', '120000', 'A.1', meta('u1'), '0');
  run('join', R, 'A', '60000', '120000', '', '3', '0');
  adminDelete(R);
  redis.cli('PEXPIRE', k[4], '30000');
  const seq = redis.cli('GET', k[4]);
  const left = () => redis.scanAll(`lt:room:{${R}}*`);
  assert.deepEqual(left(), [k[4]], 'the admin delete leaves only the seq counter, which expires by itself');
  // node A missed the 'deleted' message: it heartbeats, re-syncs its local truth, and leaves
  const calls = [
    ['heartbeat', ['A', '60000', '120000', '3']],
    ['heartbeat', ['A', '60000', '120000', '']],
    ['sync', ['A', '60000', '120000', '3', '0', '', 'A.1', meta('u1')]],
    ['leave', ['A', '60000', '120000', 'A.1', '0', '0']],
    ['leave', ['A', '60000', '120000', '', '3', '1']],
    ['sync', ['A', '60000', '120000', '0', '1', '']],
  ];
  const gone = { heartbeat: ['0', '0', '0', '0'], sync: ['0', '0', '0'], leave: ['0', '0', '0', '0'] };
  for (const [name, argv] of calls) {
    const r = run(name, R, ...argv);
    assert.deepEqual(left(), [k[4]], `${name} ${argv.slice(3).join(' ')}: no presence key written back`);
    assert.equal(redis.cli('GET', k[4]), seq, `${name}: seq not bumped`);
    assert.ok(Number(redis.cli('PTTL', k[4])) <= 30000, `${name}: seq TTL not refreshed`);
    assert.deepEqual(r, gone[name], `${name} reports the room gone`);
  }
  // once the counter has expired too, nothing of the room is left at all
  redis.cli('DEL', k[4]);
  run('heartbeat', R, 'A', '60000', '120000', '3');
  run('sync', R, 'A', '60000', '120000', '3', '0', '', 'A.1', meta('u1'));
  run('leave', R, 'A', '60000', '120000', 'A.1', '0', '0');
  assert.deepEqual(left(), []);
});

test('in a deleted room, heartbeat, sync and leave remove the calling node\'s leftovers and touch nothing else', () => {
  const R = 'gone2';
  const k = keys(R);
  const left = () => redis.scanAll(`lt:room:{${R}}*`);
  // leftovers of nodes A, B, C, D in a room whose record is gone (written back by an older gateway)
  const far = String(Date.now() + 600000);
  redis.cli('HSET', k[1], 'A.1', meta('u1'), 'A.2', meta('u2'), 'B.1', meta('u3'), 'C.1', meta('u4'), 'D.1', meta('u5'));
  redis.cli('HSET', k[2], 'A', '3', 'B', '2', 'C', '1', 'D', '4');
  redis.cli('ZADD', k[3], far, 'A', far, 'B', far, 'C', far, 'D');
  const hb = run('heartbeat', R, 'A', '60000', '120000', '3');
  assert.deepEqual(redis.lines('HKEYS', k[1]).sort(), ['B.1', 'C.1', 'D.1'], 'A\'s fields removed, no one else\'s');
  assert.equal(redis.cli('HGET', k[2], 'A'), '');
  assert.equal(redis.cli('ZSCORE', k[3], 'A'), '');
  assert.equal(redis.cli('HGET', k[2], 'B'), '2');
  assert.equal(redis.cli('PTTL', k[1]), '-1', 'no TTL refreshed');
  assert.equal(redis.cli('PTTL', k[3]), '-1', 'no TTL refreshed');
  assert.deepEqual(hb, ['0', '0', '0', '0']);
  assert.deepEqual(run('leave', R, 'B', '60000', '120000', 'B.1', '0', '0'), ['0', '0', '0', '0']);
  assert.deepEqual(run('sync', R, 'C', '60000', '120000', '1', '0', '', 'C.1', meta('u4')), ['0', '0', '0']);
  assert.deepEqual(run('sync', R, 'D', '60000', '120000', '0', '1', ''), ['0', '0', '0']);
  assert.deepEqual(left(), [], 'nothing of the deleted room lingers');
});

test('when the lease set is lost (eviction), every entry without a live lease is swept and its leave published', async () => {
  const R = 'orph1';
  const k = keys(R);
  redis.cli('HSET', k[0], 'name', R);
  run('join', R, 'a', '60000', '120000', 'a.1', meta('u1'), '0');
  run('join', R, 'a', '60000', '120000', '', '3', '0');
  run('join', R, 'b', '60000', '120000', 'b.1', meta('u2'), '0');
  run('join', R, 'b', '60000', '120000', '', '2', '0');
  const sub = await subscribe(R);
  try {
    redis.cli('DEL', k[3]); // evicted
    // b's next heartbeat: nobody holds a lease, so every field is an orphan (b's own too: it had no
    // lease either, reports had = 0 and re-asserts its entries with sync)
    const hb = run('heartbeat', R, 'b', '60000', '120000', '2');
    assert.equal(hb[0], '0', 'b had no lease');
    assert.deepEqual(redis.lines('HKEYS', k[1]), []);
    assert.equal(redis.cli('HGET', k[2], 'a'), '', 'a\'s anonymous count is gone');
    assert.equal(redis.cli('HGET', k[2], 'b'), '2', 'b re-asserted its count');
    assert.equal(hb[2], '2', 'the anonymous total counts only b');
    const env = await sub.next(1);
    assert.equal(String(env.seq), hb[1]);
    assert.equal(env.anon, 2);
    assert.deepEqual(env.leaves.sort(), ['a.1', 'b.1']);
    // b answers had = 0 with sync; a snapshot then holds b only
    const s = run('sync', R, 'b', '60000', '120000', '2', '0', '', 'b.1', meta('u2'));
    assert.deepEqual(Object.keys((await sub.next(2)).joins), ['b.1']);
    const snap = run('snapshot', R, '120000');
    assert.equal(snap[1], s[0]);
    assert.equal(snap[2], '2');
    assert.deepEqual(snap.slice(3).filter((c) => c !== '').filter((_, i) => i % 2 === 0), ['b.1']);
    // a is dead: its heartbeat, if it ever comes back, finds no lease
    assert.equal(run('heartbeat', R, 'a', '60000', '120000', '3')[0], '0');
  } finally {
    sub.stop();
  }
});

test('an anonymous count or presence field whose node has no lease is swept by the next script, and the node learns it', async () => {
  const R = 'orph2';
  const k = keys(R);
  redis.cli('HSET', k[0], 'name', R);
  run('join', R, 'c', '60000', '120000', 'c.1', meta('u1'), '0');
  run('join', R, 'a', '60000', '120000', 'a.1', meta('u2'), '0');
  run('join', R, 'a', '60000', '120000', '', '4', '0');
  redis.cli('ZREM', k[3], 'a'); // a's lease alone is lost
  const sub = await subscribe(R);
  try {
    const j = run('join', R, 'c', '60000', '120000', '', '1', '0');
    assert.equal(j[2], '1', 'the anonymous total counts only nodes with a live lease');
    assert.equal(j[4], '0', 'c lost nothing');
    assert.equal(redis.cli('HGET', k[2], 'a'), '');
    assert.deepEqual(redis.lines('HKEYS', k[1]), ['c.1'], 'a dead node\'s presence goes with its count');
    const env = await sub.next(1);
    assert.equal(String(env.seq), j[1]);
    assert.deepEqual(env.leaves, ['a.1']);
    // a's own entries orphaned: its next join or leave reports lost = 1
    redis.cli('HSET', k[2], 'a', '2');
    const ja = run('join', R, 'a', '60000', '120000', 'a.2', meta('u2'), '0');
    assert.equal(ja[4], '1', 'a\'s own entries had no lease: it must re-sync');
    assert.equal(ja[2], '1');
    redis.cli('ZREM', k[3], 'a');
    const la = run('leave', R, 'a', '60000', '120000', 'a.2', '0', '0');
    assert.equal(la[2], '1');
    assert.deepEqual(redis.lines('HKEYS', k[1]), ['c.1']);
  } finally {
    sub.stop();
  }
});

test('presence fields without a lease are swept by the smallest live node\'s heartbeat and by snapshot, not by every heartbeat', async () => {
  const R = 'orph3';
  const k = keys(R);
  redis.cli('HSET', k[0], 'name', R);
  run('join', R, 'b', '60000', '120000', 'b.1', meta('u1'), '0');
  run('join', R, 'c', '60000', '120000', 'c.1', meta('u2'), '0');
  run('join', R, 'a', '60000', '120000', 'a.1', meta('u3'), '0');
  redis.cli('ZREM', k[3], 'a'); // no anonymous field betrays a: only a scan finds a.1
  const sub = await subscribe(R);
  try {
    // c is not the smallest live id: its heartbeat stays cheap (no scan of the presence hash)
    redis.cli('CONFIG', 'RESETSTAT');
    const hc = run('heartbeat', R, 'c', '60000', '120000', '0');
    assert.deepEqual(hc.slice(0, 3), ['1', '0', '0']);
    const hkeys = calls('hkeys');
    assert.ok(redis.lines('HKEYS', k[1]).includes('a.1'));
    assert.ok(hkeys <= 1, `at most one HKEYS (of the anonymous fields), none of the presence hash: ${hkeys}`);
    // b is ('a' has no lease, so it does not count)
    redis.cli('CONFIG', 'RESETSTAT');
    const hb = run('heartbeat', R, 'b', '60000', '120000', '0');
    const hkeysB = calls('hkeys');
    assert.deepEqual(redis.lines('HKEYS', k[1]).sort(), ['b.1', 'c.1']);
    assert.equal(hkeysB, 2, 'b scans the presence hash');
    assert.equal(hb[0], '1');
    assert.ok(Number(hb[1]) > 0);
    assert.deepEqual([hc[3], hb[3]], ['1', '1'], 'the room exists');
    const env = await sub.next(1);
    assert.equal(String(env.seq), hb[1]);
    assert.deepEqual(env.leaves, ['a.1']);
    // a snapshot always checks every field
    redis.cli('HSET', k[1], 'z.1', meta('u9'));
    const snap = run('snapshot', R, '120000');
    assert.deepEqual(snap.slice(3).filter((c) => c !== '').filter((_, i) => i % 2 === 0).sort(), ['b.1', 'c.1']);
    const env2 = await sub.next(2);
    assert.equal(String(env2.seq), snap[1]);
    assert.deepEqual(env2.leaves, ['z.1']);
  } finally {
    sub.stop();
  }
});

test('every call that renews a lease leaves the lease set and the other presence keys with a TTL', () => {
  const R = 'ttl1';
  const k = keys(R);
  redis.cli('HSET', k[0], 'name', R);
  // leave with nothing to change still renews the lease: the re-created :nodes key must expire
  assert.equal(run('leave', R, 'A', '60000', '120000', 'A.9', '0', '0')[0], '0', 'nothing changed');
  assert.ok(Number(redis.cli('PTTL', k[3])) > 0, `leave: PTTL of :nodes is ${redis.cli('PTTL', k[3])}`);
  redis.cli('DEL', k[3]);
  assert.equal(run('sync', R, 'A', '60000', '120000', '', '0', '')[0], '0', 'nothing changed');
  assert.ok(Number(redis.cli('PTTL', k[3])) > 0, `sync: PTTL of :nodes is ${redis.cli('PTTL', k[3])}`);
  // keys that lost their TTL get it back from the next renew, changed or not
  run('join', R, 'A', '60000', '120000', '', '2', '0');
  redis.cli('PERSIST', k[2]);
  redis.cli('PERSIST', k[3]);
  assert.equal(run('leave', R, 'A', '60000', '120000', '', '0', '0')[0], '0', 'nothing changed');
  assert.ok(Number(redis.cli('PTTL', k[2])) > 0, 'leave: :anon has a TTL');
  assert.ok(Number(redis.cli('PTTL', k[3])) > 0, 'leave: :nodes has a TTL');
  redis.cli('PERSIST', k[2]);
  redis.cli('PERSIST', k[3]);
  assert.equal(run('sync', R, 'A', '60000', '120000', '2', '0', '')[0], '0', 'nothing changed');
  assert.ok(Number(redis.cli('PTTL', k[2])) > 0, 'sync: :anon has a TTL');
  assert.ok(Number(redis.cli('PTTL', k[3])) > 0, 'sync: :nodes has a TTL');
});

test('publish.lua: replies with the stream id, publishes the frame carrying it; a room without a record gets nil and nothing', async () => {
  const publish = fs.readFileSync(path.join(LUA, 'publish.lua'), 'utf8');
  const b = 'lt:room:{pub1}';
  const head = '[null,null,"rooms:pub1","new_msg",';
  const pub = (...payload) => redis.cli('EVAL', publish, '3', b, `${b}:history`, `${b}:events`, 'PUBLISH', '100', head, 'new_msg', ...payload);
  const proc = spawn('redis-cli', ['-h', '127.0.0.1', '-p', String(redis.port), '--raw', 'SUBSCRIBE', `${b}:events`],
    { stdio: ['ignore', 'pipe', 'ignore'] });
  let out = '';
  proc.stdout.on('data', (d) => { out += d; });
  try {
    await waitFor(() => redis.numsub(`${b}:events`)[`${b}:events`] >= 1, 5000, 'the subscriber');
    // no record: nil (empty in --raw), no stream, nothing published
    assert.equal(pub('{"body":"x"}'), '');
    assert.equal(redis.cli('EXISTS', `${b}:history`), '0');
    redis.cli('HSET', b, 'name', 'pub1');
    const id1 = pub('{"body":"x"}');
    const id2 = pub('{}');
    assert.match(id1, /^\d+-\d+$/);
    assert.match(id2, /^\d+-\d+$/);
    assert.deepEqual(redis.lines('XRANGE', `${b}:history`, '-', '+'), [id1, 'event', 'new_msg', 'payload', '{"body":"x"}', id2, 'event', 'new_msg', 'payload', '{}']);
    await waitFor(() => out.split('\n').filter((l) => l.startsWith('[')).length >= 2, 5000, 'two frames');
    assert.deepEqual(out.split('\n').filter((l) => l.startsWith('[')).map((l) => JSON.parse(l)), [
      [null, null, 'rooms:pub1', 'new_msg', { body: 'x', id: id1 }],
      [null, null, 'rooms:pub1', 'new_msg', { id: id2 }],
    ]);
  } finally {
    proc.kill();
  }
});

test('events: the members hash counts each user\'s connections; each script reports its own edges once', () => {
  const R = 'ev1';
  const [room] = keys(R);
  redis.cli('HSET', room, 'name', R);
  const j1 = runJ('join', R, 'A', '60000', '120000', 'A.1', meta('u1'), '0');
  assert.equal(j1[6][0], j1[1], 'the edges carry the seq of the change');
  assert.ok(j1[6][1] > 1.6e12, 'and the Redis time in ms');
  assert.deepEqual(edgeList(j1[6]), ['room_occupied', 'member_added:u1']);
  assert.equal(j1[6][7], 'n-u1', 'member edges carry the username');
  assert.deepEqual(members(R), { u1: '1' });
  assert.ok(Number(redis.cli('PTTL', keys(R)[6])) > 0, 'the members hash expires like the other presence keys');
  // a second tab on another node, and a retry of that join: no edge, one count each
  assert.deepEqual(edgeList(runJ('join', R, 'B', '60000', '120000', 'B.1', meta('u1'), '0')[6]), []);
  assert.deepEqual(edgeList(runJ('join', R, 'B', '60000', '120000', 'B.1', meta('u1'), '0')[6]), []);
  assert.deepEqual(members(R), { u1: '2' });
  // anonymous viewers come and go through the per-node counts, without a members change
  assert.deepEqual(edgeList(runJ('join', R, 'C', '60000', '120000', '', '2', '0')[6]), []);
  assert.deepEqual(edgeList(runJ('leave', R, 'A', '60000', '120000', 'A.1', '0', '0')[5]), []);
  const l = runJ('leave', R, 'B', '60000', '120000', 'B.1', '0', '0');
  assert.deepEqual(edgeList(l[5]), ['member_removed:u1'], 'the last tab reports the user gone');
  assert.equal(l[5][0], l[0]);
  assert.equal(redis.cli('EXISTS', keys(R)[6]), '0', 'a user at zero leaves the hash');
  // a retried leave changes nothing and reports nothing
  assert.deepEqual(runJ('leave', R, 'B', '60000', '120000', 'B.1', '0', '0')[5], {});
  assert.deepEqual(edgeList(runJ('leave', R, 'C', '60000', '120000', '', '2', '0')[5]), ['room_vacated']);
  // anonymous viewers alone occupy the room too; a sync that releases everything vacates it
  assert.deepEqual(edgeList(runJ('join', R, 'C', '60000', '120000', '', '1', '0')[6]), ['room_occupied']);
  assert.deepEqual(edgeList(runJ('sync', R, 'C', '60000', '120000', '5', '0', '', 'C.1', meta('u2'))[3]), ['member_added:u2']);
  assert.deepEqual(edgeList(runJ('sync', R, 'C', '60000', '120000', '0', '1', '')[3]), ['member_removed:u2', 'room_vacated']);
  // a connection written again for another user moves from one to the other
  runJ('join', R, 'A', '60000', '120000', 'A.7', meta('u3'), '0');
  assert.deepEqual(edgeList(runJ('join', R, 'A', '60000', '120000', 'A.7', meta('u4'), '0')[6]), ['member_added:u4', 'member_removed:u3']);
  assert.deepEqual(members(R), { u4: '1' });
});

test('events: a lapsed node\'s users are reported once, by the script that swept them', async () => {
  const R = 'ev2';
  const [room] = keys(R);
  redis.cli('HSET', room, 'name', R);
  runJ('join', R, 'X', '200', '120000', 'X.1', meta('u1'), '0');
  runJ('join', R, 'X', '200', '120000', 'X.2', meta('u2'), '0');
  runJ('join', R, 'Y', '60000', '120000', 'Y.1', meta('u2'), '0');
  await sleep(300);
  // Y's heartbeat finds X's lease lapsed: u1 is gone, u2 still has Y's tab
  const hb = runJ('heartbeat', R, 'Y', '60000', '120000', '0');
  assert.deepEqual(edgeList(hb[4]), ['member_removed:u1']);
  assert.equal(hb[4][0], hb[1]);
  assert.deepEqual(members(R), { u2: '1' });
  // nobody reports it again
  assert.deepEqual(runJ('heartbeat', R, 'Y', '60000', '120000', '0')[4], {});
  assert.deepEqual(runJ('snapshot', R, '120000')[4], {});
  assert.deepEqual(edgeList(runJ('leave', R, 'Y', '60000', '120000', 'Y.1', '0', '0')[5]), ['member_removed:u2', 'room_vacated']);
});

test('events: a members hash that drifted from presence is healed (lost: rebuilt silently; wrong: fixed by the first node\'s heartbeat, with edges)', () => {
  const R = 'ev3';
  const k = keys(R);
  redis.cli('HSET', k[0], 'name', R);
  runJ('join', R, 'A', '60000', '120000', 'A.1', meta('u1'), '0');
  runJ('join', R, 'A', '60000', '120000', 'A.2', meta('u2'), '0');
  // the hash is lost (evicted) while presence survives: the next call rebuilds it, no edge
  redis.cli('DEL', k[6]);
  assert.deepEqual(edgeList(runJ('join', R, 'A', '60000', '120000', 'A.3', meta('u1'), '0')[6]), []);
  assert.deepEqual(members(R), { u1: '2', u2: '1' });
  // counts go wrong (a node of an older version, a lost write): the smallest live node's
  // heartbeat scan sets them to the truth and reports the differences
  redis.cli('HSET', k[6], 'u1', '5', 'ghost', '1');
  redis.cli('HDEL', k[6], 'u2');
  const hb = runJ('heartbeat', R, 'A', '60000', '120000', '0');
  assert.deepEqual(edgeList(hb[4]).sort(), ['member_added:u2', 'member_removed:ghost']);
  assert.deepEqual(members(R), { u1: '2', u2: '1' });
  assert.deepEqual(runJ('heartbeat', R, 'A', '60000', '120000', '0')[4], {}, 'healed: nothing more');
  // a count left behind with no connection at all is reported gone with the last viewer
  redis.cli('HSET', k[6], 'stale', '1');
  runJ('leave', R, 'A', '60000', '120000', 'A.1', '0', '0');
  runJ('leave', R, 'A', '60000', '120000', 'A.3', '0', '0');
  const last = runJ('leave', R, 'A', '60000', '120000', 'A.2', '0', '0');
  assert.deepEqual(edgeList(last[5]), ['member_removed:u2', 'member_removed:stale', 'room_vacated']);
  assert.equal(redis.cli('EXISTS', k[6]), '0');
});

test('events: a deleted room reports nothing; a node\'s leftovers there leave the members hash too', () => {
  const R = 'ev4';
  const k = keys(R);
  redis.cli('HSET', k[0], 'name', R);
  runJ('join', R, 'A', '60000', '120000', 'A.1', meta('u1'), '0');
  runJ('join', R, 'B', '60000', '120000', 'B.1', meta('u2'), '0');
  redis.cli('DEL', k[0]);
  assert.deepEqual(runJ('heartbeat', R, 'A', '60000', '120000', '0'), [0, 0, 0, 0]);
  assert.deepEqual(members(R), { u2: '1' }, 'A\'s user left the hash with A\'s field');
});

// The events hook's outbox (KEYS[8], on with the ARGV flag): the same call that reports an edge
// writes it to `<p>:room:{R}:unacked`, field = the event id, value '<owner>|<since>|<at>|<username>'.
const keys8 = (room) => [...keys(room), `lt:room:{${room}}:unacked`];
const runO = (name, room, ...argv) => JSON.parse(redis.cli('EVAL',
  `return cjson.encode((function()\n${script(name)}\nend)())`, '8', ...keys8(room), ...argv));
const unacked = (room) => {
  const flat = redis.lines('HGETALL', keys8(room)[7]).filter((x) => x !== '');
  return Object.fromEntries(flat.flatMap((v, i) => (i % 2 === 0 ? [[v, flat[i + 1]]] : [])));
};
// The same, as redis-cli's flat lines (a seq above 2^53/10 loses digits in cjson's numbers).
const rawO = (name, room, ...argv) => redis.lines('EVAL', script(name), '8', ...keys8(room), ...argv);
// The taken-over part of a reply as ids ({} when nothing was taken over).
const takenIds = (t) => (Array.isArray(t) ? t.filter((_, i) => i % 3 === 0) : []);

test('outbox: a script\'s edges are written to the unacked hash in the same call; an ack (HDEL) removes them; off without the flag', () => {
  const R = 'ob1';
  const k = keys8(R);
  redis.cli('HSET', k[0], 'name', R);
  const j = runO('join', R, 'A', '60000', '120000', 'A.1', meta('u1'), '0', '1');
  const seq = Object.keys(unacked(R))[0].split(':')[1];
  const at = j[6][1];
  assert.deepEqual(unacked(R), {
    [`${R}:${seq}:room_occupied`]: `A|${at}|${at}|`,
    [`${R}:${seq}:member_added:u1`]: `A|${at}|${at}|n-u1`,
  });
  assert.ok(Number(redis.cli('PTTL', k[7])) > 0, 'the outbox expires like the other presence keys');
  assert.deepEqual(j[7], {}, 'nothing taken over');
  // the sender's ack after a 2xx: one HDEL of the batch's ids in the room
  redis.cli('HDEL', k[7], `${R}:${seq}:room_occupied`, `${R}:${seq}:member_added:u1`);
  assert.equal(redis.cli('EXISTS', k[7]), '0');
  // leave and sync write theirs too
  const l = rawO('leave', R, 'A', '60000', '120000', 'A.1', '0', '0', '1');
  assert.deepEqual(Object.keys(unacked(R)).sort(), [`${R}:${l[0]}:member_removed:u1`, `${R}:${l[0]}:room_vacated`]);
  redis.cli('DEL', k[7]);
  const s = rawO('sync', R, 'B', '60000', '120000', '0', '0', '1', 'B.1', meta('u2'));
  assert.deepEqual(Object.keys(unacked(R)).sort(), [`${R}:${s[0]}:member_added:u2`, `${R}:${s[0]}:room_occupied`]);
  redis.cli('DEL', k[7]);
  // a call without an edge (a second tab) leaves the outbox alone; a heartbeat refreshes its TTL
  runO('join', R, 'B', '60000', '120000', 'B.9', meta('u2'), '0', '1');
  redis.cli('HSET', k[7], 'x', 'B|1|1|');
  redis.cli('CONFIG', 'RESETSTAT');
  runO('join', R, 'B', '60000', '120000', 'B.10', meta('u2'), '0', '1');
  assert.equal(calls('pexpire'), 5, 'the five other presence keys only');
  assert.equal(redis.cli('PTTL', k[7]), '-1');
  runO('heartbeat', R, 'B', '60000', '120000', '', '1');
  assert.ok(Number(redis.cli('PTTL', k[7])) > 0, 'the heartbeat keeps the outbox alive');
  redis.cli('DEL', k[7]);
  // without the flag (a node without an events hook): nothing is written, not even a TTL
  redis.cli('CONFIG', 'RESETSTAT');
  runO('join', R, 'B', '60000', '120000', 'B.2', meta('u3'), '0', '');
  assert.equal(redis.cli('EXISTS', k[7]), '0');
  assert.equal(calls('hset'), 0);
  assert.equal(calls('hgetall'), 0);
  // a deleted room's outbox goes with it (what `gateway rooms delete` removes includes it)
  assert.ok(fs.readFileSync(path.join(REPO_ROOT, 'gateway/src/catalog.rs'), 'utf8').includes('.arg(&k.unacked)'));
});

test('outbox: a sweep of a dead node takes over its unacked events (original ids, owner rewritten) and returns them', async () => {
  const R = 'ob2';
  const k = keys8(R);
  redis.cli('HSET', k[0], 'name', R);
  // X's join is reported (edges in the outbox), then X dies without posting or acking
  const jx = rawO('join', R, 'X', '200', '120000', 'X.1', meta('u1'), '0', '1');
  const jy = rawO('join', R, 'Y', '60000', '120000', 'Y.1', meta('u2'), '0', '1');
  const xAt = unacked(R)[`${R}:${jx[1]}:room_occupied`].split('|')[2];
  const xIds = [`${R}:${jx[1]}:room_occupied`, `${R}:${jx[1]}:member_added:u1`];
  const yIds = [`${R}:${jy[1]}:member_added:u2`];
  assert.deepEqual(Object.keys(unacked(R)).sort(), [...xIds, ...yIds].sort());
  // while X's lease lives, a call by Y takes nothing and reads no outbox
  redis.cli('CONFIG', 'RESETSTAT');
  assert.deepEqual(runO('join', R, 'Y', '60000', '120000', '', '1', '0', '1')[7], {});
  assert.equal(calls('hgetall'), 0, 'the common path does not read the outbox');
  await sleep(300);
  // Y's heartbeat sweeps X: X's user gone (a new edge, Y's) and X's unsent events taken over
  const hb = runO('heartbeat', R, 'Y', '60000', '120000', '1', '1');
  assert.deepEqual(edgeList(hb[4]), ['member_removed:u1']);
  assert.deepEqual(takenIds(hb[5]).sort(), [...xIds].sort(), 'X\'s events, with their original ids');
  const taken = hb[5];
  assert.equal(String(taken[1]), xAt, 'with the original time');
  assert.equal(taken[taken.indexOf(xIds[1]) + 2], 'n-u1', 'and username');
  const now = unacked(R);
  for (const id of xIds) assert.match(now[id], /^Y\|\d+\|/, `${id} now belongs to Y`);
  assert.match(now[yIds[0]], /^Y\|/);
  const removed = Object.keys(now).filter((id) => id.endsWith(':member_removed:u1'));
  assert.equal(removed.length, 1);
  assert.match(now[removed[0]], /^Y\|/, 'the sweep\'s own edge is in the outbox too');
  // taken once: the next call finds no dead node and takes nothing
  assert.deepEqual(runO('heartbeat', R, 'Y', '60000', '120000', '1', '1')[5], {});
});

test('outbox: the heartbeat scan takes over entries held past the stale age (a lost reply), its own included', async () => {
  const R = 'ob3';
  const k = keys8(R);
  redis.cli('HSET', k[0], 'name', R);
  const j = rawO('join', R, 'A', '60000', '120000', 'A.1', meta('u1'), '0', '1');
  runO('join', R, 'B', '60000', '120000', 'B.1', meta('u2'), '0', '1');
  // not yet stale: nothing taken
  assert.deepEqual(runO('heartbeat', R, 'A', '60000', '120000', '0', '1', '200')[5], {});
  await sleep(300);
  // only the scanning node (the smallest live id, A) looks; it re-reports everything stale
  assert.deepEqual(runO('heartbeat', R, 'B', '60000', '120000', '0', '1', '200')[5], {});
  const hb = runO('heartbeat', R, 'A', '60000', '120000', '0', '1', '200');
  assert.equal(takenIds(hb[5]).length, 3);
  assert.ok(takenIds(hb[5]).includes(`${R}:${j[1]}:member_added:u1`));
  for (const v of Object.values(unacked(R))) assert.match(v, /^A\|/);
  // re-reported once per stale age, not on every heartbeat
  assert.deepEqual(runO('heartbeat', R, 'A', '60000', '120000', '0', '1', '200')[5], {});
});
