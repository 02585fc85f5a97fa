// Redis servers with TLS or ACL users, and the certificates they need, made in the test with the
// openssl CLI: a CA, a server certificate for 127.0.0.1/localhost (SAN) and a client certificate,
// plus an unrelated CA (the "wrong CA").
import { spawn, execFileSync } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import assert from 'node:assert/strict';
import {
  freePort, parseClientList, requireTool, waitFor, withTimeout, sleep, gatewayEnv, GATEWAY_BIN,
} from './harness.mjs';

const children = new Set();
process.on('exit', () => {
  for (const c of children) {
    try { c.kill('SIGKILL'); } catch { /* gone */ }
  }
});

function openssl(dir, ...args) {
  execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
}

/** A fresh directory with ca.crt, server.{crt,key}, client.{crt,key} and other-ca.crt (PEM). */
export function makeCerts() {
  try {
    execFileSync('openssl', ['version'], { stdio: 'pipe' });
  } catch (e) {
    throw new Error(`openssl is not usable (${e.code ?? e.message}); the TLS tests make their certificates with it: apt-get install -y openssl`);
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'gw-e2e-tls-'));
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  for (const ca of ['ca', 'other-ca']) {
    openssl(dir, 'req', '-x509', ...ec, '-keyout', `${ca}.key`, '-out', `${ca}.crt`, '-days', '2', '-subj', `/CN=gateway test ${ca}`);
  }
  const leaf = (name, ext) => {
    fs.writeFileSync(path.join(dir, `${name}.ext`), ext);
    openssl(dir, 'req', ...ec, '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${name}`);
    openssl(dir, 'x509', '-req', '-in', `${name}.csr`, '-CA', 'ca.crt', '-CAkey', 'ca.key', '-CAcreateserial',
      '-out', `${name}.crt`, '-days', '2', '-extfile', `${name}.ext`);
  };
  leaf('server', 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n');
  leaf('client', 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n');
  const f = (n) => path.join(dir, n);
  return {
    dir,
    ca: f('ca.crt'),
    otherCa: f('other-ca.crt'),
    serverCert: f('server.crt'),
    serverKey: f('server.key'),
    clientCert: f('client.crt'),
    clientKey: f('client.key'),
    remove() { fs.rmSync(dir, { recursive: true, force: true }); },
  };
}

/**
 * redis-server's arguments for TLS only on `port` (`--port 0`): its server certificate, the client
 * certificate for the links it opens itself (replication, cluster bus), TLS replication, and
 * client certificates required unless `authClients` says otherwise.
 */
export function tlsServerArgs(port, certs, authClients = 'yes') {
  return ['--port', '0', '--tls-port', String(port), '--tls-cert-file', certs.serverCert, '--tls-key-file', certs.serverKey,
    '--tls-client-cert-file', certs.clientCert, '--tls-client-key-file', certs.clientKey,
    '--tls-ca-cert-file', certs.ca, '--tls-auth-clients', authClients, '--tls-replication', 'yes'];
}

/** The gateway's TLS settings for `certs`: the CA and the client certificate (mutual TLS). */
export const tlsFilesEnv = (certs) => ({
  GATEWAY_REDIS_TLS_CA_FILE: certs.ca, GATEWAY_REDIS_TLS_CERT_FILE: certs.clientCert, GATEWAY_REDIS_TLS_KEY_FILE: certs.clientKey,
});

/** redis-cli's arguments for TLS with the client certificate (none without `certs`). */
export const tlsCliArgs = (certs) => (certs ? ['--tls', '--cacert', certs.ca, '--cert', certs.clientCert, '--key', certs.clientKey] : []);

/**
 * A private redis-server on a free port with extra arguments.
 * `tls`: {certs, authClients: 'yes'|'no'|'optional'}: TLS only (`--port 0 --tls-port P`).
 * `user`/`password`: how redis-cli authenticates (ACL).
 * Returns {port, url, cli, lines, stop, kill, proc}; `url` is rediss:// for TLS.
 */
export async function startRedisWith({ tls, user, password, args = [], port: wanted } = {}) {
  requireTool('redis-server');
  requireTool('redis-cli');
  const port = wanted ?? await freePort();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'gw-e2e-redis-'));
  const portArgs = tls ? tlsServerArgs(port, tls.certs, tls.authClients) : ['--port', String(port)];
  const proc = spawn('redis-server', [
    ...portArgs, '--save', '', '--appendonly', 'no', '--bind', '127.0.0.1', '--dir', dir, '--protected-mode', 'no', ...args,
  ], { stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(proc);
  let out = '';
  proc.stdout.on('data', (d) => { out += d; });
  proc.stderr.on('data', (d) => { out += d; });
  let exited = false;
  proc.on('exit', () => { exited = true; children.delete(proc); });
  const cliArgs = ['-h', '127.0.0.1', '-p', String(port), '--raw', '--no-auth-warning'];
  cliArgs.push(...tlsCliArgs(tls?.certs));
  if (user) cliArgs.push('--user', user);
  if (password) cliArgs.push('--pass', password);
  const cli = (...a) => execFileSync('redis-cli', [...cliArgs, ...a.map(String)], {
    encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 10000,
  }).replace(/\n$/, '');
  try {
    await waitFor(() => { try { return !exited && cli('PING') === 'PONG'; } catch { return false; } }, 5000, 'redis-server to answer PING');
  } catch (e) {
    try { proc.kill('SIGKILL'); } catch { /* */ }
    throw new Error(`redis-server on port ${port} did not start: ${e.message}\n${out}`);
  }
  const lines = (...a) => {
    const s = cli(...a);
    return s === '' ? [] : s.split('\n');
  };
  return {
    port,
    url: `${tls ? 'rediss' : 'redis'}://127.0.0.1:${port}`,
    dir,
    proc,
    cli,
    lines,
    output: () => out,
    clients() {
      return parseClientList(lines('CLIENT', 'LIST'));
    },
    async stop() {
      if (exited) return;
      proc.kill('SIGTERM');
      await withTimeout(once(proc, 'exit'), 5000, 'redis stop').catch(() => proc.kill('SIGKILL'));
      fs.rmSync(dir, { recursive: true, force: true });
    },
    kill() { if (!exited) proc.kill('SIGKILL'); },
    get exited() { return exited; },
  };
}

/**
 * `gateway serve` that is expected NOT to reach Redis: collects stderr and stdout, and tells
 * whether it is still running. {proc, stderr(), stdout(), alive(), kill()}
 */
export function spawnGateway(bin, env) {
  const proc = spawn(bin, ['serve'], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(proc);
  let stderr = '';
  let stdout = '';
  let exited = null;
  proc.stderr.on('data', (d) => { stderr += d; });
  proc.stdout.on('data', (d) => { stdout += d; });
  proc.on('exit', (code, signal) => { exited = { code, signal }; children.delete(proc); });
  return {
    proc,
    stderr: () => stderr,
    stdout: () => stdout,
    alive: () => exited === null,
    exitInfo: () => exited,
    async kill() {
      if (exited) return;
      proc.kill('SIGKILL');
      await once(proc, 'exit').catch(() => {});
    },
  };
}

/** The environment `gateway serve` gets for a process a test spawns itself (`env` names the Redis). */
export const processEnv = (prefix, env) => gatewayEnv({ prefix, env });

/**
 * A gateway that cannot get in: it keeps running, logs a WARN naming the cause (matching
 * `cause`), retries, and never prints `secret`. Its admin port answers meanwhile (it does before
 * Redis is reached), with readiness 503.
 */
export async function refused(t, prefix, env, cause, secret) {
  const g = spawnGateway(GATEWAY_BIN, processEnv(prefix, env));
  try {
    const warn = (l) => / WARN /.test(l) && cause.test(l);
    await waitFor(() => g.stderr().split('\n').filter(warn).length >= 2 || !g.alive(), 10000, `two WARN lines matching ${cause}`);
    assert.ok(g.alive(), `the gateway exited: ${JSON.stringify(g.exitInfo())}\n${g.stderr()}`);
    await sleep(500);
    assert.ok(g.alive(), 'still running, still retrying');
    const line = g.stderr().split('\n').find(warn);
    t.diagnostic(line);
    assert.ok(g.stderr().split('\n').some((l) => warn(l) && / gateway::/.test(l)), `the gateway's own WARN names the cause:\n${g.stderr()}`);
    if (secret) {
      assert.ok(!g.stderr().includes(secret), 'the password never appears in a log line');
      assert.ok(!g.stdout().includes(secret), 'the password never appears on stdout');
    }
    const started = g.stdout().split('\n').map((l) => { try { return JSON.parse(l); } catch { return null; } })
      .find((m) => m && m.event === 'starting' && m.admin);
    assert.ok(started, `no "starting" line with the admin address:\n${g.stdout()}`);
    assert.equal((await fetch(`http://${started.admin}/health/ready`)).status, 503);
    assert.equal((await fetch(`http://${started.admin}/health/live`)).status, 200);
  } finally {
    await g.kill();
  }
}
