//! The settings types: [`Config`] and one section per component, each with its documented
//! defaults (`Default`) and its durations as [`Duration`]s. Plain data: reading them from the file
//! and the environment is `load.rs`, checking them `validate.rs`, the secrets `secrets.rs`.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub redis: RedisConfig,
    pub auth: AuthConfig,
    pub presence: PresenceConfig,
    pub rooms: RoomsConfig,
    pub hooks: HooksConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Public WebSocket listener (`/socket/websocket`).
    pub listen: String,
    /// The public listener's accept queue (`listen(2)` backlog), capped by the kernel's
    /// `net.core.somaxconn`. A reconnect storm (a killed gateway's viewers arriving at once)
    /// overflows a short queue: the kernel drops the SYNs and clients come back only after SYN
    /// retransmits (1 s, 3 s, 7 s).
    pub listen_backlog: u32,
    /// WebSocket upgrades in progress at most (request read, token checked, 101 not yet sent);
    /// one more gets 503 with `Retry-After` before any work. 0 = no limit.
    pub max_pending_upgrades: usize,
    /// Runtime worker threads; 0 = one per core. Several gateways on one host: give each
    /// cores / gateways (two processes with a thread per core each, on the same cores, spend
    /// their CPU switching between threads: BENCHMARKS.md).
    pub worker_threads: usize,
    /// Largest accepted WebSocket message (after reassembly of fragments). Larger → close 1009.
    /// A compressed message is held to it after inflating too.
    pub max_frame_bytes: usize,
    /// Accept permessage-deflate (RFC 7692) when a client offers it, without context takeover:
    /// payloads of 1 KiB and more (a big room's `presence_state` and diffs, large broadcasts) go
    /// out compressed, each shared payload compressed once for all its sockets; no socket holds
    /// compression state. Off by default, as in Phoenix and Centrifugo.
    pub compression: bool,
    /// Frames queued per socket before it counts as a slow consumer and is closed (4008).
    pub outbound_queue: usize,
    /// Bytes queued per socket before it counts as a slow consumer (4008), so a client that
    /// reads nothing holds at most this much however large its frames (an empty queue still
    /// takes one frame of any size: a big room's `presence_state`).
    pub outbound_queue_bytes: usize,
    /// Phoenix closes a socket that sent nothing for 60 s; clients heartbeat every 30 s.
    pub idle_timeout_ms: u64,
    /// A socket whose peer accepts no bytes for this long is dropped (its writer never hangs).
    pub write_timeout_ms: u64,
    /// Phoenix's own limit of channels per connection.
    pub max_channels_per_socket: usize,
    /// Open sockets (upgrades in flight included) at most; the upgrade answers 503 past it
    /// (protects memory and fds).
    pub max_connections: usize,
    /// Refused joins (a room that does not exist, an invalid topic) one socket may make per
    /// minute; one more closes it with 4009. phoenix.js retries a refused join at most ~6 times a
    /// minute per channel, so only a client looping over room ids gets there.
    pub max_refused_joins_per_min: u32,
    /// Pushes per second one socket may make on average (a token bucket; joins, leaves and
    /// heartbeats are not pushes). Over it: `rate limited`, nothing published.
    pub push_rate_per_s: u32,
    /// Pushes a socket may make at once before the rate applies (the bucket's size).
    pub push_burst: u32,
    /// Joins per second one socket may make on average (a token bucket; a re-join of a joined
    /// topic counts). Over it: `rate limited`, nothing written, the joined channel kept. Each
    /// join is a Lua call and a publish in Redis: a loop of joins must not be free.
    pub join_rate_per_s: u32,
    /// Joins a socket may make at once before the rate applies: a page joining many rooms, or
    /// phoenix.js rejoining every channel after a reconnect, stays under it.
    pub join_burst: u32,
    /// How long a SIGTERM drain may take before the process exits anyway.
    pub shutdown_timeout_ms: u64,
    /// Sockets closed per drain batch, so clients do not all reconnect in the same millisecond.
    pub drain_batch: usize,
    /// On SIGTERM, readiness turns false and new upgrades are refused this long before sockets are
    /// closed, so a load balancer polling `/health/ready` stops routing here first.
    pub drain_grace_ms: u64,
    /// Allowed `Origin` values; empty allows any (non-browser clients send none).
    pub allowed_origins: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Admin listener: `/metrics`, `/health/live`, `/health/ready`, the rooms API. Keep it private.
    pub listen: String,
    /// Bearer token for the admin API (health and metrics stay open). Unset = API disabled.
    pub token: Option<String>,
    /// File holding the admin token (alternative to `token`).
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `standalone` (one Redis, or a primary with replicas behind one address), `cluster`
    /// (Redis Cluster: sharded pub/sub, scripts routed by their room's slot) or `sentinel` (the
    /// master named by Redis Sentinel, followed across failovers).
    pub mode: RedisMode,
    /// `redis[s]://[[user]:password@]host:port[/db]`; in cluster mode a comma-separated list of
    /// seed nodes, e.g. `redis://10.0.0.1:7000,redis://10.0.0.2:7000`; in sentinel mode the
    /// sentinels, each reached with the credentials in its own URL. `rediss://` is TLS.
    pub url: String,
    /// Sentinel mode: the name the sentinels know the master by.
    pub sentinel_master: String,
    /// Sentinel mode: the ACL user for the master (else the sentinel URL's user).
    pub master_user: Option<String>,
    /// Sentinel mode: the password for the master (else the sentinel URL's password).
    pub master_password: Option<String>,
    /// `rediss://`: PEM file of the CA(s) the server certificate must chain to, instead of the
    /// system roots.
    pub tls_ca_file: Option<PathBuf>,
    /// `rediss://`: PEM client certificate (chain) for mutual TLS; needs `tls_key_file`.
    pub tls_cert_file: Option<PathBuf>,
    /// `rediss://`: PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// Prefix of every key and channel, so several deployments can share one Redis.
    pub prefix: String,
    /// Deadline of every Redis command; a join past it gets "presence unavailable", never a hang.
    pub command_timeout_ms: u64,
    /// Deadline of one connection attempt.
    pub connect_timeout_ms: u64,
    /// Connections of the pool used by the admin API and the CLI (the hot path does not use it).
    pub pool_size: usize,
}

