// JWKS (auth.jwks_url): keys from an identity provider's key set, chosen by the token's kid.
// A node http server plays the provider (it counts its requests); tokens are signed with node
// crypto. Sign-in with RS256 and ES256, rotation, a burst of new-kid tokens (coalesced fetches),
// the provider down (cached keys stay), an unknown kid, readiness until the first fetch.
import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import http from 'node:http';
import {
  test, startRedis, startGateway, createRoom, teardown, claims, rsaKeyPair, ecKeyPair,
  uid, rawConnect, tryUpgrade, wsUrl, waitFor, sleep, WebSocket,
} from './lib/harness.mjs';

const PREFIX = 'jw';
const b64url = (b) => Buffer.from(b).toString('base64url');

/** A JWT with `kid` in its header. */
function sign(alg, claimsObj, privateKey, kid) {
  const header = { alg, typ: 'JWT', ...(kid === undefined ? {} : { kid }) };
  const input = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(claimsObj))}`;
  const sig = alg === 'ES256'
    ? crypto.sign('sha256', Buffer.from(input), { key: privateKey, dsaEncoding: 'ieee-p1363' })
    : crypto.sign('sha256', Buffer.from(input), privateKey);
  return `${input}.${b64url(sig)}`;
}

/** A key pair with its public JWK (kid, alg, use). */
function key(alg, kid) {
  const pair = alg === 'ES256' ? ecKeyPair() : rsaKeyPair();
  const jwk = { ...pair.publicKey.export({ format: 'jwk' }), kid, alg, use: 'sig' };
  return { ...pair, kid, alg, jwk, token: (c) => sign(alg, c, pair.privateKey, kid) };
}

/**
 * The identity provider: GET <url> answers the current set (or `status`), counts requests.
 * `stop()` closes it and every kept-alive connection, so the URL is unreachable.
 */
async function provider(keys) {
  const p = { keys, status: 200, requests: 0, delayMs: 0 };
  const server = http.createServer(async (req, res) => {
    p.requests += 1;
    if (p.delayMs) await sleep(p.delayMs);
    if (p.status !== 200) {
      res.writeHead(p.status, { 'content-type': 'text/plain' });
      res.end('provider error');
      return;
    }
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ keys: p.keys.map((k) => k.jwk) }));
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  p.url = `http://127.0.0.1:${server.address().port}/.well-known/jwks.json`;
  p.stop = () => new Promise((r) => { server.close(r); server.closeAllConnections(); });
  return p;
}

/** Gateway env for JWKS with short intervals (min refresh 1 s). */
const jwksEnv = (alg, url, extra = {}) => ({
  GATEWAY_AUTH_ALGORITHM: alg,
  GATEWAY_AUTH_HS256_SECRET: undefined,
  GATEWAY_AUTH_JWKS_URL: url,
  GATEWAY_AUTH_JWKS_MIN_REFRESH_S: '1',
  GATEWAY_AUTH_AUDIENCE: 'gateway',
  ...extra,
});

const tok = (k, sub, extra = {}) => k.token(claims(sub, `name-${sub}`, { aud: 'gateway', ...extra }));

let redis;
const rsa1 = key('RS256', 'rsa-1');
const ec1 = key('ES256', 'ec-1');

before(async () => {
  redis = await startRedis();
});
after(() => teardown({ redis }));

function newRoom() {
  const id = uid('jw');
  createRoom(redis, PREFIX, id);
  return `rooms:${id}`;
}

/** Join `topic` with `token` on a fresh socket; the join reply's response. */
async function joinWith(gw, topic, token) {
  const c = await rawConnect(wsUrl(gw, { token }));
  try {
    const j = await c.join(topic, '1');
    return j[4].response;
  } finally {
    c.close();
  }
}

async function readiness(gw) {
  const r = await fetch(`${gw.adminUrl}/health/ready`);
  return { status: r.status, body: await r.text() };
}

const waitReady = (gw, ms = 5000) => waitFor(async () => (await readiness(gw)).status === 200, ms, 'readiness 200');
const signedIn = (sub) => ({ auth: 'user', user: { id: sub, username: `name-${sub}` } });

