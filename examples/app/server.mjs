#!/usr/bin/env node
// An example application beside the gateway (README: "Your application and the gateway").
// Node 20, no dependencies. It serves both hooks of DESIGN §12:
//
//   POST /hooks/publish  the gateway asks about one push; the answer decides its fate:
//                        - a body with a blocked word  → {"result":"refuse","reason":"..."}
//                        - a body starting with "/"    → {"result":"ack"} (a command: ok, not shown)
//                        - a body with spaces around   → {"result":"broadcast","body":<trimmed>}
//                        - anything else               → {"result":"broadcast"}
//                        every broadcast message is appended to <data>/messages.jsonl
//   POST /hooks/events   a batch {"events":[...]}; each event is appended to <data>/events.jsonl
//                        once: the gateway retries a batch with the same ids, repeats are dropped
//   GET  /messages[?room=R], GET /events[?room=R]   what was stored, as a JSON array
//   GET  /health         200 ok
//
// Every POST must carry x-gateway-signature: sha256=<hex HMAC-SHA256(secret, raw body)>, checked
// over the raw bytes before anything is parsed (constant-time compare); otherwise 401.
//
// Settings (a flag wins over the environment variable):
//   --port N         APP_PORT           default 8080; 0 picks a free port
//   --host H         APP_HOST           default 127.0.0.1
//   --secret S       APP_HOOK_SECRET    the gateway's hooks.secret (at least 32 bytes), required
//   --secret-file F  APP_HOOK_SECRET_FILE  or read it from a file (trailing newline ignored)
//   --data-dir D     APP_DATA_DIR       default ./data (created if missing)
//   --blocked-words  APP_BLOCKED_WORDS  comma-separated, case-insensitive whole words; default "spam,scam"
// Once listening it prints one JSON line on stdout: {"event":"listening","port":N,"url":"http://H:N"}.
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** Largest request read: a push body is at most a few KiB, an events batch at most 100 events. */
const MAX_REQUEST_BYTES = 1024 * 1024;
/** Longest refusal reason the gateway passes on (it cuts longer ones to 200 characters). */
const MAX_REASON_CHARS = 200;

function settings(argv, env) {
  const flags = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) throw new Error(`unexpected argument ${JSON.stringify(a)}`);
    const [name, inline] = a.slice(2).split(/=(.*)/s, 2);
    const value = inline ?? argv[++i];
    if (value === undefined) throw new Error(`--${name} needs a value`);
    flags[name] = value;
  }
  const known = ['port', 'host', 'secret', 'secret-file', 'data-dir', 'blocked-words'];
  for (const k of Object.keys(flags)) {
    if (!known.includes(k)) throw new Error(`unknown flag --${k} (known: ${known.map((x) => `--${x}`).join(', ')})`);
  }
  const pick = (flag, name, dflt) => flags[flag] ?? env[name] ?? dflt;
  const port = Number(pick('port', 'APP_PORT', '8080'));
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new Error('port must be an integer 0..65535');
  let secret = pick('secret', 'APP_HOOK_SECRET', undefined);
  const secretFile = pick('secret-file', 'APP_HOOK_SECRET_FILE', undefined);
  if (secret === undefined && secretFile !== undefined) {
    secret = fs.readFileSync(secretFile, 'utf8').replace(/\r?\n$/, '');
  }
  if (!secret) throw new Error('the hook secret is required: --secret, --secret-file, APP_HOOK_SECRET or APP_HOOK_SECRET_FILE (the gateway\'s hooks.secret)');
  if (Buffer.byteLength(secret) < 32) throw new Error('the hook secret must be at least 32 bytes, like the gateway\'s hooks.secret');
  const words = pick('blocked-words', 'APP_BLOCKED_WORDS', 'spam,scam')
    .split(',').map((w) => w.trim().toLowerCase()).filter(Boolean);
  return {
    port,
    host: pick('host', 'APP_HOST', '127.0.0.1'),
    secret: Buffer.from(secret),
    dataDir: path.resolve(pick('data-dir', 'APP_DATA_DIR', 'data')),
    words,
  };
}

/** `sha256=<hex HMAC-SHA256(secret, raw)>` compared in constant time with the header. */
export function signatureOk(secret, raw, header) {
  if (typeof header !== 'string') return false;
  const want = Buffer.from(`sha256=${crypto.createHmac('sha256', secret).update(raw).digest('hex')}`);
  const got = Buffer.from(header);
  return got.length === want.length && crypto.timingSafeEqual(got, want);
}

/** The first blocked word `text` contains as a whole word (any case), or undefined. */
function blockedWord(words, text) {
  const tokens = new Set(text.toLowerCase().split(/[^\p{L}\p{N}]+/u));
  return words.find((w) => tokens.has(w));
}

