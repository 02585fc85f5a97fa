// Reconnect storm (issue 21), at CI size: 3,000 viewers (10 % signed in) in 30 rooms over three
// gateways, all real phoenix.js sockets with phoenix.js's own reconnect backoff and rejoin. One
// gateway (a third of the viewers) is SIGKILLed; its viewers reconnect to the two survivors, spread
// round robin the way a load balancer that dropped the dead backend would. Every viewer must be
// back and joined, no join refused, and presence in Redis complete (each room: its signed-in users
// on live nodes only, its anonymous total on live nodes only) within TTL + heartbeat + 3 s.
// The public listener's backlog is checked with `ss`, and the gateways' own share of the
// reconnect (accept → 101, gateway_upgrade_seconds; the join script's round trip) is reported
// beside the client's CPU and event-loop lag.
import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { Socket } from 'phoenix';
import {
  test, startRedis, startGateway, createRoom, teardown, uid, waitFor, hs256, claims, WebSocket,
  tryUpgrade, wsUrl, sleep,
} from './lib/harness.mjs';
import { roomKeys, respClient, closeAllResp, pool } from './lib/presence.mjs';
import { histogram, bucketQuantile, delta } from './lib/histogram.mjs';

const PREFIX = 'st';
const VIEWERS = 3000;
const ROOMS = 30;
const SIGNED_EVERY = 10; // 10 % signed in
const TTL = 3000;
const HB = 1000;
const FAST = { GATEWAY_PRESENCE_TTL_MS: String(TTL), GATEWAY_PRESENCE_HEARTBEAT_INTERVAL_MS: String(HB) };
// a backlog below somaxconn on one gateway, the default on the others: both must show in `ss`
const SMALL_BACKLOG = 1000;
const SOMAXCONN = Number(fs.readFileSync('/proc/sys/net/core/somaxconn', 'utf8').trim());
// to measure the storm with admission control: STORM_MAX_PENDING_UPGRADES=<n> (default off)
const PENDING = process.env.STORM_MAX_PENDING_UPGRADES
  ? { GATEWAY_SERVER_MAX_PENDING_UPGRADES: process.env.STORM_MAX_PENDING_UPGRADES } : {};

let redis; let rc;
const gws = [];
const sockets = [];

before(async () => {
  redis = await startRedis();
  rc = await respClient(redis.port);
  gws.push(...await Promise.all(['storm-a', 'storm-b', 'storm-c'].map((name, i) => startGateway({
    redisPort: redis.port,
    prefix: PREFIX,
    name,
    env: { ...FAST, ...PENDING, ...(i === 2 ? { GATEWAY_SERVER_LISTEN_BACKLOG: String(SMALL_BACKLOG) } : {}) },
  }))));
});
after(async () => {
  for (const s of sockets) { try { s.disconnect(); } catch { /* */ } }
  closeAllResp();
  await teardown({ gateways: gws, redis });
});

/** The Send-Q column of `ss -ltn` for the listener on `addr` (host:port): its backlog. */
function listenBacklog(addr) {
  const port = addr.split(':').pop();
  const out = execFileSync('ss', ['-ltnH', `sport = :${port}`], { encoding: 'utf8' });
  const line = out.split('\n').find((l) => l.includes(`:${port}`));
  assert.ok(line, `ss shows a listener on ${addr}: ${out}`);
  return Number(line.trim().split(/\s+/)[2]);
}

/** The next live gateway in turn (the dead one left out), as a load balancer would pick. */
let turn = 0;
function balanced() {
  const live = gws.filter((g) => !g.exitInfo);
  return live[turn++ % live.length];
}
/**
 * phoenix.js's transport for viewer `v`: its first attempt goes to its own gateway, every later
 * one (a reconnect, or a retry after a 503) to the next live gateway; `v.at` is the gateway of
 * the latest attempt, the one the socket is connected to once open.
 */
