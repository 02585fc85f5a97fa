// A real local Sentinel set-up for the sentinel-mode tests: a master, a replica and three
// `redis-server --sentinel` (quorum 2, down-after 1 s, failover-timeout 3 s) monitoring `name`.
// With `tls: certs` (from tls.mjs' makeCerts) everything speaks TLS only: the data servers
// (`--port 0 --tls-port`, TLS replication, client certificates required) and the sentinels
// (`port 0`, `tls-port`, `tls-replication yes`: they reach the servers and each other over TLS and
// announce their TLS ports); the sentinel URLs are rediss:// and redis-cli goes in with the CA and
// the client certificate.
import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { freePort, waitFor, sleep, crosses } from './harness.mjs';
import { viewerSees } from './presence.mjs';
import { startRedisWith, tlsCliArgs, tlsFilesEnv } from './tls.mjs';

const children = new Set();
process.on('exit', () => { for (const c of children) { try { c.kill('SIGKILL'); } catch { /* gone */ } } });

/** A flat `--raw` reply of key/value lists (each starting with `name`) as objects. */
function records(text) {
  const l = text.split('\n');
  const out = [];
  for (let i = 0; i + 1 < l.length; i += 2) {
    if (l[i] === 'name' || out.length === 0) out.push({});
    out[out.length - 1][l[i]] = l[i + 1];
  }
  return out;
}

export async function startSentinels({ name = 'gwmaster', tls } = {}) {
  const certs = tls;
  const serverTls = certs ? { certs } : undefined;
  const servers = {}; // port -> redis handle (the two data servers)
  const sentinels = [];
  const a = await startRedisWith({ tls: serverTls });
  const b = await startRedisWith({ tls: serverTls, args: ['--replicaof', '127.0.0.1', String(a.port)] });
  servers[a.port] = a;
  servers[b.port] = b;
  await waitFor(() => /master_link_status:up/.test(b.cli('INFO', 'replication')), 10000, 'replica linked');

  const startSentinel = (port) => {
    const conf = path.join(a.dir, `sentinel-${port}.conf`);
    const portLines = certs
      ? ['port 0', `tls-port ${port}`, `tls-cert-file ${certs.serverCert}`, `tls-key-file ${certs.serverKey}`,
        `tls-client-cert-file ${certs.clientCert}`, `tls-client-key-file ${certs.clientKey}`,
        `tls-ca-cert-file ${certs.ca}`, 'tls-auth-clients yes', 'tls-replication yes']
      : [`port ${port}`];
    fs.writeFileSync(conf, [
      ...portLines, 'bind 127.0.0.1', 'protected-mode no', `dir ${a.dir}`,
      `sentinel monitor ${name} 127.0.0.1 ${a.port} 2`,
      `sentinel down-after-milliseconds ${name} 1000`,
      `sentinel failover-timeout ${name} 3000`,
      `sentinel parallel-syncs ${name} 1`,
      '',
    ].join('\n'));
    const proc = spawn('redis-server', [conf, '--sentinel'], { stdio: ['ignore', 'pipe', 'pipe'] });
    children.add(proc);
    proc.on('exit', () => children.delete(proc));
    let out = '';
    proc.stdout.on('data', (d) => { out += d; });
    return { port, proc, output: () => out };
  };
  for (let i = 0; i < 3; i++) sentinels.push(startSentinel(await freePort()));

  const cli = (port, ...args) => execFileSync('redis-cli', ['-h', '127.0.0.1', '-p', String(port), ...tlsCliArgs(certs), '--raw', ...args.map(String)], {
    encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 5000,
  }).replace(/\n$/, '');
  const sentinelCli = (s, ...args) => cli(s.port, ...args);
  const masterState = (s) => records(sentinelCli(s, 'SENTINEL', 'master', name))[0];

  const set = {
    name,
    servers,
    sentinels,
    /** The sentinel URLs the gateway gets. */
    url: sentinels.map((s) => `${certs ? 'rediss' : 'redis'}://127.0.0.1:${s.port}`).join(','),
    env: {},
    sentinelCli,
    /** The master's port as the first sentinel names it. */
    masterPort: () => Number(sentinelCli(sentinels[0], 'SENTINEL', 'get-master-addr-by-name', name).split('\n')[1]),
    /** The data server other than `port`. */
    other: (port) => Number(Object.keys(servers).find((p) => Number(p) !== port)),
    /** Waits until the replica is linked and every sentinel knows the two others and a healthy replica. */
    async settled(replicaPort) {
      await waitFor(() => /master_link_status:up/.test(servers[replicaPort].cli('INFO', 'replication')), 10000, 'replica linked');
      await waitFor(() => sentinels.every((s) => {
        const m = masterState(s);
        if (Number(m['num-other-sentinels']) !== 2 || Number(m['num-slaves']) < 1) return false;
        return records(sentinelCli(s, 'SENTINEL', 'replicas', name))
          .some((r) => r.port === String(replicaPort) && r.flags === 'slave' && r['master-link-status'] === 'ok');
      }), 20000, 'sentinels agree: 3 sentinels, a healthy replica');
    },
    /** Resolves with the time of the first `+switch-master` any sentinel publishes; `.stop()` ends the watch. */
    watchSwitch() {
      const procs = sentinels.map((s) => spawn('redis-cli', ['-h', '127.0.0.1', '-p', String(s.port), ...tlsCliArgs(certs), 'SUBSCRIBE', '+switch-master'], { stdio: ['ignore', 'pipe', 'ignore'] }));
      const switched = new RegExp(`\\n[^\\n]*${name} 127\\.0\\.0\\.1 \\d+ 127\\.0\\.0\\.1 \\d+`);
      const p = new Promise((resolve) => {
        for (const proc of procs) {
          let buf = '';
          proc.stdout.on('data', (d) => {
            buf += d;
            if (switched.test(buf)) resolve(Date.now());
          });
        }
      });
      p.stop = () => { for (const proc of procs) proc.kill('SIGKILL'); };
      return p;
    },
    /** Brings the killed server `port` back as a replica of `masterPort`. */
    async rejoin(port, masterPort) {
      await servers[port].stop().catch(() => {});
      servers[port] = await startRedisWith({ port, tls: serverTls, args: ['--replicaof', '127.0.0.1', String(masterPort)] });
    },
    async stop() {
      for (const s of sentinels) s.proc.kill('SIGKILL');
      for (const r of Object.values(servers)) await r.stop().catch(() => r.kill());
    },
  };
  set.env = { GATEWAY_REDIS_MODE: 'sentinel', GATEWAY_REDIS_SENTINEL_MASTER: name, GATEWAY_REDIS_URL: set.url };
  if (certs) Object.assign(set.env, tlsFilesEnv(certs));
  try {
    await waitFor(() => { try { return sentinels.every((s) => sentinelCli(s, 'PING') === 'PONG'); } catch { return false; } }, 5000, 'sentinels up');
    await set.settled(b.port);
  } catch (e) {
    const logs = sentinels.map((s) => `--- sentinel ${s.port}\n${s.output().slice(-3000)}`).join('\n');
    await set.stop();
    throw new Error(`${e.message}\n${logs}`);
  }
  return set;
}