test('RS256 and ES256 tokens sign in with keys from the set; keys of the other algorithm are ignored', async () => {
  const idp = await provider([rsa1, ec1]);
  const [rs, es] = await Promise.all([
    startGateway({ redisPort: redis.port, prefix: PREFIX, name: 'jwks-rs', env: jwksEnv('RS256', idp.url) }),
    startGateway({ redisPort: redis.port, prefix: PREFIX, name: 'jwks-es', env: jwksEnv('ES256', idp.url) }),
  ]);
  try {
    await Promise.all([waitReady(rs), waitReady(es)]);
    const topic = newRoom();
    assert.deepEqual(await joinWith(rs, topic, tok(rsa1, 'rs-user')), signedIn('rs-user'));
    assert.deepEqual(await joinWith(es, topic, tok(ec1, 'es-user')), signedIn('es-user'));
    // the EC key is in the set, but the RS256 gateway holds only RS256 keys (and vice versa)
    const cross = await joinWith(rs, topic, tok(ec1, 'x'));
    assert.equal(cross.auth, 'anonymous');
    assert.equal(cross.auth_error, 'algorithm not accepted');
    const cross2 = await joinWith(es, topic, tok(rsa1, 'x'));
    assert.equal(cross2.auth, 'anonymous');
    // a token signed by another key under a known kid
    const forged = sign('RS256', claims('evil', 'evil', { aud: 'gateway' }), rsaKeyPair().privateKey, 'rsa-1');
    assert.deepEqual(await joinWith(rs, topic, forged), { auth: 'anonymous', auth_error: 'invalid signature' });
  } finally {
    await Promise.all([rs.stop(), es.stop(), idp.stop()]);
  }
});

test('rotation: a token with a new kid signs in within 2 s; the retired key stops verifying; a burst of 50 new-kid tokens costs at most a few fetches', async () => {
  const idp = await provider([rsa1]);
  const gw = await startGateway({ redisPort: redis.port, prefix: PREFIX, name: 'jwks-rotate', env: jwksEnv('RS256', idp.url) });
  try {
    await waitReady(gw);
    const topic = newRoom();
    assert.deepEqual(await joinWith(gw, topic, tok(rsa1, 'before')), signedIn('before'));
    await sleep(1100); // past jwks_min_refresh_s since the start fetch

    const rsa2 = key('RS256', 'rsa-2');
    idp.keys = [rsa2];
    const fetchesBefore = idp.requests;
    const t0 = Date.now();
    assert.deepEqual(await joinWith(gw, topic, tok(rsa2, 'after')), signedIn('after'));
    const took = Date.now() - t0;
    assert.ok(took < 2000, `new kid signed in after ${took} ms`);
    assert.equal(idp.requests - fetchesBefore, 1, 'one fetch for the new kid');
    // rsa-1 is absent from the latest set: dropped
    assert.deepEqual(await joinWith(gw, topic, tok(rsa1, 'old')), { auth: 'anonymous', auth_error: 'unknown signing key (kid)' });

    // a burst of 50 sockets whose tokens name a kid the gateway has not seen
    await sleep(1100);
    const rsa3 = key('RS256', 'rsa-3');
    idp.keys = [rsa2, rsa3];
    const burstBefore = idp.requests;
    const replies = await Promise.all(Array.from({ length: 50 }, (_, i) => joinWith(gw, topic, tok(rsa3, `b${i}`))));
    const fetches = idp.requests - burstBefore;
    replies.forEach((r, i) => assert.deepEqual(r, signedIn(`b${i}`), `burst token ${i}`));
    assert.ok(fetches >= 1 && fetches <= 3, `a burst of 50 new-kid tokens made ${fetches} fetches`);
  } finally {
    await gw.stop();
    await idp.stop();
  }
});

test('unknown kid after a refresh: anonymous with auth_error, or HTTP 401 with its reason in reject mode', async () => {
  const idp = await provider([rsa1]);
  const [gw, reject] = await Promise.all([
    startGateway({ redisPort: redis.port, prefix: PREFIX, name: 'jwks-unknown', env: jwksEnv('RS256', idp.url) }),
    startGateway({ redisPort: redis.port, prefix: PREFIX, name: 'jwks-reject', env: jwksEnv('RS256', idp.url, { GATEWAY_AUTH_REJECT_INVALID_TOKENS: 'true' }) }),
  ]);
  try {
    await Promise.all([waitReady(gw), waitReady(reject)]);
    await sleep(1100);
    const stranger = key('RS256', 'never-published');
    const before = idp.requests;
    const r = await joinWith(gw, newRoom(), tok(stranger, 'who'));
    assert.deepEqual(r, { auth: 'anonymous', auth_error: 'unknown signing key (kid)' });
    assert.equal(idp.requests - before, 1, 'the unknown kid made the gateway look once');
    // a second one within jwks_min_refresh_s does not fetch again
    const r2 = await joinWith(gw, newRoom(), tok(stranger, 'who'));
    assert.equal(r2.auth_error, 'unknown signing key (kid)');
    assert.equal(idp.requests - before, 1, 'rate-limited: no second fetch within 1 s');

    const up = await tryUpgrade(wsUrl(reject, { token: tok(stranger, 'who') }));
    assert.equal(up.status, 401);
    assert.match(up.headers['content-type'], /^text\/plain/);
    assert.equal(up.body.trim(), 'unknown signing key (kid)');
    assert.equal((await tryUpgrade(wsUrl(reject, { token: tok(rsa1, 'ok') }))).status, 101);
  } finally {
    await Promise.all([gw.stop(), reject.stop()]);
    await idp.stop();
  }
});

