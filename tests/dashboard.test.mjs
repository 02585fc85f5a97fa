// The Grafana dashboard only queries metrics the gateway really exports, and they are there from
// start-up: a fresh gateway's /metrics (before any traffic) carries every metric name and every
// `by (label)` of every panel and variable, with every closed label set at zero. Then a real
// Prometheus scrapes two gateways under traffic and evaluates every panel's query, with the
// dashboard's variables filled in as Grafana fills them: each parses and returns data.
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { REPO_ROOT, connect, createRoom, hs256, join, push, sleep, startGateway, startRedis, teardown, test, waitFor } from './lib/harness.mjs';
import { startPrometheus } from './lib/prometheus.mjs';

let redis;
let gw;
const gws = [];
let prom;

before(async () => {
  redis = await startRedis();
  gw = await startGateway({ redisPort: redis.port, prefix: 'dash' });
  gws.push(gw);
  createRoom(redis, 'dash', 'metrics');
});
after(async () => {
  await prom?.stop().catch(() => {});
  await teardown({ gateways: gws, redis });
});

const DASHBOARD = JSON.parse(fs.readFileSync(path.join(REPO_ROOT, 'grafana', 'gateway-dashboard.json'), 'utf8'));

/** Every panel (rows' nested panels included) with its targets. */
function panels(dash = DASHBOARD) {
  return dash.panels.flatMap((p) => [p, ...(p.panels ?? [])]).filter((p) => Array.isArray(p.targets));
}

/** The dashboard's query variables: {name, query, allValue, expr, label} (`label_values(expr, label)`). */
function queryVariables(dash = DASHBOARD) {
  return dash.templating.list.filter((v) => v.type === 'query').map((v) => {
    const query = v.query?.query ?? v.query;
    const m = /^label_values\(\s*(.+?)\s*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)$/.exec(query);
    assert.ok(m, `variable ${v.name}: only label_values(expr, label) queries are evaluated here, not ${query}`);
    return { name: v.name, query, allValue: v.allValue, includeAll: v.includeAll, expr: m[1], label: m[2] };
  });
}

/** Every expression the dashboard sends to Prometheus: panel targets, then variable queries. */
function dashboardExprs() {
  return [
    ...panels().flatMap((p) => p.targets.map((t) => t.expr)),
    ...queryVariables().map((v) => v.query),
  ];
}

/** Samples of the exposition: metric name → list of {labels, value}. */
function parseExposition(text) {
  const series = new Map();
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const kv of (m[3] || '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[kv[1]] = kv[2];
    if (!series.has(m[1])) series.set(m[1], []);
    series.get(m[1]).push({ labels, value: Number(m[4]) });
  }
  return series;
}

async function scrape(g) {
  const res = await fetch(`${g.adminUrl}/metrics`);
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type'), /^text\/plain/);
  return parseExposition(await res.text());
}

/** The metric names and `by (label)`s of every dashboard expression that `series` lacks. */
function missingFromExposition(series) {
  const exprs = dashboardExprs();
  assert.ok(exprs.length >= 16, 'dashboard has its panels');
  const missing = [];
  for (const expr of exprs) {
    const names = [...expr.matchAll(/\b((?:gateway|process)_[a-z0-9_]+)\b/g)].map((m) => m[1]);
    assert.ok(names.length > 0, `no metric in ${expr}`);
    const byLabels = [...expr.matchAll(/\bby \(([^)]*)\)/g)].flatMap((m) => m[1].split(',').map((s) => s.trim()))
      .filter((l) => l && l !== 'le' && l !== 'instance' && l !== 'job');
    for (const name of names) {
      const samples = series.get(name);
      if (!samples) { missing.push(`${name} (in: ${expr})`); continue; }
      for (const label of byLabels) {
        if (!samples.some((s) => label in s.labels)) missing.push(`${name} has no label ${label} (in: ${expr})`);
      }
    }
    // histogram panels aggregate by le
    if (/histogram_quantile/.test(expr)) assert.match(expr, /_bucket\{/);
  }
  return missing;
}

