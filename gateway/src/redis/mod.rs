//! Redis plumbing: key names ([`keys`]), the Lua scripts ([`scripts`]) and connection set-up.

pub mod keys;
pub mod scripts;

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::RedisConfig;

/// The shared multiplexed connection for the hot path: every presence script and every `PUBLISH`
/// is one round trip on it, and it reconnects by itself. Commands keep their order on it, which the
/// anonymous-count batching relies on.
pub async fn hot_connection(cfg: &RedisConfig) -> redis::RedisResult<ConnectionManager> {
    let client = redis::Client::open(cfg.url.as_str())?;
    let mcfg = ConnectionManagerConfig::new()
        .set_response_timeout(Some(cfg.command_timeout()))
        .set_connection_timeout(Some(cfg.connect_timeout()))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(1));
    client.get_connection_manager_with_config(mcfg).await
}

/// The pool for cold paths (admin API, CLI). Every checkout costs a `PING` round trip, which is
/// why the hot path does not use it.
pub fn pool(cfg: &RedisConfig) -> anyhow::Result<deadpool_redis::Pool> {
    let mut pc = deadpool_redis::Config::from_url(cfg.url.clone());
    pc.pool = Some(deadpool_redis::PoolConfig {
        max_size: cfg.pool_size.max(1),
        timeouts: deadpool_redis::Timeouts {
            wait: Some(cfg.command_timeout()),
            create: Some(cfg.connect_timeout()),
            recycle: Some(cfg.command_timeout()),
        },
        ..Default::default()
    });
    Ok(pc.create_pool(Some(deadpool_redis::Runtime::Tokio1))?)
}
