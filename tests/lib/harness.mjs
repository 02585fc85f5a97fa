// End-to-end harness: a private redis-server, real gateway processes, the real
// phoenix.js client and raw `ws` sockets. No mocks.
//
// Environment:
//   GATEWAY_BIN   path of the gateway binary (default: <repo>/target/release/gateway)

import { spawn, execFileSync } from 'node:child_process';
import { once } from 'node:events';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { test as nodeTest } from 'node:test';
import { WebSocket } from 'ws';
import { Socket } from 'phoenix';

export { WebSocket };

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const TESTS_DIR = path.resolve(HERE, '..');
export const REPO_ROOT = path.resolve(TESTS_DIR, '..');
export const GATEWAY_BIN = process.env.GATEWAY_BIN
  ? path.resolve(process.env.GATEWAY_BIN)
  : path.resolve(REPO_ROOT, 'target/release/gateway');
export const DEFAULT_SECRET = 'e2e-test-hs256-secret-0123456789abcdef';

// ---------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Poll `predicate` (sync or async) until truthy; returns its value. Bounded. */
export async function waitFor(predicate, timeoutMs = 5000, what = 'condition', intervalMs = 25) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await predicate();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() >= deadline) {
      const detail = last instanceof Error ? ` (last error: ${last.message})` : ` (last value: ${JSON.stringify(last)})`;
      throw new Error(`waitFor timed out after ${timeoutMs} ms waiting for ${what}${detail}`);
    }
    await sleep(intervalMs);
  }
}

