//! Fan-out: the node's registry of rooms with local members, its one pub/sub connection, and the
//! per-room driver that turns presence changes into coalesced frames.
//!
//! * A node SUBSCRIBEs to `<p>:room:{R}:events` when its first local socket joins R and
//!   UNSUBSCRIBEs `rooms.unsubscribe_delay_ms` after the last one leaves (churn does not flap).
//! * Every message from Redis is turned into bytes once per node and the same `Bytes` is queued to
//!   each local member (a room broadcast arrives already encoded as a Phoenix frame).
//! * Each room keeps the tail of its history (the newest `rooms.history_len` broadcasts) from its
//!   own subscription, so joins get their history, and recoveries (`since`) what they missed,
//!   without a Redis read once the room is warm (see `history.rs`).
//! * Presence envelopes go into the room's [`Mirror`]; the room's driver task sends at most one
//!   `presence_diff` per `presence.diff_interval` and one `presence_count` per
//!   `presence.count_interval`, and batches anonymous joins/leaves into one `HINCRBY` per
//!   `presence.anon_flush_ms`.
//! * The subscriber connection is probed (the node publishes to its own probe channel and expects
//!   it back); a lost or silent connection is rebuilt, every room re-subscribed, re-snapshotted and
//!   re-asserted with `sync`.
//!
//! Lock order: the room map, then a room's state. A room's state lock is never held across an
//! `.await`.
//!
//! ## Layout
//! | file | holds |
//! |---|---|
//! | `mod.rs` | [`Hub`] (the node's rooms), [`Room`], and the types the parts share |
//! | `join.rs` | join, acquire, the signed-in presence write, leave, publish |
//! | `subscriber.rs` | the pub/sub connection: subscribe, dispatch, probe, reconnect |
//! | `driver.rs` | the per-room task: coalesced diffs and counts, anonymous batching, re-snapshot, sync, teardown |
//! | `heartbeat.rs` | the lease heartbeat and the release on drain |
//! | `history.rs` | the room's history tail: broadcasts as they arrive, joins' history and recoveries |
//! | `moderation.rs` | kicks (on the room's channel) and disconnects (on the control channel) as they arrive |

mod driver;
mod heartbeat;
mod history;
mod join;
mod moderation;
mod subscriber;

pub use history::{Served, Want};
pub use moderation::Control;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::auth::User;
use crate::config::Config;
use crate::history::{History, PublishCommand};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
#[cfg(test)]
use crate::presence::Snapshot;
use crate::presence::{Applied, Envelope, JoinReply, Mirror, Store, StoreError, meta_json};
use crate::protocol;
use crate::redis::keys::{Keys, RoomKeys};
use crate::rooms::{Access, JoinRefusal, RoomId};

/// An anonymous write whose seq is not known yet.
const SEQ_UNKNOWN: u64 = u64::MAX;
/// A failed presence write is re-asserted (sync) after this pause, not in a tight loop.
const SYNC_RETRY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, thiserror::Error)]
pub enum JoinError {
    #[error("room does not exist")]
    NoRoom,
    #[error("presence unavailable: {0}")]
    Unavailable(String),
    #[error("shutting down")]
    ShuttingDown,
    /// The room's rules refuse the joiner: a private room, or a ban. Nothing was written.
    #[error("join refused: {0:?}")]
    Refused(JoinRefusal),
}

impl From<StoreError> for JoinError {
    fn from(e: StoreError) -> Self {
        JoinError::Unavailable(e.to_string())
    }
}

/// A request to the subscriber task, which owns the set of subscribed channels (so a reconnect
/// re-subscribes exactly what it had, whatever the joiners saw of it). One queue keeps a room's
/// UNSUBSCRIBE ordered before a later SUBSCRIBE of the same channel.
enum SubCmd {
    /// Subscribe and answer on the sender; skipped when the joiner stopped waiting.
    Subscribe(String, oneshot::Sender<bool>),
    /// Unsubscribe if subscribed (a room that never got its subscription confirmed still sends
    /// it, so a subscription that landed after its joiner gave up is not left behind).
    Unsubscribe(String),
}

