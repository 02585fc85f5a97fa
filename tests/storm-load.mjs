// The reconnect storm at load-test size (issue 21): not part of `node --test` (scripts/bench.sh
// storm runs it). VIEWERS phoenix.js viewers (10 % signed in) in ROOMS rooms, one of them holding
// BIG, over three gateways, driven by WORKERS client processes (a process may hold at most 20,000
// descriptors here, and one Node process cannot drive 30,000 sockets in time). A control room on
// the two survivors gets CONTROL_RATE messages a second from a signed-in phoenix.js publisher and
// every other room gets BACKGROUND_RATE messages a second in all through the admin API, throughout.
// Gateway 0 (a third of the viewers) is SIGKILLed; its viewers reconnect with phoenix.js's own
// backoff, spread round robin over the survivors as a load balancer would.
//
// Reported (one JSON line per run, `{"storm": …}`), with the issue's targets:
//   - every killed viewer back (joined again) after the kill: p50 / p99 / max   (target ≤ 5 s)
//   - presence complete in Redis, and as a new viewer per room sees it          (≤ TTL + heartbeat + 1 s)
//   - the control room's delivery p99 before / during / after, and loss         (p99 ≤ 100 ms, none lost)
//   - joins refused (none), upgrades shed (503), the gateways' own share (accept → 101 and the
//     join script, from their histograms), the survivors' CPU, and each client process's CPU and
//     event-loop lag, so a miss caused by the client side is visible.
//
//   node tests/storm-load.mjs                       # 30,000 viewers, 100 rooms, one of 7,500
//   STORM_VIEWERS=6000 STORM_BIG=1500 node tests/storm-load.mjs
//   STORM_MAX_PENDING_UPGRADES=64 node tests/storm-load.mjs   # with admission control
import { fork } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import fs from 'node:fs';
import { Socket, Presence } from 'phoenix';
import {
  startRedis, startGateway, createRoom, teardown, hs256, claims, WebSocket, waitFor, sleep, uid,
} from './lib/harness.mjs';
import { roomKeys, respClient, closeAllResp, pool } from './lib/presence.mjs';
import { histogram, bucketQuantile, delta as hdelta, sum as hsum, metric } from './lib/histogram.mjs';

const num = (name, dflt) => (process.env[name] === undefined ? dflt : Number(process.env[name]));
const CFG = {
  viewers: num('STORM_VIEWERS', 30000),
  rooms: num('STORM_ROOMS', 100),
  big: num('STORM_BIG', 7500),
  workers: num('STORM_WORKERS', 4),
  signedEvery: 10,
  ttl: num('STORM_TTL_MS', 3000),
  hb: num('STORM_HEARTBEAT_MS', 1000),
  controlSubscribers: num('STORM_CONTROL_SUBSCRIBERS', 200),
  controlRate: num('STORM_CONTROL_RATE', 20),
  backgroundRate: num('STORM_BACKGROUND_RATE', 20),
  inFlight: num('STORM_IN_FLIGHT', 64),
  pending: process.env.STORM_MAX_PENDING_UPGRADES,
};
const ADMIN_TOKEN = 'storm-admin-token-0123456789abcdef';
const SELF = fileURLToPath(import.meta.url);

/** Viewer i: its room (0 is the big one), its place in the room, first gateway, signed in or not. */
function viewer(i, cfg) {
  const rest = cfg.rooms - 1;
  const room = i < cfg.big ? 0 : 1 + ((i - cfg.big) % rest);
  const k = i < cfg.big ? i : Math.floor((i - cfg.big) / rest);
  return { i, room, gw: k % 3, signed: k % cfg.signedEvery === 0 };
}

function percentile(xs, p) {
  if (!xs.length) return null;
  const s = Float64Array.from(xs).sort();
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
}

function cpuOf(pid) {
  const f = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const parts = f.slice(f.lastIndexOf(')') + 2).split(' ');
  return (Number(parts[11]) + Number(parts[12])) / 100; // utime + stime, in s (USER_HZ 100)
}

// ---------------------------------------------------------------------------------------------
// A client process: its share of the viewers (role "viewers") or the control room (role "control")
// ---------------------------------------------------------------------------------------------

