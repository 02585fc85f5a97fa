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
  assert.equal(setting('log', 'format'), 'json', 'pods log one JSON object per line');

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

// --- the container image ------------------------------------------------------------------------
// There is no container engine on the test machines: the Dockerfile is checked statically here
// against the manifests and the repository, not built.

/** The Dockerfile's instructions: [{op, args (string), line}], continuations joined, comments dropped. */
function dockerfile() {
  const text = fs.readFileSync(path.join(REPO_ROOT, 'Dockerfile'), 'utf8');
  const out = [];
  let buf = '';
  let start = 0;
  text.split('\n').forEach((raw, i) => {
    const line = raw.trim();
    if (!buf && (line === '' || line.startsWith('#'))) return;
    if (buf && line.startsWith('#')) return; // a comment inside a continued instruction
    if (!buf) start = i + 1;
    buf += (buf ? ' ' : '') + line.replace(/\\$/, '').trim();
    if (line.endsWith('\\')) return;
    const m = /^([A-Za-z]+)\s+(.*)$/.exec(buf);
    assert.ok(m, `Dockerfile line ${start}: ${buf}`);
    out.push({ op: m[1].toUpperCase(), args: m[2].trim(), line: start });
    buf = '';
  });
  assert.equal(buf, '', 'Dockerfile ends inside a continued instruction');
  return out;
}

/** `["a", "b"]` (exec form) → ['a', 'b']; the shell form is refused: signals must reach the gateway. */
function execForm(ins) {
  assert.ok(ins.args.startsWith('['), `${ins.op} (line ${ins.line}) uses the exec form, so SIGTERM reaches the gateway, not a shell`);
  return JSON.parse(ins.args);
}

