// Helpers for the presence end-to-end tests (presence-*.test.mjs).
// Builds on lib/harness.mjs; nothing here mocks anything.

import { Presence } from 'phoenix';
import {
  WebSocket, connect, join, hs256, claims, wsUrl, waitFor, sleep,
} from './harness.mjs';

export { Presence };

// The seed's chooser, verbatim.
function listBy(user_id, {metas: metas}) {
  if (!user_id) return {username: "Anonymous", count: metas.length};
  return {username: metas[0].username, count: metas.length};
}
export { listBy };

/** Rows {username,count} → a sorted, comparable list of "name: count" strings. */
export function norm(rows) {
  return (rows || []).map((r) => `${r.username}: ${r.count}`).sort();
}

/** Redis keys of one room. */
export function roomKeys(prefix, room) {
  const base = `${prefix}:room:{${room}}`;
  return {
    record: base,
    presence: `${base}:presence`,
    anon: `${base}:anon`,
    nodes: `${base}:nodes`,
    seq: `${base}:seq`,
    events: `${base}:events`,
  };
}

/**
 * A phoenix.js client with the real `Presence` helper, joined to `topic`.
 * sub === undefined → anonymous (no token).
 * Returns {socket, channel, presence, rows (last onSync render), syncs[], counts[] (presence_count payloads)}.
 */
export async function observer(url, topic, { sub, username } = {}) {
  const token = sub === undefined ? undefined : hs256(claims(sub, username ?? `user-${sub}`));
  const socket = await connect(url, { token });
  const channel = socket.channel(topic, {});
  const presence = new Presence(channel);
  const o = { socket, channel, presence, rows: null, syncs: [], counts: [] };
  presence.onSync(() => {
    o.rows = presence.list(listBy);
    o.syncs.push({ at: Date.now(), rows: o.rows });
  });
  channel.on('presence_count', (p) => o.counts.push({ ...p, at: Date.now() }));
  const r = await join(channel);
  if (r.status !== 'ok') throw new Error(`observer join of ${topic} failed: ${JSON.stringify(r)}`);
  o.lastCount = () => o.counts[o.counts.length - 1];
  /** The raw presence state for key `key` (metas array) or undefined. */
  o.metas = (key) => {
    let found;
    presence.list((k, p) => { if (k === key) found = p.metas; });
    return found;
  };
  return o;
}

/** Wait until the observer's rendered rows equal `expected` (array of "name: n" strings). */
export async function waitRows(o, expected, timeoutMs = 5000, what = 'rendered presence') {
  const want = [...expected].sort();
  return waitFor(() => JSON.stringify(norm(o.rows)) === JSON.stringify(want), timeoutMs,
    `${what} = ${JSON.stringify(want)} (now ${JSON.stringify(norm(o.rows))})`);
}

/** Wait until the observer's last presence_count matches `partial`. */
export async function waitCount(o, partial, timeoutMs = 5000, what = 'presence_count') {
  return waitFor(() => {
    const c = o.lastCount();
    return c && Object.entries(partial).every(([k, v]) => c[k] === v);
  }, timeoutMs, `${what} ⊇ ${JSON.stringify(partial)} (last ${JSON.stringify(o.lastCount())})`);
}

// ---------------------------------------------------------------------------
// Light raw clients (hundreds of sockets): the event name is read from the frame's head; only
// replies, presence_count and (optionally) presence payloads are parsed.
// ---------------------------------------------------------------------------

const lights = new Set();

