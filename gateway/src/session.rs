//! One WebSocket connection: its joined channels and their join_refs, its idle deadline, and its
//! bounded outbound queue drained by a single writer.
//!
//! The reader reassembles fragments under `server.max_frame_bytes`, decodes Phoenix frames and
//! applies the rules (`rooms`), calling into the [`Hub`] for joins, leaves and broadcasts. The
//! writer owns the socket's write half; every frame the socket gets, replies and room broadcasts
//! alike, goes through the one queue, so per-socket order is the order of enqueueing. A queue that
//! fills up closes the socket with 4008: a slow client never slows a room or grows memory.
//!
//! Redis keys and other sessions are out of reach from here.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, WebSocketError, WebSocketRead};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use crate::app::App;
use crate::auth::{AuthError, Identity};
use crate::fanout::{JoinError, Joiner, Room};
use crate::metrics::{join_result, push_result};
use crate::protocol::{self, Inbound, Payload, close, reason};
use crate::rooms::{PushRefusal, RoomId};

/// What the writer sends.
enum Out {
    Text(Bytes),
    Pong(Bytes),
    /// A text frame `head ++ body ++ "]"`: a channel push around a payload shared by many
    /// sockets (a room's `presence_state`), without a copy per socket.
    Wrapped(Bytes, Bytes),
}

/// A socket's outbound queue and close request, shared by the reader, every room the socket is
/// in (the hub), the drain, and the single writer that empties it.
///
/// The queue is a `VecDeque` that starts empty and gives its memory back when drained, so an idle
/// socket holds no queue storage at all (a tokio channel would keep a 32-slot block per socket).
pub struct Shared {
    queue: std::sync::Mutex<VecDeque<Out>>,
    cap: usize,
    /// 0 = open; a close code; [`ABORT`] = stop without a close frame (the peer is gone).
    code: AtomicU32,
    notify: Notify,
    /// Fired when the writer has stopped, so the reader stops too (at a frame boundary: a join
    /// or leave under way always completes).
    writer_done: Notify,
    metrics: crate::metrics::Metrics,
}

const ABORT: u32 = u32::MAX;
/// The client closed without a status code; the echo carries none either.
const NO_STATUS: u16 = 1005;
/// A drained queue keeps at most this many slots.
const KEEP_SLOTS: usize = 8;

/// The sending side of a socket; cloned into every room the socket is a member of.
#[derive(Clone)]
pub struct Outbox(Arc<Shared>);