/// How the gateway reaches Redis.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    #[default]
    Standalone,
    Cluster,
    Sentinel,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The one accepted JWT algorithm: `HS256`, `RS256` or `ES256` (pinned: no `alg` confusion).
    pub algorithm: String,
    /// HS256 shared secret.
    pub hs256_secret: Option<String>,
    /// File holding the HS256 secret (alternative to `hs256_secret`; trailing newline trimmed).
    pub hs256_secret_file: Option<PathBuf>,
    /// Accept an HS256 secret shorter than [`MIN_HS256_SECRET_BYTES`] (legacy issuers only).
    pub allow_short_hs256_secret: bool,
    /// PEM public key for RS256 / ES256 (or `jwks_url`).
    pub public_key_file: Option<PathBuf>,
    /// The identity provider's key set (JWKS, `https://…/.well-known/jwks.json`) for RS256 /
    /// ES256, instead of `public_key_file`: keys are chosen by the token's `kid`, keys of another
    /// algorithm are ignored, the set is fetched at start and refreshed.
    pub jwks_url: Option<String>,
    /// Refresh of the key set, in seconds: a key the provider retired stops verifying then.
    pub jwks_refresh_s: u64,
    /// A token naming an unknown `kid` refreshes the set at once, but at most once per this many
    /// seconds (since the last fetch of any kind), so tokens with made-up kids cannot make the
    /// gateway hammer the provider.
    pub jwks_min_refresh_s: u64,
    /// Deadline of one fetch, in ms; a token waiting for a refresh waits at most this long.
    pub jwks_fetch_timeout_ms: u64,
    /// Clock skew tolerated on `exp` / `nbf`, in seconds.
    pub leeway_s: u64,
    /// Required `aud` claim, if set. Unset with RS256/ES256 a start-up warning is logged: a
    /// shared identity provider's tokens for any other service would be accepted too.
    pub audience: Option<String>,
    /// Required `iss` claim, if set.
    pub issuer: Option<String>,
    /// `false` (the seed's behaviour): a bad token leaves the socket anonymous. `true`: HTTP 401.
    pub reject_invalid_tokens: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// Lease of a node in a room: a killed node's viewers disappear within ttl + heartbeat.
    pub ttl_ms: u64,
    /// Lease renewal per (node, room); a third of the TTL survives two lost heartbeats.
    pub heartbeat_interval_ms: u64,
    /// At most one `presence_diff` per room per interval on each node (coalescing).
    pub diff_interval_ms: u64,
    /// A node sends a room's `presence_diff`s to at most this many sockets per second: a room
    /// with more local members than `diff_frames_per_s × diff_interval` gets its diffs spaced
    /// `members / diff_frames_per_s` apart instead (5,000 members at 10,000: 500 ms), so a join
    /// burst in a big room costs each member a few frames a second, not twenty. 0: off.
    pub diff_frames_per_s: u64,
    /// At most one `presence_count` per room per interval on each node.
    pub count_interval_ms: u64,
    /// A `presence_diff` that only moves the anonymous `""` list (no signed-in change) waits until
    /// this long after the last diff that moved it: the seed's "Anonymous: N" follows a crowd at
    /// the count's cadence, and a burst of anonymous joins costs each viewer one frame a second.
    /// 0: they go at `diff_interval_ms` like any other change.
    pub anonymous_diff_interval_ms: u64,
    /// Anonymous viewers expanded as synthetic metas `a1..aN` up to this many.
    pub anonymous_list_max: u64,
    /// Anonymous joins/leaves are summed per room and written with one `HINCRBY` per interval.
    pub anon_flush_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RoomsConfig {
    /// Events a signed-in client may push (`phx_*` / `presence_*` can never be pushed).
    pub client_events: Vec<String>,
    /// Events an anonymous client may push too (e.g. `["reaction"]`), broadcast with
    /// `"user": null`, under the same rate and body limits. Empty: anonymous clients push nothing.
    pub anonymous_events: Vec<String>,
    /// A node keeps a room subscribed this long after its last local member leaves (no flapping).
    pub unsubscribe_delay_ms: u64,
    /// Largest `body` of a push, in bytes: a `new_msg`'s string, another event's body as JSON.
    /// The broadcast carries nothing else of the client's, so this bounds what a push fans out.
    pub max_body_bytes: usize,
    /// Broadcasts kept per room in its Redis stream `<p>:room:{R}:history` (`MAXLEN ~`: Redis
    /// trims in whole blocks, so a few more may linger) and in each subscribed node's memory; a
    /// reconnecting client recovers at most this many. 0 turns history off (no stream, no `id`).
    pub history_len: usize,
    /// Events a channel gets right after its join reply (oldest first, as the frames live viewers
    /// got), and after a recovery that found a gap. At most `history_len`.
    pub history_on_join: usize,
}

