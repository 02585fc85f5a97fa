//! The events hook (DESIGN §12): the presence edges the scripts report — `member_added`,
//! `member_removed`, `room_occupied`, `room_vacated` — queued by the node whose script call made
//! each change ([`EventsHook::report`], called by `presence::Store`) and posted in order to
//! `hooks.events_url` as `{"events":[...]}`, signed like the publish hook.
//!
//! One sender per node sends one batch at a time, so one room's events leave a node in the order
//! its scripts returned them (several nodes' events of one room are ordered by `seq`). A batch
//! holds at most `hooks.events_batch` events and waits at most `hooks.events_interval_ms` for more.
//! A batch answered with another status than 2xx, or not within `hooks.timeout_ms`, is sent again
//! — the same bytes, so the same ids — after 1 s, the delay doubling up to 10 s, until
//! `hooks.events_retry_s` have passed since its first attempt; then it is dropped and counted.
//! The queue is bounded ([`QUEUE_MAX`]): past it the oldest events are dropped and counted.
//!
//! Delivery survives a crash of the node through the room's outbox in Redis (`<p>:room:{R}:unacked`,
//! written by the same script call that reported the event; see lua/common.lua): an event reported
//! with its outbox key is acknowledged there — its entry deleted through the [`Outbox`] attached
//! by `presence::Store` — once a 2xx answered its batch, or when it was dropped. Until then a
//! script that finds this node dead takes it over and another node posts it again, same id.
//!
//! Knows nothing of Redis or sockets: events arrive as [`Event`]s, already decided, and leave
//! through the [`Outbox`] as ids.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Uri};
use serde_json::json;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::{Config, ConfigError};
use crate::httpclient::{self, HttpClient, HttpError};
use crate::metrics::{Metrics, hook_event_result, hook_kind, hook_outcome};

/// Events queued on a node at most. An event is about 150 bytes, so this bounds the queue near
/// 15 MB — minutes of heavy churn while the application is away — rather than letting an
/// unreachable application grow the node's memory without end.
pub const QUEUE_MAX: usize = 100_000;
/// The first retry of a failed batch comes this long after the failure ...
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// ... and the delay doubles up to this: an application back after an outage hears from every
/// node within 10 s, without every node hammering it while it is down.
const RETRY_MAX: Duration = Duration::from_secs(10);
/// How long after the last attempt a node may still hold an unacknowledged event of its own
/// beyond its retry window (a batch waiting in a long queue, a slow acknowledgement): past the
/// window plus this, the heartbeat's scan re-reports it (a lost script reply or acknowledgement).
const STALE_MARGIN: Duration = Duration::from_secs(30);
/// The answer's body is not read (any 2xx is an acknowledgement); a little is allowed so a
/// keep-alive connection is left clean.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    MemberAdded,
    MemberRemoved,
    RoomOccupied,
    RoomVacated,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::MemberAdded => "member_added",
            EventKind::MemberRemoved => "member_removed",
            EventKind::RoomOccupied => "room_occupied",
            EventKind::RoomVacated => "room_vacated",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "member_added" => EventKind::MemberAdded,
            "member_removed" => EventKind::MemberRemoved,
            "room_occupied" => EventKind::RoomOccupied,
            "room_vacated" => EventKind::RoomVacated,
            _ => return None,
        })
    }
}

/// One edge, as a script call reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// The room id (`lobby`, not the topic).
    pub room: String,
    /// `(sub, username)` on member events; `None` on `room_*` events.
    pub user: Option<(String, String)>,
    /// The room's presence seq of the change.
    pub seq: u64,
    /// Epoch ms of the change (Redis's clock, as the script saw it).
    pub at_ms: u64,
}