const HEAD = /^\[(?:null|"[^"]*"),(?:null|"[^"]*"),"[^"]*","([^"]+)"/;

/**
 * Open a raw socket (no join yet). Options: token, trackAnon (parse presence frames and keep the
 * size of the `""` key: o.anonMetas, and log every presence_diff in o.diffLog as {at, anon: how
 * far it moved the `""` list, keys: the signed-in keys it names}). o.diffTimes holds the arrival
 * time of every presence_diff.
 */
export function lightOpen(gw, { token, trackAnon = false, timeoutMs = 10000 } = {}) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(wsUrl(gw, { token }), { handshakeTimeout: timeoutMs, perMessageDeflate: false });
    const c = {
      ws, events: {}, diffTimes: [], diffLog: [], replies: new Map(), lastCount: null, anonMetas: 0, closeInfo: null,
      stateSeen: false, waiters: new Set(),
    };
    lights.add(c);
    ws.on('message', (data) => {
      const s = data.toString();
      const m = HEAD.exec(s.slice(0, 300));
      const ev = m ? m[1] : '?';
      c.events[ev] = (c.events[ev] || 0) + 1;
      if (ev === 'presence_diff') c.diffTimes.push(Date.now());
      if (ev === 'phx_reply') {
        const f = JSON.parse(s);
        c.replies.set(f[1], f[4]);
      } else if (ev === 'presence_count') {
        c.lastCount = JSON.parse(s)[4];
      } else if (trackAnon && ev === 'presence_state') {
        const p = JSON.parse(s)[4];
        c.anonMetas = p[''] ? p[''].metas.length : 0;
        c.stateSeen = true;
      } else if (trackAnon && ev === 'presence_diff') {
        const p = JSON.parse(s)[4];
        const moved = (p.joins && p.joins[''] ? p.joins[''].metas.length : 0)
          - (p.leaves && p.leaves[''] ? p.leaves[''].metas.length : 0);
        c.anonMetas += moved;
        const keys = [...Object.keys(p.joins || {}), ...Object.keys(p.leaves || {})].filter((k) => k !== '');
        c.diffLog.push({ at: Date.now(), anon: moved, keys });
      }
      for (const w of c.waiters) w();
    });
    ws.on('close', (code) => { c.closeInfo = { code, at: Date.now() }; lights.delete(c); for (const w of c.waiters) w(); });
    ws.on('error', (e) => { if (!c.opened) reject(e); });
    ws.on('open', () => { c.opened = true; resolve(c); });
    c.sendJoin = (topic, ref = '1') => ws.send(JSON.stringify([ref, ref, topic, 'phx_join', {}]));
    c.reply = (ref = '1', ms = 10000) => new Promise((res, rej) => {
      const check = () => {
        if (c.replies.has(ref)) { c.waiters.delete(check); clearTimeout(t); res(c.replies.get(ref)); return true; }
        if (c.closeInfo) { c.waiters.delete(check); clearTimeout(t); rej(new Error(`socket closed ${JSON.stringify(c.closeInfo)} before reply ${ref}`)); return true; }
        return false;
      };
      const t = setTimeout(() => { c.waiters.delete(check); rej(new Error(`no reply ${ref} within ${ms} ms`)); }, ms);
      if (!check()) c.waiters.add(check);
    });
    c.join = async (topic, ref = '1') => {
      c.sendJoin(topic, ref);
      const r = await c.reply(ref);
      if (!r || r.status !== 'ok') throw new Error(`join ${topic} failed: ${JSON.stringify(r)}`);
      return r;
    };
    c.close = () => { try { ws.close(); } catch { /* */ } };
    c.terminate = () => { try { ws.terminate(); } catch { /* */ } };
  });
}

/** Run `fn(i)` for i in [0,n) with at most `limit` in flight. */
export async function pool(n, limit, fn) {
  const out = new Array(n);
  let next = 0;
  const worker = async () => {
    while (next < n) {
      const i = next++;
      out[i] = await fn(i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, n) }, worker));
  return out;
}

/** Open `n` light sockets on `gw` and join each to `topic` (bounded concurrency). */
export async function lightCrowd(gw, topic, n, opts = {}, limit = 50) {
  return pool(n, limit, async () => {
    const c = await lightOpen(gw, opts);
    await c.join(topic);
    return c;
  });
}

export function closeAllLight() {
  for (const c of lights) c.terminate();
  lights.clear();
}

// ---------------------------------------------------------------------------
// Redis introspection
// ---------------------------------------------------------------------------

/** INFO commandstats → {cmd: calls} (lower-case command names, e.g. evalsha, hgetall). */
export function commandCalls(redis) {
  const out = {};
  for (const line of redis.lines('INFO', 'commandstats')) {
    const m = /^cmdstat_([^:]+):calls=(\d+)/.exec(line.trim());
    if (m) out[m[1]] = Number(m[2]);
  }
  return out;
}