/// The application in the loop (DESIGN §12). Off unless a URL is set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HooksConfig {
    /// The publish hook: an allowed push of an event of `publish_events` is posted here, signed,
    /// and the answer decides (broadcast, broadcast another body, ack without broadcast, refuse).
    /// Unset: no push waits for anyone.
    pub publish_url: Option<String>,
    /// Events whose pushes go through the publish hook; other allowed events are broadcast
    /// directly (still in the socket's order).
    pub publish_events: Vec<String>,
    /// Key of the `x-gateway-signature` HMAC-SHA256 of every hook request; required with any hook
    /// URL, at least [`MIN_HOOK_SECRET_BYTES`] bytes.
    pub secret: Option<String>,
    /// File holding the hook secret (alternative to `secret`; trailing newline trimmed).
    pub secret_file: Option<PathBuf>,
    /// Deadline of one hook request (connect, answer and body); past it the push is answered
    /// `unavailable` and the request abandoned.
    pub timeout_ms: u64,
    /// Hook requests in flight on this node at most; one more is a failure (`overloaded`), so a
    /// slow application cannot make the node hold unbounded requests.
    pub max_in_flight: usize,
    /// The events hook: presence edges (`member_added`, `member_removed`, `room_occupied`,
    /// `room_vacated`) are posted here in batches `{"events":[...]}`, signed. Unset: off.
    pub events_url: Option<String>,
    /// Events per request at most.
    pub events_batch: usize,
    /// How long the first queued event waits for more before its batch is sent, ms.
    pub events_interval_ms: u64,
    /// How long a batch that failed (non-2xx, timeout) is retried, the same events with the same
    /// ids, before it is dropped and counted, s. 0: never retried.
    pub events_retry_s: u64,
}

