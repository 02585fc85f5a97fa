//! A socket's pushes that wait on the publish hook, kept in order without stopping the reader.
//!
//! DESIGN §12: per socket, across its channels, the reply and broadcast of push N+1 are released
//! only after those of push N; other sockets never wait, and neither do this socket's heartbeats,
//! joins and leaves. So the reader never awaits the application: a push that goes through the hook
//! becomes a job of this FIFO, worked by one small task per socket, one job at a time (the
//! application also sees the socket's pushes in order). While any job is queued, every later push
//! of the socket, hooked or not, and every push reply (a refusal included) queues behind it; when
//! the queue is empty the reader publishes directly, as without a hook. The task is spawned at
//! the socket's first hooked push, so a socket that never makes one pays nothing.
//!
//! Bounds: jobs that publish at most `server.push_burst` (more: `rate limited`, in order); jobs of
//! any kind at most `server.outbound_queue` (more: the socket is a slow consumer, 4008) — the
//! replies would have filled its outbound queue anyway.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::app::App;
use crate::auth::Identity;
use crate::fanout::Room;
use crate::history::HistoryError;
use crate::hooks::{Push, Verdict};
use crate::metrics::push_result;
use crate::outbox::Outbox;
use crate::protocol::{self, close, reason};

/// Where a push's reply goes.
pub(super) struct ReplyTo {
    pub join_ref: Option<String>,
    pub reference: Option<String>,
    pub topic: String,
}

impl ReplyTo {
    fn ok(&self) -> Bytes {
        protocol::reply_ok(
            self.join_ref.as_deref(),
            self.reference.as_deref(),
            &self.topic,
            json!({}),
        )
    }
    fn error(&self, why: &str) -> Bytes {
        protocol::reply_error(
            self.join_ref.as_deref(),
            self.reference.as_deref(),
            &self.topic,
            why,
        )
    }
}

/// An allowed push, its broadcast payload built (`rooms::broadcast_payload`).
pub(super) struct Publish {
    pub room: Arc<Room>,
    /// The socket and the channel's join_ref: a push whose channel was left (or kicked, or
    /// replaced by a rejoin) before its turn or its answer is not broadcast.
    pub socket: u64,
    pub channel: Arc<str>,
    pub event: String,
    pub payload: Value,
    pub identity: Identity,
    /// Whether the application is asked first.
    pub hooked: bool,
    pub at_ms: i64,
    pub reply: ReplyTo,
}

enum Job {
    /// A reply released in its turn (a refusal decided by the reader).
    Reply(Bytes),
    Publish(Publish),
}

#[derive(Default)]
struct Counts {
    /// Jobs queued and not finished.
    jobs: AtomicUsize,
    /// Of which publishing ones.
    publishes: AtomicUsize,
}

struct Running {
    tx: mpsc::UnboundedSender<Job>,
    task: JoinHandle<()>,
    counts: Arc<Counts>,
}

/// The socket's queue; empty and task-less until its first hooked push (boxed: 8 bytes in every
/// socket's task until then).
#[derive(Default)]
pub(super) struct PushQueue {
    running: Option<Box<Running>>,
}

impl PushQueue {
    /// Whether a job is queued or in progress: a push reply must then queue behind it.
    pub fn busy(&self) -> bool {
        self.running
            .as_ref()
            .is_some_and(|r| r.counts.jobs.load(Ordering::Acquire) > 0)
    }

    /// Publishing jobs queued or in progress.
    pub fn publishes(&self) -> usize {
        self.running
            .as_ref()
            .map_or(0, |r| r.counts.publishes.load(Ordering::Acquire))
    }

    /// Queues a reply behind the jobs before it (only while [`Self::busy`]).
    pub fn reply(&mut self, app: &Arc<App>, out: &Outbox, conn: &Arc<str>, frame: Bytes) {
        self.enqueue(app, out, conn, Job::Reply(frame));
    }

    /// Queues a push to be (asked about and) published in its turn.
    pub fn publish(&mut self, app: &Arc<App>, out: &Outbox, conn: &Arc<str>, p: Publish) {
        self.enqueue(app, out, conn, Job::Publish(p));
    }