/// At most this many subscribe requests wait for the subscriber: past it a cold join is refused
/// as unavailable instead of queueing without bound behind a slow Redis.
const SUBSCRIBE_QUEUE_MAX: usize = 1024;
/// A room id found missing is answered from memory for this long: a flood of joins to rooms that
/// do not exist costs one `EXISTS` per id and second, not one per join.
const MISSING_ROOM_TTL: Duration = Duration::from_secs(1);
/// At most this many missing ids are remembered (a bounded cache, cleared when full).
const MISSING_ROOMS_MAX: usize = 10_000;

/// One local member of a room: a socket's channel.
struct Member {
    out: Outbox,
    join_ref: Arc<str>,
    anonymous: bool,
    /// The signed-in user (`sub`) of the channel, for kicks.
    user: Option<Arc<str>>,
    /// The channel's history went beyond what the subscription has delivered here: live frames up
    /// to this id are not sent to it again (cleared by the first one above it).
    /// Boxed: rare, and 24 bytes inline in every member of every room.
    skip_until: Option<Box<crate::history::StreamId>>,
}

/// Who is joining.
pub struct Joiner<'a> {
    /// The socket's number: one channel per topic per socket, so it identifies the member.
    pub socket: u64,
    /// `<node>.<socket>`: the presence field and `phx_ref`.
    pub conn: &'a str,
    pub user: Option<&'a User>,
    pub join_ref: &'a str,
    pub out: Outbox,
    /// The `phx_reply`'s ref and response: the reply is queued first, under the room lock, so
    /// nothing overtakes it; a join with `since` gets `"recovered"` added to the response.
    pub reference: Option<&'a str>,
    pub response: serde_json::Map<String, Value>,
    /// The history the channel asks for (`since` in the join payload, or the last events).
    pub want: Want,
}

pub struct Room {
    pub id: RoomId,
    /// The record's `access`, read when the node took the room up (a cold join): joins of a warm
    /// room are checked without a Redis read.
    pub access: Access,
    topic: Arc<str>,
    pub keys: RoomKeys,
    state: Mutex<RoomState>,
    wake: Notify,
    /// The room was deleted: its channels got `phx_close`; pushes are refused.
    deleted: AtomicBool,
}

impl Room {
    /// `rooms:<id>`.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Relaxed)
    }

    /// Whether the socket's channel with this join_ref is still a member (a kick removes it).
    pub fn is_member(&self, socket: u64, join_ref: &str) -> bool {
        lock(&self.state)
            .members
            .get(&socket)
            .is_some_and(|m| &*m.join_ref == join_ref)
    }
}

#[derive(Default)]
struct RoomState {
    members: HashMap<u64, Member>,
    /// This node's anonymous viewers in the room (the truth).
    anon_local: u64,
    /// Anonymous joins minus leaves not yet written to Redis.
    anon_unflushed: i64,
    anon_unflushed_since: Option<Instant>,
    /// Anonymous writes sent but not yet seen in the mirror: (seq, delta).
    anon_inflight: Vec<(u64, i64)>,
    /// An anonymous write (batch, heartbeat or sync) is under way: one at a time keeps them ordered.
    anon_writing: bool,
    /// This node's signed-in connections: conn → meta JSON (what `sync` re-asserts).
    signed_local: HashMap<Arc<str>, String>,
    /// Bumped on every change of `signed_local`: a sync that raced with one runs again.
    signed_version: u64,
    /// A failed sync is retried no earlier than this; the pause doubles per failure.
    sync_retry_at: Option<Instant>,
    sync_backoff: Duration,
    /// An anonymous write failed and may or may not have landed: no more deltas until an
    /// absolute write (the next heartbeat, or a sync) has set the count again.
    anon_needs_absolute: bool,
    /// The install (subscribe + first snapshot) of a cold room under way: every joiner that
    /// arrives meanwhile waits for its outcome instead of trying again on its own.
    installing: Option<watch::Receiver<Option<Result<(), JoinError>>>>,
    /// When a failed re-snapshot may run again; the pause doubles per failure, with jitter.
    resnapshot_at: Option<Instant>,
    resnapshot_backoff: Duration,
    /// A script call renewed this node's lease in the room: from then on, a call that finds no
    /// lease of ours means another node swept our entries, and they are re-asserted.
    lease_held: bool,
    /// Signed-in leaves whose script call is under way (teardown and drain wait for them).
    pending_leaves: usize,
    mirror: Mirror,
    /// The newest broadcasts of the room, from this node's subscription (see `history.rs`).
    history: history::Tail,
    installed: bool,
    subscribed: bool,
    resnapshot: bool,
    resnapshotting: bool,
    needs_sync: bool,
    syncing: bool,
    last_diff: Option<Instant>,
    /// The last diff that moved the anonymous list (see `presence.anonymous_diff_interval_ms`).
    last_anon_diff: Option<Instant>,
    last_count: Option<Instant>,
    count_sent: (u64, usize, usize),
    pending_joins: usize,
    empty_since: Option<Instant>,
    removed: bool,
}