/** Race a promise against a timeout. */
export function withTimeout(promise, ms, what = 'operation') {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, rej) => {
      timer = setTimeout(() => rej(new Error(`${what} timed out after ${ms} ms`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

let uidCounter = 0;
/** Short unique id usable as a room id ([A-Za-z0-9_-]). */
export function uid(prefix = 'r') {
  uidCounter += 1;
  return `${prefix}_${process.pid.toString(36)}${uidCounter}${crypto.randomBytes(3).toString('hex')}`;
}

/** The first port of the kernel's ephemeral range (outgoing connections take their local port from it). */
function ephemeralLow() {
  try {
    return Number(fs.readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0]) || 32768;
  } catch {
    return 32768;
  }
}

async function isFree(port) {
  const srv = net.createServer();
  try {
    srv.listen(port, '127.0.0.1');
    await once(srv, 'listening');
    return true;
  } catch {
    return false;
  } finally {
    srv.close();
  }
}

const handedOut = new Set();
/**
 * A free port below the kernel's ephemeral range, with `port + span` free too when `span` is given
 * (a cluster node's bus port is its port + 10000). Servers the tests kill and restart on the same
 * port need this: a port from the ephemeral range can be taken, while its server is down, as the
 * local end of any outgoing connection (a gateway reconnecting, a redis-cli call), and the restart
 * then fails with EADDRINUSE.
 */
export async function freePort({ span = 0 } = {}) {
  const hi = ephemeralLow() - 1 - span;
  for (let i = 0; hi > 10000 && i < 500; i++) {
    const port = 10000 + Math.floor(Math.random() * (hi - 10000));
    if (port === 6379 || handedOut.has(port) || (span && handedOut.has(port + span))) continue;
    if (await isFree(port) && (!span || await isFree(port + span))) {
      handedOut.add(port);
      if (span) handedOut.add(port + span);
      return port;
    }
  }
  throw new Error(`no free port below the ephemeral range (${ephemeralLow()}) with port + ${span} free`);
}

function tail(s, n = 6000) {
  // eslint-disable-next-line no-control-regex
  const t = s.replace(/\x1b\[[0-9;]*m/g, '');
  return t.length > n ? `...${t.slice(-n)}` : t;
}

// ---------------------------------------------------------------------------
// Process registry: everything we spawn gets killed when the test file exits,
// and gateway stderr is attached to failing tests (see `test` below).
// ---------------------------------------------------------------------------

const children = new Set();
const gateways = new Set();
process.on('exit', () => {
  for (const c of children) {
    try { c.kill('SIGKILL'); } catch { /* gone */ }
  }
});

/** The logs of all gateways started by this test file (for failure output). */
export function gatewayLogs() {
  const parts = [];
  // E2E_LOG_DIR=/some/dir keeps every gateway's whole stderr there (for debugging; not a
  // GATEWAY_* name: the gateway refuses unknown GATEWAY_LOG_* settings, and some CLI calls pass the
  // whole environment)
  if (process.env.E2E_LOG_DIR) {
    for (const g of gateways) fs.writeFileSync(path.join(process.env.E2E_LOG_DIR, `${g.name}.log`), g.stderr());
  }
  for (const g of gateways) {
    parts.push(`--- gateway ${g.name} (node ${g.node ?? '?'}, pid ${g.proc.pid}${g.exitInfo ? `, exited ${JSON.stringify(g.exitInfo)}` : ''}) stderr ---\n${tail(g.stderr())}`);
  }
  return parts.join('\n');
}

/**
 * Like node:test `test`, but when the test fails, the error is re-thrown with the
 * stderr of every gateway of this file appended, to help debugging.
 */
export function test(name, optsOrFn, maybeFn) {
  const fn = typeof optsOrFn === 'function' ? optsOrFn : maybeFn;
  const opts = typeof optsOrFn === 'function' ? {} : optsOrFn;
  return nodeTest(name, { timeout: 60000, ...opts }, async (t) => {
    try {
      await fn(t);
    } catch (e) {
      const logs = gatewayLogs();
      if (!logs) throw e;
      const err = new Error(`${e && e.stack ? e.stack : String(e)}\n\n${logs}`);
      err.cause = e;
      throw err;
    }
  });
}

// ---------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------

/**
 * Fail (never skip) when a tool the tests need is not installed. `why` and `install` complete
 * the message; the defaults are Redis's.
 */
export function requireTool(name, { why = 'a real Redis', install = 'apt-get install -y redis-server' } = {}) {
  try {
    execFileSync(name, ['--version'], { stdio: 'pipe' });
  } catch (e) {
    if (e.code === 'ENOENT') {
      throw new Error(`${name} is not installed; these tests need ${why}: ${install} (scripts/test.sh installs it)`);
    }
    throw e;
  }
}

/**
 * Start a private redis-server on a free port. Never touches 6379.
 * Returns {port, url, cli(...args) -> string, lines(...args) -> string[], scanAll(), stop(), kill()}
 */
/** `CLIENT LIST` lines parsed into objects ({name, sub, psub, user, ...}). */
export function parseClientList(lines) {
  return lines.map((line) => {
    const o = {};
    for (const kv of line.trim().split(' ')) {
      const i = kv.indexOf('=');
      if (i > 0) o[kv.slice(0, i)] = kv.slice(i + 1);
    }
    return o;
  });
}

export async function startRedis() {
  requireTool('redis-server');
  requireTool('redis-cli');
  let lastErr;
  for (let attempt = 0; attempt < 5; attempt++) {
    const port = await freePort();
    if (port === 6379) continue;
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'gw-e2e-redis-'));
    const proc = spawn('redis-server', [
      '--port', String(port), '--save', '', '--appendonly', 'no', '--bind', '127.0.0.1',
      '--dir', dir, '--protected-mode', 'no',
    ], { stdio: ['ignore', 'pipe', 'pipe'] });
    children.add(proc);
    let out = '';
    proc.stdout.on('data', (d) => { out += d; });
    proc.stderr.on('data', (d) => { out += d; });
    let exited = false;
    proc.on('exit', () => { exited = true; children.delete(proc); });
    const cli = (...args) => execFileSync('redis-cli', ['-h', '127.0.0.1', '-p', String(port), '--raw', ...args.map(String)], {
      encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 10000,
    }).replace(/\n$/, '');
    try {
      await waitFor(() => !exited && cli('PING') === 'PONG', 5000, 'redis-server to answer PING');
    } catch (e) {
      lastErr = new Error(`redis-server on port ${port} did not start: ${e.message}\n${out}`);
      try { proc.kill('SIGKILL'); } catch { /* */ }
      continue;
    }
    const lines = (...args) => {
      const s = cli(...args);
      return s === '' ? [] : s.split('\n');
    };
    const stop = async () => {
      if (exited) return;
      proc.kill('SIGTERM');
      await withTimeout(once(proc, 'exit'), 5000, 'redis stop').catch(() => proc.kill('SIGKILL'));
      fs.rmSync(dir, { recursive: true, force: true });
    };
    return {
      port,
      url: `redis://127.0.0.1:${port}`,
      /** The server's --dir (where SAVE writes dump.rdb). */
      dir,
      proc,
      cli,
      lines,
      /** Full SCAN iteration; sorted key list. */
      scanAll(match = '*') {
        const keys = new Set();
        let cursor = '0';
        do {
          const l = lines('SCAN', cursor, 'MATCH', match, 'COUNT', '1000');
          cursor = l[0];
          for (const k of l.slice(1)) if (k !== '') keys.add(k);
        } while (cursor !== '0');
        return [...keys].sort();
      },
      /** PUBSUB NUMSUB for several channels → {channel: count} */
      numsub(...channels) {
        const l = lines('PUBSUB', 'NUMSUB', ...channels);
        const res = {};
        for (let i = 0; i < l.length; i += 2) res[l[i]] = Number(l[i + 1]);
        return res;
      },
      /** CLIENT LIST parsed into objects ({name, sub, psub, ...}) */
      clients() {
        return parseClientList(lines('CLIENT', 'LIST'));
      },
      stop,
      kill() { if (!exited) proc.kill('SIGKILL'); },
    };
  }
  throw lastErr;
}

// ---------------------------------------------------------------------------
// Gateway
// ---------------------------------------------------------------------------

function requireBinary() {
  if (!fs.existsSync(GATEWAY_BIN)) {
    throw new Error(`gateway binary not found at ${GATEWAY_BIN}: run cargo build --release first (or set GATEWAY_BIN)`);
  }
}

/** The environment `gateway serve` gets: this process's minus its GATEWAY_*, then the test's. */
export function gatewayEnv({ redisPort, prefix, env = {} }) {
  const base = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (!k.startsWith('GATEWAY_')) base[k] = v;
  }
  const merged = {
    ...base,
    NO_COLOR: '1',
    GATEWAY_SERVER_LISTEN: '127.0.0.1:0',
    GATEWAY_ADMIN_LISTEN: '127.0.0.1:0',
    ...(redisPort ? { GATEWAY_REDIS_URL: `redis://127.0.0.1:${redisPort}` } : {}),
    GATEWAY_REDIS_PREFIX: prefix,
    GATEWAY_AUTH_HS256_SECRET: DEFAULT_SECRET,
    ...env,
  };
  // `undefined` in overrides removes a variable.
  for (const [k, v] of Object.entries(merged)) if (v === undefined) delete merged[k];
  return merged;
}

let gwCounter = 0;

/**
 * Spawn `gateway serve` and wait for its `{"event":"listening",...}` line on stdout.
 * Resolves {publicUrl, adminUrl, node, proc, stderr(), stop(), kill()}.
 */
export async function startGateway({ redisPort, prefix = 'gw', env = {}, name, readyTimeoutMs = 15000 } = {}) {
  requireBinary();
  if (!redisPort) throw new Error('startGateway: redisPort is required');
  gwCounter += 1;
  const gwName = name || `gw${gwCounter}`;
  const proc = spawn(GATEWAY_BIN, ['serve'], {
    env: gatewayEnv({ redisPort, prefix, env }),
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  children.add(proc);
  let stdout = '';
  let stderr = '';
  const g = {
    name: gwName,
    prefix,
    proc,
    node: undefined,
    exitInfo: null,
    stderr: () => stderr,
    stdout: () => stdout,
  };
  gateways.add(g);
  proc.stderr.on('data', (d) => { stderr += d; if (stderr.length > 2e6) stderr = stderr.slice(-1e6); });
  const exited = new Promise((resolve) => {
    proc.on('exit', (code, signal) => {
      g.exitInfo = { code, signal };
      children.delete(proc);
      resolve(g.exitInfo);
    });
  });
  proc.on('error', (e) => { stderr += `\n[spawn error] ${e.message}\n`; });

  const ready = new Promise((resolve, reject) => {
    let buf = '';
    proc.stdout.on('data', (d) => {
      stdout += d;
      buf += d;
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i).trim();
        buf = buf.slice(i + 1);
        if (!line) continue;
        let msg;
        try { msg = JSON.parse(line); } catch { continue; }
        if (msg && msg.event === 'listening') resolve(msg);
      }
    });
    exited.then((info) => reject(new Error(`gateway ${gwName} exited before listening: ${JSON.stringify(info)}\nstdout:\n${tail(stdout)}\nstderr:\n${tail(stderr)}`)));
  });
  let msg;
  try {
    msg = await withTimeout(ready, readyTimeoutMs, `gateway ${gwName} "listening" line`);
  } catch (e) {
    try { proc.kill('SIGKILL'); } catch { /* */ }
    throw new Error(`${e.message}\nstdout:\n${tail(stdout)}\nstderr:\n${tail(stderr)}`);
  }
  if (typeof msg.public !== 'string' || typeof msg.admin !== 'string' || typeof msg.node !== 'string') {
    throw new Error(`gateway ${gwName}: malformed listening line ${JSON.stringify(msg)}`);
  }
  g.node = msg.node;
  Object.assign(g, {
    listening: msg,
    publicAddr: msg.public,
    publicUrl: `ws://${msg.public}/socket`,
    adminUrl: `http://${msg.admin}`,
    exited,
    async stop(timeoutMs = 8000) {
      if (g.exitInfo) return g.exitInfo;
      proc.kill('SIGTERM');
      try {
        return await withTimeout(exited, timeoutMs, `gateway ${gwName} SIGTERM exit`);
      } catch {
        proc.kill('SIGKILL');
        return exited;
      }
    },
    async kill() {
      if (g.exitInfo) return g.exitInfo;
      proc.kill('SIGKILL');
      return exited;
    },
  });
  return g;
}

/** Gateways named `names`, started side by side on the same settings (see startGateway). */
export function startGateways(names, { redisPort, prefix, env }) {
  return Promise.all(names.map((name) => startGateway({ redisPort, prefix, env, name })));
}

/**
 * `gateway rooms create <id>` with the same Redis env. Throws (with output) on failure:
 * the CLI is part of the contract, there is no fallback.
 */
/** Runs `gateway <args>` against `redis` with `prefix`; never throws: {code, out} (stdout + stderr). */
export function runCli(redis, prefix, args, env = {}) {
  try {
    return { code: 0, out: execFileSync(GATEWAY_BIN, args, { env: gatewayEnv({ redisPort: redis.port, prefix, env }), encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 15000 }) };
  } catch (e) {
    return { code: e.status, out: `${e.stdout}${e.stderr}` };
  }
}

export function createRoom(redis, prefix, id, env = {}) {
  requireBinary();
  try {
    return execFileSync(GATEWAY_BIN, ['rooms', 'create', id], {
      env: gatewayEnv({ redisPort: redis.port, prefix, env }),
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'pipe'],
      timeout: 15000,
    });
  } catch (e) {
    throw new Error(`\`gateway rooms create ${id}\` failed (status ${e.status}, signal ${e.signal}):\nstdout:\n${e.stdout}\nstderr:\n${e.stderr}`);
  }
}

