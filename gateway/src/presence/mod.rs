//! Presence: the Redis store (one Lua script call per change) and the node-local [`Mirror`] of a
//! room that every local socket's `presence_state`, `presence_diff` and `presence_count` come from.
//!
//! The store speaks to Redis only through the scripts in `lua/` (see `redis::scripts`); it never
//! writes to sockets. The mirror is pure data: it applies the envelopes the scripts publish, in
//! `seq` order, and tells its caller when it saw a gap and needs a new snapshot.
//!
//! Coalescing: the mirror keeps the view it last *announced* to local sockets (`dirty` remembers,
//! for every connection changed since, what was announced before). [`Mirror::take_diff`] turns all
//! changes since the last flush into one `presence_diff`; [`Mirror::state_payload`] is always the
//! announced view, so a socket that joins between two flushes gets a state to which the next diff
//! applies exactly.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::metrics::script;
use crate::redis::keys::RoomKeys;
use crate::redis::scripts::Scripts;

/// One signed-in connection's meta, as stored in `<p>:room:{R}:presence`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct Meta {
    pub user_id: String,
    pub username: String,
    pub online_at: i64,
    #[serde(default)]
    pub node: String,
}

/// A presence change as published by the scripts (see `lua/common.lua`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Envelope {
    pub seq: u64,
    pub anon: u64,
    #[serde(default)]
    pub joins: HashMap<String, Meta>,
    #[serde(default)]
    pub leaves: Vec<String>,
}

/// A whole-room snapshot.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Snapshot {
    pub seq: u64,
    pub anon: u64,
    pub metas: HashMap<String, Meta>,
}

/// What applying an envelope did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Applied in order.
    Changed,
    /// Already seen (seq not above ours): ignored.
    Stale,
    /// Buffered while a snapshot is being taken.
    Buffered,
    /// A seq was skipped: the caller must take a new snapshot.
    Gap,
}

/// The node-local view of one room's presence.
#[derive(Debug, Default)]
pub struct Mirror {
    /// false until the first snapshot is installed, and again while a re-snapshot is under way.
    synced: bool,
    seq: u64,
    metas: HashMap<Arc<str>, Arc<Meta>>,
    /// Connections per user, so `users` in presence_count is O(1).
    users: HashMap<String, u32>,
    /// Anonymous total from Redis (all live nodes).
    anon: u64,
    /// Envelopes that arrived while not synced.
    buffer: Vec<Envelope>,
    /// conn → what was announced for it before it changed (None: it was not present).
    dirty: HashMap<Arc<str>, Option<Arc<Meta>>>,
    /// Anonymous count as last announced (before the cap).
    anon_announced: u64,
    /// Cached `presence_state` payload of the announced view.
    state_cache: Option<Bytes>,
}

impl Mirror {
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Anonymous total as known from Redis.
    pub fn anon(&self) -> u64 {
        self.anon
    }

    pub fn users(&self) -> usize {
        self.users.len()
    }

    pub fn connections(&self) -> usize {
        self.metas.len()
    }

    /// Marks the mirror as out of date: envelopes are buffered until [`Mirror::install`].
    pub fn begin_resync(&mut self) {
        self.synced = false;
    }

    /// Gives up a re-snapshot (the room record is gone): keeps the last known view and drops what
    /// was buffered, instead of re-snapshotting forever.
    pub fn abandon_resync(&mut self) {
        self.buffer.clear();
        self.synced = true;
    }

    /// Installs a snapshot, then every buffered envelope above its seq. Differences against what
    /// was announced become part of the next diff. Returns [`Applied::Gap`] if the buffer skips a seq.
    pub fn install(&mut self, snap: Snapshot) -> Applied {
        let new: HashMap<Arc<str>, Arc<Meta>> = snap
            .metas
            .into_iter()
            .map(|(k, v)| (Arc::from(k), Arc::new(v)))
            .collect();
        let old = std::mem::take(&mut self.metas);
        for (k, v) in &old {
            if new.get(k) != Some(v) {
                self.dirty
                    .entry(k.clone())
                    .or_insert_with(|| Some(v.clone()));
            }
        }
        for k in new.keys() {
            if !old.contains_key(k) {
                self.dirty.entry(k.clone()).or_insert(None);
            }
        }
        if old.is_empty() && !self.synced && self.seq == 0 {
            // first install: the snapshot is what a joiner is told; nothing to announce as a diff
            self.dirty.clear();
            self.anon_announced = snap.anon;
            self.state_cache = None;
        }
        self.users.clear();
        for m in new.values() {
            *self.users.entry(m.user_id.clone()).or_default() += 1;
        }
        self.metas = new;
        self.anon = snap.anon;
        self.seq = snap.seq;
        self.synced = true;
        let mut buffered = std::mem::take(&mut self.buffer);
        buffered.sort_by_key(|e| e.seq);
        let mut result = Applied::Changed;
        for env in buffered {
            if self.apply(env) == Applied::Gap {
                result = Applied::Gap;
                break;
            }
        }
        result
    }

    /// Applies one published change.
    pub fn apply(&mut self, env: Envelope) -> Applied {
        if !self.synced {
            if self.buffer.len() < 10_000 {
                self.buffer.push(env);
            }
            return Applied::Buffered;
        }
        if env.seq <= self.seq {
            return Applied::Stale;
        }
        if env.seq != self.seq + 1 {
            self.synced = false;
            self.buffer.push(env);
            return Applied::Gap;
        }
        self.seq = env.seq;
        self.anon = env.anon;
        for conn in env.leaves {
            if let Some((k, old)) = self.metas.remove_entry(conn.as_str()) {
                self.forget_user(&old.user_id);
                self.dirty.entry(k).or_insert(Some(old));
            }
        }
        for (conn, meta) in env.joins {
            let conn: Arc<str> = Arc::from(conn);
            let meta = Arc::new(meta);
            *self.users.entry(meta.user_id.clone()).or_default() += 1;
            match self.metas.insert(conn.clone(), meta) {
                Some(old) => {
                    self.forget_user(&old.user_id);
                    self.dirty.entry(conn).or_insert(Some(old));
                }
                None => {
                    self.dirty.entry(conn).or_insert(None);
                }
            }
        }
        Applied::Changed
    }