impl RoomState {
    /// The anonymous count to show: Redis's total plus what this node has not written or seen yet.
    fn anon_display(&mut self) -> u64 {
        let seen = self.mirror.seq();
        self.anon_inflight
            .retain(|(s, _)| *s == SEQ_UNKNOWN || *s > seen);
        let pending: i64 =
            self.anon_unflushed + self.anon_inflight.iter().map(|(_, d)| d).sum::<i64>();
        (self.mirror.anon() as i64 + pending).max(0) as u64
    }

    fn counts(&mut self) -> (u64, usize, usize) {
        let anon = self.anon_display();
        (
            anon,
            self.mirror.users(),
            self.mirror.connections() + anon as usize,
        )
    }

    /// Starts an absolute anonymous write (heartbeat, sync): None if another write is under way.
    fn begin_anon_absolute(&mut self) -> Option<u64> {
        if self.anon_writing {
            return None;
        }
        if self.anon_unflushed != 0 {
            self.anon_inflight.push((SEQ_UNKNOWN, self.anon_unflushed));
            self.anon_unflushed = 0;
            self.anon_unflushed_since = None;
        }
        self.anon_writing = true;
        Some(self.anon_local)
    }

    /// Starts a batched delta write: None if nothing to write or another write is under way.
    fn begin_anon_delta(&mut self) -> Option<i64> {
        if self.anon_writing || self.anon_unflushed == 0 || self.anon_needs_absolute {
            return None;
        }
        let d = self.anon_unflushed;
        self.anon_inflight.push((SEQ_UNKNOWN, d));
        self.anon_unflushed = 0;
        self.anon_unflushed_since = None;
        self.anon_writing = true;
        Some(d)
    }

    /// An absolute write (heartbeat, sync) is done: deltas may flow again.
    fn end_anon_absolute(&mut self, seq: u64) {
        self.end_anon_write(seq);
        self.anon_needs_absolute = false;
    }

    /// The write is done; `seq` is the change it published (0: nothing changed).
    fn end_anon_write(&mut self, seq: u64) {
        for e in &mut self.anon_inflight {
            if e.0 == SEQ_UNKNOWN {
                e.0 = seq;
            }
        }
        self.anon_inflight.retain(|(s, _)| *s != 0);
        self.anon_writing = false;
    }

    /// The write failed or timed out, so it may or may not have been applied: its delta stays
    /// shown, and no delta is sent again (it could count twice) until an absolute write — the
    /// next heartbeat, or a sync — has set the count.
    fn fail_anon_write(&mut self) {
        let d: i64 = self
            .anon_inflight
            .iter()
            .filter(|(s, _)| *s == SEQ_UNKNOWN)
            .map(|(_, d)| d)
            .sum();
        self.anon_inflight.retain(|(s, _)| *s != SEQ_UNKNOWN);
        self.anon_unflushed += d;
        self.anon_writing = false;
        self.anon_needs_absolute = true;
    }

    /// Schedules a sync, not sooner than the current back-off (doubling per failure, up to
    /// `max`, with jitter so that many rooms do not retry in step).
    fn retry_sync(&mut self, failed: bool, max: Duration) {
        self.needs_sync = true;
        self.sync_retry_at = Some(back_off(&mut self.sync_backoff, failed, max));
    }

    /// Schedules another re-snapshot after a failed one, on the same back-off as syncs.
    fn retry_resnapshot(&mut self, max: Duration) {
        self.resnapshot = true;
        self.resnapshot_at = Some(back_off(&mut self.resnapshot_backoff, true, max));
    }

    /// A join or leave call renewed the lease: `lost` (it swept our own entries) or a lease that
    /// was gone although we held one (another node swept it, and our entries with it) schedules
    /// a sync.
    fn lease_renewed(&mut self, lost: bool, had_lease: bool) {
        if lost || (!had_lease && self.lease_held) {
            self.needs_sync = true;
        }
        self.lease_held = true;
    }

