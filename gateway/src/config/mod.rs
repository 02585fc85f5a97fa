//! Settings: `config/gateway.toml` (or `--config PATH`) merged with environment overrides, turned
//! into typed sections with documented defaults and checked by [`Config::validate`] before anything
//! binds a port or dials Redis.
//!
//! Every key can be overridden by `GATEWAY_<SECTION>_<KEY>` (for example `GATEWAY_PRESENCE_TTL_MS`).
//! Unknown keys, in the file or in a `GATEWAY_<SECTION>_<KEY>` variable, and unknown sections are
//! errors: a typo must not silently fall back to a default. Every error names the setting and where
//! its value came from (the file, or the environment variable that set it).
//!
//! Secrets (`auth.hs256_secret`, `admin.token`) may be given inline, by env, or as a file path
//! (`*_file` keys), so they never have to be committed. An empty or whitespace-only secret is an
//! error wherever it comes from, and an HS256 secret shorter than [`MIN_HS256_SECRET_BYTES`] is one
//! unless `auth.allow_short_hs256_secret` says otherwise: a blank key would let anyone sign tokens.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The sections, in the order `check-config` prints them. Env variables are matched against these.
const SECTIONS: [&str; 7] = [
    "server", "admin", "redis", "auth", "presence", "rooms", "log",
];

/// `GATEWAY_*` variables that are not settings: the settings file (`--config`), the log filter's
/// short name (an alias of `GATEWAY_LOG_LEVEL`), the demo page's phoenix.js. Any other
/// `GATEWAY_<WORD>_...` must name a setting; a `GATEWAY_<WORD>` without `_` (e.g. the tests'
/// `GATEWAY_BIN`) is not a setting's shape and is left alone.
const NOT_SETTINGS: [&str; 3] = ["GATEWAY_CONFIG", "GATEWAY_LOG", "GATEWAY_PHOENIX_JS"];

/// Shortest HS256 secret accepted without `auth.allow_short_hs256_secret`: RFC 7518 §3.2 asks for
/// a key at least as long as the hash output (256 bits); a shorter one can be brute-forced
/// offline from any single token.
pub const MIN_HS256_SECRET_BYTES: usize = 32;

/// Room in a socket's outbound queue beyond a full recovery (`rooms.history_len` events): the
/// join reply, `presence_state`, `presence_count` and the live frames that arrive meanwhile.
pub const HISTORY_QUEUE_SLACK: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {error}")]
    Read {
        path: PathBuf,
        // not `#[source]`: the message already carries it, and a chain printed with `{:#}` would
        // repeat the OS error
        error: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    /// A value of the wrong type, an unknown key or section: `origin` is the file or the
    /// environment variable the value came from.
    #[error("{origin}: {key}: {message}")]
    Setting {
        origin: String,
        key: String,
        message: String,
    },
    #[error("invalid setting {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub redis: RedisConfig,
    pub auth: AuthConfig,
    pub presence: PresenceConfig,
    pub rooms: RoomsConfig,
    pub log: LogConfig,
}

/// More worker threads than any host has cores is a typo, not a setting.
const MAX_WORKER_THREADS: usize = 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Public WebSocket listener (`/socket/websocket`).
    pub listen: String,
    /// Runtime worker threads; 0 = one per core. Several gateways on one host: give each
    /// cores / gateways (two processes with a thread per core each, on the same cores, spend
    /// their CPU switching between threads: BENCHMARKS.md).
    pub worker_threads: usize,
    /// Largest accepted WebSocket message (after reassembly of fragments). Larger → close 1009.
    pub max_frame_bytes: usize,
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
            worker_threads: 0,
            max_frame_bytes: 64 * 1024,
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

    /// The TLS files, read and parsed: the CA (if set) and the client certificate and key (if
    /// set). An unreadable or unparsable file, or a certificate without its key, is a
    /// configuration error, reported at start.
    pub fn tls_files(&self) -> Result<TlsFiles, ConfigError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        fn bad(key: &'static str, message: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key,
                message: message.into(),
            }
        }
        fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
            std::fs::read(path).map_err(|e| bad(key, format!("{}: {e}", path.display())))
        }
        fn certs(key: &'static str, path: &Path, pem: &[u8]) -> Result<(), ConfigError> {
            let n = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(key, format!("{}: {e}", path.display())))?
                .len();
            if n == 0 {
                return Err(bad(key, format!("{}: no PEM certificate", path.display())));
            }
            Ok(())
        }
        let ca = match &self.tls_ca_file {
            Some(p) => {
                let pem = read("redis.tls_ca_file", p)?;
                certs("redis.tls_ca_file", p, &pem)?;
                Some(pem)
            }
            None => None,
        };
        let client = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(c), Some(k)) => {
                let cert = read("redis.tls_cert_file", c)?;
                certs("redis.tls_cert_file", c, &cert)?;
                let key = read("redis.tls_key_file", k)?;
                PrivateKeyDer::from_pem_slice(&key)
                    .map_err(|e| bad("redis.tls_key_file", format!("{}: {e}", k.display())))?;
                Some((cert, key))
            }
            (Some(_), None) => {
                return Err(bad(
                    "redis.tls_cert_file",
                    "a client certificate needs its key: set redis.tls_key_file too",
                ));
            }
            (None, Some(_)) => {
                return Err(bad(
                    "redis.tls_key_file",
                    "a client key needs its certificate: set redis.tls_cert_file too",
                ));
            }
            (None, None) => None,
        };
        Ok(TlsFiles { ca, client })
    }
}

