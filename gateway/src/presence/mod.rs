//! Presence: the Redis store (one Lua script call per change) and the node-local [`Mirror`] of a
//! room that every local socket's `presence_state`, `presence_diff` and `presence_count` come from.
//!
//! | file | owns |
//! |---|---|
//! | `meta.rs` | the wire types both sides share: [`Meta`], [`Envelope`], [`Snapshot`], [`meta_json`] |
//! | `store.rs` | the Redis side: [`Store`] (script calls, deadlines, heartbeat pipelines), [`Lease`], the script replies ([`JoinReply`], [`LeaveReply`], [`SyncReply`], [`HeartbeatReply`]) read from their flat arrays, [`StoreError`] |
//! | `mirror.rs` | the node-local view: [`Mirror`], [`Applied`], coalesced diffs and the announced state (pure, no I/O) |
//! | `model.rs` | (tests only) the property-test model the mirror is checked against |
//!
//! The store speaks to Redis only through the scripts in `lua/` (see `redis::scripts`); it never
//! writes to sockets. The mirror is pure data: it applies the envelopes the scripts publish, in
//! `seq` order, and tells its caller when it saw a gap and needs a new snapshot. The parts import
//! `meta` and never each other.

mod meta;
mod mirror;
#[cfg(test)]
mod model;
mod store;

pub use meta::{Envelope, Meta, Snapshot, meta_json};
pub use mirror::{Applied, Mirror};
pub use store::{HeartbeatReply, JoinReply, Lease, LeaveReply, Store, StoreError, SyncReply};