/** The decision about one push (the body of POST /hooks/publish). */
function decide(words, push) {
  const body = push.body;
  // another event's body may be any JSON value: broadcast and kept as it is
  if (typeof body !== 'string') return { answer: { result: 'broadcast' }, stored: body ?? null };
  const word = blockedWord(words, body);
  if (word) {
    const reason = `message refused: it contains the blocked word "${word}"`.slice(0, MAX_REASON_CHARS);
    return { answer: { result: 'refuse', reason } };
  }
  if (body.trimStart().startsWith('/')) return { answer: { result: 'ack' } };
  const trimmed = body.trim();
  // An all-blank body trims to "", which the gateway's body rules refuse (the client gets
  // `invalid payload`): kept as a demonstration that a replaced body is checked; an application
  // would rather answer refuse. Not stored, since it will not be broadcast.
  if (trimmed === '') return { answer: { result: 'broadcast', body: '' } };
  if (trimmed !== body) return { answer: { result: 'broadcast', body: trimmed }, stored: trimmed };
  return { answer: { result: 'broadcast' }, stored: body };
}

/** A JSON-lines file: appended in order, read back whole. */
function jsonl(file) {
  return {
    append: (o) => fs.appendFileSync(file, `${JSON.stringify(o)}\n`),
    read: () => {
      let text = '';
      try {
        text = fs.readFileSync(file, 'utf8');
      } catch (e) {
        if (e.code !== 'ENOENT') throw e;
      }
      return text.split('\n').filter(Boolean).map((l) => JSON.parse(l));
    },
  };
}

export function createApp(cfg) {
  fs.mkdirSync(cfg.dataDir, { recursive: true });
  const messages = jsonl(path.join(cfg.dataDir, 'messages.jsonl'));
  const events = jsonl(path.join(cfg.dataDir, 'events.jsonl'));
  // ids already logged, the file's included: a retried batch after a restart is still dropped
  const seen = new Set(events.read().map((e) => e.id));

  const send = (res, status, obj) => {
    const text = JSON.stringify(obj);
    res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
    res.end(text);
  };

  const routes = {
    'POST /hooks/publish': (res, push) => {
      if (push === null || typeof push !== 'object' || typeof push.room !== 'string') {
        return send(res, 400, { error: 'expected {"room","event","body","user","conn","node","at"}' });
      }
      const { answer, stored } = decide(cfg.words, push);
      if (stored !== undefined) {
        messages.append({
          room: push.room, event: push.event, body: stored, user: push.user, conn: push.conn, node: push.node, at: push.at,
        });
      }
      return send(res, 200, answer);
    },
    'POST /hooks/events': (res, batch) => {
      const idOk = (e) => typeof e?.id === 'string' || typeof e?.id === 'number';
      if (!Array.isArray(batch?.events) || !batch.events.every(idOk)) {
        return send(res, 400, { error: 'expected {"events":[{"id",...}]}' });
      }
      let added = 0;
      for (const e of batch.events) {
        if (seen.has(e.id)) continue;
        seen.add(e.id);
        events.append(e);
        added += 1;
      }
      return send(res, 200, { received: batch.events.length, added });
    },
  };

  return http.createServer((req, res) => {
    const url = new URL(req.url, 'http://app');
    const room = url.searchParams.get('room');
    const ofRoom = (list) => (room === null ? list : list.filter((x) => x.room === room));
    if (req.method === 'GET') {
      if (url.pathname === '/messages') return send(res, 200, ofRoom(messages.read()));
      if (url.pathname === '/events') return send(res, 200, ofRoom(events.read()));
      if (url.pathname === '/health') return send(res, 200, { ok: true });
      return send(res, 404, { error: 'not found' });
    }
    const route = routes[`${req.method} ${url.pathname}`];
    if (!route) return send(res, 404, { error: 'not found' });
    const chunks = [];
    let size = 0;
    req.on('data', (c) => {
      size += c.length;
      if (size > MAX_REQUEST_BYTES) {
        if (!res.headersSent) {
          res.setHeader('connection', 'close');
          res.on('finish', () => req.destroy());
          send(res, 413, { error: 'request too large' });
        }
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => {
      if (res.writableEnded) return;
      const raw = Buffer.concat(chunks);
      // the raw bytes, before parsing: a re-serialised body would not match
      if (!signatureOk(cfg.secret, raw, req.headers['x-gateway-signature'])) {
        return send(res, 401, { error: 'bad signature' });
      }
      let body;
      try {
        body = JSON.parse(raw.toString('utf8'));
      } catch {
        return send(res, 400, { error: 'body is not JSON' });
      }
      try {
        return route(res, body);
      } catch (e) {
        console.error(`error: ${e.message}`);
        return send(res, 500, { error: 'internal error' });
      }
    });
  });
}

function main() {
  let cfg;
  try {
    cfg = settings(process.argv.slice(2), process.env);
  } catch (e) {
    console.error(`error: ${e.message}`);
    process.exit(2);
  }
  const server = createApp(cfg);
  server.on('error', (e) => {
    console.error(`error: cannot listen on ${cfg.host}:${cfg.port}: ${e.message}`);
    process.exit(1);
  });
  server.listen(cfg.port, cfg.host, () => {
    const { port } = server.address();
    const host = cfg.host.includes(':') ? `[${cfg.host}]` : cfg.host;
    console.log(JSON.stringify({ event: 'listening', port, url: `http://${host}:${port}` }));
  });
  const stop = () => {
    server.close(() => process.exit(0));
    // the gateway keeps its connections alive: close them, or close() waits for them
    server.closeAllConnections();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

// run as a program (node server.mjs), not when imported
if (process.argv[1] && fs.realpathSync(process.argv[1]) === fileURLToPath(import.meta.url)) main();
