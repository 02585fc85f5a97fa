// Operations: the CLI (rooms, token, nodes, check-config), the admin HTTP API (rooms, presence,
// broadcast, delete → phx_close on every node), health, and the SIGTERM drain.
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import net from 'node:net';
import { respClient } from './lib/presence.mjs';
import { GATEWAY_BIN, DEFAULT_SECRET, createRoom, hs256, rawConnect, startGateway, startRedis, tempFile, sleep, teardown, test, waitFor, withTimeout } from './lib/harness.mjs';

const ADMIN_TOKEN = 'admin-token-for-tests';
let redis;
let gws = [];

before(async () => {
  redis = await startRedis();
});
after(() => teardown({ gateways: gws, redis }));

function cli(args, env = {}, prefix = 'ops') {
  const full = {
    PATH: process.env.PATH,
    NO_COLOR: '1',
    GATEWAY_REDIS_URL: redis.url,
    GATEWAY_REDIS_PREFIX: prefix,
    GATEWAY_AUTH_HS256_SECRET: DEFAULT_SECRET,
    ...env,
  };
  try {
    return { code: 0, out: execFileSync(GATEWAY_BIN, args, { env: full, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 15000 }) };
  } catch (e) {
    return { code: e.status, out: `${e.stdout}${e.stderr}` };
  }
}

