//! Fan-out: the node's registry of rooms with local members, its one pub/sub connection, and the
//! per-room driver that turns presence changes into coalesced frames.
//!
//! * A node SUBSCRIBEs to `<p>:room:{R}:events` when its first local socket joins R and
//!   UNSUBSCRIBEs `rooms.unsubscribe_delay_ms` after the last one leaves (churn does not flap).
//! * Every message from Redis is turned into bytes once per node and the same `Bytes` is queued to
//!   each local member (a room broadcast arrives already encoded as a Phoenix frame).
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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

use crate::auth::User;
use crate::config::Config;
use crate::metrics::Metrics;
#[cfg(test)]
use crate::presence::Snapshot;
use crate::presence::{Applied, Envelope, JoinReply, Mirror, Store, StoreError, meta_json};
use crate::protocol;
use crate::redis::keys::{Keys, RoomKeys};
use crate::rooms::RoomId;
use crate::session::Outbox;

/// An anonymous write whose seq is not known yet.
const SEQ_UNKNOWN: u64 = u64::MAX;
/// A failed presence write is re-asserted (sync) after this pause, not in a tight loop.
const SYNC_RETRY: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("room does not exist")]
    NoRoom,
    #[error("presence unavailable: {0}")]
    Unavailable(String),
    #[error("shutting down")]
    ShuttingDown,
}

impl From<StoreError> for JoinError {
    fn from(e: StoreError) -> Self {
        JoinError::Unavailable(e.to_string())
    }
}

enum SubCmd {
    Subscribe(String, oneshot::Sender<bool>),
    Unsubscribe(String),
}

/// One local member of a room: a socket's channel.
struct Member {
    out: Outbox,
    join_ref: Arc<str>,
    anonymous: bool,
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
    /// The `phx_reply` to queue first, under the room lock, so nothing overtakes it.
    pub reply: Bytes,
}

pub struct Room {
    pub id: RoomId,
    topic: Arc<str>,
    pub keys: RoomKeys,
    state: Mutex<RoomState>,
    wake: Notify,
    /// Serialises the subscribe + first snapshot of a cold room.
    init: tokio::sync::Mutex<()>,
    /// The room was deleted: its channels got `phx_close`; pushes are refused.
    deleted: AtomicBool,
}

impl Room {
    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Relaxed)
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
    /// Signed-in leaves whose script call is under way (teardown and drain wait for them).
    pending_leaves: usize,
    mirror: Mirror,
    installed: bool,
    subscribed: bool,
    resnapshot: bool,
    resnapshotting: bool,
    needs_sync: bool,
    syncing: bool,
    last_diff: Option<Instant>,
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
        if failed {
            self.sync_backoff = (self.sync_backoff * 2).clamp(SYNC_RETRY, max.max(SYNC_RETRY));
        }
        let pause = self.sync_backoff.max(SYNC_RETRY);
        let jitter =
            Duration::from_millis(rand::random::<u64>() % (pause.as_millis() as u64 / 4 + 1));
        self.sync_retry_at = Some(Instant::now() + pause + jitter);
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

