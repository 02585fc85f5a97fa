//! # gateway
//!
//! A stateless Phoenix Channels V2 WebSocket gateway backed by Redis: signed-in users talk,
//! anonymous viewers watch and are counted, and any number of processes share only Redis.
//!
//! ## Layout
//! | module | owns |
//! |---|---|
//! | [`config`] | TOML + `GATEWAY_<SECTION>_<KEY>` env → typed, validated settings (`config/`: `settings`, `load`, `validate`, `secrets`, `tls`) |
//! | [`server`] | public listener: checks before the upgrade, hands sockets to `session` |
//! | [`http`] | accept loop, HTTP/1 builder, response helpers (shared by `server` and `admin`) |
//! | [`demo`] | the demo page, phoenix.js and demo tokens on the public port |
//! | [`session`] | one connection: channels, join_refs, idle deadline, refused-join limit; `session/pushes`: the socket's ordered queue of pushes waiting on the publish hook |
//! | [`wsread`] | client WebSocket frames read from the TCP stream, no buffer held while idle |
//! | [`wsmessage`] | frames → messages: reassembly, UTF-8, close-frame rules, fragment deadline (pure) |
//! | [`deflate`] | permessage-deflate without per-socket state: negotiation, a shared payload compressed once, bounded inflate |
//! | [`expiry`] | token lifetimes of open sockets and channels: one deadline list per node |
//! | [`outbox`] | a socket's bounded outbound queue and its single writer (used by `session` and `fanout`) |
//! | [`protocol`] | Phoenix V2 frames, replies and close codes (pure) |
//! | [`auth`] | JWT → `Identity` |
//! | [`jwks`] | an identity provider's key set (`auth.jwks_url`): fetch, refresh, lookup by `kid` |
//! | [`hooks`] | the publish hook: a push posted, signed, to the application, its answer a verdict; `hooks/events.rs`: the events hook, presence edges batched, signed, retried |
//! | [`httpclient`] | the pooled outbound HTTP/1.1 client (HTTPS against the system's roots) |
//! | [`rooms`] | room ids, topics, who may push what |
//! | [`fanout`] | rooms with local members, the pub/sub connection, coalesced presence frames, kicks and disconnects as they arrive |
//! | [`presence`] | the Redis presence store (Lua scripts) and the node-local `Mirror` (`presence/`: `store`, `mirror`, `meta`, the test `model`) |
//! | [`redis`] | key names, scripts, and the connections — hot [`redis::Redis`], cold [`redis::Pool`], [`redis::Subscriber`] — each hiding standalone vs cluster |
//! | [`history`] | room history on Redis Streams: broadcasts appended and published, reads, ids |
//! | [`catalog`] | room records for the CLI and the admin API |
//! | [`admin`], [`metrics`] | admin HTTP (health, metrics, rooms API), metric families |
//! | [`app`] | the assembled node |
//!
//! One frame's path: socket → `wsread` → `wsmessage` → `session` → `protocol::decode_text` →
//! `rooms` rules → `presence` (one Lua call) or `fanout` publish (`history`: one Lua call appends
//! and publishes) → Redis → every node's `fanout` subscriber → `Mirror` / the room's history tail
//! and the shared frame → each local session's queue → writer → socket.
//!
//! Long test modules sit beside their code as `<module>/tests.rs` (`#[cfg(test)] mod tests;`), so a
//! reader meets the code first. The `bench` binary is `src/bin/bench/`: `main.rs` dispatches, one
//! file per scenario, `client` and `measure` shared.

pub mod admin;
pub mod app;
pub mod auth;
pub mod catalog;
pub mod config;
pub mod deflate;
pub mod demo;
pub mod expiry;
pub mod fanout;
pub mod history;
pub mod hooks;
pub mod http;
pub mod httpclient;
pub mod jwks;
pub mod metrics;
pub mod outbox;
pub mod presence;
pub mod protocol;
pub mod redis;
pub mod rooms;
pub mod server;
pub mod session;
pub mod wsmessage;
pub mod wsread;

/// Milliseconds since the Unix epoch (`online_at`, `at`, room `created_at`).
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