test('a fresh gateway, before any traffic, exports every metric and label the dashboard queries', async () => {
  const series = await scrape(gw);
  const missing = missingFromExposition(series);
  assert.deepEqual(missing, [], `dashboard queries metrics a fresh gateway does not export:\n${missing.join('\n')}`);

  // closes by code exist before the first close, every code at 0
  const closes = series.get('gateway_closes_total') ?? [];
  const codes = closes.map((s) => s.labels.code).sort();
  for (const code of ['1000', '1001', '1002', '1006', '1011', '1012', '4000', '4001', '4008', '4009', 'other']) {
    assert.ok(codes.includes(code), `gateway_closes_total{code="${code}"} on a fresh gateway (has ${codes.join(',')})`);
  }
  assert.ok(closes.every((s) => s.value === 0), `fresh closes are 0: ${JSON.stringify(closes)}`);
  // the other labelled families: every known value at 0
  const want = {
    gateway_connections: ['kind', ['anonymous', 'signed_in']],
    gateway_joins_total: ['result', ['invalid', 'no_room', 'ok', 'rate_limited', 'refused', 'unavailable']],
    gateway_pushes_total: ['result', ['invalid', 'not_signed_in', 'ok', 'rate_limited', 'refused', 'unavailable', 'unknown_event']],
    gateway_hook_events_total: ['result', ['dropped', 'retried', 'sent']],
    gateway_hook_duration_seconds_count: ['hook', ['events', 'publish']],
    gateway_presence_frames_total: ['event', ['presence_count', 'presence_diff', 'presence_state']],
    gateway_redis_script_duration_seconds_count: ['script', ['broadcast', 'heartbeat', 'history', 'join', 'leave', 'snapshot', 'sync']],
    gateway_history_recoveries_total: ['outcome', ['gap', 'none', 'recovered']],
  };
  for (const [name, [label, values]] of Object.entries(want)) {
    const samples = series.get(name) ?? [];
    assert.deepEqual(samples.map((s) => s.labels[label]).sort(), values, `${name}{${label}} on a fresh gateway`);
    assert.ok(samples.every((s) => s.value === 0), `${name} is 0 on a fresh gateway: ${JSON.stringify(samples)}`);
  }
  // the hook requests: every hook × outcome at 0
  const hooks = (series.get('gateway_hook_requests_total') ?? []).map((s) => `${s.labels.hook}/${s.labels.outcome}`).sort();
  const wantHooks = ['events', 'publish'].flatMap((h) => ['http_error', 'invalid', 'ok', 'overloaded', 'refused', 'timeout'].map((o) => `${h}/${o}`));
  assert.deepEqual(hooks, wantHooks, 'gateway_hook_requests_total{hook,outcome} on a fresh gateway');
  const errors = (series.get('gateway_redis_errors_total') ?? []).map((s) => s.labels.op);
  for (const op of ['join', 'leave', 'heartbeat', 'snapshot', 'sync', 'broadcast', 'history', 'publish', 'exists', 'ping', 'node_record', 'pubsub']) {
    assert.ok(errors.includes(op), `gateway_redis_errors_total{op="${op}"} on a fresh gateway`);
  }
});

test('after a workload, the families the dashboard plots show it, with no room or user id in a label', async () => {
  // workload: signed-in and anonymous joins, a refused join, pushes of every result, presence
  const user = await connect(gw.publicUrl, { token: hs256('1') });
  const anon = await connect(gw.publicUrl);
  const uc = user.channel('rooms:metrics', {});
  const ac = anon.channel('rooms:metrics', {});
  assert.equal((await join(uc)).status, 'ok');
  assert.equal((await join(ac)).status, 'ok');
  assert.equal((await join(anon.channel('rooms:nope', {}))).status, 'error');
  assert.equal((await push(uc, 'new_msg', { body: 'hi' })).status, 'ok');
  assert.equal((await push(ac, 'new_msg', { body: 'hi' })).status, 'error');
  assert.equal((await push(uc, 'presence_diff', {})).status, 'error');
  await sleep(300);
  user.disconnect();
  await sleep(200);

  const series = await scrape(gw);
  const missing = missingFromExposition(series);
  assert.deepEqual(missing, [], `dashboard queries metrics the gateway does not export:\n${missing.join('\n')}`);
  const value = (name, labels) => series.get(name)?.find((s) => Object.entries(labels).every(([k, v]) => s.labels[k] === v))?.value;
  assert.ok(value('gateway_joins_total', { result: 'no_room' }) >= 1);
  assert.ok(value('gateway_pushes_total', { result: 'not_signed_in' }) >= 1);
  // phoenix.js disconnect() closes without a status code: counted as 1005
  assert.ok(value('gateway_closes_total', { code: '1005' }) >= 1, JSON.stringify(series.get('gateway_closes_total')));
  // labels come from closed sets: no room or user id anywhere
  for (const [name, samples] of series) {
    for (const s of samples) {
      assert.ok(!Object.values(s.labels).some((v) => v === 'metrics' || v === 'rooms:metrics'), `${name} carries a room id`);
    }
  }
});

// --- a real Prometheus --------------------------------------------------------------------------

