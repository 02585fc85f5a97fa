//! Redis Sentinel: which server is the master now. [`Sentinels`] asks each sentinel of
//! `redis.url` in turn (`SENTINEL get-master-addr-by-name`, with the credentials of that
//! sentinel's URL) and checks with `ROLE` that the server it names considers itself master; the
//! master is reached with `redis.master_user` / `redis.master_password` when set, else with the
//! answering sentinel's credentials, and over TLS when the sentinels are (`rediss://`).
//!
//! [`Failover`] is the hot connection to that master. A lost connection or a `-READONLY` (the
//! master was demoted) makes it ask the sentinels again in the background, until a master
//! answers; commands meanwhile fail fast (a join gets "presence unavailable"). The subscriber
//! asks again on every reconnect ([`Failover::refresh`]), and its reconnect re-snapshots and
//! re-asserts the node's presence exactly as after a Redis restart.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisError,
    RedisResult, Value,
};

use super::dial::{Dial, describe};
use crate::config::RedisConfig;

/// Pause between two rounds of asking the sentinels while no master answers: short, since the
/// node is unready until one does, and a round costs a few local round trips.
const RETRY: Duration = Duration::from_millis(200);

/// The sentinels of `redis.url` and how to reach the master they name.
#[derive(Clone)]
pub struct Sentinels {
    /// One per sentinel URL, with its own credentials (and TLS files).
    nodes: Vec<ConnectionInfo>,
    master: String,
    master_user: Option<String>,
    master_password: Option<String>,
    dial: Dial,
    conn: AsyncConnectionConfig,
}

impl Sentinels {
    pub fn new(cfg: &RedisConfig) -> RedisResult<Self> {
        let dial = Dial::new(cfg)?;
        let nodes = cfg
            .urls()
            .into_iter()
            .map(|u| dial.info(u))
            .collect::<RedisResult<Vec<_>>>()?;
        Ok(Self {
            nodes,
            master: cfg.sentinel_master.clone(),
            master_user: cfg.master_user.clone(),
            master_password: cfg.master_password.clone(),
            dial,
            conn: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(cfg.connect_timeout()))
                .set_response_timeout(Some(cfg.command_timeout())),
        })
    }

    /// The master as the sentinels name it now: its connection info, `host:port` and a
    /// connection to it that has answered `ROLE` with `master`. The first sentinel that names a
    /// master that answers wins; otherwise the most telling error (a refusal by the master or a
    /// sentinel outranks an unreachable sentinel).
    pub async fn master(&self) -> RedisResult<(ConnectionInfo, String, MultiplexedConnection)> {
        let mut refused: Option<RedisError> = None;
        let mut last: Option<RedisError> = None;
        for s in &self.nodes {
            match self.ask(s).await {
                Ok(m) => return Ok(m),
                Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_refusal() => {
                    last = Some(e)
                }
                Err(e) => refused = Some(e),
            }
        }
        Err(refused.or(last).unwrap_or_else(|| {
            RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "no sentinel in redis.url",
            ))
        }))
    }

    async fn ask(
        &self,
        sentinel: &ConnectionInfo,
    ) -> RedisResult<(ConnectionInfo, String, MultiplexedConnection)> {
        let mut c = redis::Client::open(sentinel.clone())?
            .get_multiplexed_async_connection_with_config(&self.conn)
            .await?;
        let named: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.master)
            .query_async(&mut c)
            .await?;
        let Some((host, port)) = named else {
            return Err(RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "the sentinel does not know the master named in redis.sentinel_master",
                self.master.clone(),
            )));
        };
        let info = self.master_info(sentinel, &host, port)?;
        let mut m = redis::Client::open(info.clone())?
            .get_multiplexed_async_connection_with_config(&self.conn)
            .await?;
        let role: Vec<Value> = redis::cmd("ROLE").query_async(&mut m).await?;
        let is_master = matches!(role.first(), Some(Value::BulkString(r)) if r == b"master");
        if !is_master {
            return Err(RedisError::from((
                redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
                "the server the sentinel names is not (yet) a master",
                format!("{host}:{port}"),
            )));
        }
        Ok((info, format!("{host}:{port}"), m))
    }

    /// How to reach the master at `host:port` named by `sentinel`: TLS if the sentinel is, the
    /// master credentials if set, else the sentinel's.
    fn master_info(
        &self,
        sentinel: &ConnectionInfo,
        host: &str,
        port: u16,
    ) -> RedisResult<ConnectionInfo> {
        let addr = match sentinel.addr() {
            ConnectionAddr::TcpTls { .. } => ConnectionAddr::TcpTls {
                host: host.to_string(),
                port,
                insecure: false,
                tls_params: None,
            },
            _ => ConnectionAddr::Tcp(host.to_string(), port),
        };
        let theirs = sentinel.redis_settings();
        let mut settings = redis::RedisConnectionInfo::default();
        if let Some(u) = self.master_user.as_deref().or(theirs.username()) {
            settings = settings.set_username(u);
        }
        if let Some(p) = self.master_password.as_deref().or(theirs.password()) {
            settings = settings.set_password(p);
        }
        let info = addr.into_connection_info()?.set_redis_settings(settings);
        self.dial.attach(info)
    }
}

