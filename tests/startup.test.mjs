// Health before Redis (DESIGN §13): within 1 s of start the admin port answers /health/live 200
// and /health/ready 503, also while Redis is unreachable; the public port says 503 meanwhile.
// Once a redis-server comes up on that port the node becomes ready and a join works.
import { after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  test, freePort, createRoom, uid, rawConnect, tryUpgrade, waitFor, withTimeout, requireTool,
  DEFAULT_SECRET, GATEWAY_BIN, hs256, claims,
} from './lib/harness.mjs';

const PREFIX = 'st';
const procs = [];
after(() => { for (const p of procs) { try { p.kill('SIGKILL'); } catch { /* */ } } });

/** `gateway serve` against `redisPort`; resolves once its "starting" line names both ports. */
async function serve(redisPort) {
  const env = { PATH: process.env.PATH, NO_COLOR: '1' };
  Object.assign(env, {
    GATEWAY_SERVER_LISTEN: '127.0.0.1:0',
    GATEWAY_ADMIN_LISTEN: '127.0.0.1:0',
    GATEWAY_REDIS_URL: `redis://127.0.0.1:${redisPort}`,
    GATEWAY_REDIS_PREFIX: PREFIX,
    GATEWAY_AUTH_HS256_SECRET: DEFAULT_SECRET,
  });
  const started = Date.now();
  const proc = spawn(GATEWAY_BIN, ['serve'], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  procs.push(proc);
  const g = { proc, stdout: '', stderr: '', started };
  proc.stderr.on('data', (d) => { g.stderr += d; });
  const lines = [];
  proc.stdout.on('data', (d) => {
    g.stdout += d;
    for (const l of String(d).split('\n')) {
      try { lines.push(JSON.parse(l)); } catch { /* */ }
    }
  });
  g.line = (event, ms) => waitFor(() => lines.find((l) => l.event === event), ms, `"${event}" line; stderr:\n${g.stderr}`, 5);
  const s = await g.line('starting', 1000);
  g.adminUrl = `http://${s.admin}`;
  g.publicUrl = `ws://${s.public}/socket`;
  return g;
}

function redisServer(port) {
  requireTool('redis-server');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'gw-e2e-redis-'));
  const p = spawn('redis-server', ['--port', String(port), '--save', '', '--appendonly', 'no', '--bind', '127.0.0.1', '--dir', dir],
    { stdio: 'ignore' });
  procs.push(p);
  return p;
}

const get = async (url) => {
  const r = await fetch(url);
  return { status: r.status, body: await r.text() };
};

test('health answers within 1 s while Redis is unreachable; ready and joinable once Redis comes up', async () => {
  const port = await freePort();
  const gw = await serve(port);
  const live = await get(`${gw.adminUrl}/health/live`);
  const ready = await get(`${gw.adminUrl}/health/ready`);
  const elapsed = Date.now() - gw.started;
  assert.equal(live.status, 200);
  assert.equal(ready.status, 503);
  assert.match(ready.body, /redis not reachable/);
  assert.ok(elapsed < 1000, `live and ready answered ${elapsed} ms after start`);
  const metrics = await get(`${gw.adminUrl}/metrics`);
  assert.equal(metrics.status, 200, 'metrics are served before Redis too');
  assert.match(metrics.body, /gateway_/);
  const early = await tryUpgrade(`${gw.publicUrl}/websocket?vsn=2.0.0`);
  assert.equal(early.status, 503, 'the public port refuses sessions until the node is assembled');
  assert.match(early.body, /redis not reachable/i);
  // still answering a little later (Redis keeps being retried, the process keeps serving)
  await new Promise((r) => setTimeout(r, 500));
  assert.equal((await get(`${gw.adminUrl}/health/ready`)).status, 503);
  assert.equal(gw.proc.exitCode, null, 'still running');

  redisServer(port);
  await waitFor(async () => (await get(`${gw.adminUrl}/health/ready`)).status === 200, 10000, `readiness 200 once Redis is up; stderr:\n${gw.stderr}`);
  await gw.line('listening', 1000);
  const room = uid('st');
  createRoom({ port }, PREFIX, room);
  const c = await rawConnect(`${gw.publicUrl}/websocket?vsn=2.0.0&token=${hs256(claims('u-st', 'starter'))}`);
  const j = await c.join(`rooms:${room}`, '1');
  assert.deepEqual(j[4], { status: 'ok', response: { auth: 'user', user: { id: 'u-st', username: 'starter' } } });
  c.close();
  gw.proc.kill('SIGTERM');
  await withTimeout(new Promise((r) => gw.proc.on('exit', r)), 8000, 'gateway exit');
  try { execFileSync('redis-cli', ['-p', String(port), 'shutdown', 'nosave'], { stdio: 'ignore' }); } catch { /* */ }
});