/** The stages: [{from, name, instructions}]. */
function stages(instrs) {
  const out = [];
  for (const ins of instrs) {
    if (ins.op === 'FROM') {
      const m = /^(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?$/i.exec(ins.args);
      assert.ok(m, `FROM line ${ins.line}: ${ins.args}`);
      out.push({ from: m[1], name: m[2], instructions: [] });
    } else {
      assert.ok(out.length > 0, `${ins.op} before the first FROM`);
      out.at(-1).instructions.push(ins);
    }
  }
  return out;
}

/** The .dockerignore patterns (simple prefixes: `dir/`, `dir`). */
function dockerignore() {
  const f = path.join(REPO_ROOT, '.dockerignore');
  assert.ok(fs.existsSync(f), '.dockerignore exists (keeps target/ and node_modules out of the build context)');
  return fs.readFileSync(f, 'utf8').split('\n').map((l) => l.trim()).filter((l) => l && !l.startsWith('#'))
    .map((l) => l.replace(/^\/+/, '').replace(/\/+$/, ''));
}

test('the Dockerfile builds the locked gateway and runs it as the manifests expect', () => {
  const instrs = dockerfile();
  const st = stages(instrs);
  assert.ok(st.length >= 2, 'multi-stage: a build stage and a slim run stage');
  const [build, run] = [st[0], st.at(-1)];
  const only = (stage, op) => stage.instructions.filter((i) => i.op === op);
  const last = (op) => {
    const found = only(run, op);
    assert.ok(found.length > 0, `the run stage has ${op}`);
    return found.at(-1);
  };

  // build: the locked dependencies, the release profile, the workspace's toolchain
  assert.ok(only(build, 'RUN').some((r) => /\bcargo build\b/.test(r.args) && /--release\b/.test(r.args) && /--locked\b/.test(r.args)),
    'the build stage runs cargo build --release --locked');
  const rustVersion = /rust-version\s*=\s*"([^"]+)"/.exec(fs.readFileSync(path.join(REPO_ROOT, 'Cargo.toml'), 'utf8'))[1];
  assert.match(build.from, new RegExp(`^rust:${rustVersion.replace('.', '\\.')}\\b`), `the build stage uses Rust ${rustVersion}, the workspace's rust-version`);
  // run: a slim base with only the binary and the default settings
  assert.match(run.from, /^debian:[a-z]+-slim$/, 'the run stage is a slim Debian');
  const copies = only(run, 'COPY').map((c) => c.args.split(/\s+/));
  assert.equal(copies.length, 2, `the run stage copies the binary and the settings, nothing else: ${JSON.stringify(copies)}`);
  const binCopy = copies.find((c) => c[0] === `--from=${build.name}`);
  assert.ok(binCopy, `the binary comes from the build stage (COPY --from=${build.name})`);
  assert.match(binCopy[1], /\/target\/release\/gateway$/);
  const cfgCopy = copies.find((c) => !c[0].startsWith('--'));
  assert.deepEqual(cfgCopy.slice(0, 1), ['config/gateway.toml'], 'the documented default settings');

  // every COPY from the context names a file or folder that exists and is not ignored
  const ignored = dockerignore();
  for (const p of ['target', 'tests/node_modules']) assert.ok(ignored.includes(p), `.dockerignore lists ${p}/`);
  for (const c of instrs.filter((i) => i.op === 'COPY' && !/^--from=/.test(i.args))) {
    const parts = c.args.split(/\s+/).filter((a) => !a.startsWith('--'));
    for (const src of parts.slice(0, -1)) {
      assert.ok(fs.existsSync(path.join(REPO_ROOT, src)), `COPY ${src} (Dockerfile line ${c.line}) exists in the repository`);
      assert.ok(!ignored.some((p) => src === p || src.startsWith(`${p}/`)), `COPY ${src} is not excluded by .dockerignore`);
    }
  }
  // the build stage copies what the crate compiles in: every include_str! path under the repo
  const buildSources = only(build, 'COPY').flatMap((c) => c.args.split(/\s+/).filter((a) => !a.startsWith('--')).slice(0, -1));
  for (const dir of ['gateway', 'lua', 'Cargo.lock']) assert.ok(buildSources.includes(dir), `the build stage copies ${dir}`);

  // entrypoint + command = the gateway serving the image's settings
  const entry = execForm(last('ENTRYPOINT'));
  const cmd = execForm(last('CMD'));
  assert.equal(entry[0], binCopy[2], 'ENTRYPOINT is the copied binary');
  assert.equal(cmd[0], 'serve');
  const imageCfg = cmd[cmd.indexOf('--config') + 1];
  assert.equal(imageCfg, cfgCopy[1], 'CMD serves the settings file the image holds');

  // non-root, numerically (runAsNonRoot can only verify a numeric user)
  const [uid, gid] = last('USER').args.split(':').map(Number);
  assert.ok(Number.isInteger(uid) && uid > 0, `USER is a numeric non-root uid (${last('USER').args})`);
  const runs = only(run, 'RUN').map((r) => r.args).join('\n');
  assert.match(runs, new RegExp(`useradd\\b.*--uid ${uid}\\b`), 'the user exists in the image');
  assert.equal(last('STOPSIGNAL').args, 'SIGTERM', 'STOPSIGNAL SIGTERM starts the drain');

  // the Deployment runs this image: same user, same command, same config path, same ports
  const docs = load();
  const dep = docs.find((d) => d.kind === 'Deployment');
  const pod = dep.spec.template.spec;
  const c = pod.containers[0];
  const version = /^version\s*=\s*"([^"]+)"/m.exec(fs.readFileSync(path.join(REPO_ROOT, 'gateway', 'Cargo.toml'), 'utf8'))[1];
  assert.match(c.image, new RegExp(`/gateway:${version.replace(/\./g, '\\.')}$`), `the Deployment's image is tagged with the crate's version ${version}`);
  const depText = fs.readFileSync(path.join(DIR, 'deployment.yaml'), 'utf8');
  assert.match(depText, /docker build -t \S+ \./, 'deployment.yaml says how the image is built');
  assert.ok(depText.includes(`docker build -t ${c.image} .`), 'and the command builds the image it runs');
  const sc = { ...pod.securityContext, ...c.securityContext };
  assert.equal(sc.runAsNonRoot, true, 'runAsNonRoot');
  assert.equal(sc.runAsUser, uid, 'runAsUser is the image\'s uid');
  if (sc.runAsGroup !== undefined) assert.equal(sc.runAsGroup, gid);
  assert.equal(c.command, undefined, 'the Deployment keeps the image\'s ENTRYPOINT');
  assert.deepEqual(c.args, cmd, 'the Deployment\'s args are the image\'s CMD');
  const mount = c.volumeMounts.find((m) => m.name === 'config');
  assert.equal(path.dirname(imageCfg), mount.mountPath, 'the ConfigMap is mounted where the image keeps its settings');

  const exposed = last('EXPOSE').args.split(/\s+/).map((p) => Number(p.replace(/\/tcp$/, ''))).sort();
  assert.deepEqual(c.ports.map((p) => p.containerPort).sort(), exposed, 'EXPOSE = the container ports');
  const adminPort = c.ports.find((p) => p.name === 'admin').containerPort;
  for (const probe of [c.readinessProbe, c.livenessProbe]) {
    const port = typeof probe.httpGet.port === 'number' ? probe.httpGet.port : c.ports.find((p) => p.name === probe.httpGet.port).containerPort;
    assert.equal(port, adminPort, `${probe.httpGet.path} probes the admin port`);
    assert.ok(exposed.includes(port));
  }

  // the image alone (its settings file + its ENV) listens where it EXPOSEs, admin reachable from
  // outside the container; and the Deployment's env and ConfigMap do not move those ports
  const imageEnv = Object.fromEntries(only(run, 'ENV').map((e) => {
    const m = /^([A-Z0-9_]+)[= ](.*)$/.exec(e.args);
    assert.ok(m, `ENV line ${e.line}: one NAME=value`);
    return [m[1], m[2]];
  }));
  for (const name of Object.keys(imageEnv)) assert.match(name, /^GATEWAY_[A-Z0-9_]+$/);
  const check = (env, cfg) => {
    try {
      return execFileSync(GATEWAY_BIN, ['check-config', '--config', cfg], { env: { PATH: process.env.PATH, NO_COLOR: '1', ...env }, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    } catch (e) {
      assert.fail(`gateway check-config refused the image's settings:\n${e.stdout}${e.stderr}`);
    }
  };
  const listenOf = (out, section) => new RegExp(`\\[${section}\\][^\\[]*?\\nlisten = "([^"]+)"`, 's').exec(out)[1];
  const alone = check(imageEnv, path.join(REPO_ROOT, cfgCopy[0]));
  assert.deepEqual([portOf(listenOf(alone, 'server')), portOf(listenOf(alone, 'admin'))].sort(), exposed);
  assert.ok(listenOf(alone, 'admin').startsWith('0.0.0.0:'), 'the image\'s admin port answers probes from outside the container');
  assert.ok(listenOf(alone, 'server').startsWith('0.0.0.0:'));
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'gw-image-'));
  const cm = docs.find((d) => d.kind === 'ConfigMap');
  fs.writeFileSync(path.join(tmp, 'gateway.toml'), cm.data['gateway.toml']);
  const secret = docs.find((d) => d.kind === 'Secret');
  const podEnv = { ...imageEnv };
  for (const e of c.env) podEnv[e.name] = e.value ?? secret.stringData[e.valueFrom.secretKeyRef.key];
  const inPod = check(podEnv, path.join(tmp, 'gateway.toml'));
  fs.rmSync(tmp, { recursive: true, force: true });
  assert.equal(portOf(listenOf(inPod, 'admin')), adminPort);
  assert.ok(listenOf(inPod, 'admin').startsWith('0.0.0.0:'));
  assert.equal(portOf(listenOf(inPod, 'server')), c.ports.find((p) => p.name === 'ws').containerPort);
});
