//! Settings: `config/gateway.toml` (or `--config PATH`) merged with environment overrides, turned
//! into typed sections with documented defaults and checked by [`Config::validate`] before anything
//! binds a port or dials Redis.
//!
//! Every key can be overridden by `GATEWAY_<SECTION>_<KEY>` (for example `GATEWAY_PRESENCE_TTL_MS`).
//! Unknown keys, in the file or in a `GATEWAY_<SECTION>_<KEY>` variable, and unknown sections are
//! errors: a typo must not silently fall back to a default. Every error names the setting and where
//! its value came from (the file, or the environment variable that set it).
//!
//! Secrets (`auth.hs256_secret`, `admin.token`, `hooks.secret`) may be given inline, by env, or as a file path
//! (`*_file` keys), so they never have to be committed. An empty or whitespace-only secret is an
//! error wherever it comes from, and an HS256 secret shorter than [`MIN_HS256_SECRET_BYTES`] is one
//! unless `auth.allow_short_hs256_secret` says otherwise: a blank key would let anyone sign tokens.
//!
//! | file | owns |
//! |---|---|
//! | `settings.rs` | the types: [`Config`] and its sections with their defaults and durations |
//! | `load.rs` | file + `GATEWAY_<SECTION>_<KEY>` env → [`Config`]; errors that name the key and its source |
//! | `validate.rs` | [`Config::validate`]: every cross-field rule, before anything starts |
//! | `secrets.rs` | secrets inline, by env or from files; masking ([`Config::to_masked_toml`], [`redact_url`]) |
//! | `tls.rs` | the Redis TLS files read and checked at start ([`TlsFiles`]) |
//!
//! The parts share [`ConfigError`] from here; each keeps its tests beside it.

mod load;
mod secrets;
mod settings;
mod tls;
mod validate;

pub use secrets::{MIN_HS256_SECRET_BYTES, redact_url};
pub use settings::{
    AdminConfig, AuthConfig, Config, HooksConfig, LogConfig, LogFormat, MIN_HOOK_SECRET_BYTES,
    PresenceConfig, RedisConfig, RedisMode, RoomsConfig, ServerConfig,
};
pub use tls::TlsFiles;
pub use validate::HISTORY_QUEUE_SLACK;

use std::path::PathBuf;

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

/// `(name, value)` pairs as the environment [`Config::from_toml_and_env`] reads.
#[cfg(test)]
fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}