test('CLI: rooms create/list/show/delete, token, nodes, check-config', async () => {
  assert.equal(cli(['rooms', 'create', 'ops-a', '--name', 'Room A']).code, 0);
  const dup = cli(['rooms', 'create', 'ops-a']);
  assert.notEqual(dup.code, 0);
  assert.match(dup.out, /already exists/);
  const bad = cli(['rooms', 'create', 'a}b']);
  assert.notEqual(bad.code, 0);
  assert.match(bad.out, /invalid room id/);
  assert.deepEqual(redis.scanAll('ops:room:*'), ['ops:room:{ops-a}']);
  // a header, then one tab-separated line per room with its creation time in ISO 8601 UTC
  const list = cli(['rooms', 'list']).out;
  assert.match(list, /^ID\tNAME\tCREATED \(UTC\)\tACCESS\n/);
  const created = /^ops-a\tRoom A\t(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)\tpublic$/m.exec(list);
  assert.ok(created, list);
  assert.ok(Math.abs(Date.parse(created[1]) - Date.now()) < 60000, `created ${created[1]} is now`);

  // show: the signed-in users and the anonymous count, from a live gateway
  const gw = await startGateway({ redisPort: redis.port, prefix: 'ops', env: { GATEWAY_PRESENCE_HEARTBEAT_INTERVAL_MS: '300', GATEWAY_PRESENCE_TTL_MS: '3000' } });
  gws.push(gw);
  const token = cli(['token', '--sub', '42', '--username', 'ann', '--ttl', '600']).out.trim();
  assert.match(token, /^[\w-]+\.[\w-]+\.[\w-]+$/);
  const u = await rawConnect(`${gw.publicUrl}/websocket?vsn=2.0.0&token=${token}`);
  const joinU = await u.join('rooms:ops-a', '1');
  assert.equal(joinU[4].response.user.username, 'ann', 'the CLI token signs in');
  const a = await rawConnect(`${gw.publicUrl}/websocket?vsn=2.0.0`);
  await a.join('rooms:ops-a', '1');
  await waitFor(() => /Anonymous: 1/.test(cli(['rooms', 'show', 'ops-a']).out), 5000, 'rooms show to count the anonymous viewer');
  const show = cli(['rooms', 'show', 'ops-a']).out;
  assert.match(show, /signed-in users: 1/);
  assert.match(show, /42\s+ann\s+\(1 connection\)/);
  assert.match(show, new RegExp(`${gw.node}: 1`));
  assert.match(show, /^created \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/m);
  const lease = new RegExp(`^  ${gw.node} until (\\S+)$`, 'm').exec(show);
  assert.ok(lease && Date.parse(lease[1]) > Date.now() - 5000, `the node's lease as an ISO time:\n${show}`);

  // a Redis the CLI cannot reach is named (password masked), its cause said once
  const down = cli(['rooms', 'list'], { GATEWAY_REDIS_URL: 'redis://:hunter2@127.0.0.1:1' });
  assert.notEqual(down.code, 0);
  assert.match(down.out, /redis:\/\/:\*\*\*@127\.0\.0\.1:1/);
  assert.ok(!down.out.includes('hunter2'), down.out);
  assert.equal(down.out.match(/os error/g)?.length ?? 0, 1, down.out);
  // `gateway token <sub>` (the user id as an argument) mints what `--sub` does
  const [t1, t2] = [cli(['token', 'ann']).out.trim(), cli(['token', '--sub', 'ann']).out.trim()];
  assert.deepEqual([t1, t2].map((t) => JSON.parse(Buffer.from(t.split('.')[1], 'base64url')).sub), ['ann', 'ann']);

  await waitFor(() => new RegExp(`${gw.node}\\s+listen=\\S+\\s+rooms=1\\s+sockets=2`).test(cli(['nodes']).out), 5000,
    'gateway nodes to list the node with its room and sockets');

  assert.equal(cli(['rooms', 'delete', 'ops-a']).code, 0);
  assert.deepEqual(redis.scanAll('ops:room:{ops-a}'), []);
  assert.notEqual(cli(['rooms', 'delete', 'ops-a']).code, 0);
  u.close();
  a.close();

  // check-config: effective settings, secrets masked, unknown keys are errors
  const cfg = tempFile('gateway.toml', '[auth]\nhs256_secret = "very-secret-0123456789abcdef0123456789"\n[presence]\nttl_ms = 9000\n');
  const ok = cli(['check-config', '--config', cfg], { GATEWAY_AUTH_HS256_SECRET: undefined });
  assert.equal(ok.code, 0, ok.out);
  assert.match(ok.out, /ttl_ms = 9000/);
  assert.match(ok.out, /hs256_secret = "\*\*\*"/);
  assert.ok(!ok.out.includes('very-secret'));
  const typo = cli(['check-config', '--config', tempFile('typo.toml', '[presence]\nttl = 9000\n')]);
  assert.notEqual(typo.code, 0);
  assert.match(typo.out, /unknown field `ttl`/);
  const envTypo = cli(['check-config'], { GATEWAY_PRESENCE_TTL: '5' });
  assert.notEqual(envTypo.code, 0);
  assert.match(envTypo.out, /^error: environment variable GATEWAY_PRESENCE_TTL: presence\.ttl:/m);
  assert.ok(!envTypo.out.includes('config/gateway.toml'), envTypo.out);
  const section = cli(['check-config'], { GATEWAY_FOO_BAR: '1' });
  assert.notEqual(section.code, 0);
  assert.match(section.out, /GATEWAY_FOO_BAR: foo: no such section/);
  const port = cli(['check-config'], { GATEWAY_SERVER_LISTEN: '0.0.0.0:99999' });
  assert.notEqual(port.code, 0);
  assert.match(port.out, /GATEWAY_SERVER_LISTEN: server\.listen: .*99999/);
  assert.equal(cli(['check-config'], { GATEWAY_SERVER_LISTEN: 'localhost:4000' }).code, 0);
});

/**
 * Opens `n` TCP connections to `addr` (host:port), then writes a WebSocket upgrade request on every
 * one in the same tick, so the requests reach the gateway together rather than one after another.
 * `stall`: each request also declares a 1-byte body it never sends, which delays hyper's hand-over
 * of the connection and so widens the window between the limit check and the session's start
 * (against the pre-fix gateway: over the limit in about half of such bursts, against about one in
 * ten plain ones). Resolves {sockets, statuses}: each socket (still open) and its HTTP status.
 */
async function upgradeBurst(addr, n, { stall = false } = {}) {
  const i = addr.lastIndexOf(':');
  const [host, port] = [addr.slice(0, i), Number(addr.slice(i + 1))];
  const sockets = await Promise.all(Array.from({ length: n }, () => new Promise((resolve, reject) => {
    const s = net.connect(port, host, () => resolve(s));
    s.on('error', reject);
  })));
  const statuses = sockets.map((s) => new Promise((resolve) => {
    let head = '';
    s.on('data', (d) => {
      head += d.toString('latin1');
      const m = /^HTTP\/1\.1 (\d{3})/.exec(head);
      if (m) resolve(Number(m[1]));
    });
    s.on('close', () => resolve(`closed without a status: ${JSON.stringify(head)}`));
    s.on('error', () => { /* reported through close */ });
  }));
  for (const s of sockets) {
    s.write(`GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: ${addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n`
      + `Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ${crypto.randomBytes(16).toString('base64')}\r\n`
      + `${stall ? 'Content-Length: 1\r\n' : ''}\r\n`);
  }
  return { sockets, statuses: await withTimeout(Promise.all(statuses), 10000, 'answers to the upgrade burst') };
}