impl Outbox {
    fn new(cap: usize, metrics: crate::metrics::Metrics) -> Self {
        Outbox(Arc::new(Shared {
            queue: std::sync::Mutex::new(VecDeque::new()),
            cap,
            code: AtomicU32::new(0),
            notify: Notify::new(),
            writer_done: Notify::new(),
            metrics,
        }))
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Out>> {
        self.0.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a text frame. A full queue closes the socket as a slow consumer; a closing socket
    /// takes nothing more. Returns whether the frame was queued.
    pub fn send(&self, frame: Bytes) -> bool {
        self.push(Out::Text(frame))
    }

    /// Queues the text frame `head ++ payload ++ "]"` (see [`crate::protocol::push_head`]).
    pub fn send_wrapped(&self, head: Bytes, payload: Bytes) -> bool {
        self.push(Out::Wrapped(head, payload))
    }

    fn push(&self, out: Out) -> bool {
        if self.code() != 0 {
            return false;
        }
        let mut q = self.queue();
        if q.len() >= self.0.cap {
            drop(q);
            if self.code() == 0 {
                self.0.metrics.slow_consumer();
            }
            self.close(close::SLOW_CONSUMER);
            return false;
        }
        q.push_back(out);
        drop(q);
        self.0.notify.notify_one();
        true
    }

    /// Asks the writer to send a close frame with `code` and stop. The first request wins.
    pub fn close(&self, code: u16) {
        self.set_code(u32::from(code));
    }

    fn abort(&self) {
        self.set_code(ABORT);
    }

    fn set_code(&self, code: u32) {
        if self
            .0
            .code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.0.notify.notify_one();
        }
    }

    fn code(&self) -> u32 {
        self.0.code.load(Ordering::Acquire)
    }

    /// Takes up to `n` queued frames; a drained queue gives back its storage.
    fn take(&self, n: usize, into: &mut Vec<Out>) {
        let mut q = self.queue();
        let k = q.len().min(n);
        into.extend(q.drain(..k));
        if q.is_empty() && q.capacity() > KEEP_SLOTS {
            *q = VecDeque::new();
        }
    }
}

struct Channel {
    room: Arc<Room>,
    join_ref: Arc<str>,
    identity: Identity,
}

struct Session {
    app: Arc<App>,
    socket: u64,
    conn: String,
    identity: Identity,
    /// Why the connection's token was refused, told in every join reply that uses it.
    auth_error: Option<AuthError>,
    channels: HashMap<String, Channel>,
    out: Outbox,
}

/// Why the reader stopped.
enum ReadEnd {
    /// A close frame was queued (ours or the echo of the client's).
    Closing,
    /// The peer is gone (EOF, reset): nothing can be written.
    Gone,
}

/// Serves one upgraded connection until it closes, then removes its presence.
pub async fn run<R, W>(
    app: Arc<App>,
    read: R,
    write: W,
    (identity, auth_error): (Identity, Option<AuthError>),
    socket: u64,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let out = Outbox::new(app.cfg.server.outbound_queue, app.metrics.clone());
    let signed_in = identity.user().is_some();
    app.metrics.connection_opened(signed_in);
    app.sessions.insert(socket, out.clone());
    let mut session = Session {
        conn: format!("{}.{}", app.node, socket),
        app: app.clone(),
        socket,
        identity,
        auth_error,
        channels: HashMap::new(),
        out: out.clone(),
    };
    let mut ws = fastwebsockets::after_handshake_split(
        read,
        tokio::io::sink(),
        fastwebsockets::Role::Server,
    )
    .0;
    // fastwebsockets refuses frames with len >= max; we allow exactly max
    ws.set_max_message_size(app.cfg.server.max_frame_bytes + 1);
    ws.set_auto_close(false);
    ws.set_auto_pong(true);

    // Both halves run to the end: the reader is never dropped in the middle of a join or leave
    // (which would leave presence half-written). Whichever stops first makes the other stop: the
    // reader sets a close code or aborts, the writer fires `writer_done`.
    let closed_code = {
        let write_timeout = app.cfg.server.write_timeout();
        let reader = async {
            if let ReadEnd::Gone = session.read_loop(&mut ws).await {
                out.abort();
            }
        };
        let writer = async {
            write_loop(out.clone(), write, write_timeout).await;
            out.0.writer_done.notify_one();
        };
        tokio::join!(reader, writer);
        match out.code() {
            ABORT | 0 => 1006,
            c => c as u16,
        }
    };
    // nothing more is queued for this socket, whoever still holds its outbox
    out.abort();
    session.leave_all().await;
    app.sessions.remove(socket);
    app.metrics.connection_closed(signed_in, closed_code);
}

impl Session {
    async fn read_loop<R: AsyncRead + Unpin>(&mut self, ws: &mut WebSocketRead<R>) -> ReadEnd {
        let idle = self.app.cfg.server.idle_timeout();
        let max = self.app.cfg.server.max_frame_bytes;
        let mut fragments: Option<(OpCode, Vec<u8>)> = None;
        let pong_out = self.out.clone();
        let mut send_fn = move |f: Frame<'_>| {
            // obligated pong for a client ping
            pong_out.push(Out::Pong(Bytes::copy_from_slice(&f.payload)));
            std::future::ready(Ok::<(), std::convert::Infallible>(()))
        };
        loop {
            let read = tokio::select! {
                biased;
                // the writer stopped (close sent, slow consumer, write error): stop reading
                _ = self.out.0.writer_done.notified() => return ReadEnd::Closing,
                r = tokio::time::timeout(idle, ws.read_frame(&mut send_fn)) => r,
            };
            let frame = match read {
                Err(_) => {
                    self.out.close(close::IDLE_TIMEOUT);
                    return ReadEnd::Closing;
                }
                Ok(Err(e)) => {
                    return match e {
                        WebSocketError::FrameTooLarge => {
                            self.out.close(close::TOO_BIG);
                            ReadEnd::Closing
                        }
                        WebSocketError::InvalidUTF8 => {
                            self.out.close(close::MALFORMED);
                            ReadEnd::Closing
                        }
                        WebSocketError::UnexpectedEOF
                        | WebSocketError::ConnectionClosed
                        | WebSocketError::IoError(_) => ReadEnd::Gone,
                        _ => {
                            self.out.close(1002);
                            ReadEnd::Closing
                        }
                    };
                }
                Ok(Ok(f)) => f,
            };
            let message = match frame.opcode {
                OpCode::Close => {
                    let code = match frame.payload.len() {
                        0 => NO_STATUS,
                        1 => 1002,
                        _ => u16::from_be_bytes([frame.payload[0], frame.payload[1]]),
                    };
                    self.out.close(code);
                    return ReadEnd::Closing;
                }
                OpCode::Ping | OpCode::Pong => continue,
                OpCode::Text | OpCode::Binary if frame.fin => {
                    if fragments.is_some() {
                        self.out.close(1002);
                        return ReadEnd::Closing;
                    }
                    (frame.opcode, frame.payload.to_vec())
                }
                OpCode::Text | OpCode::Binary => {
                    if fragments.is_some() {
                        self.out.close(1002);
                        return ReadEnd::Closing;
                    }
                    fragments = Some((frame.opcode, frame.payload.to_vec()));
                    continue;
                }
                OpCode::Continuation => {
                    let Some((_, buf)) = fragments.as_mut() else {
                        self.out.close(1002);
                        return ReadEnd::Closing;
                    };
                    if buf.len() + frame.payload.len() > max {
                        self.out.close(close::TOO_BIG);
                        return ReadEnd::Closing;
                    }
                    buf.extend_from_slice(&frame.payload);
                    if !frame.fin {
                        continue;
                    }
                    match fragments.take() {
                        Some(m) => m,
                        None => continue,
                    }
                }
            };
            let decoded = match message.0 {
                OpCode::Text => protocol::decode_text(&message.1),
                _ => protocol::decode_binary(&message.1),
            };
            if self.out.code() != 0 {
                // closing: a frame that was already buffered is not acted upon
                return ReadEnd::Closing;
            }
            match decoded {
                Ok(f) => self.handle(f).await,
                Err(e) => {
                    tracing::debug!(socket = self.socket, error = %e, "malformed frame");
                    self.out.close(close::MALFORMED);
                    return ReadEnd::Closing;
                }
            }
            if self.out.code() != 0 {
                return ReadEnd::Closing;
            }
        }
    }