function transportFor(v) {
  return class extends WebSocket {
    constructor(url, protocols) {
      const g = v.at ? balanced() : gws[v.gw];
      v.at = g;
      super(url.replace(/\/\/[^/]+\//, `//${g.publicAddr}/`), protocols, { perMessageDeflate: false });
    }
  };
}

function percentile(xs, p) {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
}

test('admission: past server.max_pending_upgrades an upgrade is answered 503 with Retry-After before any work', { timeout: 30000 }, async () => {
  const g = await startGateway({ redisPort: redis.port, prefix: PREFIX, name: 'storm-admission', env: { GATEWAY_SERVER_MAX_PENDING_UPGRADES: '1' } });
  gws.push(g);
  try {
    // Redis holds every command for 1.5 s: a signed-in upgrade waits on its ban check meanwhile
    await rc.cmd('CLIENT', 'PAUSE', '1500', 'ALL');
    const t0 = Date.now();
    const held = tryUpgrade(wsUrl(g, { token: hs256(claims('adm-1')) }), { timeoutMs: 8000 });
    await sleep(300);
    const refused = await tryUpgrade(wsUrl(g), { timeoutMs: 8000 });
    const refusedMs = Date.now() - t0;
    assert.equal(refused.status, 503, 'the second upgrade in progress is refused');
    assert.equal(refused.headers['retry-after'], '1');
    assert.equal(refused.body, 'too many upgrades in progress\n');
    assert.ok(refusedMs < 1500, `answered at once (${refusedMs} ms), while Redis was still paused`);
    assert.equal((await held).status, 101, 'the upgrade in progress completes once Redis answers');
    // its place is given back: the next upgrade goes through
    assert.equal((await tryUpgrade(wsUrl(g))).status, 101);
    const text = await (await fetch(`${g.adminUrl}/metrics`)).text();
    assert.match(text, /^gateway_upgrades_shed_total 1$/m);
  } finally {
    await g.stop();
    gws.splice(gws.indexOf(g), 1);
  }
});

test('storm: a SIGKILLed gateway\'s ~1,000 viewers are back on the survivors, presence complete, no join refused', { timeout: 120000 }, async (t) => {
  // the listeners' accept queues are what the settings say (capped by somaxconn)
  assert.equal(listenBacklog(gws[0].publicAddr), Math.min(4096, SOMAXCONN), 'default backlog 4096 (or somaxconn)');
  assert.equal(listenBacklog(gws[2].publicAddr), Math.min(SMALL_BACKLOG, SOMAXCONN), 'server.listen_backlog is used');

  const rooms = Array.from({ length: ROOMS }, () => uid('storm'));
  for (const r of rooms) createRoom(redis, PREFIX, r);
  const exp = Math.floor(Date.now() / 1000) + 3600;

  // viewer i is the j-th of room i % ROOMS (j = i / ROOMS): first on gateway j % 3, signed in when
  // j % SIGNED_EVERY == 0, so every room has viewers on every gateway and signed-in users on each
  const viewers = Array.from({ length: VIEWERS }, (_, i) => {
    const j = Math.floor(i / ROOMS);
    return { i, room: rooms[i % ROOMS], gw: j % 3, signed: j % SIGNED_EVERY === 0, oks: [], errors: [], channel: null };
  });
  const t0 = Date.now();
  await pool(VIEWERS, 100, async (v) => {
    v = viewers[v];
    const token = v.signed ? hs256({ ...claims(`u${v.i}`), exp }) : undefined;
    const first = gws[v.gw];
    const socket = new Socket(`ws://${first.publicAddr}/socket`, {
      transport: transportFor(v), params: token ? { token } : {}, timeout: 10000,
    });
    sockets.push(socket);
    v.socket = socket;
    socket.connect();
    const ch = socket.channel(`rooms:${v.room}`, {});
    v.channel = ch;
    await new Promise((resolve) => {
      ch.join()
        .receive('ok', () => { v.oks.push(Date.now()); resolve(); })
        .receive('error', (e) => { v.errors.push(e); resolve(); })
        .receive('timeout', () => { v.errors.push('timeout'); resolve(); });
    });
  });
  const joinMs = Date.now() - t0;
  assert.deepEqual(viewers.filter((v) => v.errors.length).map((v) => v.errors).slice(0, 5), [], 'every first join ok');

  const signedPerRoom = VIEWERS / ROOMS / SIGNED_EVERY;
  const anonPerRoom = VIEWERS / ROOMS - signedPerRoom;
  /** Rooms whose presence in Redis is exactly the viewers', all on live nodes. */
  const complete = async () => {
    const live = new Set(gws.filter((g) => !g.exitInfo).map((g) => g.node));
    let ok = 0;
    complete.last = '';
    for (const r of rooms) {
      const k = roomKeys(PREFIX, r);
      const [fields, anon] = await Promise.all([rc.cmd('HKEYS', k.presence), rc.cmd('HGETALL', k.anon)]);
      let anonSum = 0; let anonDead = false;
      for (let j = 0; j < anon.length; j += 2) {
        if (Number(anon[j + 1]) !== 0 && !live.has(String(anon[j]))) anonDead = true;
        anonSum += Number(anon[j + 1]);
      }
      const liveFields = fields.every((f) => live.has(String(f).split('.').slice(0, -1).join('.')));
      if (fields.length === signedPerRoom && liveFields && anonSum === anonPerRoom && !anonDead) ok += 1;
      else complete.last = `room ${r}: ${fields.length} users (all live: ${liveFields}), ${anonSum} anonymous (a dead node's: ${anonDead})`;
    }
    return ok;
  };
  await waitFor(async () => (await complete()) === ROOMS, 15000, 'presence complete before the kill', 200)
    .catch((e) => { throw new Error(`${e.message}; ${complete.last}`); });

  const victim = gws[0];
  const hit = viewers.filter((v) => v.at === victim);
  const survivors = gws.slice(1);
  const readings = (g) => Promise.all([
    histogram(g, 'gateway_upgrade_seconds', 'phase="accept"'),
    histogram(g, 'gateway_redis_script_duration_seconds', 'script="join"'),
    histogram(g, 'gateway_upgrade_seconds', 'phase="request"'),
  ]);
  const before = await Promise.all(survivors.map(readings));
  const lag = monitorEventLoopDelay({ resolution: 10 });
  lag.enable();
  const cpu0 = process.cpuUsage();

  const killedAt = Date.now();
  victim.proc.kill('SIGKILL');
  await victim.exited;
  const bound = TTL + HB + 3000;
  await waitFor(() => hit.every((v) => v.oks.some((at) => at > killedAt)), 30000,
    `every viewer of the killed gateway rejoined (now ${hit.filter((v) => v.oks.some((at) => at > killedAt)).length}/${hit.length})`, 50)
    .catch(async (e) => {
      const shed = await Promise.all(survivors.map(async (g) => /^gateway_upgrades_shed_total (\d+)$/m.exec(await (await fetch(`${g.adminUrl}/metrics`)).text())[1]));
      const v = hit[0];
      throw new Error(`${e.message}; shed by the survivors: ${shed}; a viewer: socket ${v.socket.connectionState()}, channel ${v.channel.state}, oks ${v.oks.length}, errors ${JSON.stringify(v.errors)}`);
    });
  const backMs = hit.map((v) => v.oks.find((at) => at > killedAt) - killedAt);
  await waitFor(async () => (await complete()) === ROOMS, bound + 10000,
    'every room complete in Redis on live nodes', 100)
    .catch((e) => { throw new Error(`${e.message}; ${complete.last}`); });
  const completeMs = Date.now() - killedAt;
  const cpu = process.cpuUsage(cpu0);
  lag.disable();
  const after_ = await Promise.all(survivors.map(readings));

  // every viewer joined again with no refusal, on a survivor
  const refused = viewers.filter((v) => v.errors.length);
  assert.equal(refused.length, 0, `joins refused or timed out: ${JSON.stringify(refused.slice(0, 3).map((v) => v.errors))}`);
  /** The survivors' k-th reading, summed over both, minus its value before the kill. */
  const sum = (k) => {
    const ds = after_.map((r, i) => delta(r[k], before[i][k]));
    return {
      count: ds.reduce((a, u) => a + u.count, 0),
      sum: ds.reduce((a, u) => a + u.sum, 0),
      buckets: ds[0].buckets.map(([le], j) => [le, ds.reduce((a, u) => a + u.buckets[j][1], 0)]),
    };
  };
  const merged = sum(0);
  const upgraded = merged.count;
  assert.ok(upgraded >= hit.length, `the survivors upgraded the ${hit.length} returning viewers (counted ${upgraded})`);
  assert.ok(completeMs <= bound, `presence complete in Redis ${completeMs} ms after the kill (bound TTL + heartbeat + 3 s = ${bound} ms)`);

  const joinScripts = sum(1);
  const own = sum(2);
  const figures = {
    viewers: VIEWERS,
    first_joins_ms: joinMs,
    killed_viewers: hit.length,
    rejoined_ms: { p50: percentile(backMs, 50), p99: percentile(backMs, 99), max: Math.max(...backMs) },
    presence_complete_ms: completeMs,
    upgrade_from_accept_s: { mean: +(merged.sum / merged.count).toFixed(4), p50_le: bucketQuantile(merged, 0.5), p99_le: bucketQuantile(merged, 0.99) },
    upgrade_from_request_s: { mean: +(own.sum / Math.max(1, own.count)).toFixed(4), p50_le: bucketQuantile(own, 0.5), p99_le: bucketQuantile(own, 0.99) },
    join_script_s: { calls: joinScripts.count, mean: +(joinScripts.sum / Math.max(1, joinScripts.count)).toFixed(4), p99_le: bucketQuantile(joinScripts, 0.99) },
    max_pending_upgrades: Number(PENDING.GATEWAY_SERVER_MAX_PENDING_UPGRADES || 0),
    upgrades_shed: (await Promise.all(survivors.map(async (g) => Number(/^gateway_upgrades_shed_total (\d+)$/m.exec(await (await fetch(`${g.adminUrl}/metrics`)).text())[1])))).reduce((a, b) => a + b, 0),
    client_cpu_ms: Math.round((cpu.user + cpu.system) / 1000),
    client_event_loop_lag_ms: { p99: +(lag.percentile(99) / 1e6).toFixed(1), max: +(lag.max / 1e6).toFixed(1) },
  };
  t.diagnostic(`storm figures: ${JSON.stringify(figures)}`);
  console.log(JSON.stringify({ storm: figures }));
});