async function clientProcess() {
  let gws = [];
  let dead = null;
  let turn = 0;
  const live = () => gws.filter((g) => g.addr !== dead);
  const lag = monitorEventLoopDelay({ resolution: 10 });
  const send = (m) => process.send(m);
  let role = null;
  const viewers = [];
  const control = { subs: [], lat: [], seen: [], sent: 0, pub: null, stopped: false };

  function transportFor(v) {
    return class extends WebSocket {
      constructor(url, protocols) {
        const g = v.at ? live()[turn++ % live().length] : gws[v.gw];
        v.at = g.addr;
        super(url.replace(/\/\/[^/]+\//, `//${g.addr}/`), protocols, { perMessageDeflate: false });
      }
    };
  }

  function open(v, topic, token) {
    const socket = new Socket(`ws://${gws[v.gw].addr}/socket`, {
      transport: transportFor(v), params: token ? { token } : {}, timeout: 10000,
    });
    socket.connect();
    const ch = socket.channel(topic, {});
    v.socket = socket; v.channel = ch;
    return new Promise((resolve) => {
      ch.join()
        .receive('ok', () => { v.oks.push(Date.now()); resolve(); })
        .receive('error', (e) => { v.errors.push(e); resolve(); })
        .receive('timeout', () => { v.errors.push('timeout'); resolve(); });
    });
  }

  process.on('message', async (m) => {
    if (m.cmd === 'start') {
      ({ gws } = m);
      role = m.role;
      lag.enable();
      const cpu0 = process.cpuUsage();
      const exp = Math.floor(Date.now() / 1000) + 7200;
      if (role === 'viewers') {
        for (let i = m.worker; i < m.cfg.viewers; i += m.cfg.workers) {
          viewers.push({ ...viewer(i, m.cfg), oks: [], errors: [] });
        }
        await pool(viewers.length, m.cfg.inFlight, async (j) => {
          const v = viewers[j];
          const token = v.signed ? hs256({ ...claims(`u${v.i}`), exp }) : undefined;
          // viewers receive every message: the background rate is what each socket parses
          await open(v, `rooms:${m.rooms[v.room]}`, token);
          v.channel.on('new_msg', () => {});
        });
        send({ ev: 'ready', joined: viewers.filter((v) => v.oks.length).length, errors: viewers.filter((v) => v.errors.length).map((v) => v.errors[0]).slice(0, 3), cpu: cpuOf(process.pid), userCpu: process.cpuUsage(cpu0) });
      } else {
        // the control room: subscribers on the two survivors, one signed-in publisher
        const topic = `rooms:${m.control}`;
        const survivors = [1, 2];
        await pool(m.cfg.controlSubscribers, 32, async (j) => {
          const v = { i: `c${j}`, gw: survivors[j % 2], oks: [], errors: [], got: new Set() };
          await open(v, topic, undefined);
          v.channel.on('new_msg', (p) => {
            const [seq, at] = p.body.split(':').map(Number);
            if (v.got.has(seq)) return;
            v.got.add(seq);
            control.lat.push([at, Date.now() - at]);
          });
          control.subs.push(v);
        });
        const pub = { i: 'pub', gw: 1, oks: [], errors: [] };
        await open(pub, topic, hs256({ ...claims('storm-publisher'), exp }));
        control.pub = pub;
        send({ ev: 'ready', joined: control.subs.filter((v) => v.oks.length).length + pub.oks.length, errors: [...control.subs, pub].filter((v) => v.errors.length).map((v) => v.errors[0]).slice(0, 3) });
        // publish: CONTROL_RATE in the control room, BACKGROUND_RATE over the other rooms (admin API)
        const period = 1000 / m.cfg.controlRate;
        const t0 = Date.now();
        let bg = 0;
        const bgPeriod = m.cfg.backgroundRate > 0 ? 1000 / m.cfg.backgroundRate : Infinity;
        let nextBg = t0;
        const pubErrors = [];
        while (!control.stopped) {
          const due = t0 + control.sent * period;
          const now = Date.now();
          if (now < due) { await sleep(Math.min(due - now, 5)); continue; }
          const seq = control.sent++;
          pub.channel.push('new_msg', { body: `${seq}:${Date.now()}` }).receive('error', (e) => pubErrors.push(e)).receive('timeout', () => pubErrors.push('timeout'));
          while (nextBg <= Date.now() && !control.stopped) {
            const room = m.rooms[1 + (bg++ % (m.rooms.length - 1))];
            const g = live()[bg % live().length];
            fetch(`http://${g.admin}/api/rooms/${room}/broadcast`, {
              method: 'POST', headers: { authorization: `Bearer ${ADMIN_TOKEN}`, 'content-type': 'application/json' },
              body: JSON.stringify({ event: 'new_msg', payload: { body: `bg ${bg}` } }),
            }).then((r) => { if (!r.ok) pubErrors.push(`broadcast ${r.status}`); r.body?.cancel(); }, (e) => pubErrors.push(String(e)));
            nextBg += bgPeriod;
          }
        }
        control.pubErrors = pubErrors;
        control.background = bg;
      }
    } else if (m.cmd === 'kill') {
      dead = m.addr;
      for (const v of viewers) v.hit = v.at === dead;
      lag.reset();
      send({ ev: 'noted' });
    } else if (m.cmd === 'back?') {
      const hit = viewers.filter((v) => v.hit);
      const back = hit.filter((v) => v.oks.some((at) => at > m.killedAt));
      send({ ev: 'back', hit: hit.length, back: back.length });
    } else if (m.cmd === 'report') {
      const out = { ev: 'report', role, cpu: cpuOf(process.pid), lagP99: lag.percentile(99) / 1e6, lagMax: lag.max / 1e6 };
      if (role === 'viewers') {
        out.backMs = viewers.filter((v) => v.hit).map((v) => v.oks.find((at) => at > m.killedAt) - m.killedAt);
        out.errors = viewers.filter((v) => v.errors.length).map((v) => v.errors).slice(0, 5);
        out.refused = viewers.filter((v) => v.errors.length).length;
      } else {
        control.stopped = true;
        await sleep(1500); // the last messages land
        out.sent = control.sent;
        out.background = control.background;
        out.pubErrors = (control.pubErrors || []).slice(0, 5);
        out.pubErrorCount = (control.pubErrors || []).length;
        out.lat = control.lat;
        out.missing = control.subs.map((v) => control.sent - v.got.size).reduce((a, b) => a + b, 0);
        out.subs = control.subs.length;
      }
      send(out);
    } else if (m.cmd === 'exit') {
      for (const v of [...viewers, ...control.subs, control.pub].filter(Boolean)) { try { v.socket.disconnect(); } catch { /* */ } }
      process.exit(0);
    }
  });
  send({ ev: 'up' });
}

// ---------------------------------------------------------------------------------------------
// The coordinator
// ---------------------------------------------------------------------------------------------

function child(role, worker) {
  const c = fork(SELF, ['--client'], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
  c.role = role;
  c.worker = worker;
  c.inbox = [];
  c.waiters = [];
  c.on('message', (m) => {
    const w = c.waiters.findIndex((x) => x.ev === m.ev);
    if (w >= 0) c.waiters.splice(w, 1)[0].resolve(m); else c.inbox.push(m);
  });
  c.next = (ev, ms = 600000) => new Promise((resolve, reject) => {
    const i = c.inbox.findIndex((m) => m.ev === ev);
    if (i >= 0) { resolve(c.inbox.splice(i, 1)[0]); return; }
    const t = setTimeout(() => reject(new Error(`client ${role} ${worker}: no ${ev} in ${ms} ms`)), ms);
    c.waiters.push({ ev, resolve: (m) => { clearTimeout(t); resolve(m); } });
  });
  return c;
}

/** A new signed-in phoenix.js viewer on `g` sees `users` signed-in users (itself left out) and `anon` anonymous. */
async function newViewerSees(g, topic, users, anon, ms) {
  const socket = new Socket(`ws://${g.publicAddr}/socket`, {
    transport: class extends WebSocket { constructor(u, p) { super(u, p, { perMessageDeflate: false }); } },
    params: { token: hs256(claims(uid('probe'))) }, timeout: 10000,
  });
  socket.connect();
  const ch = socket.channel(topic, {});
  const presence = new Presence(ch);
  let count = null;
  ch.on('presence_count', (p) => { count = p; });
  let saw = '';
  try {
    await new Promise((resolve, reject) => ch.join().receive('ok', resolve).receive('error', reject).receive('timeout', reject));
    await waitFor(() => {
      let n = 0;
      presence.list((k) => { if (k !== '') n += 1; });
      saw = `${n - 1} users, count ${JSON.stringify(count)}`;
      return n - 1 === users && count && count.anonymous === anon && count.users === users + 1;
    }, ms, 'view', 50);
    return true;
  } catch { return saw; } finally { socket.disconnect(); }
}

async function coordinator() {
  const cfg = CFG;
  const redis = await startRedis();
  const rc = await respClient(redis.port);
  const env = {
    GATEWAY_PRESENCE_TTL_MS: String(cfg.ttl),
    GATEWAY_PRESENCE_HEARTBEAT_INTERVAL_MS: String(cfg.hb),
    GATEWAY_SERVER_WORKER_THREADS: '1',
    GATEWAY_SERVER_PUSH_RATE_PER_S: '1000',
    GATEWAY_SERVER_PUSH_BURST: '1000',
    GATEWAY_ADMIN_TOKEN: ADMIN_TOKEN,
    ...(cfg.pending ? { GATEWAY_SERVER_MAX_PENDING_UPGRADES: cfg.pending } : {}),
  };
  const gws = await Promise.all(['storm-a', 'storm-b', 'storm-c'].map((name) => startGateway({ redisPort: redis.port, prefix: 'sl', name, env })));
  const clients = [];
  let ctl = null;
  try {
    const rooms = Array.from({ length: cfg.rooms }, (_, r) => `storm${r}`);
    const control = 'stormcontrol';
    for (const r of [...rooms, control]) createRoom(redis, 'sl', r);
    // expected presence per room
    const want = rooms.map(() => ({ users: 0, anon: 0 }));
    const perGw = [0, 0, 0];
    for (let i = 0; i < cfg.viewers; i += 1) {
      const v = viewer(i, cfg);
      if (v.signed) want[v.room].users += 1; else want[v.room].anon += 1;
      perGw[v.gw] += 1;
    }
    const addrs = gws.map((g) => ({ addr: g.publicAddr, admin: new URL(g.adminUrl).host }));
    console.log(`== storm: ${cfg.viewers} viewers (${perGw.join(' / ')} per gateway), ${cfg.rooms} rooms (one of ${cfg.big}), ${cfg.workers} client processes; control room ${cfg.controlSubscribers} subscribers at ${cfg.controlRate}/s, ${cfg.backgroundRate} msg/s over the other rooms; TTL ${cfg.ttl} ms, heartbeat ${cfg.hb} ms${cfg.pending ? `, max_pending_upgrades ${cfg.pending}` : ''}; load ${fs.readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ')}`);

    for (let w = 0; w < cfg.workers; w += 1) clients.push(child('viewers', w));
    ctl = child('control', 0);
    await Promise.all([...clients, ctl].map((c) => c.next('up')));
    const t0 = Date.now();
    for (const c of clients) c.send({ cmd: 'start', role: 'viewers', worker: c.worker, cfg, gws: addrs, rooms });
    const ready = await Promise.all(clients.map((c) => c.next('ready')));
    const joinMs = Date.now() - t0;
    const firstErrors = ready.flatMap((r) => r.errors);
    console.log(`-- ${ready.reduce((a, r) => a + r.joined, 0)} viewers joined in ${(joinMs / 1000).toFixed(1)} s${firstErrors.length ? `; errors ${JSON.stringify(firstErrors)}` : ''}`);
    if (firstErrors.length) throw new Error(`first joins failed: ${JSON.stringify(firstErrors)}`);

    const complete = async () => {
      const liveNodes = new Set(gws.filter((g) => !g.exitInfo).map((g) => g.node));
      let ok = 0;
      complete.last = '';
      for (let r = 0; r < rooms.length; r += 1) {
        const k = roomKeys('sl', rooms[r]);
        const [fields, anon] = await Promise.all([rc.cmd('HKEYS', k.presence), rc.cmd('HGETALL', k.anon)]);
        let anonSum = 0; let anonDead = false;
        for (let j = 0; j < anon.length; j += 2) {
          if (Number(anon[j + 1]) !== 0 && !liveNodes.has(String(anon[j]))) anonDead = true;
          anonSum += Number(anon[j + 1]);
        }
        const liveFields = fields.every((f) => liveNodes.has(String(f).split('.').slice(0, -1).join('.')));
        if (fields.length === want[r].users && liveFields && anonSum === want[r].anon && !anonDead) ok += 1;
        else complete.last = `room ${rooms[r]}: ${fields.length}/${want[r].users} users (all live: ${liveFields}), ${anonSum}/${want[r].anon} anonymous (a dead node's: ${anonDead})`;
      }
      return ok;
    };
    await waitFor(async () => (await complete()) === rooms.length, 60000, 'presence complete before the kill', 250)
      .catch((e) => { throw new Error(`${e.message}; ${complete.last}`); });

    ctl.send({ cmd: 'start', role: 'control', cfg, gws: addrs, rooms, control });
    const ctlReady = await ctl.next('ready');
    if (ctlReady.errors.length) throw new Error(`control room joins failed: ${JSON.stringify(ctlReady.errors)}`);
    await sleep(5000); // a steady window before the kill

    const victim = gws[0];
    const survivors = gws.slice(1);
    const readings = (g) => Promise.all([
      histogram(g, 'gateway_upgrade_seconds', 'phase="accept"'),
      histogram(g, 'gateway_upgrade_seconds', 'phase="request"'),
      histogram(g, 'gateway_redis_script_duration_seconds', 'script="join"'),
    ]);
    const before = await Promise.all(survivors.map(readings));
    const gwCpu0 = survivors.map((g) => cpuOf(g.proc.pid));
    const clientCpu0 = await Promise.all([...clients, ctl].map(async (c) => { c.send({ cmd: 'kill', addr: victim.publicAddr }); await c.next('noted'); return cpuOf(c.pid); }));

    const killedAt = Date.now();
    victim.proc.kill('SIGKILL');
    await victim.exited;
    const bound = cfg.ttl + cfg.hb + 1000;

    // every killed viewer back
    let hit = 0; let back = 0;
    const deadline = killedAt + 120000;
    for (;;) {
      const rs = await Promise.all(clients.map(async (c) => { c.send({ cmd: 'back?', addr: victim.publicAddr, killedAt }); return c.next('back'); }));
      hit = rs.reduce((a, r) => a + r.hit, 0);
      back = rs.reduce((a, r) => a + r.back, 0);
      if (back === hit && hit > 0) break;
      if (Date.now() > deadline) throw new Error(`only ${back}/${hit} killed viewers back after 120 s`);
      await sleep(100);
    }
    const allBackMs = Date.now() - killedAt;
    // presence complete in Redis, and as a new viewer of each room sees it (one per room, on a survivor)
    await waitFor(async () => (await complete()) === rooms.length, 120000, 'every room complete in Redis', 100)
      .catch((e) => { throw new Error(`${e.message}; ${complete.last}`); });
    const redisCompleteMs = Date.now() - killedAt;
    const views = await Promise.all(rooms.map((r, i) => newViewerSees(survivors[i % 2], `rooms:${r}`, want[i].users, want[i].anon, 30000)));
    const viewCompleteMs = Date.now() - killedAt;
    const wrongViews = views.map((v, i) => (v === true ? null : `${rooms[i]}: ${v}`)).filter(Boolean);

    await sleep(3000); // a steady window after
    const after_ = await Promise.all(survivors.map(readings));
    const gwCpu = survivors.map((g, i) => cpuOf(g.proc.pid) - gwCpu0[i]);
    const windowS = (Date.now() - killedAt) / 1000;
    const reports = await Promise.all([...clients, ctl].map(async (c) => { c.send({ cmd: 'report', killedAt }); return c.next('report'); }));
    const clientCpu = reports.map((r, i) => +(r.cpu - clientCpu0[i]).toFixed(2));
    const vr = reports.filter((r) => r.role === 'viewers');
    const cr = reports.find((r) => r.role === 'control');
    const backMs = vr.flatMap((r) => r.backMs);
    const refused = vr.reduce((a, r) => a + r.refused, 0);
    const phase = (from, to) => cr.lat.filter(([at]) => at >= from && at < to).map(([, l]) => l);
    const lat = {
      before: phase(0, killedAt),
      storm: phase(killedAt, killedAt + allBackMs),
      after: phase(killedAt + allBackMs, Infinity),
    };
    const p99 = (xs) => (xs.length ? +percentile(xs, 99).toFixed(1) : null);
    const all = cr.lat.map(([, l]) => l);
    const sums = (k) => hsum(after_.map((r, i) => hdelta(r[k], before[i][k])));
    const acc = sums(0); const req = sums(1); const js = sums(2);
    const shed = (await Promise.all(survivors.map((g) => metric(g, 'gateway_upgrades_shed_total')))).reduce((a, b) => a + b, 0);
    const figures = {
      viewers: cfg.viewers,
      rooms: cfg.rooms,
      big_room: cfg.big,
      client_processes: cfg.workers,
      first_joins_s: +(joinMs / 1000).toFixed(1),
      killed_viewers: hit,
      back_ms: { p50: percentile(backMs, 50), p99: percentile(backMs, 99), max: backMs.reduce((a, b) => Math.max(a, b), 0), all: allBackMs },
      presence_complete_ms: { redis: redisCompleteMs, new_viewer: viewCompleteMs, bound },
      wrong_views: wrongViews.slice(0, 5),
      control: {
        sent: cr.sent, subscribers: cr.subs, lost: cr.missing, publish_errors: cr.pubErrorCount,
        p99_ms: { before: p99(lat.before), storm: p99(lat.storm), after: p99(lat.after), all: p99(all) },
        p50_ms: +percentile(all, 50).toFixed(1), max_ms: all.reduce((a, b) => Math.max(a, b), 0),
      },
      background_messages: cr.background,
      refused_joins: refused,
      upgrades_shed: shed,
      gateway_share: {
        accept_to_101_mean_ms: +(1000 * acc.sum / Math.max(1, acc.count)).toFixed(1),
        request_to_101_mean_ms: +(1000 * req.sum / Math.max(1, req.count)).toFixed(2),
        request_to_101_p99_le_s: bucketQuantile(req, 0.99),
        join_script_calls: js.count,
        join_script_mean_ms: +(1000 * js.sum / Math.max(1, js.count)).toFixed(1),
        join_script_p99_le_s: bucketQuantile(js, 0.99),
      },
      survivors_cpu_s: gwCpu.map((c) => +c.toFixed(2)),
      window_s: +windowS.toFixed(1),
      client_cpu_s: clientCpu,
      client_lag_ms: reports.map((r) => ({ p99: +r.lagP99.toFixed(0), max: +r.lagMax.toFixed(0) })),
      load: fs.readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' '),
    };
    const targets = [
      ['every viewer back ≤ 5 s', figures.back_ms.max <= 5000],
      [`presence complete ≤ ${bound} ms (Redis and a new viewer)`, redisCompleteMs <= bound && viewCompleteMs <= bound],
      ['control p99 ≤ 100 ms throughout', figures.control.p99_ms.all !== null && figures.control.p99_ms.all <= 100],
      ['nothing lost', cr.missing === 0 && cr.pubErrorCount === 0],
      ['no join refused', refused === 0],
    ];
    figures.targets = Object.fromEntries(targets);
    console.log(`-- killed ${hit} viewers: back p50/p99/max ${figures.back_ms.p50}/${figures.back_ms.p99}/${figures.back_ms.max} ms; presence complete in Redis ${redisCompleteMs} ms, as new viewers see it ${viewCompleteMs} ms (bound ${bound}); control p99 before/storm/after ${figures.control.p99_ms.before}/${figures.control.p99_ms.storm}/${figures.control.p99_ms.after} ms, lost ${cr.missing}; refused ${refused}; shed ${shed}`);
    for (const [what, ok] of targets) console.log(`   ${ok ? 'met   ' : 'MISSED'} ${what}`);
    console.log(JSON.stringify({ storm: figures }));
    const failed = wrongViews.length || refused || cr.missing || cr.pubErrorCount;
    for (const c of [...clients, ctl]) c.send({ cmd: 'exit' });
    if (failed) {
      console.error(`storm: incorrect result: ${JSON.stringify({ wrongViews: wrongViews.slice(0, 3), refused, lost: cr.missing, pubErrors: cr.pubErrors, errors: vr.flatMap((r) => r.errors).slice(0, 3) })}`);
      process.exitCode = 1;
    }
  } finally {
    for (const c of clients) { try { c.kill(); } catch { /* */ } }
    if (ctl) { try { ctl.kill(); } catch { /* */ } }
    closeAllResp();
    await teardown({ gateways: gws, redis });
  }
}

if (process.argv.includes('--client')) clientProcess();
else coordinator().then(() => process.exit(process.exitCode || 0), (e) => { console.error(e); process.exit(1); });