    async fn handle(&mut self, f: Inbound) {
        match (f.topic.as_str(), f.event.as_str()) {
            ("phoenix", "heartbeat") => {
                self.out
                    .send(protocol::heartbeat_reply(f.reference.as_deref()));
            }
            (_, "phx_join") => Box::pin(self.join(f)).await,
            (_, "phx_leave") => Box::pin(self.leave(f)).await,
            _ => Box::pin(self.push(f)).await,
        }
    }

    fn reply_error(&self, f: &Inbound, reason: &str) {
        self.out.send(protocol::reply_error(
            f.join_ref.as_deref(),
            f.reference.as_deref(),
            &f.topic,
            reason,
        ));
    }

    async fn join(&mut self, f: Inbound) {
        let app = self.app.clone();
        let Payload::Json(params) = &f.payload else {
            app.metrics.join(join_result::INVALID);
            return self.reply_error(&f, reason::INVALID_PAYLOAD);
        };
        let id = match RoomId::from_topic(&f.topic) {
            Ok(id) => id,
            Err(e) => {
                app.metrics.join(join_result::INVALID);
                return self.reply_error(&f, e.reason());
            }
        };
        let join_ref: Arc<str> = Arc::from(
            f.join_ref
                .clone()
                .or_else(|| f.reference.clone())
                .unwrap_or_default(),
        );
        if !self.channels.contains_key(&f.topic)
            && self.channels.len() >= app.cfg.server.max_channels_per_socket
        {
            app.metrics.join(join_result::REFUSED);
            return self.reply_error(&f, reason::TOO_MANY_CHANNELS);
        }
        // per-channel sign-in with `guardian_token`, else the connection's identity
        let (identity, auth_error): (Identity, Option<AuthError>) =
            match params.get("guardian_token") {
                Some(Value::String(t)) if !t.is_empty() => app.verifier.identify(Some(t)),
                Some(Value::Null) | None => (self.identity.clone(), self.auth_error),
                Some(_) => (Identity::Anonymous, Some(AuthError::Malformed)),
            };
        if auth_error.is_some() && app.cfg.auth.reject_invalid_tokens {
            app.metrics.join(join_result::REFUSED);
            return self.reply_error(&f, "invalid token");
        }
        // a second join of a joined topic replaces the channel; the old one is closed with its
        // own join_ref after the new join's reply
        let previous = self.channels.remove(&f.topic);
        if let Some(old) = &previous {
            app.hub.leave(&old.room, self.socket, &self.conn).await;
        }
        let mut response = Map::new();
        match identity.user() {
            Some(u) => {
                response.insert("auth".into(), json!("user"));
                response.insert("user".into(), json!({"id": u.id, "username": u.username}));
            }
            None => {
                response.insert("auth".into(), json!("anonymous"));
                if let Some(e) = auth_error {
                    response.insert("auth_error".into(), json!(e.to_string()));
                }
            }
        }
        let reply = protocol::reply_ok(
            Some(&join_ref),
            f.reference.as_deref(),
            &f.topic,
            Value::Object(response),
        );
        let joiner = Joiner {
            socket: self.socket,
            conn: &self.conn,
            user: identity.user(),
            join_ref: &join_ref,
            out: self.out.clone(),
            reply,
        };
        match app.hub.join(&id, joiner).await {
            Ok(room) => {
                app.metrics.join(join_result::OK);
                self.channels.insert(
                    f.topic.clone(),
                    Channel {
                        room,
                        join_ref: join_ref.clone(),
                        identity,
                    },
                );
            }
            Err(e) => {
                let (label, why) = match &e {
                    JoinError::NoRoom => (join_result::NO_ROOM, reason::ROOM_DOES_NOT_EXIST),
                    JoinError::Unavailable(_) => {
                        (join_result::UNAVAILABLE, reason::PRESENCE_UNAVAILABLE)
                    }
                    JoinError::ShuttingDown => (join_result::UNAVAILABLE, reason::SHUTTING_DOWN),
                };
                if let JoinError::Unavailable(detail) = &e {
                    tracing::warn!(room = %id, %detail, "join failed");
                }
                app.metrics.join(label);
                self.reply_error(&f, why);
            }
        }
        if let Some(old) = previous
            && *old.join_ref != *join_ref
        {
            self.out.send(protocol::phx_close(&old.join_ref, &f.topic));
        }
    }