// ---------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------

const b64url = (buf) => Buffer.from(buf).toString('base64').replace(/=+$/, '').replace(/\+/g, '-').replace(/\//g, '_');
const b64json = (o) => b64url(JSON.stringify(o));

export function claims(sub, username = `user-${sub}`, extra = {}) {
  return { sub, username, exp: Math.floor(Date.now() / 1000) + 3600, ...extra };
}

/** HS256 JWT. `claimsOrSub` is a claims object or a sub string. */
export function hs256(claimsOrSub, secret = DEFAULT_SECRET) {
  const c = typeof claimsOrSub === 'string' ? claims(claimsOrSub) : claimsOrSub;
  const input = `${b64json({ alg: 'HS256', typ: 'JWT' })}.${b64json(c)}`;
  const sig = crypto.createHmac('sha256', secret).update(input).digest();
  return `${input}.${b64url(sig)}`;
}

export function rs256(claimsOrSub, privateKey) {
  const c = typeof claimsOrSub === 'string' ? claims(claimsOrSub) : claimsOrSub;
  const input = `${b64json({ alg: 'RS256', typ: 'JWT' })}.${b64json(c)}`;
  const sig = crypto.sign('sha256', Buffer.from(input), privateKey);
  return `${input}.${b64url(sig)}`;
}

export function es256(claimsOrSub, privateKey) {
  const c = typeof claimsOrSub === 'string' ? claims(claimsOrSub) : claimsOrSub;
  const input = `${b64json({ alg: 'ES256', typ: 'JWT' })}.${b64json(c)}`;
  const sig = crypto.sign('sha256', Buffer.from(input), { key: privateKey, dsaEncoding: 'ieee-p1363' });
  return `${input}.${b64url(sig)}`;
}

/** Unsigned token, header {"alg":"none"}, empty signature. */
export function algNone(claimsOrSub) {
  const c = typeof claimsOrSub === 'string' ? claims(claimsOrSub) : claimsOrSub;
  return `${b64json({ alg: 'none', typ: 'JWT' })}.${b64json(c)}.`;
}

export function rsaKeyPair() {
  return crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
}

export function ecKeyPair() {
  return crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' });
}

export function publicPem(keyPair) {
  return keyPair.publicKey.export({ type: 'spki', format: 'pem' });
}

/** Write `contents` to a file in a fresh temp dir; returns its path. */
export function tempFile(name, contents) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'gw-e2e-'));
  const p = path.join(dir, name);
  fs.writeFileSync(p, contents);
  return p;
}

