//! The node-local [`Mirror`] of one room's presence, that every local socket's `presence_state`,
//! `presence_diff` and `presence_count` come from. Pure data: it applies the envelopes the scripts
//! publish, in `seq` order, and tells its caller when it saw a gap and needs a new snapshot.
//!
//! Coalescing: the mirror keeps the view it last *announced* to local sockets (`dirty` remembers,
//! for every connection changed since, what was announced before). [`Mirror::take_diff`] turns all
//! changes since the last flush into one `presence_diff`; [`Mirror::state_payload`] is always the
//! announced view, so a socket that joins between two flushes gets a state to which the next diff
//! applies exactly.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::{Envelope, Meta, Snapshot};

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
    /// The announced signed-in view, in the order `presence_state` lists it: (user, phx_ref) →
    /// that meta serialised. Kept up to date by each flush (O(changes)), so a new
    /// `presence_state` is one pass of copies, not a sort and a serialisation of the whole room.
    announced: BTreeMap<(Arc<str>, Arc<str>), Bytes>,
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
            self.announced = new
                .iter()
                .map(|(conn, m)| announced_entry(conn, m))
                .collect();
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
            // the announced view becomes the current one
            if let Some(b) = &before {
                self.announced
                    .remove(&(Arc::from(b.user_id.as_str()), conn.clone()));
            }
            if let Some(m) = now {
                let (k, v) = announced_entry(&conn, m);
                self.announced.insert(k, v);
            }
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

    /// The `presence_state` payload of the announced view, built once per flush window and
    /// shared by every joiner of the window (each gets it spliced into its own frame).
    ///
    /// Copied together from the announced metas serialised at their flush: at 10,000 users the
    /// view is ~1 MB, and building it as a `serde_json::Value` tree (an object, an array and a
    /// string per meta) and serialising that cost several milliseconds per window. The bytes are
    /// what that tree serialised to: keys in byte order (`""`, the anonymous stack, first), each
    /// meta's fields in the order `online_at`, `phx_ref`, `username`; a user's metas in `phx_ref`
    /// order.
    pub fn state_payload(&mut self, cap: u64) -> Bytes {
        if let Some(b) = &self.state_cache {
            return b.clone();
        }
        let n = self.anon_announced.min(cap);
        let size: usize = self.announced.values().map(|v| v.len() + 1).sum();
        let mut out = Vec::with_capacity(16 + size + self.announced.len() * 24 + n as usize * 18);
        out.push(b'{');
        if n > 0 {
            out.extend_from_slice(b"\"\":{\"metas\":[");
            for i in 1..=n {
                if i > 1 {
                    out.push(b',');
                }
                out.extend_from_slice(b"{\"phx_ref\":\"a");
                out.extend_from_slice(i.to_string().as_bytes());
                out.extend_from_slice(b"\"}");
            }
            out.extend_from_slice(b"]}");
        }
        let mut user: Option<&str> = None;
        for ((u, _), meta) in &self.announced {
            // a signed-in user with an empty id would share the anonymous key: the stack wins
            if u.is_empty() && n > 0 {
                continue;
            }
            if user == Some(&**u) {
                out.push(b',');
            } else {
                if user.is_some() {
                    out.extend_from_slice(b"]}");
                }
                if user.is_some() || n > 0 {
                    out.push(b',');
                }
                write_str(&mut out, u);
                out.extend_from_slice(b":{\"metas\":[");
                user = Some(u);
            }
            out.extend_from_slice(meta);
        }
        if user.is_some() {
            out.extend_from_slice(b"]}");
        }
        out.push(b'}');
        let b = Bytes::from(out);
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

/// A JSON string, escaped as serde_json escapes it.
fn write_str(out: &mut Vec<u8>, s: &str) {
    // writing a &str into a Vec cannot fail
    let _ = serde_json::to_writer(&mut *out, s);
}

/// One meta of the announced view, keyed for `presence_state`'s order, serialised.
fn announced_entry(conn: &Arc<str>, m: &Meta) -> ((Arc<str>, Arc<str>), Bytes) {
    let mut out = Vec::with_capacity(48 + conn.len() + m.username.len());
    write_meta(&mut out, conn, m);
    (
        (Arc::from(m.user_id.as_str()), conn.clone()),
        Bytes::from(out),
    )
}

/// `{"online_at":…,"phx_ref":…,"username":…}`: the fields in the order a `serde_json::Map`
/// (sorted keys) writes them, as `add_meta` builds them for diffs.
fn write_meta(out: &mut Vec<u8>, conn: &str, m: &Meta) {
    out.extend_from_slice(b"{\"online_at\":");
    out.extend_from_slice(m.online_at.to_string().as_bytes());
    out.extend_from_slice(b",\"phx_ref\":");
    write_str(out, conn);
    out.extend_from_slice(b",\"username\":");
    write_str(out, &m.username);
    out.push(b'}');
}

/// `{"metas":[{"phx_ref":"a<from>"},…,{"phx_ref":"a<to>"}]}` — the stack of synthetic refs that
/// renders as "Anonymous: N" in the seed's unmodified client.
fn anon_metas(from: u64, to: u64) -> Value {
    let metas: Vec<Value> = (from..=to)
        .map(|i| json!({ "phx_ref": format!("a{i}") }))
        .collect();
    json!({ "metas": metas })
}

#[cfg(test)]
mod tests;
