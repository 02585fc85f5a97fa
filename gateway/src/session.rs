//! One WebSocket connection: its joined channels and their join_refs, its idle deadline, its
//! refused-join count and its push and join rate limits. Its outbound side (the bounded queue and
//! the writer) is an [`Outbox`].
//!
//! The reader turns frames into messages with [`crate::wsmessage`] (fragments under
//! `server.max_frame_bytes`, UTF-8, close codes), decodes Phoenix frames and applies the rules
//! (`rooms`), calling into the [`crate::fanout::Hub`] for joins, leaves and broadcasts.
//!
//! A push that waits on the application (the publish hook) does not stop the reader: it queues,
//! in order, in the socket's [`pushes`] queue.
//!
//! Redis keys and other sessions are out of reach from here.
//!
//! This file holds a connection's life: its setup, the read loop, and leave and push. A join (the
//! longest of the three things a client asks) is in `join`, the channel list in `channels`, the
//! idle timeout in `idle`; framing (`wsread`, `wsmessage`), the writer (`outbox`), the hook queue
//! (`pushes`) and the rules (`rooms`) live apart.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::app::App;
use crate::auth::{AuthError, Identity};
use crate::expiry::{Expiring, ExpiryKey};
use crate::fanout::Room;
use crate::metrics::push_result;
use crate::outbox::{Limits, NO_STATUS, Outbox};
use crate::protocol::{self, Inbound, Payload, close, reason};
use crate::rooms::PushRefusal;
use crate::wsmessage::{Assembler, Event, Message, Violation};
use crate::wsread::FrameReader;

mod channels;
pub mod idle;
mod join;
mod pushes;
use channels::Channels;
use pushes::{Broadcast, PushQueue, ReplyTo};

struct Channel {
    room: Arc<Room>,
    join_ref: Arc<str>,
    identity: Identity,
    /// The channel's own token (`guardian_token`) in the node's deadline list.
    expiry: Option<ExpiryKey>,
}

struct Session {
    app: Arc<App>,
    socket: u64,
    identity: Identity,
    /// Why the connection's token was refused, told in every join reply that uses it (boxed:
    /// rare, and 40 bytes inline in every socket's task).
    auth_error: Option<Box<AuthError>>,
    channels: Channels,
    out: Outbox,
    /// Joins refused in the current minute (see `server.max_refused_joins_per_min`).
    refused_joins: u32,
    /// On the idle clock (`idle::ms`).
    refused_since_ms: u64,
    /// `server.push_rate_per_s` / `server.push_burst`.
    pushes: Bucket,
    /// `server.join_rate_per_s` / `server.join_burst`.
    joins: Bucket,
    /// Pushes waiting on the publish hook, and the replies and pushes queued behind them.
    queue: PushQueue,
}

/// A token bucket: `rate` tokens a second, at most `burst` held. 16 bytes: it is in every
/// socket's task.
struct Bucket {
    /// Tokens left as of `at_ms`.
    tokens: f32,
    /// On the idle clock (`idle::ms`), milliseconds.
    at_ms: u64,
}

impl Bucket {
    fn full(burst: u32) -> Self {
        Bucket {
            tokens: burst as f32,
            at_ms: idle::ms(tokio::time::Instant::now()),
        }
    }

