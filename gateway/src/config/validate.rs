//! Validation: [`Config::validate`], every cross-field rule checked before anything binds a port or
//! dials Redis (listen addresses, Redis URLs and modes, TLS and Sentinel settings, the auth
//! algorithm and JWKS, inline secrets, timings, limits, history against the outbound queue).
//! A broken rule is [`ConfigError::Invalid`] naming the key; `load.rs` turns it into one that names
//! the variable when the value came from the environment.

use super::secrets::{check_hook_secret, check_secret};
use super::{Config, ConfigError, RedisMode, redact_url};

/// Room in a socket's outbound queue beyond a full recovery (`rooms.history_len` events): the
/// join reply, `presence_state`, `presence_count` and the live frames that arrive meanwhile.
pub const HISTORY_QUEUE_SLACK: usize = 16;

/// More worker threads than any host has cores is a typo, not a setting.
const MAX_WORKER_THREADS: usize = 1024;

impl Config {
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
        if self.server.listen_backlog == 0 || self.server.listen_backlog > i32::MAX as u32 {
            return Err(bad("server.listen_backlog", "between 1 and 2147483647"));
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
        self.validate_hooks()
    }

    /// `[hooks]`: an http(s) URL, a secret with it (inline checked here, a file when read), sane
    /// bounds.
    fn validate_hooks(&self) -> Result<(), ConfigError> {
        fn bad(key: &'static str, message: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key,
                message: message.into(),
            }
        }
        let h = &self.hooks;
        if h.secret.is_some() && h.secret_file.is_some() {
            return Err(bad("hooks.secret", "set either secret or secret_file"));
        }
        if let Some(s) = &h.secret {
            check_hook_secret(s, "hooks.secret")?;
        }
        if let Some(url) = &h.events_url {
            check_hook_url(url, "hooks.events_url")?;
            if h.secret.is_none() && h.secret_file.is_none() {
                return Err(bad(
                    "hooks.secret",
                    "required with hooks.events_url (GATEWAY_HOOKS_SECRET or hooks.secret_file): \
                     the application checks every request's x-gateway-signature with it",
                ));
            }
            if !(1..=10_000).contains(&h.events_batch) {
                return Err(bad("hooks.events_batch", "from 1 to 10000"));
            }
            if !(1..=60_000).contains(&h.events_interval_ms) {
                return Err(bad("hooks.events_interval_ms", "from 1 to 60000"));
            }
            if h.events_retry_s > 86_400 {
                return Err(bad("hooks.events_retry_s", "from 0 to 86400"));
            }
            if !(10..=60_000).contains(&h.timeout_ms) {
                return Err(bad("hooks.timeout_ms", "from 10 to 60000"));
            }
        }
        let Some(url) = &h.publish_url else {
            return Ok(());
        };
        check_hook_url(url, "hooks.publish_url")?;
        if h.secret.is_none() && h.secret_file.is_none() {
            return Err(bad(
                "hooks.secret",
                "required with hooks.publish_url (GATEWAY_HOOKS_SECRET or hooks.secret_file): \
                 the application checks every request's x-gateway-signature with it",
            ));
        }
        if !(10..=60_000).contains(&h.timeout_ms) {
            return Err(bad("hooks.timeout_ms", "from 10 to 60000"));
        }
        if h.max_in_flight == 0 {
            return Err(bad("hooks.max_in_flight", "at least 1"));
        }
        for ev in &h.publish_events {
            if crate::rooms::is_reserved(ev) {
                return Err(bad(
                    "hooks.publish_events",
                    format!("{ev:?} is reserved and can never be pushed by a client"),
                ));
            }
        }
        Ok(())
    }
}

/// A hook URL: an absolute http:// or https:// URL with a host.
fn check_hook_url(url: &str, key: &'static str) -> Result<(), ConfigError> {
    let ok = (url.starts_with("https://") || url.starts_with("http://"))
        && url.parse::<hyper::Uri>().is_ok_and(|u| u.host().is_some());
    if ok {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        key,
        message: format!("{url:?}: use an absolute http:// or https:// URL"),
    })
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

#[cfg(test)]
mod tests;
