// The README's phoenix.js client snippet runs as written on this Node (with `ws` as transport)
// against a real gateway: it joins, its push comes back, and neither an admin broadcast (no
// `user`) nor an anonymous viewer's event (`"user": null`) throws. Its signature snippets (Node
// and Python) accept a signature captured from a real gateway's publish hook and refuse a
// tampered body or another secret.
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import {
  REPO_ROOT, TESTS_DIR, claims, connect, createRoom, hs256, join, push, rawConnect, requireTool, startGateway, startRedis,
  teardown, test, waitFor, withTimeout,
} from './lib/harness.mjs';

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

/** The first ```<lang> block after `marker` in the README. */
function snippet(marker, lang = 'js') {
  const readme = fs.readFileSync(path.join(REPO_ROOT, 'README.md'), 'utf8');
  const at = readme.indexOf(marker);
  assert.ok(at >= 0, `README has "${marker}"`);
  const m = new RegExp(`\`\`\`${lang}\n([\\s\\S]*?)\`\`\``).exec(readme.slice(at));
  assert.ok(m, `a ${lang} block follows "${marker}"`);
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

test('the README signature snippets (Node and Python) verify a signature captured from the gateway', { timeout: 30000 }, async () => {
  requireTool('python3', { why: 'Python to run the README\'s Python snippet', install: 'apt-get install -y python3' });
  const secret = 'readme-hook-secret-0123456789abcdef-xyz';
  // an application that keeps the raw bytes and the header of the one request it gets
  let captured;
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      captured = { raw: Buffer.concat(chunks), header: req.headers['x-gateway-signature'] };
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end('{"result":"broadcast"}');
    });
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'readme-sig-'));
  try {
    const g = await startGateway({
      redisPort: redis.port,
      prefix: 'readme-sig',
      env: { GATEWAY_HOOKS_PUBLISH_URL: `http://127.0.0.1:${server.address().port}/hook`, GATEWAY_HOOKS_SECRET: secret },
    });
    gws.push(g);
    createRoom(redis, 'readme-sig', 'lobby');
    const s = await rawConnect(`${g.publicUrl}/websocket?vsn=2.0.0&token=${hs256(claims('42', 'ann'))}`);
    assert.equal((await s.join('rooms:lobby', '1'))[4].status, 'ok');
    s.send(['1', '2', 'rooms:lobby', 'new_msg', { body: 'héllo "quoted" \\ and ✓' }]);
    assert.equal((await s.reply('2'))[4].status, 'ok');
    s.close();
    assert.ok(captured, 'the gateway posted to the hook');
    assert.match(captured.header, /^sha256=[0-9a-f]{64}$/);
    const body = path.join(dir, 'body');
    fs.writeFileSync(body, captured.raw);
    const tampered = path.join(dir, 'tampered');
    fs.writeFileSync(tampered, Buffer.concat([captured.raw, Buffer.from(' ')]));

    const nodeFile = path.join(dir, 'verify.mjs');
    fs.writeFileSync(nodeFile, `${snippet('Verifying the signature', 'js')}
import fs from 'node:fs';
const [secret, file, header] = process.argv.slice(2);
console.log(verify(secret, fs.readFileSync(file), header) ? 'valid' : 'invalid');
`);
    const pyFile = path.join(dir, 'verify.py');
    fs.writeFileSync(pyFile, `${snippet('Verifying the signature', 'python')}
import sys
secret, file, header = sys.argv[1:4]
print("valid" if verify(secret.encode(), open(file, "rb").read(), header) else "invalid")
`);
    const run = (cmd, file, args) => execFileSync(cmd, [file, ...args], { encoding: 'utf8' }).trim();
    for (const [cmd, file] of [[process.execPath, nodeFile], ['python3', pyFile]]) {
      assert.equal(run(cmd, file, [secret, body, captured.header]), 'valid', `${cmd}: the gateway's signature`);
      assert.equal(run(cmd, file, [secret, tampered, captured.header]), 'invalid', `${cmd}: a tampered body`);
      assert.equal(run(cmd, file, [`${secret}x`, body, captured.header]), 'invalid', `${cmd}: another secret`);
      assert.equal(run(cmd, file, [secret, body, 'sha256=00']), 'invalid', `${cmd}: a short header`);
    }
  } finally {
    server.closeAllConnections();
    server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
