// Acceptance 6: authentication. Bad tokens never yield a signed-in socket; reject mode
// answers 401; per-join guardian_token; subprotocol token; RS256 / ES256 and
// algorithm confusion.
import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import {
  test, startRedis, startGateway, createRoom, teardown, connect, join, push,
  hs256, rs256, es256, algNone, claims, rsaKeyPair, ecKeyPair, publicPem, tempFile,
  uid, rawConnect, tryUpgrade, httpUpgrade, wsUrl, withTimeout, DEFAULT_SECRET, GATEWAY_BIN,
} from './lib/harness.mjs';

const PREFIX = 'au';
let redis; let hs; let reject; let rs; let es;
const rsa = rsaKeyPair();
const rsaOther = rsaKeyPair();
const ec = ecKeyPair();
const ecOther = ecKeyPair();
const rsaPem = publicPem(rsa);
const ecPem = publicPem(ec);

before(async () => {
  redis = await startRedis();
  [hs, reject, rs, es] = await Promise.all([
    startGateway({ redisPort: redis.port, prefix: PREFIX, name: 'hs256' }),
    startGateway({
      redisPort: redis.port, prefix: PREFIX, name: 'hs256-reject',
      env: { GATEWAY_AUTH_REJECT_INVALID_TOKENS: 'true', GATEWAY_SERVER_ALLOWED_ORIGINS: '["https://app.example"]' },
    }),
    startGateway({
      redisPort: redis.port, prefix: PREFIX, name: 'rs256',
      env: { GATEWAY_AUTH_ALGORITHM: 'RS256', GATEWAY_AUTH_PUBLIC_KEY_FILE: tempFile('rsa.pub.pem', rsaPem), GATEWAY_AUTH_HS256_SECRET: undefined },
    }),
    startGateway({
      redisPort: redis.port, prefix: PREFIX, name: 'es256',
      env: { GATEWAY_AUTH_ALGORITHM: 'ES256', GATEWAY_AUTH_PUBLIC_KEY_FILE: tempFile('ec.pub.pem', ecPem), GATEWAY_AUTH_HS256_SECRET: undefined },
    }),
  ]);
});
after(() => teardown({ gateways: [hs, reject, rs, es], redis }));

function newRoom() {
  const id = uid('au');
  createRoom(redis, PREFIX, id);
  return `rooms:${id}`;
}