const SCRAPE_S = 1;
// Grafana's $__interval is the panel's step; $__rate_interval is max($__interval + scrape
// interval, 4 × scrape interval) with the data source's scrape interval set to the real one.
const STEP_S = 1;
const RATE_INTERVAL_S = Math.max(STEP_S + SCRAPE_S, 4 * SCRAPE_S);
// Panels that stay at 0 in a healthy run (no Redis errors, no pub/sub reconnects or other
// interruptions, no slow consumers): they must return data, not a positive value.
const ZERO_IN_HEALTH = ['gateway_redis_errors_total', 'gateway_pubsub_reconnects_total', 'gateway_pubsub_interruptions_total', 'gateway_slow_consumer_closes_total'];

/** Grafana's regex escaping of a multi-value variable's values inside a PromQL string. */
const regexEscape = (v) => v.replace(/[\\^$*+?.()|[\]{}]/g, '\\\\$&');
/** A multi-value variable as Grafana renders it in a `=~` matcher. */
const multiValue = (values) => (values.length === 1 ? regexEscape(values[0]) : `(${values.map(regexEscape).join('|')})`);

/** Replaces $var, ${var}, ${var:fmt} and [[var]]; an unknown variable fails the test. */
function substitute(expr, vars) {
  const out = expr.replace(/\$\{([a-zA-Z_][a-zA-Z0-9_]*)(?::[a-z]+)?\}|\$([a-zA-Z_][a-zA-Z0-9_]*)|\[\[([a-zA-Z_][a-zA-Z0-9_]*)\]\]/g, (m, a, b, c) => {
    const name = a ?? b ?? c;
    assert.ok(Object.hasOwn(vars, name), `unknown variable $${name} in ${expr}`);
    return vars[name];
  });
  assert.ok(!out.includes('$'), `unsubstituted variable left in ${out}`);
  return out;
}

const finite = (v) => Number.isFinite(Number(v));

