// The Prometheus alert rules (deploy/prometheus/alerts.yml): `promtool check rules` accepts them,
// `promtool test rules` runs their unit tests (alerts.test.yml), every alert has a test, and every
// metric, label and label value they use is one a fresh gateway really exports. Then
// `gateway_ready`, which GatewayNotReady watches, follows readiness: 1 when ready, 0 in a drain.
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { parse } from 'yaml';
import { REPO_ROOT, requireTool, sleep, startGateway, startRedis, teardown, test, waitFor } from './lib/harness.mjs';

const DIR = path.join(REPO_ROOT, 'deploy', 'prometheus');
const PROMTOOL_INSTALL = 'apt-get install -y --no-install-recommends prometheus (Debian\'s package ships /usr/bin/promtool)';

let redis;
const gws = [];
before(async () => { redis = await startRedis(); });
after(async () => { await teardown({ gateways: gws, redis }); });

/** Runs promtool; fails loudly (never skips) when it is missing. */
function promtool(...args) {
  requireTool('promtool', { why: 'promtool to check and unit-test the alert rules', install: PROMTOOL_INSTALL });
  try {
    return execFileSync('promtool', args, { cwd: DIR, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (e) {
    assert.fail(`promtool ${args.join(' ')} failed (exit ${e.status}):\n${e.stdout}${e.stderr}`);
  }
}

const rules = () => parse(fs.readFileSync(path.join(DIR, 'alerts.yml'), 'utf8')).groups.flatMap((g) => g.rules);

test('promtool accepts the alert rules and their unit tests pass', () => {
  const n = rules().length;
  assert.match(promtool('check', 'rules', 'alerts.yml'), new RegExp(`SUCCESS: ${n} rules found`));
  assert.match(promtool('test', 'rules', 'alerts.test.yml'), /SUCCESS/);
  // every alert is unit-tested, firing at least once and quiet at least once
  const tests = parse(fs.readFileSync(path.join(DIR, 'alerts.test.yml'), 'utf8')).tests.flatMap((t) => t.alert_rule_test ?? []);
  for (const r of rules()) {
    const mine = tests.filter((t) => t.alertname === r.alert);
    assert.ok(mine.some((t) => (t.exp_alerts ?? []).length > 0), `${r.alert} has a test where it fires`);
    assert.ok(mine.some((t) => (t.exp_alerts ?? []).length === 0), `${r.alert} has a test where it stays quiet`);
    assert.ok(['critical', 'warning'].includes(r.labels?.severity), `${r.alert} has a severity`);
    assert.ok(r.annotations?.summary && r.annotations?.description, `${r.alert} says what is wrong`);
  }
});

test('the alert rules use only metrics, labels and label values a fresh gateway exports', async () => {
  const g = await startGateway({ redisPort: redis.port, prefix: 'alerts' });
  gws.push(g);
  const text = await (await fetch(`${g.adminUrl}/metrics`)).text();
  const samples = text.split('\n').filter((l) => l && !l.startsWith('#')).map((l) => {
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s/.exec(l);
    const labels = Object.fromEntries([...(m[2] ?? '').matchAll(/([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"/g)].map((x) => [x[1], x[2]]));
    return { name: m[1], labels };
  });
  const problems = [];
  for (const r of rules()) {
    const names = [...r.expr.matchAll(/\b(gateway_[a-z0-9_]+)\b/g)].map((m) => m[1]);
    // Prometheus' own `up` is the only other series an alert may use
    const others = [...r.expr.matchAll(/\b([a-z_][a-z0-9_]*)\s*\{/g)].map((m) => m[1]).filter((n) => !n.startsWith('gateway_') && n !== 'up');
    if (others.length) problems.push(`${r.alert}: unknown series ${others.join(', ')}`);
    if (!names.length && !/\bup\{/.test(r.expr)) problems.push(`${r.alert}: no gateway metric`);
    for (const name of names) {
      const mine = samples.filter((s) => s.name === name);
      if (!mine.length) { problems.push(`${r.alert}: ${name} is not exported`); continue; }
      // label matchers: the label exists and every alternative of a =~ is a value it takes
      for (const m of r.expr.matchAll(new RegExp(`${name}\\{([^}]*)\\}`, 'g'))) {
        for (const [, label, op, value] of m[1].matchAll(/([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"([^"]*)"/g)) {
          if (label === 'job' || label === 'instance') continue;
          const values = new Set(mine.map((s) => s.labels[label]).filter((v) => v !== undefined));
          if (!values.size) { problems.push(`${r.alert}: ${name} has no label ${label}`); continue; }
          const wanted = op.includes('~') ? value.split('|') : [value];
          for (const v of wanted) if (!values.has(v)) problems.push(`${r.alert}: ${name}{${label}} never is ${v} (has ${[...values].join(', ')})`);
        }
      }
      for (const by of r.expr.matchAll(/\bby \(([^)]*)\)/g)) {
        for (const label of by[1].split(',').map((s) => s.trim())) {
          if (['job', 'instance', 'le'].includes(label)) continue;
          if (!mine.some((s) => label in s.labels)) problems.push(`${r.alert}: ${name} has no label ${label} to aggregate by`);
        }
      }
    }
  }
  assert.deepEqual(problems, [], problems.join('\n'));
});

test('gateway_ready is 1 on a ready node and 0 while it drains', async () => {
  const g = await startGateway({ redisPort: redis.port, prefix: 'alerts-ready', env: { GATEWAY_SERVER_DRAIN_GRACE_MS: '3000' }, name: 'ready' });
  gws.push(g);
  const ready = async () => {
    const text = await (await fetch(`${g.adminUrl}/metrics`)).text();
    return Number(/^gateway_ready (\S+)$/m.exec(text)?.[1]);
  };
  await waitFor(async () => (await fetch(`${g.adminUrl}/health/ready`)).status === 200, 10000, 'ready');
  assert.equal(await ready(), 1);
  g.proc.kill('SIGTERM');
  await waitFor(async () => (await fetch(`${g.adminUrl}/health/ready`)).status === 503, 2000, 'readiness 503 in the drain');
  assert.equal(await ready(), 0, 'gateway_ready follows /health/ready');
  await sleep(10);
  await g.exited;
});