    fn forget_user(&mut self, user: &str) {
        if let Some(n) = self.users.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                self.users.remove(user);
            }
        }
    }

    /// Whether a flush would send anything, given the anonymous count to show now.
    pub fn has_pending(&self, anon_now: u64, cap: u64) -> bool {
        self.members_changed() || self.anon_moved(anon_now, cap)
    }

    /// Whether a signed-in connection joined, left or changed since the last flush.
    pub fn members_changed(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Whether the anonymous `""` list shown differs from the announced one.
    pub fn anon_moved(&self, anon_now: u64, cap: u64) -> bool {
        anon_now.min(cap) != self.anon_announced.min(cap)
    }

    /// Builds the `presence_diff` payload for everything changed since the last flush and makes
    /// the current view the announced one. `None` when nothing visible changed.
    pub fn take_diff(&mut self, anon_now: u64, cap: u64) -> Option<Value> {
        let mut joins = Map::new();
        let mut leaves = Map::new();
        for (conn, before) in std::mem::take(&mut self.dirty) {
            let now = self.metas.get(&conn);
            match (before, now) {
                (None, Some(m)) => add_meta(&mut joins, &conn, m),
                (Some(b), None) => add_meta(&mut leaves, &conn, &b),
                // same phx_ref, other user (a connection re-joined under another identity):
                // the old key must lose the ref, or clients keep a ghost under it
                (Some(b), Some(m)) if b.user_id != m.user_id => {
                    add_meta(&mut leaves, &conn, &b);
                    add_meta(&mut joins, &conn, m);
                }
                // same user, new content: a join with the same ref replaces the meta
                (Some(b), Some(m)) if *b != **m => add_meta(&mut joins, &conn, m),
                _ => {}
            }
        }
        let (from, to) = (self.anon_announced.min(cap), anon_now.min(cap));
        self.anon_announced = anon_now;
        if to > from {
            joins.insert(String::new(), anon_metas(from + 1, to));
        } else if from > to {
            leaves.insert(String::new(), anon_metas(to + 1, from));
        }
        if joins.is_empty() && leaves.is_empty() {
            return None;
        }
        self.state_cache = None;
        Some(json!({"joins": joins, "leaves": leaves}))
    }

    /// The `presence_state` payload of the announced view, serialised once per flush window.
    pub fn state_payload(&mut self, cap: u64) -> Bytes {
        if let Some(b) = &self.state_cache {
            return b.clone();
        }
        let mut state = Map::new();
        for (conn, m) in &self.metas {
            match self.dirty.get(conn) {
                None => add_meta(&mut state, conn, m),
                Some(Some(before)) => add_meta(&mut state, conn, before),
                Some(None) => {} // joined after the last flush: announced by the next diff
            }
        }
        for (conn, before) in &self.dirty {
            if let (Some(b), false) = (before, self.metas.contains_key(conn)) {
                add_meta(&mut state, conn, b); // left after the last flush
            }
        }
        let n = self.anon_announced.min(cap);
        if n > 0 {
            state.insert(String::new(), anon_metas(1, n));
        }
        let b = Bytes::from(serde_json::to_vec(&Value::Object(state)).unwrap_or_default());
        self.state_cache = Some(b.clone());
        b
    }

    /// Signed-in users grouped by user id (for the admin API and the CLI).
    pub fn users_list(&self) -> Vec<(String, String, usize)> {
        let mut by_user: HashMap<&str, (&str, usize)> = HashMap::new();
        for m in self.metas.values() {
            let e = by_user.entry(&m.user_id).or_insert((&m.username, 0));
            e.1 += 1;
        }
        let mut v: Vec<_> = by_user
            .into_iter()
            .map(|(id, (name, n))| (id.to_string(), name.to_string(), n))
            .collect();
        v.sort();
        v
    }
}

fn add_meta(into: &mut Map<String, Value>, conn: &str, m: &Meta) {
    let entry = into
        .entry(m.user_id.clone())
        .or_insert_with(|| json!({"metas": []}));
    if let Some(Value::Array(metas)) = entry.get_mut("metas") {
        metas.push(json!({"phx_ref": conn, "username": m.username, "online_at": m.online_at}));
    }
}

/// `{"metas":[{"phx_ref":"a<from>"},…,{"phx_ref":"a<to>"}]}` — the stack of synthetic refs that
/// renders as "Anonymous: N" in the seed's unmodified client.
fn anon_metas(from: u64, to: u64) -> Value {
    let metas: Vec<Value> = (from..=to)
        .map(|i| json!({ "phx_ref": format!("a{i}") }))
        .collect();
    json!({ "metas": metas })
}

/// Builds the meta JSON stored for a signed-in connection.
pub fn meta_json(user_id: &str, username: &str, online_at: i64, node: &str) -> String {
    serde_json::to_string(&Meta {
        user_id: user_id.to_string(),
        username: username.to_string(),
        online_at,
        node: node.to_string(),
    })
    .unwrap_or_default()
}

// ------------------------------------------------------------------------------------------------
// The Redis side.

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within the deadline")]
    Timeout,
    /// One failure shared by several calls (a pipeline that failed as a whole).
    #[error("redis: {0}")]
    Shared(String),
    #[error("unexpected reply from a presence script: {0}")]
    Reply(String),
}

/// Result of `join.lua`.
#[derive(Debug)]
pub enum JoinReply {
    NoRoom,
    Joined {
        seq: u64,
        anon: u64,
        snapshot: Option<Snapshot>,
        /// The call found this node's own lease lapsed and swept its entries: re-assert (sync).
        lost: bool,
        /// This node's lease existed before the call (false: its first call in the room, or
        /// another node swept it — then its other entries there are gone too).
        had_lease: bool,
    },
}