/// The contents of the TLS files (PEM), checked by [`RedisConfig::tls_files`].
#[derive(Clone, Default)]
pub struct TlsFiles {
    /// The CA bundle of `redis.tls_ca_file`; `None`: the system roots.
    pub ca: Option<Vec<u8>>,
    /// The client certificate (chain) and key, for mutual TLS.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl TlsFiles {
    /// Whether the default `rediss://` handling (system roots, no client certificate) suffices.
    pub fn is_default(&self) -> bool {
        self.ca.is_none() && self.client.is_none()
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

impl Config {
    /// Loads `path` (when given or when the default `config/gateway.toml` exists), applies the
    /// process environment, and validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with_env(path, &env)
    }

    pub fn load_with_env(
        path: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<Self, ConfigError> {
        let default_path = Path::new("config/gateway.toml");
        let (text, origin) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|error| ConfigError::Read {
                    path: p.to_path_buf(),
                    error,
                })?,
                p.display().to_string(),
            ),
            None if default_path.exists() => (
                std::fs::read_to_string(default_path).map_err(|error| ConfigError::Read {
                    path: default_path.to_path_buf(),
                    error,
                })?,
                default_path.display().to_string(),
            ),
            None => (String::new(), "<defaults>".to_string()),
        };
        Self::from_toml_and_env(&text, &origin, env)
    }

    /// Parses TOML text, applies `GATEWAY_<SECTION>_<KEY>` overrides from `env`, validates.
    /// `origin` names the text in errors (a path, or `<defaults>`).
    pub fn from_toml_and_env(
        text: &str,
        origin: &str,
        env: &[(String, String)],
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        let file = format!("config file {origin}");
        let defaults =
            toml::Table::try_from(Config::default()).map_err(|e| ConfigError::Parse {
                path: origin.to_string(),
                message: e.to_string(),
            })?;
        // (section, key) → the variable that set it, so an error blames the variable
        let mut from_env: BTreeMap<(String, String), String> = BTreeMap::new();
        for (name, section, key, value) in settings_in_env(env)? {
            let default = defaults
                .get(section)
                .and_then(|s| s.as_table())
                .and_then(|s| s.get(&key));
            let parsed = env_value(default, value).map_err(|message| ConfigError::Setting {
                origin: format!("environment variable {name}"),
                key: format!("{section}.{key}"),
                message,
            })?;
            let sect = table
                .entry(section.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let Some(t) = sect.as_table_mut() else {
                return Err(ConfigError::Setting {
                    origin: file,
                    key: section.to_string(),
                    message: format!("must be a section ([{section}])"),
                });
            };
            t.insert(key.clone(), parsed);
            from_env.insert((section.to_string(), key), name.to_string());
        }
        let origin_of = |section: &str, key: &str| {
            from_env
                .get(&(section.to_string(), key.to_string()))
                .map(|v| format!("environment variable {v}"))
                .unwrap_or_else(|| file.clone())
        };
        let cfg: Config = match toml::Value::Table(table.clone()).try_into() {
            Ok(cfg) => cfg,
            Err(e) => {
                let e: toml::de::Error = e;
                return Err(blame(&table, &origin_of).unwrap_or(ConfigError::Parse {
                    path: origin.to_string(),
                    message: e.message().to_string(),
                }));
            }
        };
        cfg.validate().map_err(|e| match e {
            // a cross-field rule broken by a variable names the variable
            ConfigError::Invalid { key, message } => match key.split_once('.') {
                Some((section, k)) if from_env.contains_key(&(section.into(), k.into())) => {
                    ConfigError::Setting {
                        origin: origin_of(section, k),
                        key: key.to_string(),
                        message,
                    }
                }
                _ => ConfigError::Invalid { key, message },
            },
            other => other,
        })?;
        Ok(cfg)
    }

    /// Checks every cross-field rule; nothing starts on an invalid configuration.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn bad(key: &'static str, message: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key,
                message: message.into(),
            }
        }
        check_listen(&self.server.listen).map_err(|m| bad("server.listen", m))?;
        check_listen(&self.admin.listen).map_err(|m| bad("admin.listen", m))?;
        if self.server.listen == self.admin.listen && !self.server.listen.ends_with(":0") {
            return Err(bad(
                "admin.listen",
                format!(
                    "is server.listen too ({}): the admin listener needs its own port",
                    self.admin.listen
                ),
            ));
        }
        if self.log.level.trim().is_empty() {
            return Err(bad(
                "log.level",
                "is empty: use e.g. \"info\" or \"warn,gateway::server=debug\"",
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(bad(
                "log.level",
                format!(
                    "{:?}: {e} (use e.g. \"info\" or \"warn,gateway::server=debug\")",
                    self.log.level
                ),
            ));
        }
        if !self
            .redis
            .prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
            || self.redis.prefix.is_empty()
        {
            return Err(bad("redis.prefix", "use 1+ characters of [A-Za-z0-9_.-]"));
        }
        let urls = self.redis.urls();
        if urls.is_empty() {
            return Err(bad("redis.url", "empty"));
        }
        if self.redis.mode == RedisMode::Standalone && urls.len() > 1 {
            return Err(bad(
                "redis.url",
                "a list of seed nodes needs redis.mode = \"cluster\" (GATEWAY_REDIS_MODE=cluster) \
                 or a list of sentinels redis.mode = \"sentinel\"",
            ));
        }
        for u in &urls {
            match redis::IntoConnectionInfo::into_connection_info(*u) {
                Err(e) => return Err(bad("redis.url", format!("{}: {e}", redact_url(u)))),
                Ok(info) if matches!(info.addr(), redis::ConnectionAddr::Unix(_)) => {
                    if self.redis.mode != RedisMode::Standalone {
                        return Err(bad(
                            "redis.url",
                            "a unix socket URL works in standalone mode only",
                        ));
                    }
                }
                Ok(_) => {}
            }
        }
        if self.redis.mode != RedisMode::Sentinel {
            for (key, set) in [
                ("redis.master_user", self.redis.master_user.is_some()),
                (
                    "redis.master_password",
                    self.redis.master_password.is_some(),
                ),
            ] {
                if set {
                    return Err(bad(key, "set only with redis.mode = \"sentinel\""));
                }
            }
        } else if self.redis.sentinel_master.trim().is_empty() {
            return Err(bad("redis.sentinel_master", "empty"));
        }
        let tls = self.redis.tls_files()?;
        if !tls.is_default() && !self.redis.uses_tls() {
            return Err(bad(
                "redis.url",
                "the redis.tls_* settings need rediss:// URLs (TLS)",
            ));
        }
        match self.auth.algorithm.as_str() {
            "HS256" => {
                if self.auth.public_key_file.is_some() {
                    return Err(bad(
                        "auth.public_key_file",
                        "set only with algorithm RS256 or ES256",
                    ));
                }
            }
            "RS256" | "ES256" => match (&self.auth.public_key_file, &self.auth.jwks_url) {
                (None, None) => {
                    return Err(bad(
                        "auth.public_key_file",
                        format!(
                            "with algorithm {} set auth.public_key_file (a PEM key) or auth.jwks_url \
                             (the identity provider's key set)",
                            self.auth.algorithm
                        ),
                    ));
                }
                (Some(_), Some(_)) => {
                    return Err(bad(
                        "auth.jwks_url",
                        "set either auth.public_key_file or auth.jwks_url",
                    ));
                }
                _ => {}
            },
            other => {
                return Err(bad(
                    "auth.algorithm",
                    format!("{other:?}: use HS256, RS256 or ES256"),
                ));
            }
        }
        if let Some(url) = &self.auth.jwks_url {
            let a = &self.auth;
            if a.algorithm == "HS256" {
                return Err(bad(
                    "auth.jwks_url",
                    "needs auth.algorithm = \"RS256\" or \"ES256\", the algorithm your identity \
                     provider signs with (Auth0, Keycloak, Cognito, Firebase: RS256)",
                ));
            }
            let ok = (url.starts_with("https://") || url.starts_with("http://"))
                && url.parse::<hyper::Uri>().is_ok_and(|u| u.host().is_some());
            if !ok {
                return Err(bad(
                    "auth.jwks_url",
                    format!("{url:?}: use an absolute http:// or https:// URL"),
                ));
            }
            if a.jwks_refresh_s == 0 || a.jwks_min_refresh_s == 0 {
                return Err(bad(
                    "auth.jwks_refresh_s",
                    "jwks_refresh_s and jwks_min_refresh_s must be at least 1",
                ));
            }
            if !(100..=60_000).contains(&a.jwks_fetch_timeout_ms) {
                return Err(bad("auth.jwks_fetch_timeout_ms", "from 100 to 60000"));
            }
        }
        if self.auth.hs256_secret.is_some() && self.auth.hs256_secret_file.is_some() {
            return Err(bad(
                "auth.hs256_secret",
                "set either hs256_secret or hs256_secret_file",
            ));
        }
        if self.admin.token.is_some() && self.admin.token_file.is_some() {
            return Err(bad("admin.token", "set either token or token_file"));
        }
        // inline secrets are checked here, so every command refuses them; file contents are
        // checked when read (`hs256_secret`, `admin_token`), which `serve` does before binding
        if let Some(s) = &self.auth.hs256_secret {
            check_secret(s, "auth.hs256_secret", Some(self.hs256_min_len()))?;
        }
        if let Some(s) = &self.admin.token {
            check_secret(s, "admin.token", None)?;
        }
        if self.server.max_frame_bytes < 1024 {
            return Err(bad("server.max_frame_bytes", "at least 1024"));
        }
        if self.server.outbound_queue < 4 {
            return Err(bad("server.outbound_queue", "at least 4"));
        }
        if self.server.worker_threads > MAX_WORKER_THREADS {
            return Err(bad(
                "server.worker_threads",
                format!("at most {MAX_WORKER_THREADS} (0: one per core)"),
            ));
        }
        if self.server.idle_timeout_ms < 100 || self.server.write_timeout_ms < 100 {
            return Err(bad(
                "server.idle_timeout_ms",
                "idle_timeout_ms and write_timeout_ms must be at least 100",
            ));
        }
        if self.server.drain_grace_ms >= self.server.shutdown_timeout_ms {
            return Err(bad(
                "server.drain_grace_ms",
                "must be shorter than server.shutdown_timeout_ms",
            ));
        }
        if self.server.max_channels_per_socket == 0 || self.server.drain_batch == 0 {
            return Err(bad(
                "server.max_channels_per_socket",
                "max_channels_per_socket and drain_batch must be positive",
            ));
        }
        let p = &self.presence;
        if p.heartbeat_interval_ms == 0 || p.ttl_ms <= p.heartbeat_interval_ms {
            return Err(bad(
                "presence.ttl_ms",
                format!(
                    "must exceed presence.heartbeat_interval_ms ({}), or a live node's lease lapses between heartbeats",
                    p.heartbeat_interval_ms
                ),
            ));
        }
        if p.diff_interval_ms == 0 || p.count_interval_ms == 0 || p.anon_flush_ms == 0 {
            return Err(bad(
                "presence.diff_interval_ms",
                "diff_interval_ms, count_interval_ms and anon_flush_ms must be positive",
            ));
        }
        for (key, events) in [
            ("rooms.client_events", &self.rooms.client_events),
            ("rooms.anonymous_events", &self.rooms.anonymous_events),
        ] {
            for ev in events {
                if ev.starts_with("phx_") || ev.starts_with("presence_") || ev == "heartbeat" {
                    return Err(bad(
                        key,
                        format!("{ev:?} is reserved and can never be pushed by a client"),
                    ));
                }
            }
        }
        if self.server.push_rate_per_s == 0 || self.server.push_burst == 0 {
            return Err(bad(
                "server.push_rate_per_s",
                "push_rate_per_s and push_burst must be positive",
            ));
        }
        if self.server.join_rate_per_s == 0 || self.server.join_burst == 0 {
            return Err(bad(
                "server.join_rate_per_s",
                "join_rate_per_s and join_burst must be positive",
            ));
        }
        if self.server.outbound_queue_bytes < 65_536 {
            return Err(bad("server.outbound_queue_bytes", "at least 65536"));
        }
        let r = &self.rooms;
        if r.history_len > 0 && r.history_on_join > r.history_len {
            return Err(bad(
                "rooms.history_on_join",
                format!("at most rooms.history_len ({})", r.history_len),
            ));
        }
        if r.history_len > 100_000 {
            return Err(bad("rooms.history_len", "at most 100000"));
        }
        // a recovery queues up to history_len events at once, besides the join's own frames
        if r.history_len > 0 && self.server.outbound_queue < r.history_len + HISTORY_QUEUE_SLACK {
            return Err(bad(
                "server.outbound_queue",
                format!(
                    "must be at least rooms.history_len + {HISTORY_QUEUE_SLACK} ({}): a recovery queues up to history_len events at once",
                    r.history_len + HISTORY_QUEUE_SLACK
                ),
            ));
        }
        if self.redis.command_timeout_ms == 0 || self.redis.connect_timeout_ms == 0 {
            return Err(bad("redis.command_timeout_ms", "timeouts must be positive"));
        }
        Ok(())
    }

    /// The effective settings as TOML, secrets masked (for `gateway check-config`).
    pub fn to_masked_toml(&self) -> String {
        let mut c = self.clone();
        if c.auth.hs256_secret.is_some() {
            c.auth.hs256_secret = Some("***".into());
        }
        if c.admin.token.is_some() {
            c.admin.token = Some("***".into());
        }
        if c.redis.master_password.is_some() {
            c.redis.master_password = Some("***".into());
        }
        c.redis.url = c
            .redis
            .urls()
            .into_iter()
            .map(redact_url)
            .collect::<Vec<_>>()
            .join(",");
        toml::to_string(&c).unwrap_or_else(|e| format!("# cannot print settings: {e}\n"))
    }

    /// The HS256 secret from `hs256_secret` or `hs256_secret_file`; an empty, whitespace-only
    /// or (without `allow_short_hs256_secret`) short one is an error, never a key.
    pub fn hs256_secret(&self) -> Result<Option<String>, ConfigError> {
        read_secret(
            &self.auth.hs256_secret,
            ("auth.hs256_secret", "auth.hs256_secret_file"),
            &self.auth.hs256_secret_file,
            Some(self.hs256_min_len()),
        )
    }

    /// The admin token from `token` or `token_file`; an empty or whitespace-only one is an error
    /// (it would match an empty bearer).
    pub fn admin_token(&self) -> Result<Option<String>, ConfigError> {
        read_secret(
            &self.admin.token,
            ("admin.token", "admin.token_file"),
            &self.admin.token_file,
            None,
        )
    }

    fn hs256_min_len(&self) -> usize {
        if self.auth.allow_short_hs256_secret {
            1
        } else {
            MIN_HS256_SECRET_BYTES
        }
    }
}