// ---------------------------------------------------------------------------
// phoenix.js client helpers
// ---------------------------------------------------------------------------

const phxSockets = new Set();

/**
 * Open a phoenix.js Socket. Options: token (query param), params, authToken
 * (Sec-WebSocket-Protocol), heartbeatIntervalMs, timeoutMs.
 * The socket records every inbound message in `socket.received` and transport
 * events in `socket.events` ({type:'open'|'error'|'close', ...}).
 */
export async function connect(url, { token, params = {}, authToken, heartbeatIntervalMs = 30000, timeoutMs = 5000, ...rest } = {}) {
  const p = { ...params };
  if (token !== undefined) p.token = token;
  const socket = new Socket(url, {
    transport: WebSocket,
    params: p,
    authToken,
    heartbeatIntervalMs,
    timeout: 5000,
    reconnectAfterMs: () => 60000,
    rejoinAfterMs: () => 60000,
    ...rest,
  });
  socket.received = [];
  socket.events = [];
  socket.onMessage((m) => socket.received.push(m));
  socket.onOpen(() => socket.events.push({ type: 'open', at: Date.now() }));
  socket.onError((e) => socket.events.push({ type: 'error', at: Date.now(), error: String(e && (e.message || e.type) || e) }));
  socket.onClose((e) => socket.events.push({ type: 'close', at: Date.now(), code: e && e.code, reason: e && e.reason }));
  phxSockets.add(socket);
  const opened = new Promise((resolve) => socket.onOpen(resolve));
  socket.connect();
  try {
    await withTimeout(opened, timeoutMs, `phoenix socket open to ${url}`);
  } catch (e) {
    socket.disconnect();
    phxSockets.delete(socket);
    throw new Error(`${e.message}; transport events: ${JSON.stringify(socket.events)}`);
  }
  return socket;
}

