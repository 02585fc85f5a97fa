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

/// A pub/sub connection named `name` in `CLIENT LIST`, so operators (and tests) can tell which
/// node a subscriber connection belongs to. The name is set with `CLIENT SETNAME` (after `AUTH`
/// when the URL has a password) before the connection enters pub/sub mode; a `rediss://` or unix
/// URL gets an unnamed connection.
pub async fn named_pubsub(
    client: &redis::Client,
    name: &str,
) -> redis::RedisResult<redis::aio::PubSub> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let info = client.get_connection_info();
    let redis::ConnectionAddr::Tcp(host, port) = info.addr() else {
        return client.get_async_pubsub().await;
    };
    let mut tcp = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
    let settings = info.redis_settings();
    let mut commands = Vec::new();
    if let Some(pw) = settings.password() {
        let mut auth = redis::cmd("AUTH");
        if let Some(user) = settings.username() {
            auth.arg(user);
        }
        commands.push(auth.arg(pw).get_packed_command());
    }
    commands.push(
        redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(name)
            .get_packed_command(),
    );
    for c in commands {
        tcp.write_all(&c).await?;
        // each answer is one short line: +OK or -ERR ...
        let mut line = Vec::with_capacity(64);
        loop {
            let b = tcp.read_u8().await?;
            line.push(b);
            if line.ends_with(b"\r\n") || line.len() > 512 {
                break;
            }
        }
        if !line.starts_with(b"+OK") {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "pub/sub connection set-up refused",
                String::from_utf8_lossy(&line).trim().to_string(),
            )));
        }
    }
    redis::aio::PubSub::new(settings, tcp).await
}