    async fn leave(&mut self, f: Inbound) {
        let reply = protocol::reply_ok(
            f.join_ref.as_deref(),
            f.reference.as_deref(),
            &f.topic,
            json!({}),
        );
        let current = self
            .channels
            .get(&f.topic)
            .is_some_and(|c| f.join_ref.as_deref().is_none_or(|jr| jr == &*c.join_ref));
        if !current {
            // Phoenix answers a leave of a topic that is not joined with ok
            self.out.send(reply);
            return;
        }
        if let Some(ch) = self.channels.remove(&f.topic) {
            self.app.hub.leave(&ch.room, self.socket, &self.conn).await;
            self.out.send(reply);
            self.out.send(protocol::phx_close(&ch.join_ref, &f.topic));
        }
    }

    async fn push(&mut self, f: Inbound) {
        let app = self.app.clone();
        let Some(ch) = self.channels.get(&f.topic) else {
            return self.out.send_unit(protocol::reply_error(
                None,
                f.reference.as_deref(),
                &f.topic,
                reason::UNMATCHED_TOPIC,
            ));
        };
        if let Some(jr) = &f.join_ref
            && **jr != *ch.join_ref
        {
            // a stale join_ref: Phoenix ignores it silently
            return;
        }
        if ch.room.is_deleted() {
            let topic = f.topic.clone();
            if let Some(ch) = self.channels.remove(&topic) {
                app.hub.leave(&ch.room, self.socket, &self.conn).await;
            }
            return self.reply_error(&f, reason::ROOM_DOES_NOT_EXIST);
        }
        let refused = |refusal: PushRefusal| {
            app.metrics.push(match refusal {
                PushRefusal::NotSignedIn => push_result::NOT_SIGNED_IN,
                PushRefusal::UnknownEvent => push_result::UNKNOWN_EVENT,
                PushRefusal::InvalidPayload => push_result::INVALID,
            });
            self.reply_error(&f, refusal.reason());
        };
        if let Err(refusal) = app.policy.check(&ch.identity, &f.event) {
            return refused(refusal);
        }
        let Some(user) = ch.identity.user() else {
            return self.reply_error(&f, reason::NOT_SIGNED_IN);
        };
        let Payload::Json(payload) = &f.payload else {
            app.metrics.push(push_result::INVALID);
            return self.reply_error(&f, reason::BINARY_UNSUPPORTED);
        };
        // only the body is the client's; the sender comes from the token, every other field is
        // dropped (see `rooms::broadcast_payload`)
        let payload = match crate::rooms::broadcast_payload(
            &f.event,
            payload,
            user,
            crate::unix_ms(),
            app.cfg.rooms.max_body_bytes,
        ) {
            Ok(p) => p,
            Err(refusal) => return refused(refusal),
        };
        let frame = protocol::broadcast(&f.topic, &f.event, &payload);
        let room = ch.room.clone();
        match app.hub.publish(&room, &frame).await {
            Ok(()) => {
                app.metrics.push(push_result::OK);
                self.out.send(protocol::reply_ok(
                    f.join_ref.as_deref(),
                    f.reference.as_deref(),
                    &f.topic,
                    json!({}),
                ));
            }
            Err(e) => {
                tracing::warn!(room = %room.id, error = %e, "broadcast failed");
                app.metrics.push(push_result::UNAVAILABLE);
                self.reply_error(&f, "unavailable");
            }
        }
    }

