// The Grafana dashboard only queries metrics the gateway really exports: run a short workload,
// scrape /metrics, and check every metric name (and every `by (label)`) of every panel and variable.
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { REPO_ROOT, connect, createRoom, hs256, join, push, startGateway, startRedis, teardown, test } from './lib/harness.mjs';

let redis;
let gw;

before(async () => {
  redis = await startRedis();
  gw = await startGateway({ redisPort: redis.port, prefix: 'dash' });
  createRoom(redis, 'dash', 'metrics');
});
after(() => teardown({ gateways: [gw], redis }));

/** Samples of the exposition: metric name → list of label maps. */
function parseExposition(text) {
  const series = new Map();
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+\S+/);
    if (!m) continue;
    const labels = {};
    for (const kv of (m[3] || '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[kv[1]] = kv[2];
    if (!series.has(m[1])) series.set(m[1], []);
    series.get(m[1]).push(labels);
  }
  return series;
}

test('every metric the dashboard queries is exported after a workload', async () => {
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
  await new Promise((r) => setTimeout(r, 300));
  user.disconnect();

  const res = await fetch(`${gw.adminUrl}/metrics`);
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type'), /^text\/plain/);
  const series = parseExposition(await res.text());

  const dash = JSON.parse(fs.readFileSync(path.join(REPO_ROOT, 'grafana', 'gateway-dashboard.json'), 'utf8'));
  const exprs = [
    ...dash.panels.flatMap((p) => p.targets.map((t) => t.expr)),
    ...dash.templating.list.filter((v) => v.type === 'query').map((v) => v.query.query ?? v.query),
  ];
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
        if (!samples.some((s) => label in s)) missing.push(`${name} has no label ${label} (in: ${expr})`);
      }
    }
    // histogram panels aggregate by le
    if (/histogram_quantile/.test(expr)) assert.match(expr, /_bucket\{/);
  }
  assert.deepEqual(missing, [], `dashboard queries metrics the gateway does not export:\n${missing.join('\n')}`);

  // the workload shows up in the families the dashboard plots
  const value = (name, labels) => series.get(name)?.find((s) => Object.entries(labels).every(([k, v]) => s[k] === v));
  assert.ok(value('gateway_joins_total', { result: 'no_room' }));
  assert.ok(value('gateway_pushes_total', { result: 'not_signed_in' }));
  // labels come from closed sets: no room or user id anywhere
  for (const [name, samples] of series) {
    for (const s of samples) {
      assert.ok(!Object.values(s).some((v) => v === 'metrics' || v === 'rooms:metrics'), `${name} carries a room id`);
    }
  }
});