/// Refuses a secret that is blank, or (an HS256 key, `hs256_min` given) shorter than `hs256_min`
/// bytes, naming the setting.
fn check_secret(
    secret: &str,
    key: &'static str,
    hs256_min: Option<usize>,
) -> Result<(), ConfigError> {
    if secret.trim().is_empty() {
        return Err(ConfigError::Invalid {
            key,
            message: "is empty or only whitespace; give a real secret or leave the setting unset"
                .into(),
        });
    }
    if let Some(min_len) = hs256_min
        && secret.len() < min_len
    {
        return Err(ConfigError::Invalid {
            key,
            message: format!(
                "is {} bytes; an HS256 secret needs at least {min_len} (RFC 7518 §3.2). Use a longer \
                 one (e.g. `openssl rand -base64 48`), or set auth.allow_short_hs256_secret = true \
                 (GATEWAY_AUTH_ALLOW_SHORT_HS256_SECRET) to accept it anyway",
                secret.len()
            ),
        });
    }
    Ok(())
}

fn read_secret(
    inline: &Option<String>,
    (inline_key, file_key): (&'static str, &'static str),
    file: &Option<PathBuf>,
    hs256_min: Option<usize>,
) -> Result<Option<String>, ConfigError> {
    if let Some(s) = inline {
        check_secret(s, inline_key, hs256_min)?;
        return Ok(Some(s.clone()));
    }
    let Some(p) = file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(p).map_err(|e| ConfigError::Invalid {
        key: file_key,
        message: format!("{}: {e}", p.display()),
    })?;
    // editors and `echo` add a line end; nothing else is trimmed (a secret may contain spaces)
    let secret = text.trim_end_matches(['\r', '\n']).to_string();
    check_secret(&secret, file_key, hs256_min).map_err(|e| match e {
        ConfigError::Invalid { key, message } => ConfigError::Invalid {
            key,
            message: format!("{}: {message}", p.display()),
        },
        other => other,
    })?;
    Ok(Some(secret))
}

