// Production Redis (DESIGN §13): TLS (`rediss://`, verified against redis.tls_ca_file; mutual TLS
// with redis.tls_cert_file + redis.tls_key_file) and ACL users (`user:password@`), on real
// redis-server processes with certificates made here by openssl. A Redis that refuses the gateway
// (wrong CA, no client certificate, wrong password) is unreachable, not fatal: the gateway stays
// up, names the cause in a WARN line (never a password) and keeps retrying.
import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import {
  test, startGateway, teardown, connect, join, push, hs256, claims, rawConnect, wsUrl, waitFor,
  createRoom, GATEWAY_BIN,
} from './lib/harness.mjs';
import { observer, waitRows } from './lib/presence.mjs';
import { makeCerts, startRedisWith, refused, processEnv, tlsFilesEnv } from './lib/tls.mjs';

const PREFIX = 'tls';
let certs;
let mtls; // TLS, client certificates required
let acl; // plain TCP, ACL user only
const gws = [];
const ENV = { GATEWAY_PRESENCE_TTL_MS: '3000', GATEWAY_PRESENCE_HEARTBEAT_INTERVAL_MS: '500' };

before(async () => {
  certs = makeCerts();
  // also on 127.0.0.2, an address its certificate does not name
  mtls = await startRedisWith({ tls: { certs, authClients: 'yes' }, args: ['--bind', '127.0.0.1', '127.0.0.2'] });
  acl = await startRedisWith({
    args: ['--user', 'default', 'off', '--user', 'gw', 'on', '>s3cret-acl-pass', `~${PREFIX}:*`, `&${PREFIX}:*`, '+@all'],
    user: 'gw',
    password: 's3cret-acl-pass',
  });
});
after(async () => {
  await teardown({ gateways: gws });
  await mtls?.stop();
  await acl?.stop();
  certs?.remove();
});

function tlsEnv(extra = {}) {
  return {
    ...ENV,
    GATEWAY_REDIS_URL: mtls.url,
    ...tlsFilesEnv(certs),
    ...extra,
  };
}

/** Two gateways on one Redis: a signed-in user on each, messages both ways, presence on both. */
async function endToEnd(t, env, redis, room) {
  createRoom(redis, PREFIX, room, env); // the CLI over the same settings
  const [g1, g2] = await Promise.all([
    startGateway({ redisPort: redis.port, prefix: PREFIX, env, name: `${room}-1` }),
    startGateway({ redisPort: redis.port, prefix: PREFIX, env, name: `${room}-2` }),
  ]);
  gws.push(g1, g2);
  const topic = `rooms:${room}`;
  const a = await connect(g1.publicUrl, { token: hs256(claims('1', 'alice')) });
  const b = await connect(g2.publicUrl, { token: hs256(claims('2', 'bob')) });
  const ca = a.channel(topic, {});
  const cb = b.channel(topic, {});
  assert.equal((await join(ca)).status, 'ok');
  assert.equal((await join(cb)).status, 'ok');
  const anon = await rawConnect(wsUrl(g2));
  assert.equal((await anon.join(topic, '1'))[4].status, 'ok');
  const gotA = []; const gotB = [];
  ca.on('new_msg', (m) => gotA.push(m));
  cb.on('new_msg', (m) => gotB.push(m));
  const obs = await observer(g1.publicUrl, topic, { sub: '3', username: 'carol' });
  await waitRows(obs, ['alice: 1', 'bob: 1', 'carol: 1', 'Anonymous: 1'], 5000, `${room}: presence across both nodes`);
  assert.equal((await push(ca, 'new_msg', { body: 'from 1' })).status, 'ok');
  assert.equal((await push(cb, 'new_msg', { body: 'from 2' })).status, 'ok');
  await waitFor(() => gotB.some((m) => m.body === 'from 1'), 5000, 'gateway 1 → gateway 2 (pub/sub)');
  await waitFor(() => gotA.some((m) => m.body === 'from 2'), 5000, 'gateway 2 → gateway 1 (pub/sub)');
  await waitFor(() => anon.frames.some((f) => f[3] === 'new_msg' && f[4].body === 'from 1'), 5000, 'anonymous viewer gets it');
  // each node's subscriber is a named connection on this server
  const names = redis.clients().map((c) => c.name);
  for (const g of [g1, g2]) assert.ok(names.includes(`${PREFIX}-sub-${g.node}`), `named subscriber of ${g.name} in ${names}`);
  for (const g of [g1, g2]) assert.equal((await fetch(`${g.adminUrl}/health/ready`)).status, 200);
  t.diagnostic(`${room}: ${JSON.stringify(obs.rows)}`);
  a.disconnect(); b.disconnect(); obs.socket.disconnect(); anon.close();
  return [g1, g2];
}