/// The master of the moment.
struct Current {
    addr: String,
    conn: MultiplexedConnection,
}

/// The hot connection in sentinel mode (see the module docs).
pub struct Failover {
    sentinels: Sentinels,
    current: RwLock<Current>,
    /// A background round of asking the sentinels is under way.
    resolving: AtomicBool,
}

impl Failover {
    pub async fn connect(cfg: &RedisConfig) -> RedisResult<Arc<Self>> {
        let sentinels = Sentinels::new(cfg)?;
        let (_, addr, conn) = sentinels.master().await?;
        tracing::info!(master = %addr, name = %sentinels.master, "sentinel: master found");
        Ok(Arc::new(Self {
            sentinels,
            current: RwLock::new(Current { addr, conn }),
            resolving: AtomicBool::new(false),
        }))
    }

    /// The connection to the master of the moment (cheap: multiplexed).
    pub fn conn(&self) -> MultiplexedConnection {
        self.read().conn.clone()
    }

    /// Asks the sentinels again. The connection is kept when the master is the same and still
    /// answers; otherwise the new one replaces it. Returns how to reach the master (for the
    /// subscriber).
    pub async fn refresh(&self) -> RedisResult<ConnectionInfo> {
        let (info, addr, conn) = self.sentinels.master().await?;
        let (same, mut old) = {
            let cur = self.read();
            (cur.addr == addr, cur.conn.clone())
        };
        if same {
            let alive: RedisResult<String> = redis::cmd("PING").query_async(&mut old).await;
            if alive.is_ok() {
                return Ok(info);
            }
        } else {
            tracing::warn!(master = %addr, name = %self.sentinels.master, "sentinel: the master changed; following it");
        }
        let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
        *cur = Current { addr, conn };
        Ok(info)
    }

    /// Called with every failed command: a lost connection or `-READONLY` starts a background
    /// round of asking the sentinels (one at a time), repeated until a master answers.
    pub fn on_error(self: &Arc<Self>, e: &RedisError) {
        let lost = e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_unrecoverable_error()
            || matches!(
                e.kind(),
                redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
            );
        if !lost || self.resolving.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let mut warned = false;
            loop {
                match this.refresh().await {
                    Ok(_) => break,
                    Err(e) => {
                        if !warned {
                            tracing::warn!(error = %describe(&e), "sentinel: no master answers yet; asking again");
                            warned = true;
                        }
                        tokio::time::sleep(RETRY).await;
                    }
                }
            }
            this.resolving.store(false, Ordering::Release);
        });
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.current.read().unwrap_or_else(|p| p.into_inner())
    }
}