    /// Takes one token, or says the action is over the limit.
    fn take(&mut self, rate: u32, burst: u32) -> bool {
        let now = idle::ms(tokio::time::Instant::now());
        let refill = now.saturating_sub(self.at_ms) as f32 / 1000.0 * rate as f32;
        self.tokens = (self.tokens + refill).min(burst as f32);
        self.at_ms = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// How long a socket we closed is read (and discarded) for the client's own close, at most.
const LINGER: Duration = Duration::from_secs(2);

/// What the reader does after a read.
enum Step<'a> {
    /// Read on.
    Next,
    /// Stop reading.
    End(ReadEnd),
    /// A join, leave or push to run first.
    Run(std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'a>>),
}

/// Why the reader stopped.
enum ReadEnd {
    /// A close frame was queued (ours or the echo of the client's).
    Closing,
    /// The peer is gone (EOF, reset): nothing can be written.
    Gone,
}

/// Sets up one upgraded connection and returns the task that serves it until it closes, then
/// removes its presence. `early`: bytes the HTTP layer read past the upgrade request; `permit`
/// (the node's connection limit) is held for the connection's life: as the session's own (given
/// back when the session drops), not as a 16-byte permit in the task.
///
/// The setup runs here, not in the task: the task's future then holds the session's state once,
/// as its captures, instead of the arguments and the state built from them side by side (an
/// `async fn` keeps its arguments for its whole life). Every open socket's task is this future.
pub fn run(
    app: Arc<App>,
    (read, early): (OwnedReadHalf, Bytes),
    write: OwnedWriteHalf,
    (identity, auth_error): (Identity, Option<AuthError>),
    (socket, deflate): (u64, bool),
    permit: tokio::sync::OwnedSemaphorePermit,
) -> impl Future<Output = ()> + Send + 'static {
    let out = Outbox::new(
        Limits {
            frames: app.cfg.server.outbound_queue,
            bytes: app.cfg.server.outbound_queue_bytes,
        },
        app.metrics.clone(),
    )
    .deflating(deflate);
    let signed_in = identity.user().is_some();
    app.metrics.connection_opened(signed_in);
    if deflate {
        app.metrics.compressed_connection(1);
    }
    app.sessions
        .insert(socket, out.clone(), identity.user().map(|u| u.id.as_str()));
    if app.is_draining() {
        // upgraded after the drain began (and perhaps after it closed the sessions it saw):
        // told to reconnect elsewhere like every other socket of this node
        out.close(close::RESTART);
    }
    let mut session = Session {
        app: app.clone(),
        socket,
        identity,
        auth_error: auth_error.map(Box::new),
        channels: Channels::default(),
        out: out.clone(),
        refused_joins: 0,
        refused_since_ms: idle::ms(tokio::time::Instant::now()),
        pushes: Bucket::full(app.cfg.server.push_burst),
        joins: Bucket::full(app.cfg.server.join_burst),
        queue: PushQueue::default(),
    };
    // the connection's token ends the socket when it expires (4001); boxed, as few sockets have one
    let expiry = session.identity.user().map(|u| {
        Box::new(
            app.expiries
                .add(u.valid_until_ms, Expiring::Socket(out.clone())),
        )
    });
    // the place is the session's from now on: `Drop for Session` gives it back
    permit.forget();
    let mut ws = FrameReader::new(read, early, app.cfg.server.max_frame_bytes).deflating(deflate);
    // The reader runs to the end: it is never dropped in the middle of a join or leave (which
    // would leave presence half-written). Senders write to the socket directly; a writer task
    // runs only while the kernel pushes back, and for the close. Whichever side stops first
    // makes the other stop: the reader sets a close code or aborts, a close asked for by anyone
    // (the writer included) wakes the reader.
    out.attach(write, app.cfg.server.write_timeout());
    // The captures are the task's whole state: borrowed, never moved into locals, and the read
    // loop is inline (each nested `async fn` would hold its own copies of its arguments).
    async move {
        let out = session.out.clone();
        // a fragmented message has idle_timeout from its first fragment (DESIGN §14)
        let max = session.app.cfg.server.max_frame_bytes;
        let mut messages = Assembler::new(max, session.app.cfg.server.idle_timeout());
        let end = loop {
            let step = {
                let now = tokio::time::Instant::now();
                let idle = session.app.cfg.server.idle_timeout();
                let until = match messages.deadline() {
                    Some(d) => (now + idle).min(tokio::time::Instant::from_std(d)),
                    None => now + idle,
                };
                // nothing for idle_timeout, or a fragmented message unfinished in time: the
                // node's idle sweep closes the socket with 4000 (no timer per socket)
                out.set_idle_deadline(idle::ms(until));
                // all an idle socket's task holds while it waits: no timer, no wait list
                let read = std::future::poll_fn(|cx| {
                    // a close asked for by anyone (the writer, a drain, the idle sweep)
                    if out.poll_closing(cx).is_ready() {
                        return std::task::Poll::Ready(None);
                    }
                    ws.poll_next(cx).map(Some)
                })
                .await;
                session.take(read, &mut messages)
            };
            match step {
                Step::Next => {}
                Step::End(end) => break end,
                // boxed: an idle socket's task holds only the read state, not a join's
                Step::Run(work) => work.await,
            }
            if out.code() != 0 {
                break ReadEnd::Closing;
            }
        };
        let gone = matches!(end, ReadEnd::Gone);
        if gone {
            out.abort();
        }
        // pushes still waiting on the application are abandoned: no reply could reach the client
        session.queue.stop();
        // the close frame is out (or the peer gone) and our side shut
        out.ended().await;
        if !gone {
            // the close frame is out and our side shut: the descriptor is closed once the client
            // has closed too (or after LINGER), not under data it is still sending
            tokio::spawn(ws.linger(LINGER));
        }
        Box::pin(session.end(expiry.as_deref().copied(), (signed_in, deflate))).await;
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // the connection's place under `server.max_connections` (see `run`)
        self.app.release_connection();
    }
}

impl Session {
    /// The connection's id in presence (`<node>.<socket>`): made when a join, leave or hooked
    /// push needs it, not kept in every idle socket.
    fn conn(&self) -> Arc<str> {
        Arc::from(format!("{}.{}", self.app.node, self.socket))
    }