/// Shortest hook secret: an HMAC-SHA256 key as long as the hash output (256 bits).
pub const MIN_HOOK_SECRET_BYTES: usize = 32;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text`: human-readable lines (colours on a terminal). `json`: one JSON object per line
    /// (`timestamp`, `level`, `target`, `fields.message` and the event's fields), for a log
    /// pipeline. Logs go to stderr either way.
    pub format: LogFormat,
    /// Which events are logged, in `tracing`'s env-filter syntax (`info`,
    /// `warn,gateway::server=debug`). `GATEWAY_LOG` is a short name for `GATEWAY_LOG_LEVEL`.
    pub level: String,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for HooksConfig {
    fn default() -> Self {
        Self {
            publish_url: None,
            publish_events: vec!["new_msg".into()],
            secret: None,
            secret_file: None,
            timeout_ms: 2_000,
            max_in_flight: 1_024,
            events_url: None,
            events_batch: 100,
            events_interval_ms: 200,
            events_retry_s: 60,
        }
    }
}

impl HooksConfig {
    pub fn timeout(&self) -> Duration {
        ms(self.timeout_ms)
    }
    pub fn events_interval(&self) -> Duration {
        ms(self.events_interval_ms)
    }
    pub fn events_retry(&self) -> Duration {
        Duration::from_secs(self.events_retry_s)
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:4000".into(),
            listen_backlog: 4096,
            max_pending_upgrades: 0,
            worker_threads: 0,
            max_frame_bytes: 64 * 1024,
            compression: false,
            outbound_queue: 256,
            outbound_queue_bytes: 4 * 1024 * 1024,
            idle_timeout_ms: 60_000,
            write_timeout_ms: 10_000,
            max_channels_per_socket: 100,
            max_connections: 100_000,
            max_refused_joins_per_min: 30,
            push_rate_per_s: 10,
            push_burst: 20,
            join_rate_per_s: 10,
            join_burst: 30,
            shutdown_timeout_ms: 10_000,
            drain_batch: 500,
            drain_grace_ms: 0,
            allowed_origins: Vec::new(),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:4001".into(),
            token: None,
            token_file: None,
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            mode: RedisMode::Standalone,
            url: "redis://127.0.0.1:6379".into(),
            sentinel_master: "mymaster".into(),
            master_user: None,
            master_password: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            prefix: "gw".into(),
            command_timeout_ms: 2_000,
            connect_timeout_ms: 1_000,
            pool_size: 4,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            algorithm: "HS256".into(),
            hs256_secret: None,
            hs256_secret_file: None,
            allow_short_hs256_secret: false,
            public_key_file: None,
            jwks_url: None,
            jwks_refresh_s: 300,
            jwks_min_refresh_s: 30,
            jwks_fetch_timeout_ms: 2_000,
            leeway_s: 5,
            audience: None,
            issuer: None,
            reject_invalid_tokens: false,
        }
    }
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            ttl_ms: 15_000,
            heartbeat_interval_ms: 5_000,
            diff_interval_ms: 50,
            diff_frames_per_s: 10_000,
            count_interval_ms: 1_000,
            anonymous_diff_interval_ms: 1_000,
            anonymous_list_max: 1_000,
            anon_flush_ms: 20,
        }
    }
}

impl Default for RoomsConfig {
    fn default() -> Self {
        Self {
            client_events: vec!["new_msg".into()],
            anonymous_events: Vec::new(),
            unsubscribe_delay_ms: 2_000,
            max_body_bytes: 4_096,
            history_len: 100,
            history_on_join: 20,
        }
    }
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

impl ServerConfig {
    pub fn idle_timeout(&self) -> Duration {
        ms(self.idle_timeout_ms)
    }
    pub fn shutdown_timeout(&self) -> Duration {
        ms(self.shutdown_timeout_ms)
    }
    pub fn write_timeout(&self) -> Duration {
        ms(self.write_timeout_ms)
    }
    pub fn drain_grace(&self) -> Duration {
        ms(self.drain_grace_ms)
    }
}

impl RedisConfig {
    /// The URL, or in cluster mode each seed node's URL (blank entries skipped).
    pub fn urls(&self) -> Vec<&str> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect()
    }
    pub fn command_timeout(&self) -> Duration {
        ms(self.command_timeout_ms)
    }
    pub fn connect_timeout(&self) -> Duration {
        ms(self.connect_timeout_ms)
    }

    /// Whether any URL is `rediss://` (TLS).
    pub fn uses_tls(&self) -> bool {
        self.urls().iter().any(|u| u.starts_with("rediss://"))
    }
}

impl PresenceConfig {
    pub fn ttl(&self) -> Duration {
        ms(self.ttl_ms)
    }
    pub fn heartbeat_interval(&self) -> Duration {
        ms(self.heartbeat_interval_ms)
    }
    pub fn diff_interval(&self) -> Duration {
        ms(self.diff_interval_ms)
    }
    /// The spacing of a room's diffs on a node with `members` local members: `diff_interval`, or
    /// longer for a room big enough to exceed `diff_frames_per_s`.
    pub fn diff_spacing(&self, members: usize) -> Duration {
        let floor = self.diff_interval();
        if self.diff_frames_per_s == 0 {
            return floor;
        }
        floor.max(Duration::from_micros(
            (members as u64).saturating_mul(1_000_000) / self.diff_frames_per_s,
        ))
    }
    pub fn count_interval(&self) -> Duration {
        ms(self.count_interval_ms)
    }
    pub fn anonymous_diff_interval(&self) -> Duration {
        ms(self.anonymous_diff_interval_ms)
    }
    pub fn anon_flush(&self) -> Duration {
        ms(self.anon_flush_ms)
    }
}

impl RoomsConfig {
    pub fn unsubscribe_delay(&self) -> Duration {
        ms(self.unsubscribe_delay_ms)
    }
}