    fn enqueue(&mut self, app: &Arc<App>, out: &Outbox, conn: &Arc<str>, job: Job) {
        let r = self.running.get_or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let counts = Arc::new(Counts::default());
            let task = tokio::spawn(work(
                app.clone(),
                out.clone(),
                conn.clone(),
                rx,
                counts.clone(),
            ));
            Box::new(Running { tx, task, counts })
        });
        if r.counts.jobs.load(Ordering::Acquire) >= app.cfg.server.outbound_queue {
            // replies piling up faster than the application answers: as a full outbound queue
            tracing::debug!(conn = %conn, "push queue full; closing");
            app.metrics.slow_consumer();
            out.close(close::SLOW_CONSUMER);
            return;
        }
        let publishes = matches!(job, Job::Publish(_));
        r.counts.jobs.fetch_add(1, Ordering::AcqRel);
        if publishes {
            r.counts.publishes.fetch_add(1, Ordering::AcqRel);
        }
        if r.tx.send(job).is_err() {
            // the task is gone only after `stop`; nothing is waiting for the job
            r.counts.jobs.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// The socket ended: what still waits is abandoned (its replies could not be delivered).
    pub fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.task.abort();
        }
    }
}

/// The socket's worker: one job at a time, in order.
async fn work(
    app: Arc<App>,
    out: Outbox,
    conn: Arc<str>,
    mut rx: mpsc::UnboundedReceiver<Job>,
    counts: Arc<Counts>,
) {
    while let Some(job) = rx.recv().await {
        let publishes = match job {
            Job::Reply(frame) => {
                out.send(frame);
                false
            }
            Job::Publish(p) => {
                publish(&app, &out, &conn, p).await;
                true
            }
        };
        // after the job's reply is queued: a reader that sees no job may answer directly
        if publishes {
            counts.publishes.fetch_sub(1, Ordering::AcqRel);
        }
        counts.jobs.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Asks the application (a hooked push), then publishes and replies.
async fn publish(app: &App, out: &Outbox, conn: &str, p: Publish) {
    // the channel ended while the push waited its turn: the application is not asked
    if !p.room.is_member(p.socket, &p.channel) {
        out.send(p.reply.error(reason::UNMATCHED_TOPIC));
        return;
    }
    let mut payload = p.payload;
    if p.hooked
        && let Some(hook) = &app.publish_hook
    {
        let push = Push {
            room: &p.room.id,
            event: &p.event,
            body: &payload["body"],
            user: p.identity.user(),
            conn,
            node: &app.node,
            at_ms: p.at_ms,
        };
        let refused = |label: &'static str, why: &str| {
            app.metrics.push(label);
            out.send(p.reply.error(why));
        };
        match hook.call(&push).await {
            Verdict::Broadcast(None) => {}
            Verdict::Broadcast(Some(replaced)) => payload = replaced,
            Verdict::Ack => {
                app.metrics.push(push_result::OK);
                out.send(p.reply.ok());
                return;
            }
            Verdict::Refuse(why) => return refused(push_result::REFUSED, &why),
            Verdict::InvalidBody => {
                return refused(push_result::INVALID, reason::INVALID_PAYLOAD);
            }
            Verdict::Unavailable => return refused(push_result::UNAVAILABLE, "unavailable"),
        }
        // the channel ended while the application decided (as in Phoenix, where no handle_in
        // runs after a leave): nothing is broadcast, and the reply, which phoenix.js drops for
        // a closed channel anyway, says so
        if !p.room.is_member(p.socket, &p.channel) {
            out.send(p.reply.error(reason::UNMATCHED_TOPIC));
            return;
        }
    }
    broadcast(app, out, &p.room, &p.event, &payload, &p.reply).await;
}

/// What became of a broadcast.
pub(super) enum Broadcast {
    Done,
    /// The room was deleted meanwhile (the hub closed its channels); nothing was written.
    NoRoom,
    Failed,
}

/// Publishes `payload` to the room and answers the client.
pub(super) async fn broadcast(
    app: &App,
    out: &Outbox,
    room: &Room,
    event: &str,
    payload: &Value,
    reply: &ReplyTo,
) -> Broadcast {
    match app.hub.publish(room, event, payload).await {
        Ok(_) => {
            app.metrics.push(push_result::OK);
            out.send(reply.ok());
            Broadcast::Done
        }
        Err(HistoryError::NoRoom) => {
            out.send(reply.error(reason::ROOM_DOES_NOT_EXIST));
            Broadcast::NoRoom
        }
        Err(e) => {
            tracing::warn!(room = %room.id, error = %e, "broadcast failed");
            app.metrics.push(push_result::UNAVAILABLE);
            out.send(reply.error("unavailable"));
            Broadcast::Failed
        }
    }
}