/** MEMORY USAGE (all samples) of each key; a missing key counts 0. Returns {total, perKey}. */
export function memoryUsage(redis, keys) {
  const perKey = {};
  let total = 0;
  for (const k of keys) {
    const v = redis.cli('MEMORY', 'USAGE', k, 'SAMPLES', '0');
    const n = v === '' ? 0 : Number(v);
    perKey[k] = n;
    total += n;
  }
  return { total, perKey };
}

/** Sum of HVALS of the room's anon hash. */
export function anonTotal(redis, prefix, room) {
  return redis.lines('HVALS', roomKeys(prefix, room).anon).reduce((a, v) => a + Number(v), 0);
}

export { sleep };

// ---------------------------------------------------------------------------
// A tiny async RESP client (redis-cli via execFileSync blocks the event loop, which would skew
// the timings measured on sockets while polling Redis).
// ---------------------------------------------------------------------------

import net from 'node:net';

const clients = new Set();

export function respClient(port) {
  return new Promise((resolve, reject) => {
    const sock = net.createConnection({ host: '127.0.0.1', port });
    let buf = Buffer.alloc(0);
    const pending = [];
    const parse = (b, i) => {
      // returns [value, nextIndex] or null if incomplete
      if (i >= b.length) return null;
      const type = String.fromCharCode(b[i]);
      const eol = b.indexOf('\r\n', i);
      if (eol < 0) return null;
      const line = b.toString('utf8', i + 1, eol);
      const after = eol + 2;
      if (type === '+') return [line, after];
      if (type === '-') return [new Error(line), after];
      if (type === ':') return [Number(line), after];
      if (type === '$') {
        const n = Number(line);
        if (n < 0) return [null, after];
        if (b.length < after + n + 2) return null;
        return [b.toString('utf8', after, after + n), after + n + 2];
      }
      if (type === '*') {
        const n = Number(line);
        if (n < 0) return [null, after];
        const arr = [];
        let j = after;
        for (let k = 0; k < n; k++) {
          const r = parse(b, j);
          if (!r) return null;
          arr.push(r[0]);
          j = r[1];
        }
        return [arr, j];
      }
      throw new Error(`unexpected RESP type ${type}`);
    };
    sock.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      for (;;) {
        const r = parse(buf, 0);
        if (!r) break;
        buf = buf.subarray(r[1]);
        const p = pending.shift();
        if (!p) continue;
        if (r[0] instanceof Error) p.reject(r[0]); else p.resolve(r[0]);
      }
    });
    const c = {
      cmd(...args) {
        return new Promise((res, rej) => {
          pending.push({ resolve: res, reject: rej });
          let s = `*${args.length}\r\n`;
          for (const a of args) {
            const v = String(a);
            s += `$${Buffer.byteLength(v)}\r\n${v}\r\n`;
          }
          sock.write(s);
        });
      },
      close() { clients.delete(c); sock.destroy(); },
    };
    sock.on('error', (e) => { for (const p of pending.splice(0)) p.reject(e); reject(e); });
    sock.on('connect', () => { clients.add(c); resolve(c); });
  });
}

export function closeAllResp() {
  for (const c of clients) c.close();
}

/** Does Redis still hold anything of `node` in the room? Returns a description or '' if clean. */
export async function nodeTraces(rc, prefix, room, node) {
  const k = roomKeys(prefix, room);
  const [fields, anon, lease] = await Promise.all([
    rc.cmd('HKEYS', k.presence), rc.cmd('HGET', k.anon, node), rc.cmd('ZSCORE', k.nodes, node),
  ]);
  const mine = fields.filter((f) => f.startsWith(`${node}.`));
  const out = [];
  if (mine.length) out.push(`presence fields ${JSON.stringify(mine)}`);
  if (anon !== null) out.push(`anon field = ${anon}`);
  if (lease !== null) out.push(`lease = ${lease}`);
  return out.join(', ');
}

/** One try: a new signed-in viewer `viewer<n>` on gateway `g` sees exactly `want` (itself included). */
export async function viewerSees(g, topic, n, want, ms) {
  const o = await observer(g.publicUrl, topic, { sub: `v${n}`, username: `viewer${n}` });
  try {
    await waitRows(o, [...want, `viewer${n}: 1`], ms, 'new viewer');
    return true;
  } catch { return false; } finally {
    o.socket.disconnect();
  }
}