const now = () => Math.floor(Date.now() / 1000);
const b64url = (s) => Buffer.from(s).toString('base64').replace(/=+$/, '').replace(/\+/g, '-').replace(/\//g, '_');

/** Connect raw with `token` in the query, join `topic`, push new_msg; return {join, push}. */
async function tryToken(gw, topic, token, joinPayload = {}) {
  const c = await rawConnect(wsUrl(gw, token === undefined ? {} : { token }));
  const j = await c.join(topic, '1', joinPayload);
  let p = null;
  if (j[4].status === 'ok') {
    c.send(['1', '2', topic, 'new_msg', { body: 'auth probe' }]);
    p = await c.reply('2');
  }
  c.close();
  return { join: j[4], push: p && p[4], conn: c };
}

/**
 * Security first (thrown at once): the socket is anonymous and its push is refused.
 * Then the reply shape: `auth_error` present. Shape problems are collected into
 * `problems` so one run checks every token of a list before failing.
 */
function assertAnonymousWithError(res, what, problems) {
  assert.equal(res.join.status, 'ok', `${what}: join must still succeed (anonymous): ${JSON.stringify(res.join)}`);
  assert.equal(res.join.response.auth, 'anonymous', `${what}: ${JSON.stringify(res.join)}`);
  assert.equal(res.join.response.user, undefined, `${what}: anonymous reply must not carry a user`);
  assert.deepEqual(res.push, { status: 'error', response: { reason: 'Not signed in' } }, `${what}: push must be refused`);
  const r = res.join.response;
  if (typeof r.auth_error !== 'string' || r.auth_error.length === 0
    || JSON.stringify(Object.keys(r).sort()) !== '["auth","auth_error"]') {
    problems.push(`${what}: join reply ${JSON.stringify(res.join)}, expected {"status":"ok","response":{"auth":"anonymous","auth_error":"<reason>"}}`);
  }
}

const assertNoProblems = (problems) => assert.deepEqual(problems, [], `join replies without auth_error:\n${problems.join('\n')}`);

function assertSignedIn(res, sub, username, what) {
  assert.deepEqual(res.join, { status: 'ok', response: { auth: 'user', user: { id: sub, username } } }, what);
  assert.deepEqual(res.push, { status: 'ok', response: {} }, `${what}: push`);
}

test('HS256: valid token signs in; no token is plain anonymous (no auth_error)', async () => {
  const topic = newRoom();
  assertSignedIn(await tryToken(hs, topic, hs256(claims('u-1', 'one'))), 'u-1', 'one', 'valid HS256');
  const anon = await tryToken(hs, topic, undefined);
  assert.deepEqual(anon.join, { status: 'ok', response: { auth: 'anonymous' } });
  assert.deepEqual(anon.push, { status: 'error', response: { reason: 'Not signed in' } });
});

test('bad tokens leave the socket anonymous with auth_error: wrong secret, expired, alg none, garbage, tampered', async () => {
  const topic = newRoom();
  const good = hs256(claims('u-2', 'two'));
  const [h, p] = good.split('.');
  const tampered = `${h}.${b64url(JSON.stringify(claims('u-admin', 'admin')))}.${good.split('.')[2]}`;
  const cases = {
    'wrong secret': hs256(claims('u-2', 'two'), 'not-the-secret'),
    'expired 1 h ago': hs256(claims('u-2', 'two', { exp: now() - 3600 })),
    'expired 30 s ago (beyond 5 s leeway)': hs256(claims('u-2', 'two', { exp: now() - 30 })),
    'alg none': algNone(claims('u-2', 'two')),
    'alg none, signature kept': `${b64url(JSON.stringify({ alg: 'none', typ: 'JWT' }))}.${p}.${good.split('.')[2]}`,
    garbage: 'garbage-token',
    'three garbage parts': 'aaa.bbb.ccc',
    tampered,
    'RS256 token on an HS256 gateway': rs256(claims('u-2', 'two'), rsa.privateKey),
  };
  const problems = [];
  for (const [what, token] of Object.entries(cases)) {
    assertAnonymousWithError(await tryToken(hs, topic, token), what, problems);
  }
  assertNoProblems(problems);
});

test('expiry leeway: a token that expired 2 s ago is still accepted (leeway 5 s)', async () => {
  const topic = newRoom();
  assertSignedIn(await tryToken(hs, topic, hs256(claims('u-3', 'three', { exp: now() - 2 }))), 'u-3', 'three', 'exp now-2');
});

test('phoenix.js with a bad token: join says anonymous + auth_error, push refused', async () => {
  const topic = newRoom();
  const s = await connect(hs.publicUrl, { token: hs256(claims('u-4', 'four'), 'wrong-secret') });
  const ch = s.channel(topic);
  const j = await join(ch);
  assert.equal(j.status, 'ok');
  assert.equal(j.response.auth, 'anonymous');
  assert.deepEqual(await push(ch, 'new_msg', { body: 'x' }), { status: 'error', response: { reason: 'Not signed in' } });
  assert.equal(typeof j.response.auth_error, 'string', `join reply ${JSON.stringify(j)} lacks auth_error`);
});

test('GATEWAY_AUTH_REJECT_INVALID_TOKENS=true: bad token → HTTP 401; no token and good token still connect', async () => {
  const base = `${reject.publicUrl}/websocket?vsn=2.0.0`;
  for (const [what, token] of [
    ['wrong secret', hs256('u-5', 'nope')],
    ['expired', hs256(claims('u-5', 'five', { exp: now() - 3600 }))],
    ['alg none', algNone('u-5')],
    ['garbage', 'garbage'],
  ]) {
    const r = await tryUpgrade(`${base}&token=${encodeURIComponent(token)}`);
    assert.equal(r.status, 401, `${what}: upgrade status ${r.status}`);
  }
  // bad token through the subprotocol is refused as well
  const sp = await tryUpgrade(base, { protocols: ['phoenix', `base64url.bearer.phx.${Buffer.from('garbage.token.x').toString('base64').replace(/=/g, '')}`] });
  assert.equal(sp.status, 401, `bad subprotocol token: upgrade status ${sp.status}`);

  assert.equal((await tryUpgrade(base)).status, 101, 'anonymous connect must still be allowed');
  const topic = newRoom();
  assertSignedIn(await tryToken(reject, topic, hs256(claims('u-6', 'six'))), 'u-6', 'six', 'valid token on reject gateway');
});

test('refusals at the upgrade say why in text/plain: vsn, origin, and each token fault (reject mode)', async () => {
  const base = `${reject.publicUrl}/websocket`;
  const refusals = [
    ['vsn 1.0.0', `${base}?vsn=1.0.0`, {}, 403, 'unsupported vsn: use 2.0.0'],
    ['no vsn', base, {}, 403, 'unsupported vsn: use 2.0.0'],
    ['foreign origin', `${base}?vsn=2.0.0`, { Origin: 'https://evil.example' }, 403, 'origin not allowed'],
    ['expired', `${base}?vsn=2.0.0&token=${hs256(claims('u-r', 'r', { exp: now() - 3600 }))}`, {}, 401, 'token expired'],
    ['wrong secret', `${base}?vsn=2.0.0&token=${hs256('u-r', 'not-the-secret')}`, {}, 401, 'invalid signature'],
    ['garbage', `${base}?vsn=2.0.0&token=garbage`, {}, 401, 'malformed token'],
    ['no exp', `${base}?vsn=2.0.0&token=${hs256({ sub: 'u-r' })}`, {}, 401, 'missing claim: exp'],
    ['numeric sub', `${base}?vsn=2.0.0&token=${hs256({ sub: 42, exp: now() + 60 })}`, {}, 401, 'sub must be a string'],
  ];
  for (const [what, url, headers, status, reason] of refusals) {
    const r = await tryUpgrade(url, { headers });
    assert.equal(r.status, status, `${what}: status`);
    assert.match(r.headers['content-type'] || '', /^text\/plain/, `${what}: content-type`);
    assert.equal(r.body.trim(), reason, `${what}: body`);
  }
  // the allowed origin, and no Origin at all (not a browser), still connect
  assert.equal((await tryUpgrade(`${base}?vsn=2.0.0`, { headers: { Origin: 'https://app.example' } })).status, 101);
});

test('auth_error names the claim: missing exp, sub not a string, empty sub, username not a string', async () => {
  const topic = newRoom();
  const cases = [
    [{ sub: 'u-c' }, 'missing claim: exp'],
    [{ exp: now() + 60 }, 'missing claim: sub'],
    [{ sub: 42, exp: now() + 60 }, 'sub must be a string'],
    [{ sub: '', exp: now() + 60 }, 'sub must not be empty'],
    [{ sub: 'u-c', exp: now() + 60, username: ['x'] }, 'username must be a string'],
    [{ sub: 'u-c', exp: 'tomorrow' }, 'exp must be a number (seconds since 1970)'],
  ];
  for (const [c, reason] of cases) {
    const res = await tryToken(hs, topic, hs256(c));
    assert.deepEqual(res.join, { status: 'ok', response: { auth: 'anonymous', auth_error: reason } }, JSON.stringify(c));
  }
});

test('per-join guardian_token signs in that channel only, on an anonymous socket', async () => {
  const t1 = newRoom(); const t2 = newRoom(); const t3 = newRoom();
  const c = await rawConnect(wsUrl(hs));
  const j1 = await c.join(t1, '1', { guardian_token: hs256(claims('u-g', 'guard')) });
  assert.deepEqual(j1, ['1', '1', t1, 'phx_reply', { status: 'ok', response: { auth: 'user', user: { id: 'u-g', username: 'guard' } } }]);
  const j2 = await c.join(t2, '2', {});
  assert.deepEqual(j2, ['2', '2', t2, 'phx_reply', { status: 'ok', response: { auth: 'anonymous' } }]);
  const j3 = await c.join(t3, '3', { guardian_token: hs256(claims('u-g', 'guard'), 'bad-secret') });
  assert.equal(j3[4].status, 'ok');
  assert.equal(j3[4].response.auth, 'anonymous');
  assert.equal(typeof j3[4].response.auth_error, 'string');

  c.send(['1', '10', t1, 'new_msg', { body: 'from guardian channel' }]);
  assert.deepEqual(await c.reply('10'), ['1', '10', t1, 'phx_reply', { status: 'ok', response: {} }]);
  const b = await c.next((f) => f[0] === null && f[2] === t1 && f[3] === 'new_msg', 3000, 'broadcast in t1');
  assert.deepEqual(b[4].user, { id: 'u-g', username: 'guard' });
  c.send(['2', '11', t2, 'new_msg', { body: 'x' }]);
  assert.deepEqual(await c.reply('11'), ['2', '11', t2, 'phx_reply', { status: 'error', response: { reason: 'Not signed in' } }]);
  c.send(['3', '12', t3, 'new_msg', { body: 'x' }]);
  assert.deepEqual(await c.reply('12'), ['3', '12', t3, 'phx_reply', { status: 'error', response: { reason: 'Not signed in' } }]);
});

test('phoenix.js guardian_token in channel params', async () => {
  const topic = newRoom();
  const s = await connect(hs.publicUrl, {});
  const ch = s.channel(topic, { guardian_token: hs256(claims('u-pg', 'phxguard')) });
  assert.deepEqual(await join(ch), { status: 'ok', response: { auth: 'user', user: { id: 'u-pg', username: 'phxguard' } } });
  assert.deepEqual(await push(ch, 'new_msg', { body: 'hi' }), { status: 'ok', response: {} });
});

test('subprotocol token: phoenix.js authToken signs in, server echoes "phoenix"', async () => {
  const topic = newRoom();
  const token = hs256(claims('u-sp', 'subproto'));
  const s = await connect(hs.publicUrl, { authToken: token });
  assert.equal(s.conn.protocol, 'phoenix', 'server must select subprotocol "phoenix"');
  assert.ok(!s.endPointURL().includes('token='), 'token must not be in the query');
  const ch = s.channel(topic);
  assert.deepEqual(await join(ch), { status: 'ok', response: { auth: 'user', user: { id: 'u-sp', username: 'subproto' } } });
  assert.deepEqual(await push(ch, 'new_msg', { body: 'hi' }), { status: 'ok', response: {} });

  // raw ws (it sends "phoenix,base64url.bearer.phx.<b64>" without a space)
  const b64 = Buffer.from(token).toString('base64').replace(/=+$/, '');
  const c = await rawConnect(wsUrl(hs), { protocols: ['phoenix', `base64url.bearer.phx.${b64}`] });
  assert.equal(c.ws.protocol, 'phoenix');
  assert.deepEqual((await c.join(topic, '1'))[4], { status: 'ok', response: { auth: 'user', user: { id: 'u-sp', username: 'subproto' } } });
});

test('subprotocol header as browsers send it ("phoenix, base64url.bearer.phx.<b64>"): accepted by the reject-mode gateway', async () => {
  // On the reject-mode gateway a token that fails to parse or verify gives 401, so a 101
  // proves the token was extracted and verified.
  const url = `${reject.publicUrl}/websocket?vsn=2.0.0`;
  const token = hs256(claims('u-br', 'browser'));
  const b64 = Buffer.from(token).toString('base64').replace(/=+$/, '');
  const r = await httpUpgrade(url, { headers: { 'Sec-WebSocket-Protocol': `phoenix, base64url.bearer.phx.${b64}` } });
  assert.equal(r.status, 101, `browser-style header: status ${r.status}`);
  assert.equal(r.headers['sec-websocket-protocol'], 'phoenix');
  const bad = await httpUpgrade(url, { headers: { 'Sec-WebSocket-Protocol': `phoenix, base64url.bearer.phx.${Buffer.from(hs256('u-br', 'wrong')).toString('base64').replace(/=+$/, '')}` } });
  assert.equal(bad.status, 401, `browser-style header with a bad token: status ${bad.status}`);
});

test('subprotocol with a bad token: anonymous with auth_error (non-reject mode)', async () => {
  const topic = newRoom();
  const bad = hs256(claims('u-spb', 'x'), 'wrong');
  const c = await rawConnect(wsUrl(hs), { protocols: ['phoenix', `base64url.bearer.phx.${Buffer.from(bad).toString('base64').replace(/=/g, '')}`] });
  assert.equal(c.ws.protocol, 'phoenix');
  const j = await c.join(topic, '1');
  assert.equal(j[4].response.auth, 'anonymous');
  c.send(['1', '2', topic, 'new_msg', { body: 'x' }]);
  assert.deepEqual(await c.reply('2'), ['1', '2', topic, 'phx_reply', { status: 'error', response: { reason: 'Not signed in' } }]);
  assert.equal(typeof j[4].response.auth_error, 'string', `join reply ${JSON.stringify(j)} lacks auth_error`);
});

test('RS256: valid token signs in; other key, HS256-with-public-key (alg confusion), alg none are refused', async () => {
  const topic = newRoom();
  assertSignedIn(await tryToken(rs, topic, rs256(claims('u-rs', 'rsa-user'), rsa.privateKey)), 'u-rs', 'rsa-user', 'valid RS256');
  const der = rsa.publicKey.export({ type: 'spki', format: 'der' });
  const cases = {
    'RS256 signed by another key': rs256(claims('u-rs', 'rsa-user'), rsaOther.privateKey),
    'HS256 with the PEM public key as secret': hs256(claims('u-rs', 'rsa-user'), rsaPem),
    'HS256 with the DER public key as secret': hs256(claims('u-rs', 'rsa-user'), der),
    'HS256 with the default HS secret': hs256(claims('u-rs', 'rsa-user'), DEFAULT_SECRET),
    'alg none': algNone(claims('u-rs', 'rsa-user')),
    'expired RS256': rs256(claims('u-rs', 'rsa-user', { exp: now() - 3600 }), rsa.privateKey),
    'ES256 on an RS256 gateway': es256(claims('u-rs', 'rsa-user'), ec.privateKey),
  };
  const problems = [];
  for (const [what, token] of Object.entries(cases)) {
    assertAnonymousWithError(await tryToken(rs, topic, token), what, problems);
  }
  assertNoProblems(problems);
});

test('ES256: valid token (raw r||s signature) signs in; other key, DER signature, HS256-with-public-key, RS256 refused', async () => {
  const topic = newRoom();
  assertSignedIn(await tryToken(es, topic, es256(claims('u-es', 'ec-user'), ec.privateKey)), 'u-es', 'ec-user', 'valid ES256');
  // an ES256 token whose signature is DER-encoded instead of raw r||s is not a valid JWS
  const input = `${b64url(JSON.stringify({ alg: 'ES256', typ: 'JWT' }))}.${b64url(JSON.stringify(claims('u-es', 'ec-user')))}`;
  const derSig = crypto.sign('sha256', Buffer.from(input), { key: ec.privateKey, dsaEncoding: 'der' });
  const cases = {
    'ES256 signed by another key': es256(claims('u-es', 'ec-user'), ecOther.privateKey),
    'ES256 with DER signature': `${input}.${derSig.toString('base64url')}`,
    'HS256 with the PEM public key as secret': hs256(claims('u-es', 'ec-user'), ecPem),
    'RS256 on an ES256 gateway': rs256(claims('u-es', 'ec-user'), rsa.privateKey),
    'alg none': algNone(claims('u-es', 'ec-user')),
  };
  const problems = [];
  for (const [what, token] of Object.entries(cases)) {
    assertAnonymousWithError(await tryToken(es, topic, token), what, problems);
  }
  assertNoProblems(problems);
});

test('phoenix.js against the RS256 gateway with authToken', async () => {
  const topic = newRoom();
  const s = await connect(rs.publicUrl, { authToken: rs256(claims('u-rsp', 'rsa-phx'), rsa.privateKey) });
  const ch = s.channel(topic);
  assert.deepEqual(await join(ch), { status: 'ok', response: { auth: 'user', user: { id: 'u-rsp', username: 'rsa-phx' } } });
  assert.deepEqual(await push(ch, 'new_msg', { body: 'signed by RSA' }), { status: 'ok', response: {} });
});

/**
 * `gateway serve` with `env` over the usual test settings, expected to refuse to start: resolves
 * {code, stdout, stderr} once it exits (or is killed after `ms`, if it started after all).
 */
async function serveExpectingRefusal(env, ms = 8000) {
  const full = {
    PATH: process.env.PATH,
    NO_COLOR: '1',
    GATEWAY_SERVER_LISTEN: '127.0.0.1:0',
    GATEWAY_ADMIN_LISTEN: '127.0.0.1:0',
    GATEWAY_REDIS_URL: redis.url,
    GATEWAY_REDIS_PREFIX: PREFIX,
    ...env,
  };
  for (const [k, v] of Object.entries(full)) if (v === undefined) delete full[k];
  const proc = spawn(GATEWAY_BIN, ['serve'], { env: full, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  proc.stdout.on('data', (d) => { stdout += d; });
  proc.stderr.on('data', (d) => { stderr += d; });
  // 'close', not 'exit': the process may exit before its stderr has been read to the end
  const exited = new Promise((resolve) => proc.on('close', (code) => resolve(code)));
  let code;
  try {
    code = await withTimeout(exited, ms, 'gateway to refuse to start');
  } catch {
    proc.kill('SIGKILL');
    code = `still running after ${ms} ms`;
  }
  return { code, stdout, stderr };
}

function assertRefused(r, pattern, what) {
  assert.ok(typeof r.code === 'number' && r.code !== 0, `${what}: must exit non-zero at start, got ${r.code}; stdout ${r.stdout}; stderr ${r.stderr}`);
  assert.ok(!r.stdout.includes('"listening"'), `${what}: must not listen`);
  assert.match(r.stderr, pattern, `${what}: the error must name the setting`);
}

test('a blank HS256 secret or admin token stops the gateway at start, whether inline, env or file', async () => {
  const cases = {
    'empty secret file': [{ GATEWAY_AUTH_HS256_SECRET_FILE: tempFile('empty-secret', '') }, /auth\.hs256_secret_file.*empty/],
    'secret file with a line end only': [{ GATEWAY_AUTH_HS256_SECRET_FILE: tempFile('nl-secret', '\r\n') }, /auth\.hs256_secret_file.*empty/],
    'whitespace secret file': [{ GATEWAY_AUTH_HS256_SECRET_FILE: tempFile('ws-secret', '   \n') }, /auth\.hs256_secret_file.*empty/],
    'empty secret by env': [{ GATEWAY_AUTH_HS256_SECRET: '' }, /auth\.hs256_secret.*empty/],
    'empty secret in the config file': [{ GATEWAY_CONFIG: tempFile('gw.toml', '[auth]\nhs256_secret = ""\n') }, /auth\.hs256_secret.*empty/],
    'empty admin token file': [{ GATEWAY_AUTH_HS256_SECRET: DEFAULT_SECRET, GATEWAY_ADMIN_TOKEN_FILE: tempFile('admin-token', '\n') }, /admin\.token_file.*empty/],
    'empty admin token by env': [{ GATEWAY_AUTH_HS256_SECRET: DEFAULT_SECRET, GATEWAY_ADMIN_TOKEN: ' ' }, /admin\.token.*empty/],
  };
  const runs = await Promise.all(Object.values(cases).map(([env]) => serveExpectingRefusal(env)));
  Object.keys(cases).forEach((what, i) => assertRefused(runs[i], cases[what][1], what));
});

test('an HS256 secret shorter than 32 bytes stops the gateway unless auth.allow_short_hs256_secret', async () => {
  const short = '0123456789'; // 10 bytes
  const file = tempFile('short-secret', `${short}\n`);
  for (const [what, env, pattern] of [
    ['10-byte secret by env', { GATEWAY_AUTH_HS256_SECRET: short }, /auth\.hs256_secret.*10 bytes.*allow_short_hs256_secret/],
    ['10-byte secret file', { GATEWAY_AUTH_HS256_SECRET_FILE: file }, /auth\.hs256_secret_file.*10 bytes.*allow_short_hs256_secret/],
  ]) {
    assertRefused(await serveExpectingRefusal(env), pattern, what);
  }
  // with the opt-in, the same secrets start, and a token signed with them signs in
  const topic = newRoom();
  for (const env of [
    { GATEWAY_AUTH_HS256_SECRET: short },
    { GATEWAY_AUTH_HS256_SECRET: undefined, GATEWAY_AUTH_HS256_SECRET_FILE: file },
  ]) {
    const gw = await startGateway({ redisPort: redis.port, prefix: PREFIX, name: 'short-secret', env: { ...env, GATEWAY_AUTH_ALLOW_SHORT_HS256_SECRET: 'true' } });
    try {
      assertSignedIn(await tryToken(gw, topic, hs256(claims('u-short', 'short'), short)), 'u-short', 'short', `opted-in short secret ${JSON.stringify(env)}`);
    } finally {
      await gw.stop();
    }
  }
});

test('RS256 / ES256 without auth.audience: one warning at start; HS256, or an audience set, none', async () => {
  const warning = /WARN.*auth\.audience.*not set[^\n]*/g;
  for (const [gw, alg] of [[rs, 'RS256'], [es, 'ES256']]) {
    const found = gw.stderr().match(warning) || [];
    assert.equal(found.length, 1, `${alg} gateway stderr must warn once about auth.audience:\n${gw.stderr()}`);
    assert.match(found[0], new RegExp(alg));
  }
  assert.doesNotMatch(hs.stderr(), warning, 'no audience warning with HS256');
  const withAud = await startGateway({
    redisPort: redis.port, prefix: PREFIX, name: 'rs256-aud',
    env: { GATEWAY_AUTH_ALGORITHM: 'RS256', GATEWAY_AUTH_PUBLIC_KEY_FILE: tempFile('rsa.pub.pem', rsaPem), GATEWAY_AUTH_HS256_SECRET: undefined, GATEWAY_AUTH_AUDIENCE: 'gateway' },
  });
  try {
    assert.doesNotMatch(withAud.stderr(), warning, 'no audience warning when one is set');
    const topic = newRoom();
    assertSignedIn(await tryToken(withAud, topic, rs256(claims('u-aud', 'aud', { aud: 'gateway' }), rsa.privateKey)), 'u-aud', 'aud', 'RS256 with the right aud');
    const other = await tryToken(withAud, topic, rs256(claims('u-aud', 'aud', { aud: 'billing' }), rsa.privateKey));
    assert.equal(other.join.response.auth, 'anonymous', 'a token for another service is refused');
  } finally {
    await withAud.stop();
  }
});
