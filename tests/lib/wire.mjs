// A WebSocket client at the byte level, for tests that need what `ws` will not do: several frames
// in one TCP write, invalid close codes, unfinished fragments. It speaks RFC 6455 over a plain
// `net` socket (the gateway is the server under test; nothing here stands in for it).
import crypto from 'node:crypto';
import net from 'node:net';
import { waitFor } from './harness.mjs';

/**
 * A masked client frame: `opcode` (1 text, 2 binary, 8 close, 9 ping, 0 continuation); `rsv1`
 * marks a compressed message (permessage-deflate).
 */
export function clientFrame(opcode, payload = Buffer.alloc(0), { fin = true, rsv1 = false } = {}) {
  const data = Buffer.isBuffer(payload) ? payload : Buffer.from(typeof payload === 'string' ? payload : JSON.stringify(payload));
  const mask = crypto.randomBytes(4);
  const first = (fin ? 0x80 : 0) | (rsv1 ? 0x40 : 0) | opcode;
  let head;
  if (data.length < 126) {
    head = Buffer.from([first, 0x80 | data.length]);
  } else if (data.length < 65536) {
    head = Buffer.alloc(4);
    head[0] = first;
    head[1] = 0x80 | 126;
    head.writeUInt16BE(data.length, 2);
  } else {
    head = Buffer.alloc(10);
    head[0] = first;
    head[1] = 0x80 | 127;
    head.writeBigUInt64BE(BigInt(data.length), 2);
  }
  const body = Buffer.alloc(data.length);
  for (let i = 0; i < data.length; i++) body[i] = data[i] ^ mask[i & 3];
  return Buffer.concat([head, mask, body]);
}

/** A close frame's payload: a code and an optional reason (Buffer or string). */
export function closePayload(code, reason = '') {
  const r = Buffer.isBuffer(reason) ? reason : Buffer.from(reason);
  const b = Buffer.alloc(2 + r.length);
  b.writeUInt16BE(code, 0);
  r.copy(b, 2);
  return b;
}

/**
 * Opens `ws://host:port/path?query` over a raw TCP socket and completes the handshake; `headers`
 * are added to the upgrade request (e.g. `Sec-WebSocket-Extensions`).
 * Returns {write(buf), frames ({opcode, rsv1, payload, at}), texts(), response (the 101's head),
 * close: promise of the server's close frame {code, at} (code null for an empty close payload),
 * ended: promise of the TCP end, destroy()}.
 */
export async function wireConnect(url, { headers = {} } = {}) {
  const u = new URL(url.replace(/^ws/, 'http'));
  const sock = net.connect(Number(u.port), u.hostname);
  await new Promise((resolve, reject) => { sock.once('connect', resolve); sock.once('error', reject); });
  const key = crypto.randomBytes(16).toString('base64');
  sock.write(`GET ${u.pathname}${u.search} HTTP/1.1\r\nHost: ${u.host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n`
    + `Sec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n`
    + Object.entries(headers).map(([k, v]) => `${k}: ${v}\r\n`).join('') + '\r\n');
  const c = { frames: [], closeFrame: null, endedAt: null };
  let buf = Buffer.alloc(0);
  let upgraded = false;
  let onClose;
  c.close = new Promise((r) => { onClose = r; });
  c.ended = new Promise((r) => {
    sock.on('close', () => { c.endedAt = Date.now(); r(c.endedAt); onClose(c.closeFrame); });
  });
  sock.on('error', () => { /* reported through close */ });
  sock.on('data', (d) => {
    buf = Buffer.concat([buf, d]);
    if (!upgraded) {
      const end = buf.indexOf('\r\n\r\n');
      if (end < 0) return;
      const head = buf.subarray(0, end).toString();
      if (!head.startsWith('HTTP/1.1 101')) { c.refused = head; sock.destroy(); return; }
      upgraded = true;
      c.response = head;
      buf = buf.subarray(end + 4);
    }
    for (;;) {
      if (buf.length < 2) return;
      const opcode = buf[0] & 0x0f;
      const rsv1 = (buf[0] & 0x40) !== 0;
      let len = buf[1] & 0x7f;
      let at = 2;
      if (len === 126) { if (buf.length < 4) return; len = buf.readUInt16BE(2); at = 4; }
      else if (len === 127) { if (buf.length < 10) return; len = Number(buf.readBigUInt64BE(2)); at = 10; }
      if (buf.length < at + len) return;
      const payload = buf.subarray(at, at + len);
      buf = buf.subarray(at + len);
      const frame = { opcode, rsv1, payload: Buffer.from(payload), at: Date.now() };
      c.frames.push(frame);
      if (opcode === 8 && !c.closeFrame) {
        c.closeFrame = { code: payload.length >= 2 ? payload.readUInt16BE(0) : null, at: frame.at };
        onClose(c.closeFrame);
      }
    }
  });
  await waitFor(() => upgraded || c.refused, 5000, 'the 101 answer');
  if (!upgraded) throw new Error(`upgrade refused: ${c.refused}`);
  c.write = (b) => sock.write(b);
  /** Text frames so far, parsed as JSON where they parse. */
  c.texts = () => c.frames.filter((f) => f.opcode === 1).map((f) => { try { return JSON.parse(f.payload); } catch { return f.payload.toString(); } });
  c.destroy = () => sock.destroy();
  c.sock = sock;
  return c;
}
