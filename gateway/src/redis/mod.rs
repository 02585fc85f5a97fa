//! Redis plumbing: key names ([`keys`]), the Lua scripts ([`scripts`]), and the connections:
//! the hot path's [`Redis`], the cold paths' [`Pool`] and the node's [`Subscriber`]. Each hides
//! whether Redis is one server, a cluster ([`cluster`] holds the slot arithmetic) or a master
//! found through Sentinel ([`sentinel`]); nothing above this module knows the mode. [`dial`]
//! says how each connection is made: ACL user, TLS.

pub mod cluster;
mod conn;
pub mod dial;
pub mod keys;
mod pool;
mod pubsub;
pub mod scripts;
mod sentinel;

pub use conn::{MIN_VERSION, Redis, version_supported};
pub use pool::{Pool, PoolConn, PoolError};
pub use pubsub::{Event, Publisher, Subscriber};

/// A pub/sub connection named `name` in `CLIENT LIST`, so operators (and tests) can tell which
/// node a subscriber connection belongs to. The name is set with `CLIENT SETNAME` (after `AUTH`
/// when the URL has a password) before the connection enters pub/sub mode, over TCP or TLS
/// alike (see [`dial`]); a unix socket URL gets an unnamed connection.
async fn named_pubsub(
    dial: &dial::Dial,
    info: &redis::ConnectionInfo,
    name: &str,
) -> redis::RedisResult<redis::aio::PubSub> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(mut stream) = dial.stream(info).await? else {
        return redis::Client::open(info.clone())?.get_async_pubsub().await;
    };
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
        stream.write_all(&c).await?;
        stream.flush().await?;
        // each answer is one short line: +OK or -ERR ...
        let mut line = Vec::with_capacity(64);
        loop {
            let b = stream.read_u8().await?;
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
    redis::aio::PubSub::new(settings, stream).await
}