    /// After the close: the channels leave, the socket is forgotten.
    async fn end(&mut self, expiry: Option<ExpiryKey>, (signed_in, deflate): (bool, bool)) {
        let app = self.app.clone();
        let closed_code = self.out.closed_code();
        // nothing more is queued for this socket, whoever still holds its outbox
        self.out.abort();
        if let Some(k) = expiry {
            app.expiries.remove(k);
        }
        self.leave_all().await;
        app.sessions.remove(self.socket);
        app.metrics.connection_closed(signed_in, closed_code);
        if deflate {
            app.metrics.compressed_connection(-1);
        }
    }
}

impl Session {
    /// What a read gives: nothing to do yet (a fragment, a ping answered), the end, or a
    /// message's work. Not async, so that nothing of a frame is kept in the task while it waits.
    fn take(
        &mut self,
        read: Option<Result<crate::wsread::Frame, crate::wsread::ReadError>>,
        messages: &mut Assembler,
    ) -> Step<'_> {
        let frame = match read {
            // a close was asked for
            None => return Step::End(ReadEnd::Closing),
            Some(Err(e)) => match Violation::of_read(&e) {
                None => return Step::End(ReadEnd::Gone),
                Some(v) => {
                    self.out.close(v.close_code());
                    return Step::End(ReadEnd::Closing);
                }
            },
            Some(Ok(f)) => f,
        };
        let message = match messages.push(frame, tokio::time::Instant::now().into_std()) {
            Ok(Event::Message(m)) => m,
            Ok(Event::Partial | Event::Pong) => return Step::Next,
            Ok(Event::Ping(payload)) => {
                self.out.pong(Bytes::from(payload));
                return Step::Next;
            }
            Ok(Event::Close(code)) => {
                self.out.echo_close(code.unwrap_or(NO_STATUS));
                return Step::End(ReadEnd::Closing);
            }
            Err(v) => {
                tracing::debug!(socket = self.socket, error = %v, "refused frame; closing");
                self.out.close(v.close_code());
                return Step::End(ReadEnd::Closing);
            }
        };
        let decoded = match &message {
            Message::Text(t) => protocol::decode_text(t),
            Message::Binary(b) => protocol::decode_binary(b),
        };
        if self.out.code() != 0 {
            // closing: a frame that was already buffered is not acted upon
            return Step::End(ReadEnd::Closing);
        }
        let f = match decoded {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(socket = self.socket, error = %e, "malformed frame");
                self.out.close(close::MALFORMED);
                return Step::End(ReadEnd::Closing);
            }
        };
        match (f.topic.as_str(), f.event.as_str()) {
            ("phoenix", "heartbeat") => {
                self.out
                    .send(protocol::heartbeat_reply(f.reference.as_deref()));
                Step::Next
            }
            (_, "phx_join") => Step::Run(Box::pin(self.join(f))),
            (_, "phx_leave") => Step::Run(Box::pin(self.leave(f))),
            _ => Step::Run(Box::pin(self.push(f))),
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
            self.end_channel(&ch).await;
            self.out.send(reply);
            self.out.send(protocol::phx_close(&ch.join_ref, &f.topic));
        }
    }

    /// A push reply, released after the replies of the socket's earlier pushes (DESIGN §12).
    fn push_reply(&mut self, frame: Bytes) {
        if self.queue.busy() {
            self.queue.reply(&self.app, &self.out, &self.conn(), frame);
        } else {
            self.out.send(frame);
        }
    }

    fn push_error(&mut self, f: &Inbound, why: &str) {
        let frame =
            protocol::reply_error(f.join_ref.as_deref(), f.reference.as_deref(), &f.topic, why);
        self.push_reply(frame);
    }

    async fn push(&mut self, f: Inbound) {
        let app = self.app.clone();
        let Some(ch) = self.channels.get(&f.topic) else {
            return self.push_reply(protocol::reply_error(
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
                self.end_channel(&ch).await;
            }
            return self.push_error(&f, reason::ROOM_DOES_NOT_EXIST);
        }
        let s = &app.cfg.server;
        if !self.pushes.take(s.push_rate_per_s, s.push_burst) {
            app.metrics.push(push_result::RATE_LIMITED);
            return self.push_error(&f, reason::RATE_LIMITED);
        }
        let Some(ch) = self.channels.get(&f.topic) else {
            return;
        };
        if ch
            .identity
            .user()
            .is_some_and(|u| u.valid_until_ms < crate::unix_ms())
        {
            // the channel's token ran out (its presence is leaving): no more writes with it
            app.metrics.push(push_result::NOT_SIGNED_IN);
            return self.push_error(&f, reason::TOKEN_EXPIRED);
        }
        if !ch.room.is_member(self.socket, &ch.join_ref) {
            // kicked (its phx_close is out): the channel is gone, as after a leave
            let topic = f.topic.clone();
            if let Some(ch) = self.channels.remove(&topic) {
                self.end_channel(&ch).await;
            }
            return self.push_error(&f, reason::UNMATCHED_TOPIC);
        }
        let Some(ch) = self.channels.get(&f.topic) else {
            return;
        };
        let refusal = |refusal: PushRefusal| {
            app.metrics.push(match refusal {
                PushRefusal::NotSignedIn => push_result::NOT_SIGNED_IN,
                PushRefusal::UnknownEvent => push_result::UNKNOWN_EVENT,
                PushRefusal::InvalidPayload => push_result::INVALID,
            });
            refusal.reason()
        };
        if let Err(r) = app.policy.check(&ch.identity, &f.event) {
            let why = refusal(r);
            return self.push_error(&f, why);
        }
        // anonymous: an event of `rooms.anonymous_events`, broadcast with "user": null
        let user = ch.identity.user();
        let Payload::Json(payload) = &f.payload else {
            app.metrics.push(push_result::INVALID);
            return self.push_error(&f, reason::BINARY_UNSUPPORTED);
        };
        // only the body is the client's; the sender comes from the token, every other field is
        // dropped (see `rooms::broadcast_payload`)
        let at_ms = crate::unix_ms();
        let payload = match crate::rooms::broadcast_payload(
            &f.event,
            payload,
            user,
            at_ms,
            app.cfg.rooms.max_body_bytes,
        ) {
            Ok(p) => p,
            Err(r) => {
                let why = refusal(r);
                return self.push_error(&f, why);
            }
        };
        let room = ch.room.clone();
        let channel = ch.join_ref.clone();
        let identity = ch.identity.clone();
        let reply = ReplyTo {
            join_ref: f.join_ref.clone(),
            reference: f.reference.clone(),
            topic: f.topic.clone(),
        };
        let hooked = app
            .publish_hook
            .as_ref()
            .is_some_and(|h| h.applies_to(&f.event));
        if hooked || self.queue.busy() {
            // the application decides, or an earlier push of this socket still waits on it:
            // in order, without holding up the reader
            if self.queue.publishes() >= s.push_burst as usize {
                app.metrics.push(push_result::RATE_LIMITED);
                return self.push_error(&f, reason::RATE_LIMITED);
            }
            let p = pushes::Publish {
                room,
                socket: self.socket,
                channel,
                event: f.event.clone(),
                payload,
                identity,
                hooked,
                at_ms,
                reply,
            };
            return self.queue.publish(&app, &self.out, &self.conn(), p);
        }
        let done = pushes::broadcast(&app, &self.out, &room, &f.event, &payload, &reply).await;
        if let Broadcast::NoRoom = done
            && let Some(ch) = self.channels.remove(&f.topic)
        {
            self.end_channel(&ch).await;
        }
    }

    /// A channel ends: its token's deadline goes, its presence leaves.
    async fn end_channel(&self, ch: &Channel) {
        if let Some(k) = ch.expiry {
            self.app.expiries.remove(k);
            // it was signed in with its own token
            self.publish_users();
        }
        self.app
            .hub
            .leave(&ch.room, self.socket, &self.conn())
            .await;
    }

    /// Tells the node's registry which users are signed in on this socket (the connection's
    /// token's and its channels' own), so a disconnect of any of them closes it.
    fn publish_users(&self) {
        let mut users: Vec<Arc<str>> = Vec::new();
        let all =
            std::iter::once(&self.identity).chain(self.channels.values().map(|c| &c.identity));
        for u in all.filter_map(Identity::user) {
            if !users.iter().any(|x| **x == *u.id) {
                users.push(Arc::from(u.id.as_str()));
            }
        }
        self.app.sessions.set_users(self.socket, users);
    }

    async fn leave_all(&mut self) {
        for ch in self.channels.take() {
            self.end_channel(&ch).await;
        }
    }
}