test('server.max_connections holds under bursts: 30 concurrent upgrades, limit 5 → at most 5 open, the rest 503; closing frees the places', async () => {
  const gw = await startGateway({ redisPort: redis.port, prefix: 'lim', env: { GATEWAY_SERVER_MAX_CONNECTIONS: '5' } });
  gws.push(gw);
  const url = `${gw.publicUrl}/websocket?vsn=2.0.0`;
  // Several bursts: whether upgrades in flight overlap the limit check is a matter of scheduling,
  // so one burst alone could pass by luck; every other one stalls its upgrades to widen the window.
  for (let round = 0; round < 12; round++) {
    const stall = round % 2 === 1;
    const { sockets, statuses } = await upgradeBurst(gw.publicAddr, 30, { stall });
    const admitted = statuses.filter((s) => s === 101).length;
    try {
      assert.ok(admitted <= 5, `round ${round}${stall ? ' (stalled upgrades)' : ''}: at most 5 of 30 concurrent upgrades may succeed, ${admitted} did: ${statuses}`);
      if (round === 0) assert.equal(admitted, 5, `a fresh gateway admits exactly 5: ${statuses}`);
      assert.deepEqual(statuses.filter((s) => s !== 101), Array(30 - admitted).fill(503), 'the others are refused with 503');
      if (round === 0) await assert.rejects(rawConnect(url), (e) => e.statusCode === 503, 'still full');
    } finally {
      for (const s of sockets) s.destroy();
    }
    await sleep(150); // let the closed sockets' sessions end
  }

  // the places come back when the sockets close (once each session has ended)
  const again = [];
  for (let i = 0; i < 5; i++) {
    again.push(await waitFor(() => rawConnect(url), 5000, `place ${i + 1} of 5 to come back`));
  }
  for (const c of again) {
    c.send([null, 'hb', 'phoenix', 'heartbeat', {}]);
    assert.equal((await c.reply('hb'))[4].status, 'ok', 'the admitted sockets work');
  }
  await assert.rejects(rawConnect(url), (e) => e.statusCode === 503, 'full again with 5 new sockets');
  for (const c of again) c.close();
});