    async fn leave_all(&mut self) {
        for (_, ch) in self.channels.drain() {
            self.app.hub.leave(&ch.room, self.socket, &self.conn).await;
        }
    }
}

impl Outbox {
    fn send_unit(&self, frame: Bytes) {
        self.send(frame);
    }
}

/// Frames per write: several queued frames go out in one syscall.
const BATCH: usize = 64;
/// A write buffer larger than this is released after use, so one burst does not pin memory on
/// every idle socket.
const KEEP_BUFFER: usize = 1024;
/// Frames larger than this (a big `presence_state`) are written straight from the shared bytes
/// instead of being copied into the write buffer.
const COPY_LIMIT: usize = 2048;

/// The single writer: drains the queue, frames text with a header written here (server frames
/// are unmasked, so a shared `Bytes` body is written as is), and sends the close frame last.
async fn write_loop<W: AsyncWrite + Unpin>(out: Outbox, mut w: W, write_timeout: Duration) {
    let mut buf: Vec<u8> = Vec::new();
    let mut batch: Vec<Out> = Vec::new();
    loop {
        out.0.notify.notified().await;
        loop {
            if out.code() != 0 {
                break;
            }
            out.take(BATCH, &mut batch);
            if batch.is_empty() {
                break;
            }
            // a peer that does not read for write_timeout is dropped: the writer never hangs
            let wrote = tokio::time::timeout(write_timeout, async {
                for m in batch.drain(..) {
                    write_out(&mut w, &mut buf, m).await?;
                }
                if !buf.is_empty() {
                    w.write_all(&buf).await?;
                }
                Ok::<(), std::io::Error>(())
            })
            .await;
            match wrote {
                Ok(Ok(())) => buf.clear(),
                Ok(Err(_)) => {
                    out.abort();
                    return;
                }
                Err(_) => {
                    out.0.metrics.slow_consumer();
                    out.abort();
                    return;
                }
            }
        }
        // an idle socket keeps no write buffers beyond small ones
        if buf.capacity() > KEEP_BUFFER {
            buf = Vec::new();
        }
        if batch.capacity() > KEEP_SLOTS {
            batch = Vec::new();
        }
        match out.code() {
            0 => continue,
            ABORT => return,
            code => {
                let code = code as u16;
                let mut frame = vec![0x88u8];
                if code == NO_STATUS {
                    frame.push(0);
                } else {
                    frame.push(2);
                    frame.extend_from_slice(&code.to_be_bytes());
                }
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    let _ = w.write_all(&frame).await;
                    let _ = w.flush().await;
                    let _ = w.shutdown().await;
                })
                .await;
                return;
            }
        }
    }
}

