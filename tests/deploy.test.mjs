// The Kubernetes example (deploy/kubernetes/*.yaml) checked against the code: it parses, its
// settings pass `gateway check-config` with the env the Deployment sets, and ports, probe paths,
// env names, the drain budget and label selectors agree with the gateway and with each other.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { parseAllDocuments } from 'yaml';
import { test, REPO_ROOT, GATEWAY_BIN } from './lib/harness.mjs';

const DIR = path.join(REPO_ROOT, 'deploy', 'kubernetes');

function load() {
  const docs = [];
  for (const f of fs.readdirSync(DIR).filter((x) => x.endsWith('.yaml')).sort()) {
    for (const d of parseAllDocuments(fs.readFileSync(path.join(DIR, f), 'utf8'))) {
      assert.equal(d.errors.length, 0, `${f}: ${d.errors.join('; ')}`);
      docs.push({ file: f, ...d.toJS() });
    }
  }
  return docs;
}

const portOf = (listen) => Number(listen.split(':').pop());

test('Kubernetes manifests parse and agree with the gateway', () => {
  const docs = load();
  const kind = (k) => {
    const found = docs.filter((d) => d.kind === k);
    assert.equal(found.length, 1, `exactly one ${k}`);
    return found[0];
  };
  const cm = kind('ConfigMap');
  const secret = kind('Secret');
  const dep = kind('Deployment');
  const svc = kind('Service');
  const pdb = kind('PodDisruptionBudget');
  const pod = dep.spec.template.spec;
  const c = pod.containers[0];

  // the config file the Deployment mounts is the ConfigMap's, and it is valid with the env the
  // Deployment sets (unknown GATEWAY_* names or a short secret would fail here)
  const mount = c.volumeMounts.find((m) => m.name === 'config');
  const vol = pod.volumes.find((v) => v.name === 'config');
  assert.equal(vol.configMap.name, cm.metadata.name);
  const cfgArg = c.args[c.args.indexOf('--config') + 1];
  assert.equal(path.dirname(cfgArg), mount.mountPath);
  const toml = cm.data[path.basename(cfgArg)];
  assert.ok(toml, `ConfigMap has ${path.basename(cfgArg)}`);
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'gw-k8s-'));
  const file = path.join(tmp, 'gateway.toml');
  fs.writeFileSync(file, toml);
  const env = { PATH: process.env.PATH, NO_COLOR: '1' };
  for (const e of c.env) {
    assert.match(e.name, /^GATEWAY_[A-Z0-9_]+$/);
    if (e.value !== undefined) env[e.name] = e.value;
    else {
      const ref = e.valueFrom.secretKeyRef;
      assert.equal(ref.name, secret.metadata.name, `${e.name} comes from the Secret`);
      assert.ok(ref.key in secret.stringData, `Secret has key ${ref.key}`);
      env[e.name] = secret.stringData[ref.key];
    }
  }
  assert.ok(c.env.some((e) => e.name === 'GATEWAY_AUTH_HS256_SECRET'), 'the JWT secret comes from the Secret');
  let out;
  try {
    out = execFileSync(GATEWAY_BIN, ['check-config', '--config', file], { env, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (e) {
    assert.fail(`gateway check-config refused the manifests' settings:\n${e.stdout}${e.stderr}`);
  }
  fs.rmSync(tmp, { recursive: true, force: true });
  const setting = (section, key) => {
    const m = new RegExp(`\\[${section}\\][^\\[]*?\\n${key} = "?([^"\\n]*)"?`, 's').exec(out);
    assert.ok(m, `check-config prints ${section}.${key}:\n${out}`);
    return m[1];
  };
  assert.equal(setting('redis', 'mode'), 'cluster');

  // ports: container ports = the listeners; the Service targets the WebSocket port
  const ws = c.ports.find((p) => p.name === 'ws');
  const admin = c.ports.find((p) => p.name === 'admin');
  assert.equal(ws.containerPort, portOf(setting('server', 'listen')));
  assert.equal(admin.containerPort, portOf(setting('admin', 'listen')));
  assert.ok(setting('admin', 'listen').startsWith('0.0.0.0:'), 'probes reach the admin port from outside the pod');
  assert.equal(svc.spec.ports[0].targetPort, 'ws');

  // probes hit the gateway's health routes on the admin port
  const adminSrc = fs.readFileSync(path.join(REPO_ROOT, 'gateway', 'src', 'admin.rs'), 'utf8');
  for (const [probe, route] of [[c.readinessProbe, '/health/ready'], [c.livenessProbe, '/health/live']]) {
    assert.equal(probe.httpGet.path, route);
    assert.equal(probe.httpGet.port, 'admin');
    assert.ok(adminSrc.includes(`"${route}"`), `the gateway serves ${route}`);
  }
  assert.equal(dep.spec.template.metadata.annotations['prometheus.io/port'], String(admin.containerPort));
  assert.ok(adminSrc.includes('"/metrics"'));

  // the drain fits: preStop sleep + shutdown timeout < terminationGracePeriodSeconds
  const sleepS = Number(c.lifecycle.preStop.exec.command.at(-1));
  const shutdownMs = Number(setting('server', 'shutdown_timeout_ms'));
  assert.ok(Number(setting('server', 'drain_grace_ms')) > 0, 'a drain grace so balancers see readiness turn false');
  assert.ok(sleepS + shutdownMs / 1000 < pod.terminationGracePeriodSeconds,
    `preStop ${sleepS} s + shutdown ${shutdownMs} ms < grace ${pod.terminationGracePeriodSeconds} s`);

  // selectors agree
  const labels = dep.spec.template.metadata.labels;
  for (const sel of [dep.spec.selector.matchLabels, svc.spec.selector, pdb.spec.selector.matchLabels]) {
    for (const [k, v] of Object.entries(sel)) assert.equal(labels[k], v, `selector ${k}=${v}`);
  }
  assert.ok(pdb.spec.maxUnavailable >= 1 && pdb.spec.maxUnavailable < dep.spec.replicas);
  assert.ok(secret.stringData['hs256-secret'].length >= 32);
});
