// Redis Cluster over TLS (DESIGN §13 with §8): a 3-master cluster that speaks TLS only
// (`--port 0 --tls-port`, TLS on the cluster bus and for replication, client certificates
// required), created with `redis-cli --tls … --cluster create`. Two gateways in cluster mode with
// rediss:// seed URLs, redis.tls_ca_file and a client certificate: the CLI, joins, presence and
// new_msg across the nodes in a room on every master, and again after a master is killed (its
// replica takes over over TLS; the gateways reconnect and re-subscribe over TLS). A wrong CA or no client certificate is
// refused, named in a WARN line and retried, readiness 503.
import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  test, startGateways, teardown, createRoom, member, anonymous, crosses, waitFor,
} from './lib/harness.mjs';
import { observer, waitRows, viewerSees } from './lib/presence.mjs';
import { startCluster } from './lib/cluster.mjs';
import { makeCerts, refused } from './lib/tls.mjs';

const PREFIX = 'ctls';
const ENV = {
  GATEWAY_PRESENCE_TTL_MS: '3000',
  GATEWAY_PRESENCE_HEARTBEAT_INTERVAL_MS: '1000',
  GATEWAY_SERVER_PUSH_RATE_PER_S: '1000',
  GATEWAY_SERVER_PUSH_BURST: '1000',
};
let certs; let cluster; let env; let gw1; let gw2;

before(async () => {
  certs = makeCerts();
  cluster = await startCluster({ tls: certs });
  env = { ...ENV, ...cluster.env };
  [gw1, gw2] = await startGateways(['ctls-gw1', 'ctls-gw2'], { redisPort: cluster.ports[0], prefix: PREFIX, env });
});
after(async () => {
  await teardown({ gateways: [gw1, gw2] });
  if (cluster) await cluster.stop();
  certs?.remove();
});

test('TLS cluster: the CLI, joins, presence and new_msg across two gateways in a room on every master', async (t) => {
  const rooms = cluster.masters().map((m) => cluster.roomOn(PREFIX, m.port, 'tls'));
  assert.equal(new Set(rooms.map((r) => cluster.masterOf(`${PREFIX}:room:{${r}}`))).size, 3, 'one room per master');
  for (const room of rooms) {
    const topic = `rooms:${room}`;
    createRoom({ port: cluster.ports[0] }, PREFIX, room, env); // `gateway rooms create` over TLS
    const alice = await member(gw1, topic, '1', 'alice');
    const bob = await member(gw2, topic, '2', 'bob');
    const anon1 = await anonymous(gw1, topic);
    const anon2 = await anonymous(gw2, topic);
    const want = ['alice: 1', 'bob: 1', 'carol: 1', 'dave: 1', 'Anonymous: 2'];
    const o1 = await observer(gw1.publicUrl, topic, { sub: '3', username: 'carol' });
    const o2 = await observer(gw2.publicUrl, topic, { sub: '4', username: 'dave' });
    await waitRows(o1, want, 5000, `${room}: presence on gw1`);
    await waitRows(o2, want, 5000, `${room}: presence on gw2`);
    assert.ok(await crosses(alice, bob, topic, 5000), `${room}: gw1 → gw2`);
    assert.ok(await crosses(bob, alice, topic, 5000), `${room}: gw2 → gw1`);
    assert.ok(await crosses(alice, anon2, topic, 5000), `${room}: gw1 → anonymous on gw2`);
    assert.ok(await crosses(bob, anon1, topic, 5000), `${room}: gw2 → anonymous on gw1`);
    t.diagnostic(`${room} on master ${cluster.masterOf(`${PREFIX}:room:{${room}}`)}: ${JSON.stringify(o1.rows)}`);
    for (const c of [alice, bob, anon1, anon2]) c.close();
    o1.socket.disconnect(); o2.socket.disconnect();
  }
  for (const g of [gw1, gw2]) assert.equal((await fetch(`${g.adminUrl}/health/ready`)).status, 200, `${g.name} ready`);
});

test('TLS cluster: a master is killed; its replica takes over and messages and presence cross the nodes again', { timeout: 60000 }, async (t) => {
  const victim = cluster.masters()[0].port;
  const room = cluster.roomOn(PREFIX, victim, 'tlsfo');
  const topic = `rooms:${room}`;
  createRoom({ port: cluster.ports[0] }, PREFIX, room, env);
  const alice = await member(gw1, topic, '1', 'alice');
  const bob = await member(gw2, topic, '2', 'bob');
  const anon = await anonymous(gw2, topic);
  const want = ['alice: 1', 'bob: 1', 'Anonymous: 1'];
  assert.ok(await viewerSees(gw1, topic, 0, want, 5000), 'presence before the failover');
  const t0 = Date.now();
  await cluster.kill(victim);
  const slot = cluster.slotOf(`${PREFIX}:room:{${room}}`);
  await waitFor(() => {
    const m = cluster.masters().find((x) => x.slots.some(([a, b]) => a <= slot && slot <= b));
    return m && m.port !== victim;
  }, 20000, 'a replica to take over', 100);
  const promoted = Date.now() - t0;
  await waitFor(async () => await crosses(alice, bob, topic, 500) && await crosses(bob, alice, topic, 500), 20000, 'messages cross both ways');
  const crossed = Date.now() - t0;
  let n = 0;
  await waitFor(async () => await viewerSees(gw1, topic, ++n, want, 500) && await viewerSees(gw2, topic, ++n, want, 500), 20000, 'new viewers see everyone');
  assert.ok(await crosses(alice, anon, topic, 3000), 'the anonymous viewer gets them');
  t.diagnostic(`master ${victim} killed: promotion after ${promoted} ms, messages both ways after ${crossed} ms, presence complete after ${Date.now() - t0} ms`);
  await waitFor(async () => (await Promise.all([gw1, gw2].map(async (g) => (await fetch(`${g.adminUrl}/health/ready`)).status))).every((c) => c === 200), 15000, 'ready again');
  for (const c of [alice, bob, anon]) assert.equal(c.closeInfo, null);
});

test('TLS cluster: a server certificate from another CA is refused, logged (certificate) and retried; readiness 503', async (t) => {
  await refused(t, PREFIX, { ...env, GATEWAY_REDIS_TLS_CA_FILE: certs.otherCa }, /UnknownIssuer|certificate/);
});

test('TLS cluster: without a client certificate the nodes refuse; logged and retried; readiness 503', async (t) => {
  await refused(t, PREFIX, { ...env, GATEWAY_REDIS_TLS_CERT_FILE: undefined, GATEWAY_REDIS_TLS_KEY_FILE: undefined }, /certificate|alert|reset|closed/i);
});
