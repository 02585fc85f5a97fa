// The README's phoenix.js client snippet runs as written on this Node (with `ws` as transport)
// against a real gateway: it joins, its push comes back, and neither an admin broadcast (no
// `user`) nor an anonymous viewer's event (`"user": null`) throws.
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { REPO_ROOT, TESTS_DIR, claims, connect, createRoom, hs256, join, push, startGateway, startRedis, teardown, test, waitFor, withTimeout } from './lib/harness.mjs';

const ADMIN_TOKEN = 'readme-admin-token';
let redis;
const gws = [];
let child;
let file;
before(async () => { redis = await startRedis(); });
after(async () => {
  try { child?.kill('SIGKILL'); } catch { /* gone */ }
  if (file) fs.rmSync(file, { force: true });
  await teardown({ gateways: gws, redis });
});

/** The first ```js block after `marker` in the README. */
function snippet(marker) {
  const readme = fs.readFileSync(path.join(REPO_ROOT, 'README.md'), 'utf8');
  const at = readme.indexOf(marker);
  assert.ok(at >= 0, `README has "${marker}"`);
  const m = /```js\n([\s\S]*?)```/.exec(readme.slice(at));
  assert.ok(m, `a js block follows "${marker}"`);
  return m[1];
}

test('the README client snippet runs on Node and survives admin broadcasts and anonymous events', { timeout: 30000 }, async () => {
  const g = await startGateway({
    redisPort: redis.port,
    prefix: 'readme',
    env: { GATEWAY_ADMIN_TOKEN: ADMIN_TOKEN, GATEWAY_ROOMS_ANONYMOUS_EVENTS: '["new_msg"]' },
  });
  gws.push(g);
  createRoom(redis, 'readme', 'lobby');
  const code = snippet('A phoenix.js client');
  assert.ok(code.includes('ws://127.0.0.1:4000/socket'), 'the snippet names the default socket URL');
  // next to tests/node_modules, so `phoenix` and `ws` resolve as they would in the reader's project
  file = path.join(TESTS_DIR, `.readme-snippet-${process.pid}.mjs`);
  fs.writeFileSync(file, code.replace('ws://127.0.0.1:4000/socket', g.publicUrl));
  child = spawn(process.execPath, [file], { env: { ...process.env, TOKEN: hs256(claims('5', 'eve')) }, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout.on('data', (d) => { out += d; });
  child.stderr.on('data', (d) => { err += d; });
  const alive = () => child.exitCode === null && child.signalCode === null;
  const until = (re, what) => waitFor(() => re.test(out), 10000, what).catch((e) => {
    throw new Error(`${e.message}\nsnippet stdout:\n${out}\nstderr:\n${err}`);
  });
  await until(/^user$/m, 'the snippet to join signed in');
  await until(/^eve: hello$/m, 'the snippet to see its own message');
  await until(/eve \(1\)/, 'presence to list the signed-in user');

  // an anonymous viewer's event: "user": null
  const anon = await connect(g.publicUrl);
  const ac = anon.channel('rooms:lobby', {});
  assert.equal((await join(ac)).status, 'ok');
  assert.equal((await push(ac, 'new_msg', { body: 'from the crowd' })).status, 'ok');
  await until(/^anonymous: from the crowd$/m, 'the snippet to print the anonymous event');
  // an admin broadcast: no "user" at all
  const res = await fetch(`${g.adminUrl}/api/rooms/lobby/broadcast`, {
    method: 'POST',
    headers: { authorization: `Bearer ${ADMIN_TOKEN}`, 'content-type': 'application/json' },
    body: JSON.stringify({ event: 'new_msg', payload: { body: 'maintenance at 5' } }),
  });
  assert.equal(res.status, 200, await res.text());
  await until(/^server: maintenance at 5$/m, 'the snippet to print the admin broadcast');
  assert.ok(alive(), `the snippet is still running:\n${out}${err}`);
  assert.equal(err, '', 'the snippet wrote nothing on stderr (no exception)');
  anon.disconnect();
  child.kill('SIGTERM');
  await withTimeout(new Promise((resolve) => (alive() ? child.on('exit', resolve) : resolve())), 5000, 'snippet exit');
});