test('admin API: auth, rooms, presence, broadcast, and delete closes channels on every node', async () => {
  const env = { GATEWAY_ADMIN_TOKEN: ADMIN_TOKEN };
  const g1 = await startGateway({ redisPort: redis.port, prefix: 'adm', env });
  const g2 = await startGateway({ redisPort: redis.port, prefix: 'adm', env });
  gws.push(g1, g2);
  const api = (method, path, body, token = ADMIN_TOKEN) => fetch(`${g1.adminUrl}${path}`, {
    method,
    headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });

  assert.equal((await api('GET', '/api/rooms', undefined, 'wrong')).status, 401);
  assert.equal((await fetch(`${g1.adminUrl}/api/rooms`)).status, 401);
  assert.equal((await api('POST', '/api/rooms', { id: '../x' })).status, 400);
  assert.equal((await api('POST', '/api/rooms', { id: 'stage', name: 'Main stage' })).status, 201);
  assert.equal((await api('POST', '/api/rooms', { id: 'stage' })).status, 409);
  const list = await (await api('GET', '/api/rooms')).json();
  assert.deepEqual(list.map((r) => [r.id, r.name]), [['stage', 'Main stage']]);
  assert.equal((await api('GET', '/api/rooms/nope')).status, 404);

  const u = await rawConnect(`${g1.publicUrl}/websocket?vsn=2.0.0&token=${hs256({ sub: '7', username: 'seven', exp: Math.floor(Date.now() / 1000) + 600 })}`);
  const anonOn2 = await rawConnect(`${g2.publicUrl}/websocket?vsn=2.0.0`);
  await u.join('rooms:stage', '5');
  await anonOn2.join('rooms:stage', '9');
  await waitFor(async () => {
    const r = await (await api('GET', '/api/rooms/stage')).json();
    return r.presence.anonymous === 1 && r.presence.users.length === 1;
  }, 5000, 'presence through the admin API');
  const room = await (await api('GET', '/api/rooms/stage')).json();
  assert.deepEqual(room.presence.users, [{ id: '7', username: 'seven', connections: 1 }]);
  assert.equal(room.presence.anonymous_by_node[g2.node], 1);

  // a backend broadcast reaches sockets on both nodes
  const b = await api('POST', '/api/rooms/stage/broadcast', { event: 'announcement', payload: { text: 'doors open' } });
  assert.equal(b.status, 200);
  const { id } = await b.json(); // the broadcast is kept in the room's history: its stream id
  assert.match(id, /^\d+-\d+$/);
  for (const c of [u, anonOn2]) {
    const f = await c.next((x) => x[3] === 'announcement');
    assert.deepEqual(f, [null, null, 'rooms:stage', 'announcement', { text: 'doors open', id }]);
  }
  assert.equal((await api('POST', '/api/rooms/stage/broadcast', { event: 'presence_diff', payload: {} })).status, 400);

  // delete: every node closes its channels with phx_close and the channel's join_ref
  assert.equal((await api('DELETE', '/api/rooms/stage')).status, 200);
  assert.deepEqual(await u.next((x) => x[3] === 'phx_close'), ['5', '5', 'rooms:stage', 'phx_close', {}]);
  assert.deepEqual(await anonOn2.next((x) => x[3] === 'phx_close'), ['9', '9', 'rooms:stage', 'phx_close', {}]);
  assert.deepEqual(redis.scanAll('adm:room:{stage}*').filter((k) => !k.endsWith(':seq')), []);
  u.send(['5', '6', 'rooms:stage', 'new_msg', { body: 'still there?' }]);
  const r6 = await u.reply('6');
  assert.equal(r6[4].response.reason, 'Room does not exist', JSON.stringify(r6));
  const rejoin = await anonOn2.join('rooms:stage', '10');
  assert.equal(rejoin[4].response.reason, 'Room does not exist');

  // health
  assert.equal((await fetch(`${g1.adminUrl}/health/live`)).status, 200);
  assert.equal((await fetch(`${g1.adminUrl}/health/ready`)).status, 200);
});