test('provider unreachable after the first fetch: known keys keep working and the node stays ready', async () => {
  const idp = await provider([rsa1, ec1]);
  const gw = await startGateway({
    redisPort: redis.port, prefix: PREFIX, name: 'jwks-outage',
    env: jwksEnv('RS256', idp.url, { GATEWAY_AUTH_JWKS_REFRESH_S: '1', GATEWAY_AUTH_JWKS_FETCH_TIMEOUT_MS: '500' }),
  });
  try {
    await waitReady(gw);
    await idp.stop();
    await sleep(2500); // two refresh periods fail meanwhile
    assert.match(gw.stderr(), /JWKS fetch failed.*keys already held stay in use/);
    assert.equal((await readiness(gw)).status, 200, 'still ready while the provider is down');
    assert.deepEqual(await joinWith(gw, newRoom(), tok(rsa1, 'cached')), signedIn('cached'));
  } finally {
    await gw.stop();
  }
});

test('readiness is 503 until the first fetch succeeds (provider answering 500 at start), then 200 and tokens sign in', async () => {
  const idp = await provider([ec1]);
  idp.status = 500;
  const gw = await startGateway({ redisPort: redis.port, prefix: PREFIX, name: 'jwks-late', env: jwksEnv('ES256', idp.url) });
  try {
    await waitFor(() => idp.requests >= 2, 5000, 'the gateway to retry the fetch');
    const r = await readiness(gw);
    assert.equal(r.status, 503);
    assert.match(r.body, /signing keys not loaded yet/);
    const early = await joinWith(gw, newRoom(), tok(ec1, 'early'));
    assert.deepEqual(early, { auth: 'anonymous', auth_error: 'signing keys not available yet' });

    idp.status = 200;
    const t0 = Date.now();
    await waitReady(gw, 8000);
    assert.ok(Date.now() - t0 < 6000, 'ready within the first-fetch retry period');
    assert.deepEqual(await joinWith(gw, newRoom(), tok(ec1, 'late')), signedIn('late'));
  } finally {
    await gw.stop();
    await idp.stop();
  }
});

test('SIGTERM while an upgrade waits for the key set: that socket, upgraded after the drain began, gets 1012 too', async () => {
  // a token with a new kid holds its upgrade (after the draining check) until the refresh answers;
  // the drain meanwhile closes the sockets it sees. The late one must not be missed (1006 at exit).
  const rsa2 = key('RS256', 'rsa-late');
  const idp = await provider([rsa1]);
  const gw = await startGateway({
    redisPort: redis.port,
    prefix: PREFIX,
    name: 'jwks-drain',
    env: jwksEnv('RS256', idp.url, { GATEWAY_SERVER_SHUTDOWN_TIMEOUT_MS: '5000' }),
  });
  try {
    await waitReady(gw, 8000);
    const early = await rawConnect(wsUrl(gw, { token: tok(rsa1, 'early') }));
    await sleep(1100); // past auth.jwks_min_refresh_s since the start fetch
    idp.keys = [rsa1, rsa2];
    idp.delayMs = 1500;
    const requests = idp.requests;
    const late = new WebSocket(wsUrl(gw, { token: tok(rsa2, 'late') }));
    const lateClosed = new Promise((resolve) => {
      late.on('close', (code) => resolve(code));
      late.on('error', () => {});
    });
    let upgraded = false;
    late.on('upgrade', () => { upgraded = true; });
    await waitFor(() => idp.requests > requests, 3000, 'the refresh for the new kid to start');
    gw.proc.kill('SIGTERM');
    assert.equal((await early.closed).code, 1012);
    const code = await lateClosed;
    assert.ok(upgraded, 'the waiting upgrade completed after the drain began');
    assert.equal(code, 1012, 'the late socket was told to reconnect elsewhere');
    await gw.exited;
  } finally {
    await gw.stop();
    await idp.stop();
  }
});