impl Event {
    /// `<room>:<seq>:<type>[:<user id>]`. Unique: a room's seq grows by one per change (and starts
    /// above every earlier one when its counter is lost), one change reports each user at most
    /// once and each room edge at most once, and room ids hold no `:`. Stable: it is computed from
    /// what the script returned, so every retry carries it unchanged.
    pub fn id(&self) -> String {
        match &self.user {
            Some((sub, _)) => format!("{}:{}:{}:{}", self.room, self.seq, self.kind.as_str(), sub),
            None => format!("{}:{}:{}", self.room, self.seq, self.kind.as_str()),
        }
    }

    /// The event's JSON: `{"id","type","room","user"?,"seq","at"}`.
    pub fn to_json(&self) -> Bytes {
        let mut v = json!({
            "id": self.id(),
            "type": self.kind.as_str(),
            "room": self.room,
            "seq": self.seq,
            "at": self.at_ms,
        });
        if let Some((id, username)) = &self.user {
            v["user"] = json!({"id": id, "username": username});
        }
        // a `Value` always serialises
        Bytes::from(serde_json::to_vec(&v).unwrap_or_default())
    }
}

/// The body of one request: `{"events":[e1,e2,...]}`.
pub fn batch_body<'a>(events: impl IntoIterator<Item = &'a Bytes>) -> Vec<u8> {
    let mut body = b"{\"events\":[".to_vec();
    for (i, e) in events.into_iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(e);
    }
    body.extend_from_slice(b"]}");
    body
}

/// The events' outbox entries in Redis, deleted once they are acknowledged or dropped (the
/// implementation is `presence::Store`'s: one `HDEL` per room).
pub trait Outbox: Send + Sync {
    /// Deletes, per outbox key (one room's), the entries of these event ids. Failures are the
    /// implementation's to log: an entry left behind is re-posted later (same id), never lost.
    fn ack(
        &self,
        entries: Vec<(Arc<str>, Vec<String>)>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// One queued event: its JSON and, when it has one, its outbox entry (key, event id).
struct Queued {
    json: Bytes,
    outbox: Option<(Arc<str>, String)>,
}

/// The outbox entries of `items`, grouped by key in first-seen order.
fn ack_entries<'a>(items: impl IntoIterator<Item = &'a Queued>) -> Vec<(Arc<str>, Vec<String>)> {
    let mut out: Vec<(Arc<str>, Vec<String>)> = Vec::new();
    for (key, id) in items.into_iter().filter_map(|q| q.outbox.as_ref()) {
        match out.iter_mut().find(|(k, _)| k == key) {
            Some((_, ids)) => ids.push(id.clone()),
            None => out.push((key.clone(), vec![id.clone()])),
        }
    }
    out
}

#[derive(Default)]
struct Queue {
    events: VecDeque<Queued>,
    /// Events dropped from a full queue whose outbox entries are still to be deleted.
    dropped: Vec<Queued>,
    /// A batch is being sent (or waits to be retried).
    busy: bool,
    /// Drain: send what is queued now, without waiting for a batch to fill.
    flush: bool,
}

/// The configured events hook of this node.
pub struct EventsHook {
    uri: Uri,
    secret: Vec<u8>,
    timeout: Duration,
    batch: usize,
    interval: Duration,
    retry_for: Duration,
    client: HttpClient,
    metrics: Metrics,
    queue: Mutex<Queue>,
    /// An event was queued, or the drain began.
    wake: Notify,
    /// Where acknowledged events' outbox entries are deleted (attached by `presence::Store`).
    outbox: OnceLock<Arc<dyn Outbox>>,
}

impl std::fmt::Debug for EventsHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventsHook")
            .field("uri", &self.uri)
            .finish()
    }
}

fn lock(q: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    q.lock().unwrap_or_else(|p| p.into_inner())
}

