// Redis servers with TLS or ACL users, and the certificates they need, made in the test with the
// openssl CLI: a CA, a server certificate for 127.0.0.1/localhost (SAN) and a client certificate,
// plus an unrelated CA (the "wrong CA").
import { spawn, execFileSync } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { freePort, requireTool, waitFor, withTimeout } from './harness.mjs';

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
  const portArgs = tls
    ? ['--port', '0', '--tls-port', String(port), '--tls-cert-file', tls.certs.serverCert, '--tls-key-file', tls.certs.serverKey,
      '--tls-ca-cert-file', tls.certs.ca, '--tls-auth-clients', tls.authClients ?? 'yes']
    : ['--port', String(port)];
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
  if (tls) cliArgs.push('--tls', '--cacert', tls.certs.ca, '--cert', tls.certs.clientCert, '--key', tls.certs.clientKey);
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
      return lines('CLIENT', 'LIST').map((line) => {
        const o = {};
        for (const kv of line.trim().split(' ')) {
          const i = kv.indexOf('=');
          if (i > 0) o[kv.slice(0, i)] = kv.slice(i + 1);
        }
        return o;
      });
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