/// The settings variables of `env`: `(variable, section, key, value)`. `GATEWAY_LOG` is
/// `GATEWAY_LOG_LEVEL`'s short name (both set: an error). A `GATEWAY_<WORD>_...` variable whose
/// word is no section is an error, as a typo in a key is.
fn settings_in_env(
    env: &[(String, String)],
) -> Result<Vec<(&str, &'static str, String, &str)>, ConfigError> {
    let mut out = Vec::new();
    let has = |n: &str| env.iter().any(|(k, _)| k == n);
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("GATEWAY_") else {
            continue;
        };
        if name == "GATEWAY_LOG" {
            if has("GATEWAY_LOG_LEVEL") {
                return Err(ConfigError::Setting {
                    origin: "environment variables GATEWAY_LOG and GATEWAY_LOG_LEVEL".into(),
                    key: "log.level".into(),
                    message: "both are set: GATEWAY_LOG is the short name of GATEWAY_LOG_LEVEL; \
                              set one"
                        .into(),
                });
            }
            out.push((name.as_str(), "log", "level".to_string(), value.as_str()));
            continue;
        }
        if NOT_SETTINGS.contains(&name.as_str()) {
            continue;
        }
        let rest = rest.to_ascii_lowercase();
        let Some(section) = SECTIONS.iter().find(|s| rest.starts_with(&format!("{s}_"))) else {
            let Some((word, _)) = rest.split_once('_') else {
                continue; // not a settings variable's shape (e.g. GATEWAY_BIN used by the tests)
            };
            return Err(ConfigError::Setting {
                origin: format!("environment variable {name}"),
                key: word.to_string(),
                message: format!(
                    "no such section: GATEWAY_<SECTION>_<KEY> variables name a setting, with \
                     SECTION one of {}",
                    SECTIONS.join(", ")
                ),
            });
        };
        let key = rest[section.len() + 1..].to_string();
        out.push((name.as_str(), *section, key, value.as_str()));
    }
    Ok(out)
}

