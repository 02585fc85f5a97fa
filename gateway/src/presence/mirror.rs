//! The node-local [`Mirror`] of one room's presence, that every local socket's `presence_state`,
//! `presence_diff` and `presence_count` come from. Pure data: it applies the envelopes the scripts
//! publish, in `seq` order, and tells its caller when it saw a gap and needs a new snapshot.
//!
//! Coalescing: the mirror keeps the view it last *announced* to local sockets (`dirty` remembers,
//! for every connection changed since, what was announced before). [`Mirror::take_diff`] turns all
//! changes since the last flush into one `presence_diff`; [`Mirror::state_payload`] is always the
//! announced view, so a socket that joins between two flushes gets a state to which the next diff
//! applies exactly.

use std::collections::HashMap;
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
}