    /// Records a signed-in connection of this node in the room (None: it left).
    fn set_signed(&mut self, conn: &str, meta: Option<String>) -> bool {
        self.signed_version += 1;
        match meta {
            Some(m) => self.signed_local.insert(Arc::from(conn), m).is_some(),
            None => self.signed_local.remove(conn).is_some(),
        }
    }

    fn send_all(&self, frame: &Bytes) -> usize {
        let mut n = 0;
        for m in self.members.values() {
            if m.out.send(frame.clone()) {
                n += 1;
            }
        }
        n
    }
}

/// One shard's liveness probe: a message the node publishes to itself on a channel of that shard.
struct Probe {
    channel: String,
    /// Nanoseconds since `epoch` of the last probe sent, and whether it came back.
    sent: u64,
    seen: bool,
    /// Missed its deadline (the shard counts as down until a probe comes back).
    lost: bool,
}

/// The node's rooms and its pub/sub connection.
pub struct Hub {
    cfg: Arc<Config>,
    keys: Keys,
    node: Arc<str>,
    store: Store,
    /// Broadcasts (append to the room's history and publish) and history reads.
    history: History,
    metrics: Metrics,
    rooms: Mutex<HashMap<RoomId, Arc<Room>>>,
    sub_tx: mpsc::UnboundedSender<SubCmd>,
    sub_rx: Mutex<Option<mpsc::UnboundedReceiver<SubCmd>>>,
    /// Subscribe requests queued and not yet taken by the subscriber (bounded by
    /// [`SUBSCRIBE_QUEUE_MAX`]).
    sub_pending: std::sync::atomic::AtomicUsize,
    /// `<p>:control`: node-wide orders (disconnects), subscribed from start-up.
    control_channel: String,
    control_tx: mpsc::UnboundedSender<Control>,
    control_rx: Mutex<Option<mpsc::UnboundedReceiver<Control>>>,
    /// Room ids recently found not to exist, with when.
    missing: Mutex<HashMap<RoomId, Instant>>,
    pubsub_up: AtomicBool,
    shutting_down: AtomicBool,
    /// Held while a heartbeat pipeline is in flight, so the shutdown release lands after it.
    heartbeat_lock: tokio::sync::Mutex<()>,
    /// The liveness probes, one per shard the subscriber listens on.
    probes: Mutex<Vec<Probe>>,
    /// `<p>:node:<node>:probe`: every probe channel starts with it.
    probe_channel: String,
    /// Probes that did not come back in time: shards that cannot be reached.
    shards_down: std::sync::atomic::AtomicUsize,
    /// Channels a slot move took away whose re-subscription failed: their rooms hear nothing.
    channels_dropped: std::sync::atomic::AtomicUsize,
    epoch: Instant,
}