/// Adds a frame to the batch; a large body is written directly from its shared bytes, after
/// what is batched before it.
async fn write_out<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &mut Vec<u8>,
    m: Out,
) -> std::io::Result<()> {
    let (head, body, tail): (&[u8], &[u8], &[u8]) = match &m {
        Out::Text(b) | Out::Pong(b) => (&[], b, &[]),
        Out::Wrapped(h, b) => (h, b, b"]"),
    };
    put_head(buf, &m, head.len() + body.len() + tail.len());
    buf.extend_from_slice(head);
    if body.len() <= COPY_LIMIT {
        buf.extend_from_slice(body);
    } else {
        w.write_all(buf).await?;
        buf.clear();
        w.write_all(body).await?;
    }
    buf.extend_from_slice(tail);
    Ok(())
}

/// The frame header: FIN + opcode, then the payload length (server frames are not masked).
fn put_head(buf: &mut Vec<u8>, m: &Out, n: usize) {
    buf.push(match m {
        Out::Text(_) | Out::Wrapped(..) => 0x81u8,
        Out::Pong(_) => 0x8Au8,
    });
    if n < 126 {
        buf.push(n as u8);
    } else if n <= u16::MAX as usize {
        buf.push(126);
        buf.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        buf.push(127);
        buf.extend_from_slice(&(n as u64).to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn framed(m: Out) -> Vec<u8> {
        let mut wire = Vec::new();
        let mut buf = Vec::new();
        write_out(&mut wire, &mut buf, m).await.unwrap();
        wire.extend_from_slice(&buf);
        wire
    }

    #[tokio::test]
    async fn frames_text_with_the_right_header() {
        assert_eq!(
            framed(Out::Text(Bytes::from_static(b"hi"))).await,
            vec![0x81, 2, b'h', b'i']
        );
        let b = framed(Out::Text(Bytes::from(vec![b'x'; 300]))).await;
        assert_eq!(&b[..4], &[0x81, 126, 1, 44]);
        assert_eq!(b.len(), 304);
        let b = framed(Out::Text(Bytes::from(vec![b'x'; 70_000]))).await;
        assert_eq!(&b[..2], &[0x81, 127]);
        assert_eq!(u64::from_be_bytes(b[2..10].try_into().unwrap()), 70_000);
        assert_eq!(b.len(), 70_010);
        assert_eq!(
            framed(Out::Pong(Bytes::from_static(b"p"))).await,
            vec![0x8A, 1, b'p']
        );
    }

    #[tokio::test]
    async fn wraps_a_shared_payload_small_and_large() {
        let b = framed(Out::Wrapped(
            Bytes::from_static(b"[1,"),
            Bytes::from_static(b"{}"),
        ))
        .await;
        assert_eq!(b, b"\x81\x06[1,{}]".to_vec());
        let big = format!("{{\"k\":\"{}\"}}", "y".repeat(5000));
        let b = framed(Out::Wrapped(
            Bytes::from_static(b"[\"3\",null,\"t\",\"e\","),
            Bytes::from(big.clone()),
        ))
        .await;
        let text = std::str::from_utf8(&b[4..]).unwrap();
        assert_eq!(usize::from(u16::from_be_bytes([b[2], b[3]])), text.len());
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(v[4]["k"].as_str().unwrap().len(), 5000);
    }

    #[test]
    fn first_close_request_wins() {
        let c = Outbox::new(4, crate::metrics::Metrics::new());
        c.close(close::SLOW_CONSUMER);
        c.close(close::RESTART);
        assert_eq!(c.code(), u32::from(close::SLOW_CONSUMER));
        assert!(
            !c.send(Bytes::from_static(b"x")),
            "a closing socket takes nothing"
        );
    }

    #[test]
    fn a_full_queue_closes_the_socket_as_slow() {
        let c = Outbox::new(2, crate::metrics::Metrics::new());
        assert!(c.send(Bytes::from_static(b"1")) && c.send(Bytes::from_static(b"2")));
        assert!(!c.send(Bytes::from_static(b"3")));
        assert_eq!(c.code(), u32::from(close::SLOW_CONSUMER));
        let mut got = Vec::new();
        c.take(10, &mut got);
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn a_drained_queue_gives_its_memory_back() {
        let c = Outbox::new(100, crate::metrics::Metrics::new());
        for _ in 0..40 {
            assert!(c.send(Bytes::from_static(b"x")));
        }
        let mut got = Vec::new();
        c.take(30, &mut got);
        assert!(c.queue().capacity() >= 10, "not drained yet: storage kept");
        c.take(30, &mut got);
        assert_eq!(got.len(), 40);
        let cap = c.queue().capacity();
        assert_eq!(cap, 0);
    }
}