test('a real Prometheus scraping two gateways evaluates every dashboard query, with data', { timeout: 120000 }, async (t) => {
  const t0 = Date.now();
  // the application behind the publish hook: every new_msg asks it (and it says broadcast)
  const application = http.createServer((req, res) => {
    req.resume();
    req.on('end', () => {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end('{"result":"broadcast"}');
    });
  });
  await new Promise((r) => application.listen(0, '127.0.0.1', r));
  t.after(() => { application.close(); application.closeAllConnections(); });
  const env = {
    GATEWAY_PRESENCE_HEARTBEAT_INTERVAL_MS: '1000', // heartbeats and pub/sub probes every second
    GATEWAY_HOOKS_PUBLISH_URL: `http://127.0.0.1:${application.address().port}/publish`,
    GATEWAY_HOOKS_SECRET: 'dashboard-hook-secret-0123456789abcdef',
  };
  const g1 = await startGateway({ redisPort: redis.port, prefix: 'prom', env, name: 'prom1' });
  gws.push(g1);
  const g2 = await startGateway({ redisPort: redis.port, prefix: 'prom', env, name: 'prom2' });
  gws.push(g2);
  createRoom(redis, 'prom', 'stage');
  const instances = [g1, g2].map((g) => g.listening.admin).sort();
  prom = await startPrometheus({ targets: instances, scrapeIntervalS: SCRAPE_S });
  const promStarted = Date.now();

  // both targets up and scraped a few times before the traffic
  const upCount = `count_over_time(up{job="${prom.job}"}[1m])`;
  await waitFor(async () => {
    const r = (await prom.query(upCount)).result;
    return r.length === 2 && r.every((s) => Number(s.value[1]) >= 3);
  }, 20000, 'prometheus to scrape both gateways 3 times', 200);
  const up = (await prom.query(`up{job="${prom.job}"}`)).result;
  assert.deepEqual(up.map((s) => [s.metric.instance, s.value[1]]).sort(), instances.map((i) => [i, '1']), prom.logs());

  // traffic across both nodes: joins (ok, no room), pushes (ok, not signed in, unknown event),
  // fan-out, presence, a leave, closes
  const trafficStart = Date.now();
  const user = await connect(g1.publicUrl, { token: hs256('7') });
  const anon = await connect(g2.publicUrl);
  const uc = user.channel('rooms:stage', {});
  const ac = anon.channel('rooms:stage', {});
  assert.equal((await join(uc)).status, 'ok');
  assert.equal((await join(ac)).status, 'ok');
  assert.equal((await join(anon.channel('rooms:missing', {}))).status, 'error');
  for (let i = 0; i < 5; i++) assert.equal((await push(uc, 'new_msg', { body: `m${i}` })).status, 'ok');
  assert.equal((await push(ac, 'new_msg', { body: 'x' })).status, 'error');
  assert.equal((await push(uc, 'nope', {})).status, 'error');
  // a reconnect with `since` on the other node (a history recovery)
  const late = await connect(g2.publicUrl);
  assert.equal((await join(late.channel('rooms:stage', { since: '1-0' }))).status, 'ok');
  // stay in the room over a few scrapes and heartbeats, then leave and close
  await sleep(2500);
  await new Promise((resolve) => uc.leave().receive('ok', resolve).receive('timeout', resolve));
  user.disconnect();
  anon.disconnect();
  late.disconnect();

  // Prometheus has the closes from both nodes, then a few more scrapes for the rate windows
  await waitFor(async () => {
    const r = (await prom.query(`sum(gateway_closes_total{job="${prom.job}"})`)).result;
    return r.length === 1 && Number(r[0].value[1]) >= 2;
  }, 10000, 'prometheus to scrape the closes', 200);
  await sleep(2 * SCRAPE_S * 1000 + 500);
  const trafficSeconds = (Date.now() - trafficStart) / 1000;

  // the variables, as Grafana resolves them: label_values(expr, label) over the dashboard's range
  const vars = queryVariables();
  const builtins = {
    __interval: `${STEP_S}s`,
    __interval_ms: String(STEP_S * 1000),
    __rate_interval: `${RATE_INTERVAL_S}s`,
    __range: `${Math.ceil((Date.now() - promStarted) / 1000)}s`,
  };
  const resolved = {};
  for (const v of vars) {
    const expr = substitute(v.expr, { ...builtins, ...Object.fromEntries(Object.entries(resolved).map(([k, vals]) => [k, multiValue(vals)])) });
    const inner = await prom.query(expr);
    assert.ok(inner.result.length > 0, `variable ${v.name}: ${expr} returns nothing`);
    const values = await prom.labelValues(v.label, expr);
    assert.ok(values.length > 0, `variable ${v.name}: label_values(${expr}, ${v.label}) is empty`);
    resolved[v.name] = values;
  }
  assert.deepEqual(resolved.job, [prom.job], 'the job variable offers the scrape job');
  assert.deepEqual(resolved.instance?.slice().sort(), instances, 'the instance variable offers both gateways');

  // selections to try: All (the variables' allValue), each single instance, both instances
  const all = Object.fromEntries(vars.map((v) => [v.name, v.includeAll && v.allValue ? v.allValue : multiValue(resolved[v.name])]));
  const selections = [
    ['All', all],
    ...instances.map((i) => [`instance ${i}`, { ...all, job: multiValue(resolved.job), instance: multiValue([i]) }]),
    ['both instances', { ...all, job: multiValue(resolved.job), instance: multiValue(instances) }],
  ];
  const end = Date.now() / 1000;
  const start = Math.floor(promStarted / 1000);
  const failures = [];
  let queries = 0;
  for (const p of panels()) {
    for (const target of p.targets) {
      for (const [what, selection] of selections) {
        let where = `panel "${p.title}" (${what}): ${target.expr}`;
        try {
          const expr = substitute(target.expr, { ...builtins, ...selection, datasource: 'prometheus' });
          where = `panel "${p.title}" (${what}): ${expr}`;
          // the instant query (a stat panel, Explore) and the range query (a time series panel)
          queries += 2;
          const instant = await prom.query(expr, end);
          if (instant.resultType !== 'vector' || instant.result.length === 0) {
            failures.push(`${where}: instant query returned no series`);
            continue;
          }
          const range = await prom.queryRange(expr, start, end, STEP_S);
          const points = range.result.flatMap((s) => s.values.map((v) => Number(v[1])));
          if (!points.some(finite)) {
            failures.push(`${where}: range query has no finite point (${range.result.length} series)`);
            continue;
          }
          if (what === 'All' && !ZERO_IN_HEALTH.some((m) => expr.includes(m)) && !points.some((v) => v > 0)) {
            failures.push(`${where}: the traffic does not show (every point 0 over ${range.result.length} series)`);
          }
        } catch (e) {
          failures.push(`${where}: ${e.message}`);
        }
      }
    }
  }
  const took = (Date.now() - t0) / 1000;
  t.diagnostic(`prometheus test: ${queries} queries over ${selections.length} selections; traffic + scrapes ${trafficSeconds.toFixed(1)} s; whole test ${took.toFixed(1)} s`);
  assert.deepEqual(failures, [], `dashboard queries that fail on a real Prometheus:\n${failures.join('\n')}\n\nprometheus log:\n${prom.logs().slice(-3000)}`);
});