impl EventsHook {
    /// The hook of `hooks.events_url`, or `None` when it is unset. Reads the secret (a file that
    /// cannot be read, or a short secret, is an error: the start stops).
    pub fn from_config(cfg: &Config, metrics: Metrics) -> Result<Option<Self>, ConfigError> {
        let Some(url) = &cfg.hooks.events_url else {
            return Ok(None);
        };
        let uri: Uri = url.parse().map_err(|e| ConfigError::Invalid {
            key: "hooks.events_url",
            message: format!("{url:?}: {e}"),
        })?;
        let secret = cfg.hooks_secret()?.ok_or(ConfigError::Invalid {
            key: "hooks.secret",
            message: "required with hooks.events_url".into(),
        })?;
        let h = &cfg.hooks;
        Ok(Some(Self::new(
            uri,
            secret.into_bytes(),
            (h.timeout(), h.events_batch.max(1), h.events_interval()),
            h.events_retry(),
            metrics,
        )))
    }

    /// A hook posting to `uri`; `(timeout, batch, interval)` as in `[hooks]`.
    pub fn new(
        uri: Uri,
        secret: Vec<u8>,
        (timeout, batch, interval): (Duration, usize, Duration),
        retry_for: Duration,
        metrics: Metrics,
    ) -> Self {
        Self {
            uri,
            secret,
            timeout,
            batch,
            interval,
            retry_for,
            // one request at a time: one pooled connection is all it needs
            client: HttpClient::new(&httpclient::Options {
                max_idle_per_host: 1,
                ..httpclient::Options::default()
            }),
            metrics,
            queue: Mutex::default(),
            wake: Notify::new(),
            outbox: OnceLock::new(),
        }
    }

    /// Attaches the outbox acknowledged events are deleted from (once; later calls are ignored).
    pub fn attach_outbox(&self, outbox: Arc<dyn Outbox>) {
        let _ = self.outbox.set(outbox);
    }

    /// How long an event may sit unacknowledged in its room's outbox before the heartbeat's scan
    /// takes it over from its owner: the owner's whole retry window, one more request and
    /// backoff step, and [`STALE_MARGIN`].
    pub fn stale_after(&self) -> Duration {
        self.retry_for + self.timeout + RETRY_MAX + STALE_MARGIN
    }

    /// Queues `events` (in order) for sending; never waits. `outbox`: the key of the room's outbox
    /// holding them (acknowledged there once sent), `None` for events written to none. Over
    /// [`QUEUE_MAX`], the oldest queued events are dropped and counted.
    pub fn report(&self, events: &[Event], outbox: Option<&str>) {
        if events.is_empty() {
            return;
        }
        let mut dropped = 0;
        {
            let key: Option<Arc<str>> = outbox.map(Arc::from);
            let mut q = lock(&self.queue);
            for e in events {
                q.events.push_back(Queued {
                    json: e.to_json(),
                    outbox: key.clone().map(|k| (k, e.id())),
                });
            }
            while q.events.len() > QUEUE_MAX {
                if let Some(old) = q.events.pop_front()
                    && old.outbox.is_some()
                {
                    q.dropped.push(old);
                }
                dropped += 1;
            }
        }
        if dropped > 0 {
            self.metrics
                .hook_events(hook_event_result::DROPPED, dropped);
            tracing::warn!(dropped, "events hook queue full: dropped the oldest events");
        }
        self.wake.notify_one();
    }

    /// Events queued and not yet handed to a request.
    pub fn queued(&self) -> usize {
        lock(&self.queue).events.len()
    }

    /// The sender: runs for the life of the process.
    pub async fn run(self: Arc<Self>) {
        loop {
            // the first event of the next batch
            loop {
                let waiting = self.wake.notified();
                if !lock(&self.queue).events.is_empty() {
                    break;
                }
                waiting.await;
            }
            // then more, up to a full batch, for at most the interval
            let until = Instant::now() + self.interval;
            loop {
                let waiting = self.wake.notified();
                {
                    let q = lock(&self.queue);
                    if q.events.len() >= self.batch || q.flush {
                        break;
                    }
                }
                if tokio::time::timeout_at(until, waiting).await.is_err() {
                    break;
                }
            }
            let (batch, dropped): (Vec<Queued>, Vec<Queued>) = {
                let mut q = lock(&self.queue);
                let n = q.events.len().min(self.batch);
                q.busy = true;
                (
                    q.events.drain(..n).collect(),
                    std::mem::take(&mut q.dropped),
                )
            };
            self.deliver(&batch).await;
            // delivered or given up: either way its outbox entries go (and those of the events a
            // full queue dropped meanwhile)
            self.ack(batch.iter().chain(dropped.iter())).await;
            lock(&self.queue).busy = false;
        }
    }