/// Finds the one setting that makes `table` not deserialize (an unknown section or key, a value
/// of the wrong type) by trying each on its own, so the error names it and where it came from.
fn blame(table: &toml::Table, origin_of: &dyn Fn(&str, &str) -> String) -> Option<ConfigError> {
    for (section, value) in table {
        if !SECTIONS.contains(&section.as_str()) {
            return Some(ConfigError::Setting {
                origin: origin_of(section, ""),
                key: section.clone(),
                message: format!("unknown section or key (sections: {})", SECTIONS.join(", ")),
            });
        }
        let Some(keys) = value.as_table() else {
            return Some(ConfigError::Setting {
                origin: origin_of(section, ""),
                key: section.clone(),
                message: format!("must be a section ([{section}])"),
            });
        };
        for (key, v) in keys {
            let one = toml::Table::from_iter([(
                section.clone(),
                toml::Value::Table(toml::Table::from_iter([(key.clone(), v.clone())])),
            )]);
            if let Err(e) = toml::Value::Table(one).try_into::<Config>() {
                return Some(ConfigError::Setting {
                    origin: origin_of(section, key),
                    key: format!("{section}.{key}"),
                    message: e.message().trim().to_string(),
                });
            }
        }
    }
    None
}

/// A listener address: `host:port` with an IPv4 address, `[IPv6]` or a host name (`localhost`),
/// and a port of 0 (any free one) to 65535. Checked here so `check-config` refuses what `serve`
/// could not bind.
fn check_listen(addr: &str) -> Result<(), String> {
    let example = "use host:port, e.g. 0.0.0.0:4000, 127.0.0.1:4001, [::]:4000 or localhost:4000";
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(format!("{addr:?} has no port: {example}"));
    };
    if port.parse::<u16>().is_err() {
        return Err(format!(
            "{addr:?}: port {port:?} is not a number from 0 to 65535"
        ));
    }
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None if host.parse::<std::net::Ipv4Addr>().is_ok() => true,
        // a name: labels of letters, digits and `-`, not all digits (that is a broken IPv4)
        None => {
            !host.is_empty()
                && host.len() <= 253
                && !host
                    .split('.')
                    .all(|l| l.chars().all(|c| c.is_ascii_digit()))
                && host.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && !l.starts_with('-')
                        && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                })
        }
    };
    if !host_ok {
        return Err(format!(
            "{addr:?}: {host:?} is not an address or host name: {example}"
        ));
    }
    Ok(())
}

/// Converts an env string to a TOML value of the type the setting has: strings stay strings
/// (a numeric secret is still a secret), others are parsed as TOML literals (`5000`, `true`,
/// `["new_msg","typing"]`).
fn env_value(default: Option<&toml::Value>, raw: &str) -> Result<toml::Value, String> {
    match default {
        None | Some(toml::Value::String(_)) => Ok(toml::Value::String(raw.to_string())),
        Some(_) => {
            let doc: BTreeMap<String, toml::Value> = toml::from_str(&format!("v = {raw}"))
                .map_err(|_| {
                    format!("{raw:?} is not a valid value (numbers, true/false, [\"a\",\"b\"])")
                })?;
            doc.get("v")
                .cloned()
                .ok_or_else(|| format!("{raw:?} is not a valid value"))
        }
    }
}