/** Disconnect every phoenix socket opened with connect(). */
export async function disconnectAll() {
  const all = [...phxSockets];
  phxSockets.clear();
  await Promise.all(all.map((s) => new Promise((resolve) => {
    const t = setTimeout(resolve, 1000);
    try { s.disconnect(() => { clearTimeout(t); resolve(); }); } catch { clearTimeout(t); resolve(); }
  })));
}

/**
 * channel.join() as a promise: {status:'ok'|'error'|'timeout', response}.
 * After an error or timeout the channel is left, so the client's endless rejoin stops.
 */
export function join(channel, timeoutMs = 5000) {
  return new Promise((resolve) => {
    channel.join(timeoutMs)
      .receive('ok', (response) => resolve({ status: 'ok', response }))
      .receive('error', (response) => { channel.leave(); resolve({ status: 'error', response }); })
      .receive('timeout', () => { channel.leave(); resolve({ status: 'timeout', response: undefined }); });
  });
}

/** channel.push() as a promise: {status:'ok'|'error'|'timeout', response}. */
export function push(channel, event, payload = {}, timeoutMs = 3000) {
  return new Promise((resolve) => {
    channel.push(event, payload, timeoutMs)
      .receive('ok', (response) => resolve({ status: 'ok', response }))
      .receive('error', (response) => resolve({ status: 'error', response }))
      .receive('timeout', () => resolve({ status: 'timeout', response: undefined }));
  });
}

/** Record every message delivered to `channel` (after join_ref filtering). */
export function record(channel) {
  const got = [];
  const orig = channel.onMessage.bind(channel);
  channel.onMessage = (event, payload, ref, joinRef) => {
    got.push({ event, payload, ref, joinRef, at: Date.now() });
    return orig(event, payload, ref, joinRef);
  };
  return got;
}

// ---------------------------------------------------------------------------
// Raw WebSocket helper
// ---------------------------------------------------------------------------

const rawSockets = new Set();