/// The next retry time of a failed Redis write or read: the pause doubles per failure from
/// [`SYNC_RETRY`] up to `max`, plus up to a quarter of jitter so that many rooms do not retry in
/// step.
fn back_off(backoff: &mut Duration, failed: bool, max: Duration) -> Instant {
    if failed {
        *backoff = (*backoff * 2).clamp(SYNC_RETRY, max.max(SYNC_RETRY));
    }
    let pause = (*backoff).max(SYNC_RETRY);
    let jitter = Duration::from_millis(rand::random::<u64>() % (pause.as_millis() as u64 / 4 + 1));
    Instant::now() + pause + jitter
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock means a panic elsewhere while holding it; the data is still usable for us.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Hub {
    pub fn new(
        cfg: Arc<Config>,
        keys: Keys,
        node: Arc<str>,
        store: Store,
        metrics: Metrics,
    ) -> Arc<Self> {
        let (sub_tx, sub_rx) = mpsc::unbounded_channel();
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let probe_channel = keys.probe(&node);
        let control_channel = keys.control();
        // the channel kind the subscriber listens to: shard channels on Redis Cluster
        let publish = if store.redis().publish_command() == "SPUBLISH" {
            PublishCommand::SPublish
        } else {
            PublishCommand::Publish
        };
        let history = History::new(
            store.clone(),
            metrics.clone(),
            cfg.rooms.history_len,
            publish,
        );
        Arc::new(Self {
            cfg,
            keys,
            node,
            store,
            history,
            metrics,
            rooms: Mutex::new(HashMap::new()),
            sub_tx,
            sub_rx: Mutex::new(Some(sub_rx)),
            sub_pending: Default::default(),
            control_channel,
            control_tx,
            control_rx: Mutex::new(Some(control_rx)),
            missing: Mutex::new(HashMap::new()),
            pubsub_up: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            heartbeat_lock: tokio::sync::Mutex::new(()),
            probes: Mutex::new(Vec::new()),
            probe_channel,
            shards_down: Default::default(),
            channels_dropped: Default::default(),
            epoch: Instant::now(),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Broadcasts and history reads (the admin API broadcasts through it too).
    pub fn history(&self) -> &History {
        &self.history
    }

    /// Whether the subscriber hears every shard it needs: connected, each shard's last probe
    /// came back, and no channel that a slot move took away is still waiting to be re-subscribed.
    pub fn pubsub_up(&self) -> bool {
        self.pubsub_up.load(Ordering::Relaxed)
            && self.shards_down.load(Ordering::Relaxed) == 0
            && self.channels_dropped.load(Ordering::Relaxed) == 0
    }

    /// Whether the subscriber is connected and no channel a slot move took away is still
    /// waiting to be re-subscribed; unlike [`Hub::pubsub_up`], a shard whose probe is lost does
    /// not count here (cluster readiness asks [`Hub::lost_probes`] which shards the node needs).
    pub fn pubsub_connected(&self) -> bool {
        self.pubsub_up.load(Ordering::Relaxed) && self.channels_dropped.load(Ordering::Relaxed) == 0
    }

    /// The probe channels whose last probe did not come back (one per unreachable shard), and
    /// how many probes there are.
    pub fn lost_probes(&self) -> (Vec<String>, usize) {
        let probes = lock(&self.probes);
        let lost = probes.iter().filter(|p| p.lost).map(|p| p.channel.clone());
        (lost.collect(), probes.len())
    }

    /// The event channels of the rooms with local members now (each names its room's slot).
    pub fn room_channels(&self) -> Vec<String> {
        let rooms: Vec<Arc<Room>> = lock(&self.rooms).values().cloned().collect();
        rooms
            .iter()
            .filter(|r| !lock(&r.state).members.is_empty())
            .map(|r| self.keys.events(&r.id))
            .collect()
    }

    pub fn room_count(&self) -> usize {
        lock(&self.rooms).len()
    }

    fn presence_cap(&self) -> u64 {
        self.cfg.presence.anonymous_list_max
    }

    /// Whether `id` was found missing within [`MISSING_ROOM_TTL`].
    fn known_missing(&self, id: &RoomId) -> bool {
        lock(&self.missing)
            .get(id)
            .is_some_and(|t| t.elapsed() < MISSING_ROOM_TTL)
    }

    fn remember_missing(&self, id: &RoomId) {
        let mut m = lock(&self.missing);
        if m.len() >= MISSING_ROOMS_MAX {
            m.retain(|_, t| t.elapsed() < MISSING_ROOM_TTL);
            if m.len() >= MISSING_ROOMS_MAX {
                m.clear();
            }
        }
        m.insert(id.clone(), Instant::now());
    }

    /// A room created on this node (admin API) is joinable at once, not after the cache lapses.
    pub fn forget_missing(&self, id: &RoomId) {
        lock(&self.missing).remove(id);
    }

    /// The room's record is gone (the `deleted` message, or a script or snapshot that found no
    /// room): its channels get `phx_close` like Phoenix sends when a channel stops normally
    /// (clients do not rejoin), and the members are forgotten so nothing of this node writes the
    /// room's keys again.
    fn mark_deleted(&self, room: &Room) {
        if room.deleted.swap(true, Ordering::AcqRel) {
            return;
        }
        self.remember_missing(&room.id);
        let mut st = lock(&room.state);
        for m in st.members.values() {
            m.out.send(protocol::phx_close(&m.join_ref, &room.topic));
        }
        tracing::info!(room = %room.id, members = st.members.len(), "room deleted; channels closed");
        st.members.clear();
        st.signed_local.clear();
        st.anon_local = 0;
        st.anon_unflushed = 0;
        st.needs_sync = false;
        st.resnapshot = false;
        st.empty_since = Some(Instant::now());
        drop(st);
        room.wake.notify_one();
    }
}

fn count_payload((anon, users, conns): (u64, usize, usize)) -> Value {
    json!({"anonymous": anon, "users": users, "connections": conns})
}

#[cfg(test)]
mod tests;
