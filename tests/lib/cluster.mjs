// A real local Redis Cluster for the cluster-mode tests: 6 redis-server processes
// (--cluster-enabled yes, cluster-node-timeout 2 s) on free ports, joined with
// `redis-cli --cluster create … --cluster-replicas 1`: 3 masters, each with one replica.
// With `tls: certs` (from tls.mjs' makeCerts) every node speaks TLS only: `--port 0 --tls-port P`,
// TLS on the cluster bus and for replication, client certificates required; the seed URLs are
// rediss:// and redis-cli goes in with the CA and the client certificate.
import { spawn, execFileSync } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { freePort, requireTool, waitFor, withTimeout, uid } from './harness.mjs';
import { tlsServerArgs, tlsCliArgs, tlsFilesEnv } from './tls.mjs';

const procs = new Set();
process.on('exit', () => { for (const p of procs) { try { p.kill('SIGKILL'); } catch { /* gone */ } } });

export async function startCluster({ nodeTimeoutMs = 2000, tls, serverArgs = [] } = {}) {
  requireTool('redis-server');
  requireTool('redis-cli');
  const cliTls = tlsCliArgs(tls);
  const cliOn = (port, ...args) => execFileSync('redis-cli', ['-h', '127.0.0.1', '-p', String(port), ...cliTls, '--raw', ...args.map(String)], {
    encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 10000,
  }).replace(/\n$/, '');
  const nodes = [];
  const start = (n) => {
    const proc = spawn('redis-server', [
      ...(tls ? [...tlsServerArgs(n.port, tls), '--tls-cluster', 'yes'] : ['--port', String(n.port)]),
      '--bind', '127.0.0.1', '--protected-mode', 'no',
      '--cluster-enabled', 'yes', '--cluster-config-file', 'nodes.conf',
      '--cluster-node-timeout', String(nodeTimeoutMs),
      '--save', '', '--appendonly', 'no', '--dir', n.dir, ...serverArgs,
    ], { stdio: ['ignore', 'pipe', 'pipe'] });
    procs.add(proc);
    n.proc = proc;
    n.exited = false;
    n.log = '';
    proc.stdout.on('data', (d) => { n.log += d; });
    proc.stderr.on('data', (d) => { n.log += d; });
    proc.on('exit', () => { n.exited = true; procs.delete(proc); });
  };
  for (let i = 0; i < 6; i++) {
    const port = await freePort({ span: 10000 });
    const n = { port, dir: fs.mkdtempSync(path.join(os.tmpdir(), 'gw-e2e-cluster-')) };
    start(n);
    nodes.push(n);
  }
  for (const n of nodes) {
    await waitFor(() => { try { return cliOn(n.port, 'PING') === 'PONG'; } catch { return false; } }, 5000, `cluster node ${n.port} to answer PING`);
  }
  try {
    execFileSync('redis-cli', [...cliTls, '--cluster', 'create', ...nodes.map((n) => `127.0.0.1:${n.port}`),
      '--cluster-replicas', '1', '--cluster-yes'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 30000 });
  } catch (e) {
    throw new Error(`redis-cli --cluster create failed: ${e.stdout}\n${e.stderr}`);
  }
  const cluster = {
    nodes,
    ports: nodes.map((n) => n.port),
    /** The seed list the gateway gets (every node). */
    url: nodes.map((n) => `${tls ? 'rediss' : 'redis'}://127.0.0.1:${n.port}`).join(','),
    env: {},
    cli: (port, ...args) => cliOn(port, ...args),
    alive: () => nodes.filter((n) => !n.exited),
    /** [{port, slots: [[a,b]...], replicas: [port]}] from CLUSTER SLOTS on a live node. */
    masters() {
      const n = cluster.alive()[0];
      const out = execFileSync('redis-cli', ['-h', '127.0.0.1', '-p', String(n.port), ...cliTls, '--json', 'CLUSTER', 'SLOTS'], { encoding: 'utf8' });
      const ranges = JSON.parse(out);
      const byPort = new Map();
      for (const r of ranges) {
        const [a, b, m, ...reps] = r;
        const port = m[1];
        if (!byPort.has(port)) byPort.set(port, { port, slots: [], replicas: reps.map((x) => x[1]) });
        byPort.get(port).slots.push([a, b]);
      }
      return [...byPort.values()].sort((x, y) => x.port - y.port);
    },
    slotOf(key) { return Number(cliOn(cluster.alive()[0].port, 'CLUSTER', 'KEYSLOT', key)); },
    /** Port of the master serving `key`. */
    masterOf(key) {
      const s = cluster.slotOf(key);
      const m = cluster.masters().find((x) => x.slots.some(([a, b]) => a <= s && s <= b));
      return m && m.port;
    },
    /** A fresh room id whose keys (`<prefix>:room:{id}`) sit on the master of `port`. */
    roomOn(prefix, port, tag = 'c') {
      for (let i = 0; i < 500; i++) {
        const id = uid(tag);
        if (cluster.masterOf(`${prefix}:room:{${id}}`) === port) return id;
      }
      throw new Error(`no room id lands on master ${port}`);
    },
    /** The cli of the master owning `key`. */
    onOwner(key, ...args) { return cliOn(cluster.masterOf(key), ...args); },
    async waitOk(timeoutMs = 20000) {
      await waitFor(() => cluster.alive().every((n) => {
        try { return /cluster_state:ok/.test(cliOn(n.port, 'CLUSTER', 'INFO')); } catch { return false; }
      }), timeoutMs, 'cluster_state:ok on every node', 100);
    },
    node(port) { return nodes.find((n) => n.port === port); },
    /**
     * Moves one slot, with its keys, from its master to the master `toPort`, the way
     * `redis-cli --cluster reshard` does: SETSLOT IMPORTING on the target, MIGRATING on the
     * source, MIGRATE every key of the slot (GETKEYSINSLOT until none is left), then SETSLOT NODE
     * on the target, the source and every other master. Returns the source's port.
     */
    moveSlot(slot, toPort) {
      const fromPort = cluster.masters().find((m) => m.slots.some(([a, b]) => a <= slot && slot <= b)).port;
      if (fromPort === toPort) throw new Error(`slot ${slot} is already on ${toPort}`);
      const fromId = cliOn(fromPort, 'CLUSTER', 'MYID');
      const toId = cliOn(toPort, 'CLUSTER', 'MYID');
      cliOn(toPort, 'CLUSTER', 'SETSLOT', slot, 'IMPORTING', fromId);
      cliOn(fromPort, 'CLUSTER', 'SETSLOT', slot, 'MIGRATING', toId);
      for (;;) {
        const keys = cliOn(fromPort, 'CLUSTER', 'GETKEYSINSLOT', slot, 1000).split('\n').filter(Boolean);
        if (keys.length === 0) break;
        const out = cliOn(fromPort, 'MIGRATE', '127.0.0.1', toPort, '', 0, 5000, 'KEYS', ...keys);
        if (!/OK|NOKEY/.test(out)) throw new Error(`MIGRATE of slot ${slot}: ${out}`);
      }
      const others = cluster.masters().map((m) => m.port).filter((p) => p !== fromPort && p !== toPort);
      for (const p of [toPort, fromPort, ...others]) cliOn(p, 'CLUSTER', 'SETSLOT', slot, 'NODE', toId);
      return fromPort;
    },
    kill(port) { const n = cluster.node(port); if (!n.exited) n.proc.kill('SIGKILL'); return withTimeout(once(n.proc, 'exit'), 5000, 'node kill').catch(() => {}); },
    /** Restarts a killed node with its nodes.conf: it rejoins (as a replica once failed over). */
    async restart(port) {
      const n = cluster.node(port);
      start(n);
      await waitFor(() => { try { return cliOn(n.port, 'PING') === 'PONG'; } catch { return false; } }, 5000, `node ${port} back`)
        .catch((e) => { throw new Error(`${e.message}; its log:\n${n.log.slice(-2000)}`); });
    },
    async stop() {
      for (const n of nodes) {
        if (!n.exited) { n.proc.kill('SIGKILL'); await withTimeout(once(n.proc, 'exit'), 5000, 'stop').catch(() => {}); }
        fs.rmSync(n.dir, { recursive: true, force: true });
      }
    },
  };
  cluster.env = { GATEWAY_REDIS_MODE: 'cluster', GATEWAY_REDIS_URL: cluster.url };
  if (tls) Object.assign(cluster.env, tlsFilesEnv(tls));
  await cluster.waitOk();
  // every node must agree on the slot map before the gateways read it
  await waitFor(() => cluster.masters().length === 3 && cluster.masters().every((m) => m.replicas.length === 1), 20000, 'three masters with a replica each', 100);
  return cluster;
}