export function wsUrl(gw, { vsn = '2.0.0', token, extra = '' } = {}) {
  const q = [];
  if (vsn !== null) q.push(`vsn=${encodeURIComponent(vsn)}`);
  if (token !== undefined) q.push(`token=${encodeURIComponent(token)}`);
  if (extra) q.push(extra);
  return `${gw.publicUrl}/websocket${q.length ? `?${q.join('&')}` : ''}`;
}

/**
 * Try a WebSocket upgrade; resolves {status: 101, ws, protocol} on open, or
 * {status: <HTTP status>, headers} when the server refused it.
 */
export function tryUpgrade(url, { protocols, headers, timeoutMs = 5000 } = {}) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, protocols, { headers, handshakeTimeout: timeoutMs });
    const timer = setTimeout(() => { ws.terminate(); reject(new Error(`upgrade to ${url} timed out`)); }, timeoutMs + 500);
    ws.on('unexpected-response', (req, res) => {
      clearTimeout(timer);
      let body = '';
      // the body (a refusal's reason) is read to its end before the request is dropped
      const done = () => { resolve({ status: res.statusCode, headers: res.headers, body }); req.destroy(); };
      res.on('data', (d) => { body += d; });
      res.on('end', done);
      res.on('error', done);
    });
    ws.on('open', () => {
      clearTimeout(timer);
      const protocol = ws.protocol;
      ws.close();
      resolve({ status: 101, protocol });
    });
    ws.on('error', (e) => {
      clearTimeout(timer);
      if (e.message.includes('Unexpected server response')) return; // handled above
      reject(e);
    });
  });
}

/**
 * A bare HTTP/1.1 WebSocket upgrade request with exactly the given headers (for header
 * forms `ws` cannot produce, e.g. "phoenix, base64url.bearer.phx.<padded>").
 * Resolves {status, headers}; the connection is dropped right after the response.
 */
export function httpUpgrade(url, { headers = {}, timeoutMs = 5000 } = {}) {
  return new Promise((resolve, reject) => {
    const req = http.request(url.replace(/^ws:/, 'http:'), {
      headers: {
        Connection: 'Upgrade',
        Upgrade: 'websocket',
        'Sec-WebSocket-Version': '13',
        'Sec-WebSocket-Key': crypto.randomBytes(16).toString('base64'),
        ...headers,
      },
      timeout: timeoutMs,
    });
    req.on('upgrade', (res, socket) => { resolve({ status: res.statusCode, headers: res.headers }); socket.destroy(); });
    req.on('response', (res) => { resolve({ status: res.statusCode, headers: res.headers }); res.resume(); req.destroy(); });
    req.on('timeout', () => { req.destroy(); reject(new Error(`HTTP upgrade to ${url} timed out`)); });
    req.on('error', reject);
    req.end();
  });
}

/**
 * Open a raw WebSocket. Returns an object with:
 *   frames        every parsed inbound frame (array of 5-element arrays), in order
 *   raw           every inbound text message as received
 *   send(frame)   JSON-encode and send (strings are sent verbatim)
 *   next(pred, timeoutMs)  resolves the first not-yet-consumed frame matching pred
 *   closed        promise of {code, reason} when the socket closes
 *   closeInfo     set once closed
 */
