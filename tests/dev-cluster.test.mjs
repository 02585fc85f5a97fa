// scripts/dev-cluster.sh: a local Redis Cluster (3 masters, 3 replicas) and a gateway against it
// come up, a phoenix.js client joins the demo room, and SIGTERM leaves no process, port or file.
import { after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import {
  test, connect, join, waitFor, withTimeout, disconnectAll, requireTool, REPO_ROOT, GATEWAY_BIN,
} from './lib/harness.mjs';

let proc;
after(async () => {
  await disconnectAll();
  if (proc && proc.exitCode === null) proc.kill('SIGKILL');
});

const listening = (port) => new Promise((resolve) => {
  const s = net.connect(port, '127.0.0.1');
  s.on('connect', () => { s.destroy(); resolve(true); });
  s.on('error', () => resolve(false));
});

test('dev-cluster.sh: a 3-master cluster with replicas and a gateway come up, and SIGTERM cleans everything up', { timeout: 60000 }, async (t) => {
  requireTool('redis-server');
  requireTool('redis-cli');
  proc = spawn('bash', [path.join(REPO_ROOT, 'scripts/dev-cluster.sh'), '--gateways', '1', '--port', '0', '--no-build'], {
    env: { ...process.env, GATEWAY_BIN }, stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  proc.stdout.on('data', (d) => { out += d; });
  proc.stderr.on('data', (d) => { out += d; });
  const exited = new Promise((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));
  await waitFor(() => /dev-cluster: ready/.test(out) || proc.exitCode !== null, 40000, 'dev-cluster ready line')
    .catch((e) => { throw new Error(`${e.message}\n${out}`); });
  assert.match(out, /dev-cluster: ready/, out);

  const ports = /masters and replicas on ([\d ]+) \(files in ([^)]+)\)/.exec(out);
  assert.ok(ports, `the script names its ports and directory:\n${out}`);
  const redisPorts = ports[1].trim().split(' ').map(Number);
  const dir = ports[2];
  assert.equal(redisPorts.length, 6);
  assert.ok(fs.existsSync(dir), 'the cluster directory exists while it runs');
  const info = execFileSync('redis-cli', ['-p', String(redisPorts[0]), 'CLUSTER', 'INFO'], { encoding: 'utf8' });
  assert.match(info, /cluster_state:ok/);
  assert.match(info, /cluster_known_nodes:6/);
  assert.match(info, /cluster_size:3/);
  const gw = JSON.parse(/dev-cluster: gateway 0: (\{.*\})/.exec(out)[1]);
  assert.equal((await fetch(`http://${gw.admin}/health/ready`)).status, 200, 'the gateway is ready in cluster mode');

  // the demo room answers a real phoenix.js client
  const socket = await connect(`ws://${gw.public}/socket`);
  const r = await join(socket.channel('rooms:lobby', {}));
  assert.equal(r.status, 'ok', JSON.stringify(r));
  await disconnectAll();

  const t0 = Date.now();
  proc.kill('SIGTERM');
  const how = await withTimeout(exited, 15000, 'dev-cluster.sh to exit on SIGTERM');
  t.diagnostic(`exited ${JSON.stringify(how)} ${Date.now() - t0} ms after SIGTERM`);
  assert.match(out, /dev-cluster: stopped; removed/);
  assert.ok(!fs.existsSync(dir), 'the cluster directory is removed');
  for (const p of [...redisPorts, Number(gw.public.split(':')[1]), Number(gw.admin.split(':')[1])]) {
    assert.equal(await listening(p), false, `nothing listens on ${p} any more`);
  }
});