/** Gateway settings for the failover tests: short presence leases and Redis timeouts, no push limit. */
export const FAILOVER_ENV = {
  GATEWAY_PRESENCE_TTL_MS: '3000',
  GATEWAY_PRESENCE_HEARTBEAT_INTERVAL_MS: '500',
  GATEWAY_REDIS_COMMAND_TIMEOUT_MS: '1000',
  GATEWAY_REDIS_CONNECT_TIMEOUT_MS: '500',
  GATEWAY_SERVER_PUSH_RATE_PER_S: '1000',
  GATEWAY_SERVER_PUSH_BURST: '1000',
};

/** `/health/ready` of gateway `g` (0 when it does not answer). */
export const ready = async (g) => { try { return (await fetch(`${g.adminUrl}/health/ready`)).status; } catch { return 0; } };

/**
 * One failover: SIGKILLs the master, waits for the first `+switch-master`, then until `a` (on
 * gateways[0]) and `b` (on gateways[1]) exchange messages on `topic` both ways and a new viewer on
 * each gateway sees `want` (viewers numbered from `n`); the killed server comes back as a replica.
 * Readiness is polled throughout. Returns {old, promoted, promotionMs, crossedMs, ms, seen503}:
 * times from the kill to the promotion, and from the promotion to the messages / to everything.
 */
export async function failover(set, { gateways, a, b, topic, want, n = 0 }) {
  const old = set.masterPort();
  const replica = set.other(old);
  await set.settled(replica);
  const switched = set.watchSwitch();
  await sleep(200); // the watchers are subscribed
  const seen503 = new Set();
  let polling = true;
  const poll = (async () => {
    while (polling) {
      for (const g of gateways) if (await ready(g) === 503) seen503.add(g.name);
      await sleep(100);
    }
  })();
  const killedAt = Date.now();
  set.servers[old].kill();
  const t0 = await switched;
  switched.stop();
  const promoted = set.masterPort();
  await waitFor(async () => await crosses(a, b, topic, 500) && await crosses(b, a, topic, 500), 20000, 'messages cross both ways');
  const crossedMs = Date.now() - t0;
  let v = n;
  await waitFor(async () => {
    for (const g of gateways) if (!await viewerSees(g, topic, ++v, want, 500)) return false;
    return true;
  }, 20000, 'new viewers see everyone');
  const ms = Date.now() - t0;
  polling = false;
  await poll;
  await waitFor(async () => (await Promise.all(gateways.map(ready))).every((s) => s === 200), 10000, 'ready again');
  await set.rejoin(old, promoted);
  return { old, replica, promoted, promotionMs: t0 - killedAt, crossedMs, ms, seen503: [...seen503].sort() };
}