test('SIGTERM drain: unready, presence and node record gone before exit, every socket closed with 1012, exit within the timeout', { timeout: 120000 }, async (t) => {
  const N = Number(process.env.DRAIN_SOCKETS || 400);
  const gw = await startGateway({ redisPort: redis.port, prefix: 'drn', env: { GATEWAY_SERVER_SHUTDOWN_TIMEOUT_MS: '8000', GATEWAY_SERVER_DRAIN_BATCH: '100', GATEWAY_SERVER_DRAIN_GRACE_MS: '300' } });
  const other = await startGateway({ redisPort: redis.port, prefix: 'drn' });
  gws.push(other);
  createRoom(redis, 'drn', 'hall');
  const open = async (i) => {
    const signed = i % 10 === 0;
    const token = signed ? `&token=${hs256({ sub: `u${i}`, username: `u${i}`, exp: Math.floor(Date.now() / 1000) + 600 })}` : '';
    const c = await rawConnect(`${gw.publicUrl}/websocket?vsn=2.0.0${token}`, { timeoutMs: 20000 });
    c.send(['1', '1', 'rooms:hall', 'phx_join', {}]);
    return c;
  };
  const socks = [];
  for (let i = 0; i < N; i += 50) {
    socks.push(...await Promise.all(Array.from({ length: Math.min(50, N - i) }, (_, k) => open(i + k))));
  }
  await Promise.all(socks.map((c) => c.reply('1', 20000)));
  const observer = await rawConnect(`${other.publicUrl}/websocket?vsn=2.0.0`);
  await observer.join('rooms:hall', '1');
  const keys = { presence: 'drn:room:{hall}:presence', anon: 'drn:room:{hall}:anon', nodes: 'drn:room:{hall}:nodes' };
  await waitFor(() => Number(redis.cli('HGET', keys.anon, gw.node) || 0) === N - N / 10, 5000, 'anonymous count in redis');
  assert.equal(Number(redis.cli('HLEN', keys.presence)), N / 10);
  // the node records of both nodes exist (refreshed every heartbeat, with a TTL of one lease)
  const nodeKey = `drn:node:${gw.node}`;
  const otherKey = `drn:node:${other.node}`;
  await waitFor(() => redis.cli('EXISTS', nodeKey) === '1' && redis.cli('EXISTS', otherKey) === '1', 5000, 'node records in redis');

  // watch Redis while draining (async client: a blocking redis-cli would starve the sockets):
  // presence must be gone before the process exits
  const rc = await respClient(redis.port);
  let goneAt = 0;
  let polling = true;
  const poll = (async () => {
    while (polling && !goneAt) {
      const [n, anon, lease] = await Promise.all([rc.cmd('HLEN', keys.presence), rc.cmd('HGET', keys.anon, gw.node), rc.cmd('ZSCORE', keys.nodes, gw.node)]);
      if (n === 0 && anon === null && lease === null) goneAt = Date.now();
      await new Promise((r) => setTimeout(r, 2));
    }
  })();
  const t0 = Date.now();
  gw.proc.kill('SIGTERM');
  const exited = new Promise((resolve) => gw.proc.on('exit', (code, signal) => resolve({ code, signal, at: Date.now() })));
  // readiness turns 503 during the drain (the admin port stays up until the process exits)
  let readyDuring = 'not polled';
  for (let i = 0; i < 200 && gw.proc.exitCode === null; i++) {
    readyDuring = await fetch(`${gw.adminUrl}/health/ready`).then((r) => r.status).catch(() => 'refused');
    if (readyDuring === 503) break;
  }
  const exit = await exited;
  polling = false;
  await poll;
  rc.close();
  const codes = await Promise.all(socks.map((c) => c.closed.then((i) => i.code)));
  const byCode = codes.reduce((m, c) => ({ ...m, [c]: (m[c] || 0) + 1 }), {});
  t.diagnostic(`drain of ${N} sockets: exit after ${exit.at - t0} ms (code ${exit.code}); presence gone from Redis after ${goneAt - t0} ms; close codes ${JSON.stringify(byCode)}; readiness during drain: ${readyDuring}`);
  assert.equal(exit.code, 0);
  assert.ok(exit.at - t0 < 8000, 'exit within server.shutdown_timeout_ms');
  assert.ok(goneAt > 0 && goneAt <= exit.at, 'presence removed from Redis before exit');
  assert.deepEqual(byCode, { 1012: N });
  // the drained node's record is gone at exit (not left to its TTL), and no refresh wrote it
  // back; the other node's record is untouched
  assert.equal(redis.cli('EXISTS', nodeKey), '0', 'node record deleted by the drain');
  assert.equal(redis.cli('EXISTS', otherKey), '1', "the other node's record stays");
  assert.doesNotMatch(cli(['nodes'], {}, 'drn').out, new RegExp(gw.node), '`gateway nodes` no longer lists the drained node');
  assert.equal(readyDuring, 503, 'readiness during the drain');
  // the other node's observer sees the leaves at once, not after a TTL
  await waitFor(() => observer.frames.some((f) => f[3] === 'presence_count' && f[4].anonymous === 1 && f[4].users === 0), 3000,
    'observer to see the drained node leave');
});

// server.worker_threads: the runtime gets that many worker threads (0, the default: one per core)
test('server.worker_threads sizes the runtime', async () => {
  const fs = await import('node:fs');
  const workers = (pid) => fs.readdirSync(`/proc/${pid}/task`)
    .filter((t) => fs.readFileSync(`/proc/${pid}/task/${t}/comm`, 'utf8').trim() === 'tokio-rt-worker').length;
  const one = await startGateway({ redisPort: redis.port, prefix: 'ops', env: { GATEWAY_SERVER_WORKER_THREADS: '1' } });
  const three = await startGateway({ redisPort: redis.port, prefix: 'ops', env: { GATEWAY_SERVER_WORKER_THREADS: '3' } });
  gws.push(one, three);
  assert.equal(workers(one.proc.pid), 1);
  assert.equal(workers(three.proc.pid), 3);
  const bad = cli(['check-config'], { GATEWAY_SERVER_WORKER_THREADS: 'many' });
  assert.notEqual(bad.code, 0);
  assert.match(bad.out, /worker_threads/i);
});
