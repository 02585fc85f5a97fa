//! The property-test model of the [`Mirror`](super::Mirror): random changes, delivered
//! duplicated, reordered and with gaps, re-snapshots, flushes and joins. Simulated Phoenix JS
//! clients must hold the model's truth at the mirror's seq after every flush, what was announced
//! in between, and the truth after a final re-snapshot; their anonymous refs always a1..ak.

use super::*;
use proptest::collection::vec;
use proptest::prelude::*;
use serde_json::{Value, json};
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
        let (Some(joins), Some(leaves)) = (diff["joins"].as_object(), diff["leaves"].as_object())
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