/// Result of `leave.lua`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaveReply {
    /// The seq of the published change, 0 if nothing changed.
    pub seq: u64,
    pub anon: u64,
    /// The call found this node's own lease lapsed and swept its entries: re-assert (sync).
    pub lost: bool,
    /// false: the room record is gone (the script wrote nothing and removed this node's entries).
    pub exists: bool,
    /// This node's lease existed before the call (see [`JoinReply::Joined::had_lease`]).
    pub had_lease: bool,
}

/// Result of `sync.lua`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncReply {
    /// The seq of the published change, 0 if nothing changed.
    pub seq: u64,
    pub anon: u64,
    /// false: the room record is gone (nothing was written back into it).
    pub exists: bool,
}

/// Result of `heartbeat.lua` for one room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatReply {
    /// false: this node's lease had lapsed (its entries may be gone): re-assert with sync.
    pub had_lease: bool,
    /// The seq of the published change, 0 if nothing changed.
    pub seq: u64,
    /// false: the room record is gone (the lease was not renewed).
    pub exists: bool,
}

/// Rooms per heartbeat pipeline: each chunk has its own deadline, so one slow batch does not
/// fail every room of the node.
const HEARTBEAT_CHUNK: usize = 200;

/// Timings every script call carries.
#[derive(Debug, Clone)]
pub struct Lease {
    pub node: String,
    pub lease_ms: u64,
    pub key_ttl_ms: u64,
}

/// Presence writes and reads, one script call each, over the shared multiplexed connection
/// (one round trip per call: no pool checkout on this path).
#[derive(Clone)]
pub struct Store {
    conn: crate::redis::Redis,
    scripts: Arc<Scripts>,
    lease: Arc<Lease>,
    timeout: std::time::Duration,
    metrics: crate::metrics::Metrics,
}

type Flat = Vec<redis::Value>;

impl Store {
    pub fn new(
        conn: crate::redis::Redis,
        scripts: Arc<Scripts>,
        lease: Lease,
        timeout: std::time::Duration,
        metrics: crate::metrics::Metrics,
    ) -> Self {
        Self {
            conn,
            scripts,
            lease: Arc::new(lease),
            timeout,
            metrics,
        }
    }

