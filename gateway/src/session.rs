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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, WebSocketError, WebSocketRead};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};

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
}

/// Close requests shared by the reader, the hub (slow consumer) and the drain.
#[derive(Default)]
pub struct Ctl {
    /// 0 = open; a close code; [`ABORT`] = stop without a close frame (the peer is gone).
    code: AtomicU32,
    notify: Notify,
}

const ABORT: u32 = u32::MAX;
/// The client closed without a status code; the echo carries none either.
const NO_STATUS: u16 = 1005;

impl Ctl {
    /// Asks the writer to send a close frame with `code` and stop. The first request wins.
    pub fn close(&self, code: u16) {
        if self
            .code
            .compare_exchange(0, u32::from(code), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.notify.notify_one();
        }
    }

    fn abort(&self) {
        if self
            .code
            .compare_exchange(0, ABORT, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.notify.notify_one();
        }
    }

    fn code(&self) -> u32 {
        self.code.load(Ordering::Acquire)
    }
}

/// The sending side of a socket's queue; cloned into every room the socket is a member of.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Out>,
    ctl: Arc<Ctl>,
    metrics: crate::metrics::Metrics,
}

impl Outbox {
    /// Queues a text frame. A full queue closes the socket as a slow consumer. Returns whether
    /// the frame was queued.
    pub fn send(&self, frame: Bytes) -> bool {
        match self.tx.try_send(Out::Text(frame)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if self.ctl.code() == 0 {
                    self.metrics.slow_consumer();
                }
                self.ctl.close(close::SLOW_CONSUMER);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    pub fn ctl(&self) -> &Arc<Ctl> {
        &self.ctl
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
    let (tx, rx) = mpsc::channel(app.cfg.server.outbound_queue);
    let ctl = Arc::new(Ctl::default());
    let out = Outbox {
        tx,
        ctl: ctl.clone(),
        metrics: app.metrics.clone(),
    };
    let signed_in = identity.user().is_some();
    app.metrics.connection_opened(signed_in);
    app.sessions.insert(socket, ctl.clone());
    let mut session = Session {
        conn: format!("{}.{}", app.node, socket),
        app: app.clone(),
        socket,
        identity,
        auth_error,
        channels: HashMap::new(),
        out,
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

    let closed_code = {
        let reader = session.read_loop(&mut ws);
        let writer = write_loop(rx, ctl.clone(), write);
        tokio::pin!(reader, writer);
        tokio::select! {
            end = &mut reader => {
                if let ReadEnd::Gone = end {
                    ctl.abort();
                }
                // let the writer put the close frame on the wire
                let _ = tokio::time::timeout(Duration::from_secs(2), &mut writer).await;
            }
            _ = &mut writer => {}
        }
        match ctl.code() {
            ABORT => 1006,
            c => c as u16,
        }
    };
    session.leave_all().await;
    app.sessions.remove(socket);
    app.metrics.connection_closed(signed_in, closed_code);
}

impl Session {
    async fn read_loop<R: AsyncRead + Unpin>(&mut self, ws: &mut WebSocketRead<R>) -> ReadEnd {
        let idle = self.app.cfg.server.idle_timeout();
        let max = self.app.cfg.server.max_frame_bytes;
        let mut fragments: Option<(OpCode, Vec<u8>)> = None;
        let pong_out = self.out.tx.clone();
        let mut send_fn = move |f: Frame<'_>| {
            // obligated pong for a client ping
            let _ = pong_out.try_send(Out::Pong(Bytes::copy_from_slice(&f.payload)));
            std::future::ready(Ok::<(), std::convert::Infallible>(()))
        };
        loop {
            let frame = match tokio::time::timeout(idle, ws.read_frame(&mut send_fn)).await {
                Err(_) => {
                    self.out.ctl.close(close::IDLE_TIMEOUT);
                    return ReadEnd::Closing;
                }
                Ok(Err(e)) => {
                    return match e {
                        WebSocketError::FrameTooLarge => {
                            self.out.ctl.close(close::TOO_BIG);
                            ReadEnd::Closing
                        }
                        WebSocketError::InvalidUTF8 => {
                            self.out.ctl.close(close::MALFORMED);
                            ReadEnd::Closing
                        }
                        WebSocketError::UnexpectedEOF
                        | WebSocketError::ConnectionClosed
                        | WebSocketError::IoError(_) => ReadEnd::Gone,
                        _ => {
                            self.out.ctl.close(1002);
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
                    self.out.ctl.close(code);
                    return ReadEnd::Closing;
                }
                OpCode::Ping | OpCode::Pong => continue,
                OpCode::Text | OpCode::Binary if frame.fin => {
                    if fragments.is_some() {
                        self.out.ctl.close(1002);
                        return ReadEnd::Closing;
                    }
                    (frame.opcode, frame.payload.to_vec())
                }
                OpCode::Text | OpCode::Binary => {
                    if fragments.is_some() {
                        self.out.ctl.close(1002);
                        return ReadEnd::Closing;
                    }
                    fragments = Some((frame.opcode, frame.payload.to_vec()));
                    continue;
                }
                OpCode::Continuation => {
                    let Some((_, buf)) = fragments.as_mut() else {
                        self.out.ctl.close(1002);
                        return ReadEnd::Closing;
                    };
                    if buf.len() + frame.payload.len() > max {
                        self.out.ctl.close(close::TOO_BIG);
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
            match decoded {
                Ok(f) => self.handle(f).await,
                Err(e) => {
                    tracing::debug!(socket = self.socket, error = %e, "malformed frame");
                    self.out.ctl.close(close::MALFORMED);
                    return ReadEnd::Closing;
                }
            }
            if self.out.ctl.code() != 0 {
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
        if let Err(refusal) = app.policy.check(&ch.identity, &f.event) {
            app.metrics.push(match refusal {
                PushRefusal::NotSignedIn => push_result::NOT_SIGNED_IN,
                PushRefusal::UnknownEvent => push_result::UNKNOWN_EVENT,
            });
            return self.reply_error(&f, refusal.reason());
        }
        let Some(user) = ch.identity.user() else {
            return self.reply_error(&f, reason::NOT_SIGNED_IN);
        };
        let Payload::Json(mut payload) = f.payload.clone() else {
            app.metrics.push(push_result::INVALID);
            return self.reply_error(&f, reason::BINARY_UNSUPPORTED);
        };
        if f.event == "new_msg" {
            match payload.get("body") {
                Some(Value::String(b))
                    if !b.is_empty() && b.len() <= app.cfg.rooms.max_body_bytes => {}
                _ => {
                    app.metrics.push(push_result::INVALID);
                    return self.reply_error(&f, reason::INVALID_PAYLOAD);
                }
            }
        }
        // identity only ever from the token
        payload.insert(
            "user".into(),
            json!({"id": user.id, "username": user.username}),
        );
        payload.insert("at".into(), json!(now_ms()));
        let frame = protocol::broadcast(&f.topic, &f.event, &Value::Object(payload));
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

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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
async fn write_loop<W: AsyncWrite + Unpin>(mut rx: mpsc::Receiver<Out>, ctl: Arc<Ctl>, mut w: W) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        tokio::select! {
            biased;
            _ = ctl.notify.notified() => {}
            m = rx.recv() => match m {
                Some(m) => {
                    let mut next = Some(m);
                    let mut n = 0;
                    while let Some(m) = next.take() {
                        if write_out(&mut w, &mut buf, m).await.is_err() {
                            ctl.abort();
                            return;
                        }
                        n += 1;
                        if n < BATCH {
                            next = rx.try_recv().ok();
                        }
                    }
                    if !buf.is_empty() && w.write_all(&buf).await.is_err() {
                        ctl.abort();
                        return;
                    }
                    buf.clear();
                    // an idle socket keeps no write buffer beyond a small one
                    if buf.capacity() > KEEP_BUFFER {
                        buf = Vec::new();
                    }
                }
                None => return,
            },
        }
        match ctl.code() {
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

/// Adds a frame to the batch; a large one is written directly, after what is batched before it.
async fn write_out<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &mut Vec<u8>,
    m: Out,
) -> std::io::Result<()> {
    let (Out::Text(body) | Out::Pong(body)) = &m;
    if body.len() <= COPY_LIMIT {
        put(buf, &m);
        return Ok(());
    }
    put_head(buf, &m);
    w.write_all(buf).await?;
    buf.clear();
    w.write_all(body).await
}

/// The frame header: FIN + opcode, then the payload length (server frames are not masked).
fn put_head(buf: &mut Vec<u8>, m: &Out) {
    let (op, n) = match m {
        Out::Text(b) => (0x81u8, b.len()),
        Out::Pong(b) => (0x8Au8, b.len()),
    };
    buf.push(op);
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

fn put(buf: &mut Vec<u8>, m: &Out) {
    put_head(buf, m);
    let (Out::Text(body) | Out::Pong(body)) = m;
    buf.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_text_with_the_right_header() {
        let mut b = Vec::new();
        put(&mut b, &Out::Text(Bytes::from_static(b"hi")));
        assert_eq!(b, vec![0x81, 2, b'h', b'i']);
        let mut b = Vec::new();
        put(&mut b, &Out::Text(Bytes::from(vec![b'x'; 300])));
        assert_eq!(&b[..4], &[0x81, 126, 1, 44]);
        assert_eq!(b.len(), 304);
        let mut b = Vec::new();
        put(&mut b, &Out::Text(Bytes::from(vec![b'x'; 70_000])));
        assert_eq!(&b[..2], &[0x81, 127]);
        assert_eq!(u64::from_be_bytes(b[2..10].try_into().unwrap()), 70_000);
    }

    #[test]
    fn first_close_request_wins() {
        let c = Ctl::default();
        c.close(close::SLOW_CONSUMER);
        c.close(close::RESTART);
        assert_eq!(c.code(), u32::from(close::SLOW_CONSUMER));
    }
}