/// `redis://user:password@host` → `redis://user:***@host` (for logs and `check-config`); a
/// comma-separated list (cluster seeds, sentinels) has each of its URLs redacted.
pub fn redact_url(url: &str) -> String {
    if url.contains(',') {
        return url
            .split(',')
            .map(|u| redact_url(u.trim()))
            .collect::<Vec<_>>()
            .join(",");
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.rsplit_once('@') {
        Some((cred, host)) => {
            let user = cred.split_once(':').map(|(u, _)| u).unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn tls_and_sentinel_settings_are_checked_at_start() {
        let e = |toml: &str| {
            Config::from_toml_and_env(toml, "t", &[])
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        // a certificate without its key, and the other way round
        let cert_only = "[redis]\nurl = \"rediss://h:1\"\ntls_cert_file = \"/x.crt\"\n";
        assert!(
            e(cert_only).contains("redis.tls_cert_file"),
            "{}",
            e(cert_only)
        );
        let key_only = "[redis]\nurl = \"rediss://h:1\"\ntls_key_file = \"/x.key\"\n";
        assert!(
            e(key_only).contains("redis.tls_key_file"),
            "{}",
            e(key_only)
        );
        let no_ca = "[redis]\nurl = \"rediss://h:1\"\ntls_ca_file = \"/nonexistent.pem\"\n";
        assert!(e(no_ca).contains("redis.tls_ca_file"), "{}", e(no_ca));
        // master credentials belong to sentinel mode; several sentinels are a list
        let stray = "[redis]\nmaster_password = \"p\"\n";
        assert!(e(stray).contains("redis.master_password"), "{}", e(stray));
        let c = Config::from_toml_and_env(
            "[redis]\nmode = \"sentinel\"\nurl = \"redis://a:26379,redis://:pw@b:26379\"\nmaster_password = \"mpw\"\n",
            "t",
            &[],
        )
        .expect("sentinel settings");
        assert_eq!(c.redis.sentinel_master, "mymaster");
        assert_eq!(c.redis.urls().len(), 2);
        assert_eq!(
            redact_url("redis://u:p1@a:1,redis://:p2@b:2"),
            "redis://u:***@a:1,redis://:***@b:2"
        );
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::from_toml_and_env("", "t", &[]).expect("defaults");
        assert_eq!(c, Config::default());
        assert_eq!(c.redis.prefix, "gw");
    }

    #[test]
    fn shipped_file_documents_the_defaults() {
        let text = include_str!("../../../config/gateway.toml");
        let c = Config::from_toml_and_env(text, "config/gateway.toml", &[]).expect("valid");
        assert_eq!(c, Config::default());
        // every key of every section appears in the file (commented out for optional ones)
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        for (section, keys) in &defaults {
            assert!(
                text.contains(&format!("[{section}]")),
                "[{section}] missing"
            );
            for key in keys.as_table().unwrap().keys() {
                assert!(
                    text.contains(&format!("{key} =")),
                    "{section}.{key} missing"
                );
            }
        }
    }

    #[test]
    fn env_overrides_file_and_keeps_types() {
        let c = Config::from_toml_and_env(
            "[presence]\nttl_ms = 9000\n",
            "t",
            &env(&[
                ("GATEWAY_PRESENCE_TTL_MS", "3000"),
                ("GATEWAY_PRESENCE_HEARTBEAT_INTERVAL_MS", "1000"),
                // digits only, 32 of them: still a string, not a number
                (
                    "GATEWAY_AUTH_HS256_SECRET",
                    "12345678901234567890123456789012",
                ),
                ("GATEWAY_REDIS_PREFIX", "t1"),
                ("GATEWAY_ROOMS_CLIENT_EVENTS", "[\"new_msg\",\"typing\"]"),
                ("GATEWAY_AUTH_REJECT_INVALID_TOKENS", "true"),
                ("GATEWAY_BIN", "/x"),
            ]),
        )
        .expect("valid");
        assert_eq!(c.presence.ttl_ms, 3000);
        assert_eq!(c.presence.heartbeat_interval_ms, 1000);
        assert_eq!(
            c.auth.hs256_secret.as_deref(),
            Some("12345678901234567890123456789012")
        );
        assert_eq!(c.redis.prefix, "t1");
        assert_eq!(c.rooms.client_events, vec!["new_msg", "typing"]);
        assert!(c.auth.reject_invalid_tokens);
    }

    #[test]
    fn errors_name_the_key_and_where_its_value_came_from() {
        // a wrong type in the file: the key and the file
        let e = Config::from_toml_and_env("[presence]\nttl_ms = \"soon\"\n", "gw.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("config file gw.toml") && e.contains("presence.ttl_ms"),
            "{e}"
        );
        let e = Config::from_toml_and_env("[server]\nlisten = 4000\n", "gw.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("server.listen") && e.contains("invalid type"),
            "{e}"
        );
        // the same from the environment: the variable, never the file
        for (var, value, key) in [
            ("GATEWAY_PRESENCE_TTL_MS", "soon", "presence.ttl_ms"),
            ("GATEWAY_SERVER_LISTN", "x", "server.listn"),
            ("GATEWAY_LOG_FORMAT", "xml", "log.format"),
            ("GATEWAY_REDIS_MODE", "sentinal", "redis.mode"),
            // a cross-field rule broken by a variable
            ("GATEWAY_PRESENCE_TTL_MS", "100", "presence.ttl_ms"),
        ] {
            let e = Config::from_toml_and_env(
                "[server]\nlisten = \"0.0.0.0:4000\"\n",
                "gw.toml",
                &env(&[(var, value)]),
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.starts_with(&format!("environment variable {var}: {key}:")),
                "{var}={value}: {e}"
            );
            assert!(!e.contains("gw.toml"), "{e}");
        }
    }

    #[test]
    fn unknown_sections_in_the_environment_are_refused() {
        let e = Config::from_toml_and_env("", "t", &env(&[("GATEWAY_FOO_BAR", "1")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("environment variable GATEWAY_FOO_BAR") && e.contains("no such section"),
            "{e}"
        );
        // the gateway's own variables that are not settings, and names without a section's shape
        Config::from_toml_and_env(
            "",
            "t",
            &env(&[
                ("GATEWAY_CONFIG", "/x.toml"),
                ("GATEWAY_PHOENIX_JS", "/x.js"),
                ("GATEWAY_BIN", "/x"),
                ("GATEWAY_LOG", "warn"),
                ("PATH", "/bin"),
            ]),
        )
        .expect("not settings");
        let e = Config::from_toml_and_env("[nope]\nx = 1\n", "gw.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("gw.toml") && e.contains("nope"), "{e}");
    }

    #[test]
    fn listen_addresses_are_checked() {
        for (addr, ok) in [
            ("0.0.0.0:4000", true),
            ("127.0.0.1:0", true),
            ("localhost:4000", true),
            ("gateway-0.gateway.svc:4000", true),
            ("[::]:4000", true),
            ("[::1]:4001", true),
            ("0.0.0.0:99999", false),
            ("localhost:99999", false),
            ("localhost", false),
            ("4000", false),
            (":4000", false),
            ("999.1.1.1:4000", false),
            ("my host:4000", false),
            ("[::g]:4000", false),
        ] {
            for (var, other) in [
                ("GATEWAY_SERVER_LISTEN", "GATEWAY_ADMIN_LISTEN"),
                ("GATEWAY_ADMIN_LISTEN", "GATEWAY_SERVER_LISTEN"),
            ] {
                let r = Config::from_toml_and_env(
                    "",
                    "t",
                    &env(&[(var, addr), (other, "127.0.0.1:0")]),
                );
                assert_eq!(r.is_ok(), ok, "{var}={addr}: {r:?}");
                if let Err(e) = r {
                    let e = e.to_string();
                    let key = if var.contains("ADMIN") {
                        "admin.listen"
                    } else {
                        "server.listen"
                    };
                    assert!(e.contains(key) && e.contains(var), "{e}");
                }
            }
        }
        let e = Config::from_toml_and_env(
            "",
            "t",
            &env(&[
                ("GATEWAY_SERVER_LISTEN", "127.0.0.1:4000"),
                ("GATEWAY_ADMIN_LISTEN", "127.0.0.1:4000"),
            ]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("own port"), "{e}");
    }

    #[test]
    fn log_settings() {
        let c = Config::from_toml_and_env("", "t", &[]).unwrap();
        assert_eq!(
            (c.log.format, c.log.level.as_str()),
            (LogFormat::Text, "info")
        );
        let c = Config::from_toml_and_env(
            "[log]\nformat = \"text\"\nlevel = \"debug\"\n",
            "t",
            &env(&[("GATEWAY_LOG_FORMAT", "json")]),
        )
        .unwrap();
        assert_eq!(
            (c.log.format, c.log.level.as_str()),
            (LogFormat::Json, "debug")
        );
        // GATEWAY_LOG is GATEWAY_LOG_LEVEL's short name
        for var in ["GATEWAY_LOG", "GATEWAY_LOG_LEVEL"] {
            let c =
                Config::from_toml_and_env("", "t", &env(&[(var, "warn,gateway::server=debug")]))
                    .unwrap();
            assert_eq!(c.log.level, "warn,gateway::server=debug");
        }
        let e = Config::from_toml_and_env(
            "",
            "t",
            &env(&[("GATEWAY_LOG", "warn"), ("GATEWAY_LOG_LEVEL", "info")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("both are set"), "{e}");
        for bad in ["", "foo=bar=baz["] {
            let e = Config::from_toml_and_env("", "t", &env(&[("GATEWAY_LOG_LEVEL", bad)]))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("GATEWAY_LOG_LEVEL") && e.contains("log.level"),
                "{e}"
            );
        }
    }

    #[test]
    fn an_unreadable_file_is_named_with_its_os_error_once() {
        let e = Config::load_with_env(Some(Path::new("/nonexistent/gw.toml")), &[]).unwrap_err();
        assert!(std::error::Error::source(&e).is_none());
        // as main prints it, and as it reads inside an anyhow chain
        for text in [e.to_string(), format!("{:#}", anyhow::Error::from(e))] {
            assert!(text.contains("/nonexistent/gw.toml"), "{text}");
            assert_eq!(text.matches("os error").count(), 1, "{text}");
        }
    }

    #[test]
    fn redaction_masks_every_password_of_a_seed_list() {
        assert_eq!(redact_url("redis://u:pw@h:1"), "redis://u:***@h:1");
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
        assert_eq!(
            redact_url("redis://:pw@a:1,redis://:pw@b:2"),
            "redis://:***@a:1,redis://:***@b:2"
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = Config::from_toml_and_env("[server]\nlisten_port = 1\n", "t", &[]).unwrap_err();
        assert!(e.to_string().contains("listen_port"), "{e}");
        let e =
            Config::from_toml_and_env("", "t", &env(&[("GATEWAY_SERVER_LISTN", "x")])).unwrap_err();
        assert!(e.to_string().contains("listn"), "{e}");
        assert!(Config::from_toml_and_env("[nope]\n", "t", &[]).is_err());
    }

    #[test]
    fn bad_values_are_errors() {
        let e = Config::from_toml_and_env("", "t", &env(&[("GATEWAY_PRESENCE_TTL_MS", "soon")]))
            .unwrap_err();
        assert!(e.to_string().contains("GATEWAY_PRESENCE_TTL_MS"), "{e}");
        let e = Config::from_toml_and_env(
            "[presence]\nttl_ms = 1000\nheartbeat_interval_ms = 1000\n",
            "t",
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("presence.ttl_ms"), "{e}");
        assert!(Config::from_toml_and_env("[auth]\nalgorithm = \"none\"\n", "t", &[]).is_err());
        assert!(Config::from_toml_and_env("[auth]\nalgorithm = \"RS256\"\n", "t", &[]).is_err());
        for (toml, key) in [
            ("[auth]\njwks_url = \"https://idp/jwks\"\n", "auth.jwks_url"),
            (
                "[auth]\nalgorithm = \"RS256\"\njwks_url = \"idp/jwks\"\n",
                "auth.jwks_url",
            ),
            (
                "[auth]\nalgorithm = \"RS256\"\njwks_url = \"https://idp/jwks\"\npublic_key_file = \"/k\"\n",
                "auth.jwks_url",
            ),
            (
                "[auth]\nalgorithm = \"ES256\"\njwks_url = \"https://idp/jwks\"\njwks_min_refresh_s = 0\n",
                "auth.jwks_refresh_s",
            ),
        ] {
            let e = Config::from_toml_and_env(toml, "t", &[]).unwrap_err();
            assert!(e.to_string().contains(key), "{toml}: {e}");
        }
        let c = Config::from_toml_and_env(
            "[auth]\nalgorithm = \"RS256\"\n",
            "t",
            &env(&[(
                "GATEWAY_AUTH_JWKS_URL",
                "https://idp.example/.well-known/jwks.json",
            )]),
        )
        .expect("RS256 with a JWKS URL");
        assert_eq!(
            (
                c.auth.jwks_refresh_s,
                c.auth.jwks_min_refresh_s,
                c.auth.jwks_fetch_timeout_ms
            ),
            (300, 30, 2000)
        );
        assert!(
            Config::from_toml_and_env("[rooms]\nclient_events = [\"presence_diff\"]\n", "t", &[])
                .is_err()
        );
        assert!(Config::from_toml_and_env("[redis]\nprefix = \"a b\"\n", "t", &[]).is_err());
    }

    #[test]
    fn history_settings_are_checked() {
        let c = Config::from_toml_and_env("", "t", &[]).unwrap();
        assert_eq!((c.rooms.history_len, c.rooms.history_on_join), (100, 20));
        let e = Config::from_toml_and_env(
            "",
            "t",
            &env(&[
                ("GATEWAY_ROOMS_HISTORY_LEN", "10"),
                ("GATEWAY_ROOMS_HISTORY_ON_JOIN", "11"),
            ]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("rooms.history_on_join"), "{e}");
        // worker threads: 0 (one per core) up to the cap
        for (v, ok) in [("0", true), ("1", true), ("1024", true), ("1025", false)] {
            let r =
                Config::from_toml_and_env("", "t", &env(&[("GATEWAY_SERVER_WORKER_THREADS", v)]));
            assert_eq!(r.is_ok(), ok, "worker_threads = {v}");
            if let Err(e) = r {
                assert!(e.to_string().contains("server.worker_threads"), "{e}");
            }
        }
        // history off: history_on_join does not matter
        let c = Config::from_toml_and_env("", "t", &env(&[("GATEWAY_ROOMS_HISTORY_LEN", "0")]))
            .unwrap();
        assert_eq!(c.rooms.history_len, 0);
        let e = Config::from_toml_and_env("", "t", &env(&[("GATEWAY_ROOMS_HISTORY_LEN", "1000")]))
            .unwrap_err();
        assert!(e.to_string().contains("server.outbound_queue"), "{e}");
        Config::from_toml_and_env(
            "",
            "t",
            &env(&[
                ("GATEWAY_ROOMS_HISTORY_LEN", "1000"),
                ("GATEWAY_SERVER_OUTBOUND_QUEUE", "1016"),
            ]),
        )
        .unwrap();
    }

    #[test]
    fn secrets_come_from_files_too() {
        let dir = std::env::temp_dir().join(format!("gw-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("secret");
        std::fs::write(&f, "from-a-file-0123456789abcdef01234\n").unwrap();
        let c = Config::from_toml_and_env(
            "",
            "t",
            &env(&[
                ("GATEWAY_AUTH_HS256_SECRET_FILE", f.to_str().unwrap()),
                ("GATEWAY_ADMIN_TOKEN_FILE", f.to_str().unwrap()),
            ]),
        )
        .expect("valid");
        assert_eq!(
            c.hs256_secret().unwrap().as_deref(),
            Some("from-a-file-0123456789abcdef01234")
        );
        assert_eq!(
            c.admin_token().unwrap().as_deref(),
            Some("from-a-file-0123456789abcdef01234")
        );
        let missing = Config::from_toml_and_env(
            "",
            "t",
            &env(&[("GATEWAY_AUTH_HS256_SECRET_FILE", "/nonexistent/secret")]),
        )
        .unwrap();
        assert!(
            missing
                .hs256_secret()
                .unwrap_err()
                .to_string()
                .contains("/nonexistent/secret")
        );
        let both = Config::from_toml_and_env(
            "[auth]\nhs256_secret = \"a\"\nhs256_secret_file = \"/x\"\n",
            "t",
            &[],
        );
        assert!(both.is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn masked_output_hides_secrets() {
        let c = Config::from_toml_and_env(
            "[auth]\nhs256_secret = \"s3cret-s3cret-s3cret-s3cret-s3cret\"\n[redis]\nurl = \"redis://u:pw@h:1\"\n",
            "t",
            &[],
        )
        .expect("valid");
        let out = c.to_masked_toml();
        assert!(!out.contains("s3cret") && !out.contains("pw@"), "{out}");
        assert!(out.contains("redis://u:***@h:1"), "{out}");
    }

    /// A temp dir unique to one test (tests run in parallel in one process).
    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gw-cfg-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn blank_secrets_are_refused_inline_env_and_file() {
        for blank in ["", "   ", "\t\n"] {
            let toml = format!("[auth]\nhs256_secret = {blank:?}\n");
            let e = Config::from_toml_and_env(&toml, "t", &[]).unwrap_err();
            assert!(e.to_string().contains("auth.hs256_secret"), "{e}");
            assert!(e.to_string().contains("empty"), "{e}");
            let e = Config::from_toml_and_env(
                "",
                "t",
                &env(&[
                    ("GATEWAY_AUTH_HS256_SECRET", blank),
                    // the opt-in for short secrets never lets a blank one through
                    ("GATEWAY_AUTH_ALLOW_SHORT_HS256_SECRET", "true"),
                ]),
            )
            .unwrap_err();
            assert!(e.to_string().contains("auth.hs256_secret"), "{e}");
            let toml = format!("[admin]\ntoken = {blank:?}\n");
            let e = Config::from_toml_and_env(&toml, "t", &[]).unwrap_err();
            assert!(e.to_string().contains("admin.token"), "{e}");
        }
        let dir = temp_dir("blank");
        for (i, blank) in ["", "\n", "\r\n", "  \n"].iter().enumerate() {
            let f = dir.join(format!("secret{i}"));
            std::fs::write(&f, blank).unwrap();
            let c = Config::from_toml_and_env(
                "",
                "t",
                &env(&[
                    ("GATEWAY_AUTH_HS256_SECRET_FILE", f.to_str().unwrap()),
                    ("GATEWAY_ADMIN_TOKEN_FILE", f.to_str().unwrap()),
                    ("GATEWAY_AUTH_ALLOW_SHORT_HS256_SECRET", "true"),
                ]),
            )
            .expect("the file is read later, when the secret is used");
            let e = c.hs256_secret().unwrap_err().to_string();
            assert!(
                e.contains("auth.hs256_secret_file") && e.contains("empty"),
                "{e}"
            );
            let e = c.admin_token().unwrap_err().to_string();
            assert!(e.contains("admin.token_file") && e.contains("empty"), "{e}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn short_hs256_secrets_need_the_opt_in() {
        let short = "0123456789"; // 10 bytes
        let e = Config::from_toml_and_env("", "t", &env(&[("GATEWAY_AUTH_HS256_SECRET", short)]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("auth.hs256_secret"), "{e}");
        assert!(e.contains("allow_short_hs256_secret"), "{e}");
        let c = Config::from_toml_and_env(
            "",
            "t",
            &env(&[
                ("GATEWAY_AUTH_HS256_SECRET", short),
                ("GATEWAY_AUTH_ALLOW_SHORT_HS256_SECRET", "true"),
            ]),
        )
        .expect("opted in");
        assert_eq!(c.hs256_secret().unwrap().as_deref(), Some(short));
        let exact = "x".repeat(MIN_HS256_SECRET_BYTES);
        let c = Config::from_toml_and_env("", "t", &env(&[("GATEWAY_AUTH_HS256_SECRET", &exact)]))
            .expect("32 bytes is enough");
        assert_eq!(c.hs256_secret().unwrap(), Some(exact.clone()));

        let dir = temp_dir("short");
        let f = dir.join("secret");
        std::fs::write(&f, format!("{short}\n")).unwrap();
        let path = f.to_str().unwrap();
        let c =
            Config::from_toml_and_env("", "t", &env(&[("GATEWAY_AUTH_HS256_SECRET_FILE", path)]))
                .unwrap();
        let e = c.hs256_secret().unwrap_err().to_string();
        assert!(
            e.contains("auth.hs256_secret_file") && e.contains("10 bytes"),
            "{e}"
        );
        let c = Config::from_toml_and_env(
            "",
            "t",
            &env(&[
                ("GATEWAY_AUTH_HS256_SECRET_FILE", path),
                ("GATEWAY_AUTH_ALLOW_SHORT_HS256_SECRET", "true"),
            ]),
        )
        .unwrap();
        assert_eq!(c.hs256_secret().unwrap().as_deref(), Some(short));
        // a short admin token is the operator's business: only blank ones are refused
        let c = Config::from_toml_and_env("[admin]\ntoken = \"t\"\n", "t", &[]).unwrap();
        assert_eq!(c.admin_token().unwrap().as_deref(), Some("t"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
