// `gateway dev` — what the README's run command (scripts/dev.sh) ends in: with no Redis answering
// at its URL it starts a local redis-server, creates room `lobby`, serves the demo page and demo
// tokens, and a phoenix.js client can join rooms:lobby. SIGTERM stops the gateway and its Redis.
import { after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Socket } from 'phoenix';
import { GATEWAY_BIN, REPO_ROOT, WebSocket, freePort, test, waitFor, withTimeout } from './lib/harness.mjs';

let proc;
after(() => { try { proc?.kill('SIGKILL'); } catch { /* */ } });

const redisAnswers = (port) => {
  try {
    return execFileSync('redis-cli', ['-p', String(port), 'PING'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'], timeout: 2000 }).trim() === 'PONG';
  } catch { return false; }
};

test('gateway dev starts its own Redis, creates lobby, serves the page, and phoenix.js joins rooms:lobby', { timeout: 60000 }, async () => {
  const [redisPort, publicPort, adminPort] = [await freePort(), await freePort(), await freePort()];
  assert.equal(redisAnswers(redisPort), false, 'the chosen Redis port must start empty');
  const env = { PATH: process.env.PATH, NO_COLOR: '1', GATEWAY_REDIS_URL: `redis://127.0.0.1:${redisPort}`,
    GATEWAY_SERVER_LISTEN: `127.0.0.1:${publicPort}`, GATEWAY_ADMIN_LISTEN: `127.0.0.1:${adminPort}` };
  proc = spawn(GATEWAY_BIN, ['dev'], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  // the JSON events on stdout, the banner on stderr: kept apart, so that a line of one is never
  // cut by a write of the other
  let stdout = '';
  let out = '';
  proc.stdout.on('data', (d) => { stdout += d; });
  proc.stderr.on('data', (d) => { out += d; });
  await waitFor(() => stdout.includes('"event":"listening"') && out.includes('more tokens:'), 20000, 'gateway dev to come up').catch((e) => {
    throw new Error(`${e.message}; its output:\n${stdout}\n${out}`);
  });
  assert.match(out, /starting redis-server/);
  assert.ok(redisAnswers(redisPort), 'gateway dev started redis-server on its URL port');
  assert.equal(execFileSync('redis-cli', ['-p', String(redisPort), 'EXISTS', 'gw:room:{lobby}'], { encoding: 'utf8' }).trim(), '1');

  const base = `http://127.0.0.1:${publicPort}`;
  const page = await fetch(`${base}/`);
  assert.equal(page.status, 200);
  assert.match(await page.text(), /import \{ Socket, Presence \} from "\/phoenix\.js"/);
  const js = await fetch(`${base}/phoenix.js`);
  assert.equal(js.status, 200, 'the official phoenix client is served for the page');
  assert.match(await js.text(), /export \{/);
  const tokens = await (await fetch(`${base}/dev/tokens.json`)).json();
  assert.deepEqual(tokens.map((t) => t.username), ['test_user', 'test_user2']);

  // a phoenix.js client signs in with a printed token and joins rooms:lobby
  const socket = new Socket(`ws://127.0.0.1:${publicPort}/socket`, { transport: WebSocket, params: { token: tokens[0].token } });
  socket.connect();
  const channel = socket.channel('rooms:lobby', {});
  const reply = await withTimeout(new Promise((resolve) => channel.join().receive('ok', resolve).receive('error', resolve)), 5000, 'join');
  assert.deepEqual(reply, { auth: 'user', user: { id: '1', username: 'test_user' } });
  socket.disconnect();

  // the printed line mints more tokens for this server: `GATEWAY_AUTH_HS256_SECRET=… gateway token alice`
  const line = /more tokens: GATEWAY_AUTH_HS256_SECRET=(\S+) (\S+) token alice/.exec(out);
  assert.ok(line, `gateway dev prints how to mint tokens:\n${out}`);
  const minted = execFileSync(GATEWAY_BIN, ['token', 'alice'], { env: { PATH: process.env.PATH, GATEWAY_AUTH_HS256_SECRET: line[1] }, encoding: 'utf8' }).trim();
  const alice = new Socket(`ws://127.0.0.1:${publicPort}/socket`, { transport: WebSocket, params: { token: minted } });
  alice.connect();
  const aliceReply = await withTimeout(new Promise((resolve) => alice.channel('rooms:lobby', {}).join().receive('ok', resolve).receive('error', resolve)), 5000, 'join as alice');
  assert.deepEqual(aliceReply, { auth: 'user', user: { id: 'alice', username: 'alice' } });
  alice.disconnect();

  proc.kill('SIGTERM');
  const code = await withTimeout(new Promise((resolve) => proc.on('exit', resolve)), 15000, 'gateway dev to exit');
  assert.equal(code, 0);
  await waitFor(() => !redisAnswers(redisPort), 5000, 'the Redis it started to stop with it');
});

test('gateway dev listens on 127.0.0.1 unless told otherwise', { timeout: 60000 }, async () => {
  // the default settings file (config/gateway.toml in the working directory) says 0.0.0.0: dev
  // keeps the port and listens on the loopback address only
  const [redisPort, publicPort, adminPort] = [await freePort(), await freePort(), await freePort()];
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'gw-dev-'));
  fs.mkdirSync(path.join(dir, 'config'));
  fs.writeFileSync(path.join(dir, 'config', 'gateway.toml'), `[server]\nlisten = "0.0.0.0:${publicPort}"\n[admin]\nlisten = "127.0.0.1:${adminPort}"\n`);
  const env = { PATH: process.env.PATH, NO_COLOR: '1', GATEWAY_REDIS_URL: `redis://127.0.0.1:${redisPort}` };
  const p = spawn(GATEWAY_BIN, ['dev'], { env, cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
  // the JSON events are on stdout, the banner on stderr: kept apart, so that a line of one is
  // never cut by a write of the other
  let stdout = '';
  let stderr = '';
  p.stdout.on('data', (d) => { stdout += d; });
  p.stderr.on('data', (d) => { stderr += d; });
  try {
    const listening = await waitFor(() => /^\{"admin".*"event":"listening".*\}$/m.exec(stdout)?.[0], 20000, 'gateway dev to come up').catch((e) => {
      throw new Error(`${e.message}; its output:\n${stdout}\n${stderr}`);
    });
    assert.equal(JSON.parse(listening).public, `127.0.0.1:${publicPort}`);
    await waitFor(() => stderr.includes('demo page:'), 5000, 'the demo banner');
    assert.match(stderr, new RegExp(`demo page: +http://127\\.0\\.0\\.1:${publicPort}/`));
  } finally {
    p.kill('SIGTERM');
    await withTimeout(new Promise((resolve) => p.on('exit', resolve)), 15000, 'gateway dev to exit');
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('the demo page names who a message is from: a user, an anonymous viewer, or the server', () => {
  // the page's own function, run here: an admin broadcast has no `user`, an anonymous event `user: null`
  const html = fs.readFileSync(path.join(REPO_ROOT, 'gateway', 'assets', 'index.html'), 'utf8');
  const src = /^function sender\(m\) \{\n[\s\S]*?\n\}$/m.exec(html);
  assert.ok(src, 'the page has function sender(m)');
  assert.match(html, /who\.textContent = sender\(m\)/, 'and renders new_msg with it');
  const sender = new Function(`${src[0]}; return sender;`)();
  assert.equal(sender({ body: 'hi', user: { id: '1', username: 'ann' } }), 'ann');
  assert.equal(sender({ body: 'hi', user: null }), 'Anonymous');
  assert.equal(sender({ body: 'maintenance at 5' }), 'server');
});