export async function rawConnect(url, { protocols, headers, timeoutMs = 5000, wsOptions = {} } = {}) {
  const ws = new WebSocket(url, protocols, { headers, handshakeTimeout: timeoutMs, ...wsOptions });
  rawSockets.add(ws);
  const c = {
    ws,
    url,
    frames: [],
    raw: [],
    consumed: new Set(),
    closeInfo: null,
    openedAt: 0,
    waiters: new Set(),
  };
  c.closed = new Promise((resolve) => {
    ws.on('close', (code, reason) => {
      c.closeInfo = { code, reason: reason.toString(), at: Date.now() };
      rawSockets.delete(ws);
      for (const w of c.waiters) w();
      resolve(c.closeInfo);
    });
  });
  ws.on('message', (data, isBinary) => {
    const text = isBinary ? data : data.toString();
    c.raw.push(text);
    let frame;
    try { frame = JSON.parse(text); } catch { frame = { unparsable: String(text) }; }
    c.frames.push(frame);
    for (const w of c.waiters) w();
  });
  await new Promise((resolve, reject) => {
    ws.on('open', resolve);
    ws.on('unexpected-response', (req, res) => {
      reject(Object.assign(new Error(`upgrade refused with HTTP ${res.statusCode}`), { statusCode: res.statusCode }));
      req.destroy();
    });
    ws.on('error', reject);
  });
  ws.on('error', () => { /* reported through close */ });
  c.openedAt = Date.now();
  c.send = (frame) => ws.send(typeof frame === 'string' || Buffer.isBuffer(frame) ? frame : JSON.stringify(frame));
  c.next = (pred, timeoutMs2 = 3000, what) => new Promise((resolve, reject) => {
    const check = () => {
      for (let i = 0; i < c.frames.length; i++) {
        if (c.consumed.has(i)) continue;
        let ok = false;
        try { ok = pred(c.frames[i]); } catch { ok = false; }
        if (ok) { c.consumed.add(i); return c.frames[i]; }
      }
      return undefined;
    };
    const found = check();
    if (found) return resolve(found);
    let timer;
    const waiter = () => {
      const f = check();
      if (f) { clearTimeout(timer); c.waiters.delete(waiter); resolve(f); return; }
      if (c.closeInfo) {
        clearTimeout(timer); c.waiters.delete(waiter);
        reject(new Error(`socket closed (${JSON.stringify(c.closeInfo)}) while waiting for ${what || pred.toString()}; frames: ${JSON.stringify(c.frames)}`));
      }
    };
    c.waiters.add(waiter);
    if (c.closeInfo) return waiter();
    timer = setTimeout(() => {
      c.waiters.delete(waiter);
      reject(new Error(`no frame matching ${what || pred.toString()} within ${timeoutMs2} ms; frames so far: ${JSON.stringify(c.frames)}`));
    }, timeoutMs2);
  });
  /** Reply frame for `ref` (any topic). */
  c.reply = (ref, timeoutMs2 = 3000) => c.next((f) => Array.isArray(f) && f[3] === 'phx_reply' && f[1] === ref, timeoutMs2, `phx_reply ref=${ref}`);
  /** Send a join and return its reply frame. */
  c.join = async (topic, ref, payload = {}) => {
    c.send([ref, ref, topic, 'phx_join', payload]);
    return c.reply(ref);
  };
  c.close = () => { try { ws.close(); } catch { /* */ } };
  c.terminate = () => { try { ws.terminate(); } catch { /* */ } };
  return c;
}

/** A raw socket of a signed-in user (`sub`, `username`) joined to `topic` on gateway `g`. */
export async function member(g, topic, sub, username) {
  const c = await rawConnect(wsUrl(g, { token: hs256(claims(sub, username)) }));
  const rep = await c.join(topic, '1');
  if (rep[4].status !== 'ok') throw new Error(`join of ${username}: ${JSON.stringify(rep)}`);
  return c;
}

/** A raw anonymous socket joined to `topic` on gateway `g`. */
export async function anonymous(g, topic) {
  const c = await rawConnect(wsUrl(g));
  const rep = await c.join(topic, '1');
  if (rep[4].status !== 'ok') throw new Error(`anonymous join: ${JSON.stringify(rep)}`);
  return c;
}

let crossSeq = 0;
/** One try: a `new_msg` sent by raw socket `from` on `topic` reaches raw socket `to` within `ms`. */
export async function crosses(from, to, topic, ms) {
  const body = `m${++crossSeq}`;
  from.send(['1', String(1000 + crossSeq), topic, 'new_msg', { body }]);
  try {
    await to.next((f) => f[3] === 'new_msg' && f[4].body === body, ms);
    return true;
  } catch { return false; }
}

export function closeAllRaw() {
  for (const ws of rawSockets) {
    try { ws.terminate(); } catch { /* */ }
  }
  rawSockets.clear();
}

/** Shorthand for cleanup in after(): disconnect phoenix sockets, raw sockets, stop gateways, stop redis. */
export async function teardown({ gateways: gws = [], redis } = {}) {
  await disconnectAll().catch(() => {});
  closeAllRaw();
  await Promise.all(gws.filter(Boolean).map((g) => g.stop().catch(() => g.kill())));
  if (redis) await redis.stop().catch(() => redis.kill());
}

/** The frames of `conn` (raw) matching a predicate, without consuming them. */
export function framesWhere(conn, pred) {
  return conn.frames.filter((f) => { try { return pred(f); } catch { return false; } });
}

/** True for a room broadcast frame [null,null,topic,event,...]. */
export const isBroadcast = (topic, event) => (f) => Array.isArray(f) && f[0] === null && f[1] === null && f[2] === topic && f[3] === event;