    /// Deletes the outbox entries of `items` (nothing without an attached outbox).
    async fn ack<'a>(&self, items: impl IntoIterator<Item = &'a Queued>) {
        let entries = ack_entries(items);
        if let (false, Some(outbox)) = (entries.is_empty(), self.outbox.get()) {
            outbox.ack(entries).await;
        }
    }

    /// Sends one batch until it is acknowledged or its retry time is over.
    async fn deliver(&self, batch: &[Queued]) {
        let body = Bytes::from(batch_body(batch.iter().map(|q| &q.json)));
        let first = Instant::now();
        let mut delay = RETRY_FIRST;
        loop {
            let outcome = self.post(body.clone()).await;
            self.metrics.hook_request(hook_kind::EVENTS, outcome);
            if outcome == hook_outcome::OK {
                self.metrics
                    .hook_events(hook_event_result::SENT, batch.len());
                return;
            }
            if first.elapsed() + delay > self.retry_for {
                self.metrics
                    .hook_events(hook_event_result::DROPPED, batch.len());
                tracing::warn!(
                    events = batch.len(),
                    outcome,
                    retried_for_s = first.elapsed().as_secs(),
                    "events hook: batch dropped after its retries"
                );
                return;
            }
            tracing::debug!(
                events = batch.len(),
                outcome,
                ?delay,
                "events hook: retrying"
            );
            tokio::time::sleep(delay).await;
            self.metrics
                .hook_events(hook_event_result::RETRIED, batch.len());
            delay = (delay * 2).min(RETRY_MAX);
        }
    }

    /// One request; its outcome label.
    async fn post(&self, body: Bytes) -> &'static str {
        let req = Request::post(self.uri.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::USER_AGENT, httpclient::USER_AGENT)
            .header("x-gateway-signature", super::signature(&self.secret, &body))
            .body(Full::new(body));
        let Ok(req) = req else {
            // a URL that parsed as a `Uri` always builds a request; kept total
            return hook_outcome::HTTP_ERROR;
        };
        let started = std::time::Instant::now();
        let answer = self.client.send(req, self.timeout, MAX_ANSWER_BYTES).await;
        self.metrics
            .hook_duration(hook_kind::EVENTS, started.elapsed().as_secs_f64());
        match answer {
            Ok(r) if r.status.is_success() => hook_outcome::OK,
            Ok(_) => hook_outcome::HTTP_ERROR,
            Err(HttpError::Timeout(_)) => hook_outcome::TIMEOUT,
            // the answer was too long to read, but it was an answer: still not an acknowledgement
            Err(HttpError::TooLarge(_)) => hook_outcome::INVALID,
            Err(HttpError::Url(_) | HttpError::Request(_)) => hook_outcome::HTTP_ERROR,
        }
    }

    /// Drain: sends what is queued without waiting for batches to fill, and returns once nothing
    /// is queued or in flight, or at `until`, whichever comes first.
    pub async fn flush(&self, until: Instant) {
        lock(&self.queue).flush = true;
        self.wake.notify_one();
        loop {
            {
                let q = lock(&self.queue);
                if q.events.is_empty() && !q.busy {
                    return;
                }
            }
            if Instant::now() >= until {
                let left = self.queued();
                tracing::warn!(left, "events hook: drain time over with events unsent");
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[cfg(test)]
mod tests;