    /// The hot connection.
    pub fn redis(&self) -> &crate::redis::Redis {
        &self.conn
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        name: &'static str,
        inv: redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        let timer = self.metrics.script_timer(name);
        let r = tokio::time::timeout(self.timeout, inv.invoke_async::<T>(&mut conn)).await;
        timer.observe_duration();
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.metrics.redis_error(name);
                Err(e.into())
            }
            Err(_) => {
                self.metrics.redis_error(name);
                Err(StoreError::Timeout)
            }
        }
    }

    /// A plain command on the hot connection, with the command deadline; failures are counted
    /// under `op` in `gateway_redis_errors_total`.
    pub async fn command<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, cmd.query_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.metrics.redis_error(op);
                Err(e.into())
            }
            Err(_) => {
                self.metrics.redis_error(op);
                Err(StoreError::Timeout)
            }
        }
    }

    fn with_keys<'a>(inv: &mut redis::ScriptInvocation<'a>, keys: &RoomKeys) {
        for k in keys.all() {
            inv.key(k);
        }
    }

    /// `join.lua`: a signed-in connection (conn, meta) or `n` anonymous viewers (conn = "").
    pub async fn join(
        &self,
        keys: &RoomKeys,
        conn: &str,
        meta_or_count: &str,
        want_snapshot: bool,
    ) -> Result<JoinReply, StoreError> {
        let mut inv = self.scripts.join.prepare_invoke();
        Self::with_keys(&mut inv, keys);
        inv.arg(&self.lease.node)
            .arg(self.lease.lease_ms)
            .arg(self.lease.key_ttl_ms)
            .arg(conn)
            .arg(meta_or_count)
            .arg(if want_snapshot { "1" } else { "0" });
        let v: Flat = self.run(script::JOIN, inv).await?;
        if int_at(&v, 0)? == 0 {
            return Ok(JoinReply::NoRoom);
        }
        let seq = int_at(&v, 1)?;
        let anon = int_at(&v, 2)?;
        let snapshot = if want_snapshot {
            Some(Snapshot {
                seq,
                anon,
                metas: metas_at(&v, 3)?,
            })
        } else {
            None
        };
        Ok(JoinReply::Joined {
            seq,
            anon,
            snapshot,
            lost: int_at(&v, 4)? == 1,
            had_lease: flag_at(&v, 5)?,
        })
    }

    /// `leave.lua`: a signed-in connection (conn) or `count` anonymous viewers (conn = "").
    /// `release_if_idle`: the node leaves the room; its lease goes too if it holds nothing there.
    pub async fn leave(
        &self,
        keys: &RoomKeys,
        conn: &str,
        count: u64,
        release_if_idle: bool,
    ) -> Result<LeaveReply, StoreError> {
        let mut inv = self.scripts.leave.prepare_invoke();
        Self::with_keys(&mut inv, keys);
        inv.arg(&self.lease.node)
            .arg(self.lease.lease_ms)
            .arg(self.lease.key_ttl_ms)
            .arg(conn)
            .arg(count)
            .arg(if release_if_idle { "1" } else { "0" });
        let v: Flat = self.run(script::LEAVE, inv).await?;
        Ok(LeaveReply {
            seq: int_at(&v, 0)?,
            anon: int_at(&v, 1)?,
            lost: int_at(&v, 2)? == 1,
            exists: flag_at(&v, 3)?,
            had_lease: flag_at(&v, 4)?,
        })
    }

    /// `snapshot.lua`; `None` when the room does not exist.
    pub async fn snapshot(&self, keys: &RoomKeys) -> Result<Option<Snapshot>, StoreError> {
        let mut inv = self.scripts.snapshot.prepare_invoke();
        Self::with_keys(&mut inv, keys);
        inv.arg(self.lease.key_ttl_ms);
        let v: Flat = self.run(script::SNAPSHOT, inv).await?;
        if int_at(&v, 0)? == 0 {
            return Ok(None);
        }
        Ok(Some(Snapshot {
            seq: int_at(&v, 1)?,
            anon: int_at(&v, 2)?,
            metas: metas_at(&v, 3)?,
        }))
    }

    /// `sync.lua`: this node's truth in the room replaces what Redis holds for it.
    /// `anon = None` leaves the anonymous field alone (a batch is in flight).
    pub async fn sync(
        &self,
        keys: &RoomKeys,
        anon: Option<u64>,
        release: bool,
        metas: &[(String, String)],
    ) -> Result<SyncReply, StoreError> {
        let mut inv = self.scripts.sync.prepare_invoke();
        Self::with_keys(&mut inv, keys);
        inv.arg(&self.lease.node)
            .arg(self.lease.lease_ms)
            .arg(self.lease.key_ttl_ms)
            .arg(anon.map(|n| n.to_string()).unwrap_or_default())
            .arg(if release { "1" } else { "0" });
        for (c, m) in metas {
            inv.arg(c).arg(m);
        }
        let v: Flat = self.run(script::SYNC, inv).await?;
        Ok(SyncReply {
            seq: int_at(&v, 0)?,
            anon: int_at(&v, 1)?,
            exists: flag_at(&v, 2)?,
        })
    }

    /// `heartbeat.lua` for many rooms, pipelined in chunks of [`HEARTBEAT_CHUNK`] that run side by
    /// side, each with its own deadline. Each entry: room keys and the anonymous count to re-assert
    /// (None: leave it alone). Returns one result per room, in order: a script error (`WRONGTYPE`
    /// on one room's keys) or a chunk's timeout fails only those rooms.
    pub async fn heartbeat(
        &self,
        rooms: &[(RoomKeys, Option<u64>)],
    ) -> Vec<Result<HeartbeatReply, StoreError>> {
        let timer = self.metrics.script_timer(script::HEARTBEAT);
        // one pipeline per master (a pipeline cannot span the slots of several masters), in
        // chunks; a standalone server is one master
        let groups = self
            .conn
            .group_by_shard(rooms.iter().map(|(k, _)| k.room.as_str()));
        let chunks = groups
            .iter()
            .flat_map(|g| g.chunks(HEARTBEAT_CHUNK))
            .map(|idx| self.heartbeat_chunk(rooms, idx));
        let mut out: Vec<Result<HeartbeatReply, StoreError>> =
            (0..rooms.len()).map(|_| Err(StoreError::Timeout)).collect();
        for part in futures_util::future::join_all(chunks).await {
            for (i, r) in part {
                out[i] = r;
            }
        }
        if out.iter().any(Result::is_err) {
            // a slot may have moved (failover, resharding): group by the current map next time
            let _ = self.conn.refresh_shards().await;
        }
        timer.observe_duration();
        for r in &out {
            if r.is_err() {
                self.metrics.redis_error(script::HEARTBEAT);
            }
        }
        out
    }

    /// One pipeline of heartbeats: the rooms `idx` of `rooms`, all on one master. Returns each
    /// room's index with its outcome.
    async fn heartbeat_chunk(
        &self,
        rooms: &[(RoomKeys, Option<u64>)],
        idx: &[usize],
    ) -> Vec<(usize, Result<HeartbeatReply, StoreError>)> {
        let pipe = |idx: &[usize]| {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for &i in idx {
                let (keys, anon) = &rooms[i];
                let mut inv = self.scripts.heartbeat.prepare_invoke();
                Self::with_keys(&mut inv, keys);
                inv.arg(&self.lease.node)
                    .arg(self.lease.lease_ms)
                    .arg(self.lease.key_ttl_ms)
                    .arg(anon.map(|n| n.to_string()).unwrap_or_default());
                pipe.invoke_script(&inv);
            }
            pipe
        };
        let mut out: std::collections::HashMap<usize, Result<HeartbeatReply, StoreError>> =
            idx.iter().map(|&i| (i, Err(StoreError::Timeout))).collect();
        let mut todo: Vec<usize> = idx.to_vec();
        // a second round only for the scripts Redis did not know (restart, SCRIPT FLUSH,
        // a freshly promoted replica)
        for round in 0..2 {
            let mut conn = self.conn.clone();
            let replies: Vec<redis::RedisResult<Flat>> = match tokio::time::timeout(
                self.timeout,
                self.conn
                    .pipeline_on_shard(&pipe(&todo), &rooms[todo[0]].0.room),
            )
            .await
            {
                Ok(Ok(r)) => r
                    .into_iter()
                    .map(|v| {
                        v.extract_error()
                            .and_then(|v| redis::from_redis_value(v).map_err(Into::into))
                    })
                    .collect(),
                Ok(Err(e)) => {
                    let msg = e.to_string();
                    for &i in &todo {
                        out.insert(i, Err(StoreError::Shared(msg.clone())));
                    }
                    return out.into_iter().collect();
                }
                Err(_) => return out.into_iter().collect(),
            };
            let mut again = Vec::new();
            for (&i, r) in todo.iter().zip(replies) {
                match r {
                    Err(e)
                        if round == 0
                            && e.kind()
                                == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                    {
                        again.push(i)
                    }
                    Err(e) => {
                        out.insert(i, Err(e.into()));
                    }
                    Ok(v) => {
                        out.insert(
                            i,
                            (|| {
                                Ok(HeartbeatReply {
                                    had_lease: int_at(&v, 0)? == 1,
                                    seq: int_at(&v, 1)?,
                                    exists: flag_at(&v, 3)?,
                                })
                            })(),
                        );
                    }
                }
            }
            if again.is_empty() {
                break;
            }
            if let Err(e) = self.scripts.load_all(&mut conn).await {
                let msg = e.to_string();
                for &i in &again {
                    out.insert(i, Err(StoreError::Shared(msg.clone())));
                }
                break;
            }
            todo = again;
        }
        out.into_iter().collect()
    }
}