test('TLS with client certificates: CLI, joins, presence and pub/sub across two gateways', async (t) => {
  await endToEnd(t, tlsEnv(), mtls, 'tlsroom');
});

test('TLS: a server certificate from another CA is refused, logged (UnknownIssuer) and retried', async (t) => {
  await refused(t, PREFIX, tlsEnv({ GATEWAY_REDIS_TLS_CA_FILE: certs.otherCa }), /UnknownIssuer|certificate/);
});

test('TLS: the system roots do not trust the test CA either (no tls_ca_file)', async (t) => {
  await refused(t, PREFIX, tlsEnv({ GATEWAY_REDIS_TLS_CA_FILE: undefined }), /UnknownIssuer|certificate/);
});

test('TLS: the server name is checked (a name the certificate does not carry is refused)', async (t) => {
  const url = mtls.url.replace('127.0.0.1', '127.0.0.2');
  await refused(t, PREFIX, tlsEnv({ GATEWAY_REDIS_URL: url }), /NotValidForName|certificate/);
});

test('mutual TLS: without a client certificate the server refuses; logged and retried', async (t) => {
  await refused(t, PREFIX, tlsEnv({ GATEWAY_REDIS_TLS_CERT_FILE: undefined, GATEWAY_REDIS_TLS_KEY_FILE: undefined }), /certificate|alert|reset|closed/i);
});

test('a client certificate without its key is a configuration error at start', async () => {
  let err;
  try {
    execFileSync(GATEWAY_BIN, ['serve'], { env: processEnv(PREFIX, tlsEnv({ GATEWAY_REDIS_TLS_KEY_FILE: undefined })), encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 10000 });
  } catch (e) { err = e; }
  assert.ok(err, 'serve must fail');
  assert.notEqual(err.status, 0);
  assert.match(`${err.stderr}`, /redis\.tls_cert_file.*tls_key_file|tls_key_file/);
  let err2;
  try {
    execFileSync(GATEWAY_BIN, ['serve'], { env: processEnv(PREFIX, tlsEnv({ GATEWAY_REDIS_TLS_CA_FILE: '/nonexistent/ca.pem' })), encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 10000 });
  } catch (e) { err2 = e; }
  assert.ok(err2, 'serve must fail on an unreadable CA file');
  assert.match(`${err2.stderr}`, /redis\.tls_ca_file/);
});

test('ACL user: the gateway and the CLI work end to end as user:password@', async (t) => {
  const env = { ...ENV, GATEWAY_REDIS_URL: `redis://gw:s3cret-acl-pass@127.0.0.1:${acl.port}` };
  const [g1, g2] = await endToEnd(t, env, acl, 'aclroom');
  for (const g of [g1, g2]) assert.ok(!g.stderr().includes('s3cret-acl-pass'), 'no password in the log');
  // every connection is the ACL user's
  assert.ok(acl.clients().filter((c) => c.cmd !== 'client|list').every((c) => c.user === 'gw'));
});

test('ACL user: a wrong password is logged as WRONGPASS, never the password, and retried', async (t) => {
  await refused(t, PREFIX, { ...ENV, GATEWAY_REDIS_URL: `redis://gw:hunter2-wrong@127.0.0.1:${acl.port}` }, /WRONGPASS/, 'hunter2-wrong');
});