/// The node's rooms and its pub/sub connection.
pub struct Hub {
    cfg: Arc<Config>,
    keys: Keys,
    node: Arc<str>,
    store: Store,
    metrics: Metrics,
    rooms: Mutex<HashMap<RoomId, Arc<Room>>>,
    sub_tx: mpsc::UnboundedSender<SubCmd>,
    sub_rx: Mutex<Option<mpsc::UnboundedReceiver<SubCmd>>>,
    pubsub_up: AtomicBool,
    shutting_down: AtomicBool,
    /// Held while a heartbeat pipeline is in flight, so the shutdown release lands after it.
    heartbeat_lock: tokio::sync::Mutex<()>,
    /// Nanoseconds (since `epoch`) the last probe was published, and whether it came back.
    probe_sent: AtomicU64,
    probe_seen: AtomicBool,
    /// `<p>:node:<node>:probe`, named once: it is compared with every pub/sub message.
    probe_channel: String,
    epoch: Instant,
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
        let probe_channel = keys.probe(&node);
        Arc::new(Self {
            cfg,
            keys,
            node,
            store,
            metrics,
            rooms: Mutex::new(HashMap::new()),
            sub_tx,
            sub_rx: Mutex::new(Some(sub_rx)),
            pubsub_up: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            heartbeat_lock: tokio::sync::Mutex::new(()),
            probe_sent: AtomicU64::new(0),
            probe_seen: AtomicBool::new(true),
            probe_channel,
            epoch: Instant::now(),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn pubsub_up(&self) -> bool {
        self.pubsub_up.load(Ordering::Relaxed)
    }

    pub fn room_count(&self) -> usize {
        lock(&self.rooms).len()
    }

    fn presence_cap(&self) -> u64 {
        self.cfg.presence.anonymous_list_max
    }

    // -------------------------------------------------------------------------------------------
    // joining and leaving

    /// Adds a member to a room: subscribes and snapshots a cold room, writes signed-in presence
    /// (one script call), queues the reply, `presence_state` and `presence_count` in that order.
    pub async fn join(
        self: &Arc<Self>,
        id: &RoomId,
        j: Joiner<'_>,
    ) -> Result<Arc<Room>, JoinError> {
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(JoinError::ShuttingDown);
        }
        let room = self.acquire(id);
        let r = Box::pin(self.join_inner(&room, &j)).await;
        let mut st = lock(&room.state);
        st.pending_joins -= 1;
        if let Err(e) = r {
            if st.members.is_empty() {
                st.empty_since.get_or_insert_with(Instant::now);
            }
            drop(st);
            room.wake.notify_one();
            return Err(e);
        }
        st.empty_since = None;
        if j.user.is_none() {
            st.anon_local += 1;
            st.anon_unflushed += 1;
            st.anon_unflushed_since.get_or_insert_with(Instant::now);
        }
        let cap = self.presence_cap();
        let state = st.mirror.state_payload(cap);
        let counts = st.counts();
        let ok = j.out.send(j.reply.clone())
            && j.out.send_wrapped(
                protocol::push_head(j.join_ref, &room.topic, "presence_state"),
                state,
            )
            && j.out.send(protocol::push(
                j.join_ref,
                &room.topic,
                "presence_count",
                &count_payload(counts),
            ));
        self.metrics.presence_frames("presence_state", 1);
        self.metrics.presence_frames("presence_count", 1);
        st.members.insert(
            j.socket,
            Member {
                out: j.out.clone(),
                join_ref: Arc::from(j.join_ref),
                anonymous: j.user.is_none(),
            },
        );
        drop(st);
        room.wake.notify_one();
        if !ok {
            tracing::debug!(room = %id, "joiner's queue is full or closed");
        }
        Ok(room)
    }

    /// The room object for `id`, created (with its driver task) if the node has none; counted as a
    /// pending join so it is not torn down meanwhile.
    fn acquire(self: &Arc<Self>, id: &RoomId) -> Arc<Room> {
        let mut rooms = lock(&self.rooms);
        if rooms.get(id).is_some_and(|r| r.is_deleted()) {
            // a deleted room's object winds down on its own; a new join starts afresh (and the
            // room may have been created again)
            rooms.remove(id);
        }
        let room = rooms
            .entry(id.clone())
            .or_insert_with(|| {
                let room = Arc::new(Room {
                    id: id.clone(),
                    topic: Arc::from(id.topic()),
                    keys: self.keys.room(id),
                    state: Mutex::new(RoomState::default()),
                    wake: Notify::new(),
                    init: tokio::sync::Mutex::new(()),
                    deleted: AtomicBool::new(false),
                });
                tokio::spawn(drive(self.clone(), room.clone()));
                room
            })
            .clone();
        self.metrics.rooms_local(rooms.len());
        lock(&room.state).pending_joins += 1;
        room
    }

    async fn join_inner(
        self: &Arc<Self>,
        room: &Arc<Room>,
        j: &Joiner<'_>,
    ) -> Result<(), JoinError> {
        let meta = j
            .user
            .map(|u| meta_json(&u.id, &u.username, crate::unix_ms(), &self.node));
        let mut joined = false;
        {
            let _init = room.init.lock().await;
            let (subscribed, installed) = {
                let st = lock(&room.state);
                (st.subscribed, st.installed)
            };
            if !subscribed {
                self.subscribe(&room.keys.events).await?;
                lock(&room.state).subscribed = true;
            }
            if !installed {
                // A cold room: one call checks the room, (for a signed-in joiner) writes the
                // presence, and returns the snapshot the mirror starts from.
                let snap = match &meta {
                    Some(meta) => {
                        joined = true;
                        self.write_join(room, j.conn, meta, true).await?
                    }
                    None => self.store.snapshot(&room.keys).await?,
                }
                .ok_or(JoinError::NoRoom)?;
                let mut st = lock(&room.state);
                if st.mirror.install(snap) == Applied::Gap {
                    st.resnapshot = true;
                }
                st.installed = true;
            }
        }
        if let (Some(meta), false) = (meta, joined) {
            self.write_join(room, j.conn, &meta, false).await?;
        }
        Ok(())
    }

    /// `join.lua` for a signed-in connection, keeping `signed_local` (the truth `sync` re-asserts)
    /// in step: a call that failed may still have run, so a failure re-syncs the room.
    async fn write_join(
        &self,
        room: &Room,
        conn: &str,
        meta: &str,
        want_snapshot: bool,
    ) -> Result<Option<crate::presence::Snapshot>, JoinError> {
        lock(&room.state).set_signed(conn, Some(meta.to_string()));
        let r = self.store.join(&room.keys, conn, meta, want_snapshot).await;
        let mut st = lock(&room.state);
        match r {
            Ok(JoinReply::Joined { snapshot, lost, .. }) => {
                if lost {
                    st.needs_sync = true;
                    drop(st);
                    room.wake.notify_one();
                }
                Ok(snapshot)
            }
            Ok(JoinReply::NoRoom) => {
                st.set_signed(conn, None);
                Err(JoinError::NoRoom)
            }
            Err(e) => {
                st.set_signed(conn, None);
                st.needs_sync = true;
                drop(st);
                room.wake.notify_one();
                Err(e.into())
            }
        }
    }

    /// Removes a member. A signed-in member's presence is removed with one script call (skipped
    /// when the node already released all its presence at shutdown).
    pub async fn leave(&self, room: &Arc<Room>, socket: u64, conn: &str) {
        let signed_in = {
            let mut st = lock(&room.state);
            let Some(m) = st.members.remove(&socket) else {
                return;
            };
            if m.anonymous {
                st.anon_local = st.anon_local.saturating_sub(1);
                st.anon_unflushed -= 1;
                st.anon_unflushed_since.get_or_insert_with(Instant::now);
            }
            if st.members.is_empty() {
                st.empty_since = Some(Instant::now());
            }
            let write = !m.anonymous
                && st.set_signed(conn, None)
                && !self.shutting_down.load(Ordering::Relaxed);
            if write {
                st.pending_leaves += 1;
            }
            write
        };
        room.wake.notify_one();
        if !signed_in {
            return;
        }
        let lost = match Box::pin(self.store.leave(&room.keys, conn, 0, false)).await {
            Ok(r) => r.lost,
            Err(e) => {
                tracing::warn!(room = %room.id, error = %e, "leave failed; the room will be re-synced");
                true
            }
        };
        let mut st = lock(&room.state);
        st.pending_leaves -= 1;
        if lost {
            st.needs_sync = true;
        }
        drop(st);
        room.wake.notify_one();
    }

    /// Publishes a ready Phoenix frame to a room on every node.
    pub async fn publish(&self, room: &Room, frame: &[u8]) -> Result<(), StoreError> {
        let cmd = redis::cmd("PUBLISH")
            .arg(&room.keys.events)
            .arg(frame)
            .clone();
        self.store.command::<i64>("publish", &cmd).await.map(|_| ())
    }

    async fn subscribe(&self, channel: &str) -> Result<(), JoinError> {
        let (tx, rx) = oneshot::channel();
        self.sub_tx
            .send(SubCmd::Subscribe(channel.to_string(), tx))
            .map_err(|_| JoinError::Unavailable("subscriber stopped".into()))?;
        match tokio::time::timeout(self.cfg.redis.command_timeout(), rx).await {
            Ok(Ok(true)) => Ok(()),
            _ => Err(JoinError::Unavailable("pub/sub subscribe failed".into())),
        }
    }

    // -------------------------------------------------------------------------------------------
    // messages from Redis

    fn dispatch(&self, channel: &str, payload: &[u8]) {
        if channel == self.probe_channel {
            let sent = self.probe_sent.load(Ordering::Relaxed);
            let now = self.epoch.elapsed().as_nanos() as u64;
            if std::str::from_utf8(payload)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                == Some(sent)
            {
                self.probe_seen.store(true, Ordering::Relaxed);
                self.metrics
                    .pubsub_lag(now.saturating_sub(sent) as f64 / 1e9);
            }
            return;
        }
        let Some(id) = self.keys.room_of_channel(channel) else {
            return;
        };
        let Some(room) = lock(&self.rooms).get(&id).cloned() else {
            return;
        };
        match payload.first() {
            Some(b'[') => {
                let frame = Bytes::copy_from_slice(payload);
                let n = lock(&room.state).send_all(&frame);
                self.metrics.fanout(n);
            }
            Some(b'{') if payload.starts_with(br#"{"deleted""#) => {
                // the room was deleted (admin API / CLI): close its channels like Phoenix does
                // when a channel stops normally (clients do not rejoin), and forget the members so
                // nothing of this node writes the room's keys again
                room.deleted.store(true, Ordering::Relaxed);
                let mut st = lock(&room.state);
                for m in st.members.values() {
                    m.out.send(protocol::phx_close(&m.join_ref, &room.topic));
                }
                tracing::info!(room = %id, members = st.members.len(), "room deleted; channels closed");
                st.members.clear();
                st.signed_local.clear();
                st.anon_local = 0;
                st.anon_unflushed = 0;
                st.empty_since = Some(Instant::now());
                drop(st);
                room.wake.notify_one();
            }
            Some(b'{') => match serde_json::from_slice::<Envelope>(payload) {
                Ok(env) => {
                    let mut st = lock(&room.state);
                    if st.mirror.apply(env) == Applied::Gap {
                        st.resnapshot = true;
                    }
                    drop(st);
                    room.wake.notify_one();
                }
                Err(e) => {
                    tracing::warn!(room = %id, error = %e, "unreadable presence envelope; re-snapshotting");
                    let mut st = lock(&room.state);
                    st.mirror.begin_resync();
                    st.resnapshot = true;
                    drop(st);
                    room.wake.notify_one();
                }
            },
            _ => {
                tracing::warn!(room = %id, "ignoring a message that is neither a frame nor an envelope")
            }
        }
    }

    // -------------------------------------------------------------------------------------------
    // background tasks

    /// Runs the pub/sub connection for the life of the process.
    pub async fn run_subscriber(self: Arc<Self>, client: redis::Client) {
        let Some(mut cmds) = lock(&self.sub_rx).take() else {
            return;
        };
        let probe_channel = self.probe_channel.clone();
        let sub_name = format!("{}-sub-{}", self.keys.prefix(), self.node);
        let mut first = true;
        let mut backoff = Duration::from_millis(50);
        loop {
            let ps = match tokio::time::timeout(
                self.cfg.redis.connect_timeout(),
                crate::redis::named_pubsub(&client, &sub_name),
            )
            .await
            {
                Ok(Ok(ps)) => ps,
                other => {
                    let err = match other {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".into(),
                    };
                    tracing::warn!(error = %err, "pub/sub connect failed");
                    self.metrics.redis_error("pubsub");
                    // keep answering subscribe requests (negatively) while Redis is away
                    let deadline = tokio::time::sleep(backoff);
                    tokio::pin!(deadline);
                    loop {
                        tokio::select! {
                            _ = &mut deadline => break,
                            c = cmds.recv() => match c {
                                Some(SubCmd::Subscribe(_, tx)) => { let _ = tx.send(false); }
                                Some(SubCmd::Unsubscribe(_)) => {}
                                None => return,
                            },
                        }
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            backoff = Duration::from_millis(50);
            let (mut sink, mut stream) = ps.split();
            let channels: Vec<String> = lock(&self.rooms)
                .values()
                .filter(|r| lock(&r.state).subscribed)
                .map(|r| r.keys.events.clone())
                .collect();
            let t = self.cfg.redis.command_timeout();
            let mut ok = matches!(
                tokio::time::timeout(t, sink.subscribe(&probe_channel)).await,
                Ok(Ok(()))
            );
            for chunk in channels.chunks(256) {
                if !ok {
                    break;
                }
                ok = matches!(
                    tokio::time::timeout(t, sink.subscribe(chunk)).await,
                    Ok(Ok(()))
                );
            }
            if !ok {
                tracing::warn!("pub/sub resubscribe failed; reconnecting");
                continue;
            }
            if !first {
                self.metrics.pubsub_reconnect();
                tracing::info!(
                    rooms = channels.len(),
                    "pub/sub reconnected; re-snapshotting rooms"
                );
                let rooms: Vec<Arc<Room>> = lock(&self.rooms).values().cloned().collect();
                for r in rooms {
                    let mut st = lock(&r.state);
                    if st.installed {
                        st.mirror.begin_resync();
                        st.resnapshot = true;
                    }
                    st.needs_sync = true;
                    drop(st);
                    r.wake.notify_one();
                }
            }
            first = false;
            self.probe_seen.store(true, Ordering::Relaxed);
            self.pubsub_up.store(true, Ordering::Relaxed);
            let mut probe = tokio::time::interval(
                self.cfg
                    .presence
                    .heartbeat_interval()
                    .min(Duration::from_secs(5)),
            );
            probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            probe.tick().await;
            let mut probe_deadline: Option<Instant> = None;
            loop {
                tokio::select! {
                    m = stream.next() => match m {
                        Some(msg) => self.dispatch(msg.get_channel_name(), msg.get_payload_bytes()),
                        None => { tracing::warn!("pub/sub connection lost"); break; }
                    },
                    c = cmds.recv() => match c {
                        Some(SubCmd::Subscribe(ch, tx)) => {
                            let r = tokio::time::timeout(t, sink.subscribe(&ch)).await;
                            let ok = matches!(r, Ok(Ok(())));
                            let _ = tx.send(ok);
                            if !ok { tracing::warn!("SUBSCRIBE failed; reconnecting"); break; }
                        }
                        Some(SubCmd::Unsubscribe(ch)) => {
                            if !matches!(tokio::time::timeout(t, sink.unsubscribe(&ch)).await, Ok(Ok(()))) {
                                tracing::warn!("UNSUBSCRIBE failed; reconnecting");
                                break;
                            }
                        }
                        None => return,
                    },
                    _ = probe.tick() => {
                        if let Some(d) = probe_deadline && !self.probe_seen.load(Ordering::Relaxed) && Instant::now() > d {
                            tracing::warn!("pub/sub probe did not come back; rebuilding the connection");
                            break;
                        }
                        self.send_probe();
                        probe_deadline = Some(Instant::now() + t * 2);
                    }
                }
            }
            self.pubsub_up.store(false, Ordering::Relaxed);
            self.metrics.redis_error("pubsub");
        }
    }

    fn send_probe(self: &Arc<Self>) {
        let hub = self.clone();
        let sent = self.epoch.elapsed().as_nanos() as u64;
        // Only a new probe resets the flag; if PUBLISH itself fails, Redis is down for everyone
        // and the stream ends by itself.
        self.probe_sent.store(sent, Ordering::Relaxed);
        self.probe_seen.store(false, Ordering::Relaxed);
        tokio::spawn(async move {
            let cmd = redis::cmd("PUBLISH")
                .arg(&hub.probe_channel)
                .arg(sent.to_string())
                .clone();
            if hub.store.command::<i64>("publish", &cmd).await.is_err() {
                // not the subscriber's fault: do not count this probe
                hub.probe_seen.store(true, Ordering::Relaxed);
            }
        });
    }

    /// Renews this node's leases in all its rooms, one pipelined round trip, every
    /// `presence.heartbeat_interval_ms`.
    pub async fn run_heartbeat(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.cfg.presence.heartbeat_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let _in_flight = self.heartbeat_lock.lock().await;
            if self.shutting_down.load(Ordering::Relaxed) {
                return;
            }
            let rooms: Vec<Arc<Room>> = lock(&self.rooms).values().cloned().collect();
            let mut batch = Vec::with_capacity(rooms.len());
            let mut absolute = Vec::with_capacity(rooms.len());
            let mut live = Vec::with_capacity(rooms.len());
            for r in rooms {
                let mut st = lock(&r.state);
                if !st.installed || st.removed || r.is_deleted() {
                    continue;
                }
                let anon = st.begin_anon_absolute();
                absolute.push(anon.is_some());
                batch.push((r.keys.clone(), anon));
                drop(st);
                live.push(r);
            }
            self.metrics.heartbeat_rooms(live.len());
            if live.is_empty() {
                continue;
            }
            match self.store.heartbeat(&batch).await {
                Ok(replies) => {
                    for ((r, (had, seq, _total)), abs) in live.iter().zip(replies).zip(&absolute) {
                        let mut st = lock(&r.state);
                        if *abs {
                            st.end_anon_absolute(seq);
                        }
                        if !had {
                            st.needs_sync = true;
                        }
                        drop(st);
                        r.wake.notify_one();
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, rooms = live.len(), "presence heartbeat failed");
                    for (r, abs) in live.iter().zip(&absolute) {
                        if *abs {
                            lock(&r.state).fail_anon_write();
                        }
                        r.wake.notify_one();
                    }
                }
            }
        }
    }

    /// Shutdown: no more joins or presence writes, then every room's presence of this node removed
    /// with one `sync` call per room (the other nodes see the leaves at once, not after a TTL).
    /// Writes already under way (joins, anonymous batches, syncs) are waited for first, within the
    /// command deadline, so none of them lands after the release.
    pub async fn release_all(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        let _no_heartbeat = self.heartbeat_lock.lock().await;
        let deadline =
            Instant::now() + self.cfg.redis.command_timeout() + Duration::from_millis(100);
        loop {
            let busy = lock(&self.rooms).values().any(|r| {
                let st = lock(&r.state);
                st.pending_joins > 0 || st.pending_leaves > 0 || st.anon_writing || st.syncing
            });
            if !busy || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let rooms: Vec<Arc<Room>> = lock(&self.rooms).values().cloned().collect();
        let calls = rooms.iter().filter(|r| !r.is_deleted()).map(|r| async move {
            if let Err(e) = self.store.sync(&r.keys, Some(0), true, &[]).await {
                tracing::warn!(room = %r.id, error = %e, "releasing presence failed; it will lapse by TTL");
            }
        });
        futures_util::future::join_all(calls).await;
    }
}

fn count_payload((anon, users, conns): (u64, usize, usize)) -> Value {
    json!({"anonymous": anon, "users": users, "connections": conns})
}

/// The room's driver: coalesced diffs and counts, anonymous batches, re-snapshots, syncs, and the
/// delayed teardown once the room has no local members. Ends when the room is torn down.
async fn drive(hub: Arc<Hub>, room: Arc<Room>) {
    let p = &hub.cfg.presence;
    let cap = p.anonymous_list_max;
    loop {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        let mut soonest = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        let mut teardown = false;
        {
            let mut st = lock(&room.state);
            if st.removed {
                return;
            }
            if st.installed && st.mirror.is_synced() {
                // presence_diff, at most one per diff interval
                let anon = st.anon_display();
                if st.mirror.has_pending(anon, cap) {
                    let due = st.last_diff.map_or(now, |t| t + p.diff_interval());
                    if now >= due {
                        if let Some(diff) = st.mirror.take_diff(anon, cap) {
                            let frame = protocol::broadcast(&room.topic, "presence_diff", &diff);
                            let n = st.send_all(&frame);
                            hub.metrics.presence_frames("presence_diff", n);
                        }
                        st.last_diff = Some(now);
                    } else {
                        soonest(due);
                    }
                }
                // presence_count, at most one per count interval
                let counts = st.counts();
                if counts != st.count_sent {
                    let due = st.last_count.map_or(now, |t| t + p.count_interval());
                    if now >= due {
                        let frame = protocol::broadcast(
                            &room.topic,
                            "presence_count",
                            &count_payload(counts),
                        );
                        let n = st.send_all(&frame);
                        hub.metrics.presence_frames("presence_count", n);
                        st.count_sent = counts;
                        st.last_count = Some(now);
                    } else {
                        soonest(due);
                    }
                }
            }
            // anonymous batch: one HINCRBY-style call per flush interval
            // (not while a re-assertion is pending: that one writes the absolute count)
            if let Some(since) = st.anon_unflushed_since
                && st.anon_unflushed != 0
                && st.installed
                && !st.needs_sync
                && !hub.shutting_down.load(Ordering::Relaxed)
            {
                let due = since + p.anon_flush();
                if now >= due {
                    if let Some(delta) = st.begin_anon_delta() {
                        tokio::spawn(flush_anon(hub.clone(), room.clone(), delta));
                    }
                } else {
                    soonest(due);
                }
            }
            if st.resnapshot && !st.resnapshotting && st.installed {
                st.resnapshot = false;
                st.resnapshotting = true;
                st.mirror.begin_resync();
                tokio::spawn(resnapshot(hub.clone(), room.clone()));
            }
            let sync_due = st.sync_retry_at.is_none_or(|t| now >= t);
            if st.needs_sync
                && !sync_due
                && let Some(t) = st.sync_retry_at
            {
                soonest(t);
            }
            if st.needs_sync
                && sync_due
                && !st.syncing
                && st.installed
                && !room.is_deleted()
                && !hub.shutting_down.load(Ordering::Relaxed)
                && let Some(anon) = st.begin_anon_absolute()
            {
                st.needs_sync = false;
                st.syncing = true;
                st.sync_retry_at = None;
                let metas: Vec<(String, String)> = st
                    .signed_local
                    .iter()
                    .map(|(c, m)| (c.to_string(), m.clone()))
                    .collect();
                let version = st.signed_version;
                tokio::spawn(sync_room(hub.clone(), room.clone(), anon, metas, version));
            }
            if st.members.is_empty() && st.pending_joins == 0 {
                let since = *st.empty_since.get_or_insert(now);
                let due = since + hub.cfg.rooms.unsubscribe_delay();
                // only once every write of the room is done: nothing of this node may land after
                // (a room that never got installed has nothing of ours to re-assert)
                let gone = room.is_deleted() || !st.installed;
                let settled = !st.anon_writing
                    && !st.syncing
                    && !st.resnapshotting
                    && st.pending_leaves == 0
                    && (st.anon_unflushed == 0 || gone)
                    && (!st.needs_sync || gone);
                if now >= due && settled {
                    teardown = true;
                } else {
                    // still settling (a write in flight, or Redis away): look again shortly
                    soonest(due.max(now + Duration::from_millis(100)));
                }
            }
        }
        if teardown && remove_room(&hub, &room) {
            if lock(&room.state).installed
                && !room.is_deleted()
                && !hub.shutting_down.load(Ordering::Relaxed)
            {
                // the node leaves the room: its lease goes too, unless a join of a new room object
                // for the same id got in first (the script checks, atomically)
                if let Err(e) = hub.store.leave(&room.keys, "", 0, true).await {
                    tracing::debug!(room = %room.id, error = %e, "releasing the room's lease failed; it lapses by TTL");
                }
            }
            return;
        }
        match next {
            Some(t) => {
                tokio::select! {
                    _ = room.wake.notified() => {}
                    _ = tokio::time::sleep_until(t) => {}
                }
            }
            None => room.wake.notified().await,
        }
    }
}

/// Takes the room out of the map if it is still empty; queues the UNSUBSCRIBE under the map lock
/// so a new subscription of the same room is always ordered after it.
fn remove_room(hub: &Hub, room: &Arc<Room>) -> bool {
    let mut rooms = lock(&hub.rooms);
    let mut st = lock(&room.state);
    if !st.members.is_empty() || st.pending_joins > 0 {
        return false;
    }
    st.removed = true;
    let subscribed = st.subscribed;
    drop(st);
    let unsubscribe = match rooms.get(&room.id) {
        Some(r) if Arc::ptr_eq(r, room) => {
            rooms.remove(&room.id);
            subscribed
        }
        // replaced after a deletion: the channel belongs to the room object that replaced it
        Some(_) => false,
        None => subscribed,
    };
    if unsubscribe {
        let _ = hub
            .sub_tx
            .send(SubCmd::Unsubscribe(room.keys.events.clone()));
    }
    hub.metrics.rooms_local(rooms.len());
    true
}

async fn flush_anon(hub: Arc<Hub>, room: Arc<Room>, delta: i64) {
    let r = if delta > 0 {
        hub.store
            .join(&room.keys, "", &delta.to_string(), false)
            .await
            .map(|j| match j {
                JoinReply::Joined { seq, lost, .. } => (seq, lost),
                JoinReply::NoRoom => (0, false),
            })
    } else {
        hub.store
            .leave(&room.keys, "", delta.unsigned_abs(), false)
            .await
            .map(|r| (r.seq, r.lost))
    };
    let mut st = lock(&room.state);
    match r {
        Ok((seq, lost)) => {
            st.end_anon_write(seq);
            if lost {
                st.needs_sync = true;
            }
        }
        Err(e) => {
            tracing::warn!(room = %room.id, error = %e, "anonymous count write failed; the next heartbeat re-asserts it");
            st.fail_anon_write();
        }
    }
    drop(st);
    room.wake.notify_one();
}

async fn resnapshot(hub: Arc<Hub>, room: Arc<Room>) {
    let r = hub.store.snapshot(&room.keys).await;
    let again = {
        let mut st = lock(&room.state);
        st.resnapshotting = false;
        match r {
            Ok(Some(snap)) => {
                if st.mirror.install(snap) == Applied::Gap {
                    st.resnapshot = true;
                }
            }
            Ok(None) => {
                // the room record is gone; keep the last known presence until the room's deletion
                // closes its channels, instead of re-snapshotting forever
                st.mirror.abandon_resync();
            }
            Err(e) => {
                tracing::warn!(room = %room.id, error = %e, "re-snapshot failed; retrying");
                st.resnapshot = true;
            }
        }
        st.resnapshot
    };
    if again {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    room.wake.notify_one();
}

async fn sync_room(
    hub: Arc<Hub>,
    room: Arc<Room>,
    anon: u64,
    metas: Vec<(String, String)>,
    version: u64,
) {
    let r = hub.store.sync(&room.keys, Some(anon), false, &metas).await;
    let max = hub.cfg.presence.heartbeat_interval();
    let mut st = lock(&room.state);
    st.syncing = false;
    match r {
        Ok((seq, _)) => {
            st.end_anon_absolute(seq);
            st.sync_backoff = Duration::ZERO;
            // a signed-in join or leave written while this sync was under way may have been
            // undone by it: sync again with the new truth (after a pause, so churn cannot turn
            // this into back-to-back syncs)
            if st.signed_version != version {
                st.retry_sync(false, max);
            }
        }
        Err(e) => {
            tracing::warn!(room = %room.id, error = %e, "presence sync failed; retrying");
            st.fail_anon_write();
            st.retry_sync(true, max);
        }
    }
    drop(st);
    room.wake.notify_one();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_delta_is_never_resent_as_a_delta() {
        let mut st = RoomState {
            anon_local: 4,
            anon_unflushed: 4,
            ..Default::default()
        };
        assert_eq!(st.begin_anon_delta(), Some(4));
        st.fail_anon_write(); // timed out: it may have landed
        assert_eq!(st.anon_display(), 4, "still shown");
        assert_eq!(
            st.begin_anon_delta(),
            None,
            "no second delta that could count twice"
        );
        assert_eq!(
            st.begin_anon_absolute(),
            Some(4),
            "the heartbeat sets the count instead"
        );
        st.end_anon_absolute(9);
        st.anon_local = 5;
        st.anon_unflushed = 1;
        assert_eq!(st.begin_anon_delta(), Some(1), "deltas flow again");
    }

    #[test]
    fn failed_syncs_back_off() {
        let mut st = RoomState::default();
        let max = Duration::from_secs(5);
        st.retry_sync(true, max);
        let first = st.sync_backoff;
        st.retry_sync(true, max);
        st.retry_sync(true, max);
        assert!(st.sync_backoff > first);
        for _ in 0..10 {
            st.retry_sync(true, max);
        }
        assert_eq!(st.sync_backoff, max);
        assert!(st.needs_sync && st.sync_retry_at.is_some());
    }

    #[test]
    fn anonymous_accounting_survives_batches_and_failures() {
        let mut st = RoomState {
            anon_local: 3,
            anon_unflushed: 3,
            ..Default::default()
        };
        assert_eq!(st.anon_display(), 3);
        let d = st.begin_anon_delta().unwrap();
        assert_eq!(d, 3);
        assert_eq!(st.anon_display(), 3, "in flight still counts");
        assert!(st.begin_anon_absolute().is_none(), "one write at a time");
        st.fail_anon_write();
        assert_eq!(st.anon_unflushed, 3);
        assert_eq!(st.anon_display(), 3);
        assert_eq!(
            st.begin_anon_absolute(),
            Some(3),
            "after a failure the count is re-asserted"
        );
        st.end_anon_absolute(7);
        // until the mirror has seen seq 7, the delta is shown on top of it
        assert_eq!(st.anon_display(), 3);
        st.mirror.install(Snapshot {
            seq: 7,
            anon: 3,
            metas: HashMap::new(),
        });
        assert_eq!(st.anon_display(), 3);
        assert!(st.anon_inflight.is_empty());
        // heartbeat absorbs unflushed deltas into an absolute write
        st.anon_local = 2;
        st.anon_unflushed = -1;
        assert_eq!(st.begin_anon_absolute(), Some(2));
        assert_eq!(st.anon_display(), 2);
        st.end_anon_write(8);
        assert_eq!(st.anon_display(), 2);
        st.mirror.apply(Envelope {
            seq: 8,
            anon: 2,
            joins: HashMap::new(),
            leaves: vec![],
        });
        assert_eq!(st.anon_display(), 2);
        assert!(st.anon_inflight.is_empty());
    }
}