fn int_at(v: &[redis::Value], i: usize) -> Result<u64, StoreError> {
    match v.get(i) {
        Some(redis::Value::Int(n)) => Ok((*n).max(0) as u64),
        other => Err(StoreError::Reply(format!(
            "expected an integer at {i}, got {other:?}"
        ))),
    }
}

/// A 1/0 flag a script appends to its reply; absent means 1 (a reply from before the flag).
fn flag_at(v: &[redis::Value], i: usize) -> Result<bool, StoreError> {
    if v.len() <= i {
        return Ok(true);
    }
    Ok(int_at(v, i)? == 1)
}

fn metas_at(v: &[redis::Value], i: usize) -> Result<HashMap<String, Meta>, StoreError> {
    let Some(redis::Value::Array(flat)) = v.get(i) else {
        return Err(StoreError::Reply(format!("expected an array at {i}")));
    };
    let mut out = HashMap::with_capacity(flat.len() / 2);
    for pair in flat.chunks(2) {
        let (Some(redis::Value::BulkString(k)), Some(redis::Value::BulkString(m))) =
            (pair.first(), pair.get(1))
        else {
            return Err(StoreError::Reply("malformed presence hash".into()));
        };
        let conn = String::from_utf8_lossy(k).into_owned();
        match serde_json::from_slice::<Meta>(m) {
            Ok(meta) => {
                out.insert(conn, meta);
            }
            Err(e) => tracing::warn!(%conn, error = %e, "ignoring unreadable presence meta"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(user: &str) -> Meta {
        Meta {
            user_id: user.into(),
            username: format!("name-{user}"),
            online_at: 1,
            node: "n".into(),
        }
    }

    fn env(seq: u64, anon: u64, joins: &[(&str, &str)], leaves: &[&str]) -> Envelope {
        Envelope {
            seq,
            anon,
            joins: joins
                .iter()
                .map(|(c, u)| (c.to_string(), meta(u)))
                .collect(),
            leaves: leaves.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn synced(seq: u64, anon: u64, metas: &[(&str, &str)]) -> Mirror {
        let mut m = Mirror::default();
        m.install(Snapshot {
            seq,
            anon,
            metas: metas
                .iter()
                .map(|(c, u)| (c.to_string(), meta(u)))
                .collect(),
        });
        m
    }

    fn state(m: &mut Mirror) -> Value {
        serde_json::from_slice(&m.state_payload(1000)).unwrap()
    }

    #[test]
    fn first_snapshot_is_the_announced_state() {
        let mut m = synced(10, 2, &[("n.1", "u1"), ("n.2", "u1"), ("n.3", "u2")]);
        let s = state(&mut m);
        assert_eq!(s["u1"]["metas"].as_array().unwrap().len(), 2);
        assert_eq!(s["u2"]["metas"][0]["phx_ref"], "n.3");
        assert_eq!(s[""]["metas"], json!([{"phx_ref":"a1"},{"phx_ref":"a2"}]));
        assert_eq!(m.users(), 2);
        assert!(!m.has_pending(2, 1000));
        assert_eq!(m.take_diff(2, 1000), None);
    }

    #[test]
    fn applies_in_order_and_detects_gaps() {
        let mut m = synced(10, 0, &[]);
        assert_eq!(m.apply(env(10, 0, &[("n.1", "u1")], &[])), Applied::Stale);
        assert_eq!(m.apply(env(11, 0, &[("n.1", "u1")], &[])), Applied::Changed);
        assert_eq!(m.seq(), 11);
        assert_eq!(m.apply(env(13, 0, &[], &[])), Applied::Gap);
        assert!(!m.is_synced());
        assert_eq!(m.apply(env(14, 1, &[], &["n.1"])), Applied::Buffered);
        // re-snapshot at 13; 14 is applied from the buffer
        let r = m.install(Snapshot {
            seq: 13,
            anon: 0,
            metas: [("n.1".to_string(), meta("u1"))].into(),
        });
        assert_eq!(r, Applied::Changed);
        assert_eq!(m.seq(), 14);
        assert_eq!(m.connections(), 0);
        assert_eq!(m.anon(), 1);
    }

    #[test]
    fn diffs_coalesce_joins_and_leaves() {
        let mut m = synced(1, 0, &[("n.1", "u1")]);
        m.apply(env(2, 3, &[("n.2", "u2")], &[]));
        m.apply(env(3, 3, &[("n.3", "u3")], &[]));
        m.apply(env(4, 5, &[], &["n.3", "n.1"])); // n.3 joined and left within the window
        // the announced view is unchanged until the flush
        let s = state(&mut m);
        assert!(s.get("u1").is_some() && s.get("u2").is_none() && s.get("").is_none());
        let d = m.take_diff(5, 1000).unwrap();
        assert_eq!(d["joins"]["u2"]["metas"][0]["phx_ref"], "n.2");
        assert!(d["joins"].get("u3").is_none() && d["leaves"].get("u3").is_none());
        assert_eq!(d["leaves"]["u1"]["metas"][0]["phx_ref"], "n.1");
        let anon: Vec<_> = d["joins"][""]["metas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["phx_ref"].clone())
            .collect();
        assert_eq!(
            anon,
            vec![
                json!("a1"),
                json!("a2"),
                json!("a3"),
                json!("a4"),
                json!("a5")
            ]
        );
        assert_eq!(m.take_diff(5, 1000), None);
        // now state shows the new view
        let s = state(&mut m);
        assert!(s.get("u1").is_none() && s.get("u2").is_some());
        assert_eq!(s[""]["metas"].as_array().unwrap().len(), 5);
    }

    #[test]
    fn anonymous_stack_shrinks_from_the_top_and_is_capped() {
        let mut m = synced(1, 5, &[]);
        let d = m.take_diff(2, 1000).unwrap();
        assert_eq!(
            d["leaves"][""]["metas"],
            json!([{"phx_ref":"a3"},{"phx_ref":"a4"},{"phx_ref":"a5"}])
        );
        assert!(d["joins"].as_object().unwrap().is_empty());
        // above the cap nothing changes on the wire
        let d = m.take_diff(10, 4).unwrap();
        assert_eq!(d["joins"][""]["metas"].as_array().unwrap().len(), 2); // a3, a4
        assert_eq!(m.take_diff(20, 4), None);
        assert_eq!(
            serde_json::from_slice::<Value>(&m.state_payload(4)).unwrap()[""]["metas"]
                .as_array()
                .unwrap()
                .len(),
            4
        );
    }

    #[test]
    fn a_connection_changing_user_leaves_the_old_key() {
        let mut m = synced(1, 0, &[("n.1", "u1")]);
        m.apply(env(2, 0, &[], &["n.1"]));
        m.apply(env(3, 0, &[("n.1", "u2")], &[]));
        let d = m.take_diff(0, 1000).unwrap();
        assert_eq!(d["leaves"]["u1"]["metas"][0]["phx_ref"], "n.1");
        assert_eq!(d["joins"]["u2"]["metas"][0]["phx_ref"], "n.1");
    }

    #[test]
    fn zero_anonymous_is_no_key() {
        let mut m = synced(1, 0, &[]);
        assert_eq!(state(&mut m), json!({}));
    }

    #[test]
    fn resnapshot_differences_become_the_next_diff() {
        let mut m = synced(1, 0, &[("n.1", "u1"), ("n.2", "u2")]);
        m.begin_resync();
        m.install(Snapshot {
            seq: 9,
            anon: 0,
            metas: [
                ("n.2".to_string(), meta("u2")),
                ("n.3".to_string(), meta("u3")),
            ]
            .into(),
        });
        let d = m.take_diff(0, 1000).unwrap();
        assert_eq!(d["leaves"]["u1"]["metas"][0]["phx_ref"], "n.1");
        assert_eq!(d["joins"]["u3"]["metas"][0]["phx_ref"], "n.3");
        assert!(d["joins"].get("u2").is_none());
    }

    #[test]
    fn envelope_parses_the_script_format() {
        let e: Envelope = serde_json::from_str(
            r#"{"seq":1795000000000001,"anon":3,"joins":{"n.1":{"user_id":"7","username":"a","online_at":5,"node":"n"}},"leaves":["m.2"]}"#,
        ).unwrap();
        assert_eq!(e.seq, 1795000000000001);
        assert_eq!(e.joins["n.1"].user_id, "7");
        assert_eq!(e.leaves, vec!["m.2"]);
        let e: Envelope =
            serde_json::from_str(r#"{"seq":2,"anon":0,"joins":{},"leaves":[]}"#).unwrap();
        assert!(e.joins.is_empty());
    }
}

/// Property test of the [`Mirror`] against a model of the room: random changes, delivered
/// duplicated, reordered and with gaps, re-snapshots, flushes and joins. Simulated Phoenix JS
/// clients must hold the model's truth at the mirror's seq after every flush, what was announced
/// in between, and the truth after a final re-snapshot; their anonymous refs always a1..ak.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    const CASES: u32 = 4096;
    /// Seqs are never 0 in Redis (`current_seq` in lua/common.lua starts at the clock).
    const BASE: u64 = 1_000;
    const CONNS: u8 = 6;
    const USERS: u8 = 3;

    fn meta() -> impl Strategy<Value = Meta> {
        (0..USERS, 0..2u8, 0..2i64).prop_map(|(u, v, t)| Meta {
            user_id: format!("u{u}"),
            username: format!("name{u}.{v}"),
            online_at: t,
            node: "n".into(),
        })
    }

    fn conn(c: u8) -> String {
        format!("n.{c}")
    }

    /// One published change, without its seq: an absolute anonymous total, connections that
    /// left and connections that joined (a connection may be in both, like a `join.lua` that
    /// swept the caller's own entries: leave first, then join).
    #[derive(Debug, Clone)]
    struct Change {
        anon: u64,
        leaves: Vec<u8>,
        joins: Vec<(u8, Meta)>,
    }

    fn change() -> impl Strategy<Value = Change> {
        (0..9u64, vec(0..CONNS, 0..3), vec((0..CONNS, meta()), 0..3)).prop_map(
            |(anon, leaves, joins)| Change {
                anon,
                leaves,
                joins,
            },
        )
    }

    /// The room as Redis holds it at one seq.
    #[derive(Debug, Clone)]
    struct Truth {
        anon: u64,
        metas: BTreeMap<String, Meta>,
    }

    impl Truth {
        fn envelope(c: &Change, seq: u64) -> Envelope {
            Envelope {
                seq,
                anon: c.anon,
                joins: c.joins.iter().map(|(k, m)| (conn(*k), m.clone())).collect(),
                leaves: c.leaves.iter().map(|k| conn(*k)).collect(),
            }
        }

        /// What Redis holds after the change: leaves removed, then joins written.
        fn after(&self, env: &Envelope) -> Truth {
            let mut metas = self.metas.clone();
            for c in &env.leaves {
                metas.remove(c);
            }
            for (c, m) in &env.joins {
                metas.insert(c.clone(), m.clone());
            }
            Truth {
                anon: env.anon,
                metas,
            }
        }

        fn snapshot(&self, seq: u64) -> Snapshot {
            Snapshot {
                seq,
                anon: self.anon,
                metas: self.metas.clone().into_iter().collect(),
            }
        }

        /// What a client must show for this truth, with `anon` anonymous viewers displayed.
        fn view(&self, anon: u64, cap: u64) -> View {
            let mut v = View::new();
            for (c, m) in &self.metas {
                v.entry(m.user_id.clone()).or_default().insert(
                    c.clone(),
                    json!({"phx_ref": c, "username": m.username, "online_at": m.online_at}),
                );
            }
            for i in 1..=anon.min(cap) {
                let r = format!("a{i}");
                v.entry(String::new())
                    .or_default()
                    .insert(r.clone(), json!({ "phx_ref": r }));
            }
            v
        }
    }

    /// key → phx_ref → meta.
    type View = BTreeMap<String, BTreeMap<String, Value>>;

    /// A Phoenix JS `Presence` (phoenix.js `syncState`/`syncDiff`, PHOENIX_PROTOCOL.md §6.2).
    #[derive(Debug, Clone, Default)]
    struct Client {
        state: BTreeMap<String, Vec<Value>>,
    }

    fn refs(p: &Value) -> Vec<Value> {
        p["metas"]
            .as_array()
            .map(|m| m.iter().map(|m| m["phx_ref"].clone()).collect())
            .unwrap_or_default()
    }

    impl Client {
        /// A fresh client's `syncState` from nothing is a diff that joins the whole state.
        fn from_state(state: &[u8]) -> Result<Client, TestCaseError> {
            let state: Value = serde_json::from_slice(state)
                .map_err(|e| TestCaseError::fail(format!("presence_state: {e}")))?;
            let mut c = Client::default();
            c.sync_diff(&json!({"joins": state, "leaves": {}}))?;
            Ok(c)
        }

        fn sync_diff(&mut self, diff: &Value) -> Result<(), TestCaseError> {
            let (Some(joins), Some(leaves)) =
                (diff["joins"].as_object(), diff["leaves"].as_object())
            else {
                return Err(TestCaseError::fail(format!("not a presence diff: {diff}")));
            };
            // joins first: the new metas, after the current ones whose ref is not among them
            for (key, p) in joins {
                let joined = refs(p);
                let mut metas: Vec<Value> = self
                    .state
                    .remove(key)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|m| !joined.contains(&m["phx_ref"]))
                    .collect();
                metas.extend(p["metas"].as_array().cloned().unwrap_or_default());
                self.state.insert(key.clone(), metas);
            }
            // then leaves: refs removed, a key with no metas left is deleted
            for (key, p) in leaves {
                let left = refs(p);
                if let Some(metas) = self.state.get_mut(key) {
                    metas.retain(|m| !left.contains(&m["phx_ref"]));
                    if metas.is_empty() {
                        self.state.remove(key);
                    }
                }
            }
            Ok(())
        }

        /// The state by ref; two metas with one ref under a key would collapse in the client.
        fn view(&self) -> Result<View, TestCaseError> {
            let mut v = View::new();
            for (key, metas) in &self.state {
                let e = v.entry(key.clone()).or_default();
                for m in metas {
                    let r = m["phx_ref"].as_str().unwrap_or_default().to_string();
                    prop_assert!(
                        e.insert(r.clone(), m.clone()).is_none(),
                        "two metas with ref {r} under {key:?}: {:?}",
                        self.state
                    );
                }
            }
            Ok(v)
        }

        /// The anonymous refs are a stack: exactly a1..ak.
        fn check_anon_stack(&self) -> Result<(), TestCaseError> {
            let held: BTreeSet<String> = self
                .state
                .get("")
                .into_iter()
                .flatten()
                .map(|m| m["phx_ref"].as_str().unwrap_or_default().to_string())
                .collect();
            let stack: BTreeSet<String> = (1..=held.len()).map(|i| format!("a{i}")).collect();
            prop_assert_eq!(held, stack, "anonymous refs are not a1..ak");
            Ok(())
        }
    }

    /// One step of the schedule. Indexes pick among what is possible at that moment.
    #[derive(Debug, Clone)]
    enum Op {
        /// Redis applies and publishes the next 1..=n changes (they are now in flight).
        Publish(u8),
        /// The oldest envelope in flight arrives.
        Deliver,
        /// Some envelope in flight arrives, overtaking older ones.
        DeliverAny(prop::sample::Index),
        /// An envelope that already arrived arrives again.
        Duplicate(prop::sample::Index),
        /// An envelope in flight is lost.
        Lose(prop::sample::Index),
        /// A re-snapshot begins without a gap (pub/sub reconnect).
        BeginResync,
        /// The pending snapshot's reply arrives: taken at some seq between the request and now.
        Snapshot(prop::sample::Index),
        /// The driver's flush: a `presence_diff` if `has_pending`, with the anonymous count
        /// shown off by `delta` (local joins not yet written to Redis).
        Flush(i8),
        /// A socket joins and gets `presence_state`.
        Join,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1..4u8).prop_map(Op::Publish),
            6 => Just(Op::Deliver),
            2 => any::<prop::sample::Index>().prop_map(Op::DeliverAny),
            1 => any::<prop::sample::Index>().prop_map(Op::Duplicate),
            1 => any::<prop::sample::Index>().prop_map(Op::Lose),
            1 => Just(Op::BeginResync),
            3 => any::<prop::sample::Index>().prop_map(Op::Snapshot),
            3 => prop_oneof![3 => Just(0i8), 1 => -3..4i8].prop_map(Op::Flush),
            1 => Just(Op::Join),
        ]
    }

    #[derive(Debug, Clone)]
    struct Case {
        /// `presence.anonymous_list_max`.
        cap: u64,
        initial: Truth,
        changes: Vec<Change>,
        ops: Vec<Op>,
    }

    fn case() -> impl Strategy<Value = Case> {
        (
            prop_oneof![0..6u64, Just(1000u64)],
            0..9u64,
            vec((0..CONNS, meta()), 0..4),
            vec(change(), 0..40),
            vec(op(), 0..120),
        )
            .prop_map(|(cap, anon, metas, changes, ops)| Case {
                cap,
                initial: Truth {
                    anon,
                    metas: metas.into_iter().map(|(c, m)| (conn(c), m)).collect(),
                },
                changes,
                ops,
            })
    }

    /// The node around one room's mirror, as in `fanout`: it asks for a snapshot on a gap or a
    /// reconnect, installs the reply, flushes diffs to its sockets and sends joiners the state.
    struct Node {
        cap: u64,
        /// truths[i] is the room at seq BASE + i.
        truths: Vec<Truth>,
        envelopes: Vec<Envelope>,
        /// How many changes Redis has published.
        published: usize,
        in_flight: Vec<usize>,
        delivered: Vec<usize>,
        mirror: Mirror,
        installed: bool,
        /// A snapshot was asked for when `published` was this.
        pending: Option<usize>,
        /// What the sockets were told so far: the first snapshot, then each flush's truth.
        announced: View,
        clients: Vec<Client>,
    }

    impl Node {
        fn new(c: &Case) -> Node {
            let mut truths = vec![c.initial.clone()];
            let mut envelopes = Vec::new();
            for (i, ch) in c.changes.iter().enumerate() {
                let env = Truth::envelope(ch, BASE + 1 + i as u64);
                truths.push(truths[i].after(&env));
                envelopes.push(env);
            }
            Node {
                cap: c.cap,
                truths,
                envelopes,
                published: 0,
                in_flight: Vec::new(),
                delivered: Vec::new(),
                mirror: Mirror::default(),
                installed: false,
                pending: Some(0),
                announced: View::new(),
                clients: Vec::new(),
            }
        }

        fn resnapshot(&mut self) {
            self.mirror.begin_resync();
            self.pending.get_or_insert(self.published);
        }

        fn deliver(&mut self, i: usize) {
            self.delivered.push(i);
            if self.mirror.apply(self.envelopes[i].clone()) == Applied::Gap {
                self.resnapshot();
            }
        }

        fn install(&mut self, at: usize) -> Result<(), TestCaseError> {
            self.pending = None;
            let applied = self
                .mirror
                .install(self.truths[at].snapshot(BASE + at as u64));
            if !self.installed {
                // the first snapshot is what the first joiner, right after it, is told
                self.installed = true;
                let first = &self.truths[at];
                self.announced = first.view(first.anon, self.cap);
                self.join()?;
            }
            if applied == Applied::Gap {
                self.resnapshot();
            }
            Ok(())
        }

        fn join(&mut self) -> Result<(), TestCaseError> {
            let c = Client::from_state(&self.mirror.state_payload(self.cap))?;
            c.check_anon_stack()?;
            self.clients.push(c);
            // between flushes, every client (the new one too) holds what was announced
            for (n, c) in self.clients.iter().enumerate() {
                prop_assert_eq!(&c.view()?, &self.announced, "client {} between flushes", n);
            }
            Ok(())
        }

        /// The driver's flush; afterwards every client holds the truth at the mirror's seq.
        fn flush(&mut self, delta: i8) -> Result<(), TestCaseError> {
            if !self.installed || !self.mirror.is_synced() {
                return Ok(());
            }
            let anon = self.mirror.anon().saturating_add_signed(i64::from(delta));
            if self.mirror.has_pending(anon, self.cap)
                && let Some(diff) = self.mirror.take_diff(anon, self.cap)
            {
                for c in &mut self.clients {
                    c.sync_diff(&diff)?;
                }
            }
            let at = self.mirror.seq() - BASE;
            let truth = &self.truths[at as usize];
            prop_assert_eq!(
                self.mirror.anon(),
                truth.anon,
                "anonymous total at seq +{}",
                at
            );
            prop_assert_eq!(self.mirror.connections(), truth.metas.len());
            let users: BTreeSet<_> = truth.metas.values().map(|m| &m.user_id).collect();
            prop_assert_eq!(self.mirror.users(), users.len());
            self.announced = truth.view(anon, self.cap);
            for (n, c) in self.clients.iter().enumerate() {
                c.check_anon_stack()?;
                prop_assert_eq!(&c.view()?, &self.announced, "client {} at seq +{}", n, at);
            }
            Ok(())
        }

        fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
            match op {
                Op::Publish(n) => {
                    for _ in 0..*n {
                        if self.published < self.envelopes.len() {
                            self.in_flight.push(self.published);
                            self.published += 1;
                        }
                    }
                }
                Op::Deliver if !self.in_flight.is_empty() => {
                    let i = self.in_flight.remove(0);
                    self.deliver(i);
                }
                Op::DeliverAny(at) if !self.in_flight.is_empty() => {
                    let i = self.in_flight.remove(at.index(self.in_flight.len()));
                    self.deliver(i);
                }
                Op::Duplicate(at) if !self.delivered.is_empty() => {
                    self.deliver(self.delivered[at.index(self.delivered.len())]);
                }
                Op::Lose(at) if !self.in_flight.is_empty() => {
                    self.in_flight.remove(at.index(self.in_flight.len()));
                }
                Op::BeginResync if self.installed => self.resnapshot(),
                Op::Snapshot(at) => {
                    if let Some(from) = self.pending {
                        self.install(from + at.index(self.published - from + 1))?;
                    }
                }
                Op::Flush(delta) => self.flush(*delta)?,
                Op::Join if self.installed => self.join()?,
                _ => {}
            }
            Ok(())
        }

        /// Everything is published and what is still in flight arrives; then a re-snapshot of
        /// the final truth and a flush.
        fn finish(&mut self) -> Result<(), TestCaseError> {
            while self.published < self.envelopes.len() {
                self.step(&Op::Publish(1))?;
            }
            while !self.in_flight.is_empty() {
                self.step(&Op::Deliver)?;
            }
            if self.installed {
                self.resnapshot();
            }
            let last = self.envelopes.len();
            self.install(last)?;
            prop_assert!(self.mirror.is_synced());
            prop_assert_eq!(self.mirror.seq(), BASE + last as u64);
            self.flush(0)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

        /// Clients that start from `presence_state` and apply every `presence_diff` hold the
        /// model's truth after each flush and at the end, with the anonymous refs a stack.
        #[test]
        fn clients_converge_to_the_truth(c in case()) {
            let mut node = Node::new(&c);
            for op in &c.ops {
                node.step(op)?;
            }
            node.finish()?;
        }
    }
}
