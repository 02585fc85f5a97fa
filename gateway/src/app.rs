//! The assembled node: configuration, identity of this process, the verifier, the hub, metrics,
//! and the registry of open sockets that the drain walks. Built once by `main` (or a test) and
//! shared by `Arc`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth::{AuthError, Identity, Verifier};
use crate::config::Config;
use crate::fanout::Hub;
use crate::hooks::{EventsHook, PublishHook};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::presence::{Lease, Store};
use crate::redis::keys::Keys;
use crate::redis::scripts::Scripts;
use crate::rooms::PushPolicy;

/// The process from its first moment: settings, metrics and the token verifier, which need no
/// Redis, and the [`App`] once Redis has been reached. Both listeners serve from it at once, so
/// health and metrics answer while Redis is still unreachable (readiness 503, the public port 503).
pub struct Gateway {
    pub cfg: Arc<Config>,
    pub metrics: Metrics,
    pub verifier: Arc<Verifier>,
    /// `hooks.publish_url`, when set.
    pub publish_hook: Option<Arc<PublishHook>>,
    /// `hooks.events_url`, when set: its sender starts with the node ([`App::start`]).
    pub events_hook: Option<Arc<EventsHook>>,
    app: OnceLock<Arc<App>>,
}

impl Gateway {
    /// Checks the key settings (a PEM file that cannot be read stops the start) and says once
    /// what is risky about them. Nothing is fetched or dialled yet.
    pub fn new(cfg: Config) -> anyhow::Result<Arc<Self>> {
        let verifier = Verifier::from_config(&cfg)?;
        if cfg.auth.algorithm == "HS256" && cfg.hs256_secret()?.is_none() {
            tracing::warn!(
                "no auth.hs256_secret (GATEWAY_AUTH_HS256_SECRET): every token is refused and every socket is anonymous"
            );
        }
        if let Some(w) = crate::auth::missing_audience_warning(&cfg.auth) {
            tracing::warn!("{w}");
        }
        let metrics = Metrics::new();
        let publish_hook = PublishHook::from_config(&cfg, metrics.clone())?.map(Arc::new);
        let events_hook = EventsHook::from_config(&cfg, metrics.clone())?.map(Arc::new);
        Ok(Arc::new(Self {
            cfg: Arc::new(cfg),
            metrics,
            verifier: Arc::new(verifier),
            publish_hook,
            events_hook,
            app: OnceLock::new(),
        }))
    }

    /// Starts what needs no Redis: the JWKS refresher (its first fetch at once).
    pub fn start(&self) {
        if let Some(jwks) = self.verifier.jwks() {
            tokio::spawn(jwks.clone().run());
        }
    }

    /// The assembled node, once Redis has been reached.
    pub fn app(&self) -> Option<&Arc<App>> {
        self.app.get()
    }

    /// Installs the node (once; a second call is ignored).
    pub fn set_app(&self, app: Arc<App>) {
        let _ = self.app.set(app);
    }
}

pub struct App {
    pub cfg: Arc<Config>,
    /// Unique per process start, so a restarted process never inherits its previous life's entries.
    pub node: Arc<str>,
    pub keys: Keys,
    pub verifier: Arc<Verifier>,
    pub policy: PushPolicy,
    /// The application's say on pushes (`hooks.publish_url`), when set.
    pub publish_hook: Option<Arc<PublishHook>>,
    /// Where the presence scripts' edges go (`hooks.events_url`), when set.
    pub events_hook: Option<Arc<EventsHook>>,
    pub hub: Arc<Hub>,
    pub metrics: Metrics,
    /// Token deadlines of open sockets and channels (one list, one task).
    pub expiries: Arc<crate::expiry::Expiries>,
    pub sessions: Sessions,
    /// The cold paths' pool (admin API).
    pub pool: crate::redis::Pool,
    /// Set when the drain starts: readiness turns false and new upgrades get 503.
    pub draining: AtomicBool,
    /// `gateway dev` only: demo users and their tokens, served to the demo page.
    pub demo_tokens: std::sync::OnceLock<Vec<(String, String)>>,
    next_socket: AtomicU64,
    /// One permit per allowed socket (`server.max_connections`), taken before the upgrade is
    /// answered and held until the session ends. Counting registered sessions instead let a
    /// burst through: a session registers only after its 101 has gone out.
    connection_permits: Arc<Semaphore>,
    node_record: NodeRecordTask,
}

/// The refresher of `<p>:node:<id>`: told to stop, and awaited, before the drain deletes the
/// record, so no refresh can write it back.
#[derive(Default)]
struct NodeRecordTask {
    stop: tokio::sync::Notify,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Open sockets, for the drain, the node record and disconnects (the limit is [`App::admit`]'s).
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<u64, SessionEntry>>,
}

struct SessionEntry {
    out: Outbox,
    /// The users signed in on the socket: its connection token's and its channels' own tokens'.
    users: Vec<Arc<str>>,
}

impl Sessions {
    pub fn insert(&self, id: u64, out: Outbox, user: Option<&str>) {
        let users = user.map(Arc::from).into_iter().collect();
        self.lock().insert(id, SessionEntry { out, users });
    }
    /// The users signed in on the socket now (after a channel signed in with its own token
    /// joined or left).
    pub fn set_users(&self, id: u64, users: Vec<Arc<str>>) {
        if let Some(e) = self.lock().get_mut(&id) {
            e.users = users;
        }
    }
    pub fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }
    pub fn len(&self) -> usize {
        self.lock().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Every open socket, oldest first.
    pub fn all(&self) -> Vec<Outbox> {
        let m = self.lock();
        let mut v: Vec<_> = m.iter().map(|(k, c)| (*k, c.out.clone())).collect();
        v.sort_by_key(|(k, _)| *k);
        v.into_iter().map(|(_, c)| c).collect()
    }
    /// The sockets whose idle deadline has passed at `now_ms` (see `session::idle`).
    pub fn idle_past(&self, now_ms: u64) -> Vec<Outbox> {
        self.lock()
            .values()
            .filter(|c| c.out.idle_past(now_ms))
            .map(|c| c.out.clone())
            .collect()
    }
    /// The sockets on which `user` is signed in (by the connection's token or a channel's).
    pub fn of_user(&self, user: &str) -> Vec<Outbox> {
        self.lock()
            .values()
            .filter(|e| e.users.iter().any(|u| &**u == user))
            .map(|e| e.out.clone())
            .collect()
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, SessionEntry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Carries out the hub's orders for this node's sessions: a disconnect closes every socket of the
/// user with 4003 (their presence leaves as the sessions end) and answers how many.
async fn run_control(
    app: Arc<App>,
    mut orders: tokio::sync::mpsc::UnboundedReceiver<crate::fanout::Control>,
) {
    while let Some(order) = orders.recv().await {
        match order {
            crate::fanout::Control::Disconnect { user, reply } => {
                let sockets = app.sessions.of_user(&user);
                for out in &sockets {
                    out.close(crate::protocol::close::DISCONNECTED);
                }
                tracing::info!(sockets = sockets.len(), "user disconnected by the server");
                if let Some(key) = reply {
                    app.hub.reply(&key, sockets.len()).await;
                }
            }
        }
    }
}

/// A node id: the host name (sanitised, shortened) and 64 random bits.
///
/// The random part is what makes ids unique: pods of one ReplicaSet share a host prefix, and two
/// processes with the same id would renew and erase each other's presence. 64 bits keep a
/// collision negligible across any number of restarts (32 bits reach even odds after ~77,000
/// starts of same-prefixed pods). The id holds only `[A-Za-z0-9_-]`: connection ids are
/// `<node>.<n>` and the Lua scripts split them on the last dot.
pub fn new_node_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .unwrap_or_default();
    node_id(&host, rand::random())
}

/// Longest host prefix kept in a node id (a Kubernetes pod name's deployment and ReplicaSet
/// part), so ids stay short in every presence field and lease.
const NODE_HOST_CHARS: usize = 24;

fn node_id(host: &str, random: u64) -> String {
    let host: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(NODE_HOST_CHARS)
        .collect();
    let host = if host.is_empty() { "gw" } else { &host };
    format!("{host}-{random:016x}")
}

impl App {
    /// Connects to Redis (retrying, with a warning each time, until it answers), checks its
    /// version and loads the scripts, and assembles the node. A Redis that is too old, or that
    /// refuses the scripts, is an error: the process stops.
    pub async fn build(gw: &Gateway, node: String) -> anyhow::Result<Arc<App>> {
        let cfg = gw.cfg.clone();
        let verifier = gw.verifier.clone();
        let metrics = gw.metrics.clone();
        let keys = Keys::new(&cfg.redis.prefix);
        let mut delay = std::time::Duration::from_millis(100);
        // a refusing Redis (wrong password, failed TLS verification, no client certificate) is
        // unreachable, not fatal: the cause is logged and the attempt repeated
        let attempt_limit = (cfg.redis.connect_timeout() + cfg.redis.command_timeout()) * 4;
        let conn = loop {
            match tokio::time::timeout(attempt_limit, crate::redis::Redis::connect(&cfg.redis))
                .await
            {
                Ok(Ok(c)) => break c,
                other => {
                    let error = match other {
                        Ok(Err(e)) => crate::redis::dial::describe(&e),
                        _ => "timed out".to_string(),
                    };
                    tracing::warn!(url = %redact(&cfg.redis.url), mode = ?cfg.redis.mode, %error, "redis not reachable yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(2));
                }
            }
        };
        check_redis_version(&conn, &cfg.redis.url).await?;
        let scripts = Arc::new(Scripts::for_redis(&conn));
        let mut c = conn.clone();
        scripts.load_all(&mut c).await?;
        let presence = &cfg.presence;
        let lease = Lease {
            node: node.clone(),
            lease_ms: presence.ttl_ms,
            // keys outlive the last lease by one more TTL, then vanish by themselves
            key_ttl_ms: presence.ttl_ms * 2,
        };
        let store = Store::new(
            conn,
            scripts,
            lease,
            cfg.redis.command_timeout(),
            metrics.clone(),
        )
        .with_events(gw.events_hook.clone());
        let node: Arc<str> = Arc::from(node);
        let hub = Hub::new(
            cfg.clone(),
            keys.clone(),
            node.clone(),
            store,
            metrics.clone(),
        );
        let pool = crate::redis::Pool::new(&cfg.redis)?;
        let connection_permits = Arc::new(Semaphore::new(
            cfg.server.max_connections.min(Semaphore::MAX_PERMITS),
        ));
        Ok(Arc::new(App {
            policy: PushPolicy::with_anonymous(
                &cfg.rooms.client_events,
                &cfg.rooms.anonymous_events,
            ),
            publish_hook: gw.publish_hook.clone(),
            events_hook: gw.events_hook.clone(),
            cfg,
            node,
            keys,
            verifier,
            hub,
            expiries: Default::default(),
            metrics,
            sessions: Sessions::default(),
            pool,
            draining: AtomicBool::new(false),
            demo_tokens: std::sync::OnceLock::new(),
            next_socket: AtomicU64::new(1),
            connection_permits,
            node_record: NodeRecordTask::default(),
        }))
    }

    /// Starts the background tasks: the pub/sub subscriber, the presence heartbeat, the token
    /// deadlines, the idle sweep and the node record's refresher.
    pub fn start(self: &Arc<Self>) {
        tokio::spawn(self.hub.clone().run_subscriber());
        if let Some(orders) = self.hub.take_control() {
            tokio::spawn(run_control(self.clone(), orders));
        }
        tokio::spawn(self.hub.clone().run_heartbeat());
        if let Some(hook) = &self.events_hook {
            tokio::spawn(hook.clone().run());
        }
        tokio::spawn(self.expiries.clone().run(self.hub.clone()));
        tokio::spawn(crate::session::idle::sweep(self.clone()));
        let task = tokio::spawn(node_record(self.clone()));
        *lock(&self.node_record.task) = Some(task);
    }

    /// Deletes `<p>:node:<id>` (drain): first stops the refresher and waits until it has
    /// finished (a refresh in flight completes or times out within the command deadline), so
    /// nothing writes the record back after the delete.
    pub async fn remove_node_record(&self) {
        self.node_record.stop.notify_one();
        let task = lock(&self.node_record.task).take();
        if let Some(task) = task {
            let _ = task.await;
        }
        let cmd = redis::cmd("DEL").arg(self.keys.node(&self.node)).clone();
        let _ = self
            .hub
            .store()
            .command::<i64>(crate::metrics::redis_op::NODE_RECORD, &cmd)
            .await;
    }

    /// A place for one more socket, or `None` at `server.max_connections`. The socket holds the
    /// permit for its whole life; dropping it frees the place.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        self.connection_permits.clone().try_acquire_owned().ok()
    }

    /// Gives back the place of a session that held its permit as `Session`'s own (see
    /// `session::run`).
    pub fn release_connection(&self) {
        self.connection_permits.add_permits(1);
    }

    /// Connections admitted and not yet ended: open sessions and upgrades still under way.
    pub fn open_connections(&self) -> usize {
        self.cfg.server.max_connections.min(Semaphore::MAX_PERMITS)
            - self.connection_permits.available_permits()
    }

    pub fn next_socket(&self) -> u64 {
        self.next_socket.fetch_add(1, Ordering::Relaxed)
    }

    /// A verified identity whose user is banned (`<p>:user:{<sub>}:ban`, set by a disconnect
    /// with `ban_s`) signs nothing in: it becomes anonymous with `auth_error: banned`.
    ///
    /// Cost: one `EXISTS` per signed-in upgrade and per join with its own `guardian_token` (never
    /// for anonymous sockets, never for joins under the connection's token, which was checked at
    /// the upgrade). Redis unreachable: the ban is not enforced (the join or upgrade would need
    /// Redis anyway), and a warning is logged.
    pub async fn unless_banned(
        &self,
        (identity, error): (Identity, Option<AuthError>),
    ) -> (Identity, Option<AuthError>) {
        let Some(u) = identity.user() else {
            return (identity, error);
        };
        let cmd = redis::cmd("EXISTS").arg(self.keys.user_ban(&u.id)).clone();
        match self.hub.store().command::<i64>("exists", &cmd).await {
            Ok(1) => (Identity::Anonymous, Some(AuthError::Banned)),
            Ok(_) => (identity, error),
            Err(e) => {
                tracing::warn!(error = %e, "checking a user ban failed; not enforced");
                (identity, error)
            }
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// Refuses a Redis older than [`crate::redis::MIN_VERSION`] with an error naming the server and
/// its version (every master of a cluster is asked).
async fn check_redis_version(conn: &crate::redis::Redis, url: &str) -> anyhow::Result<()> {
    let versions = conn
        .server_versions()
        .await
        .map_err(|e| anyhow::anyhow!("cannot read the Redis version (INFO server): {e}"))?;
    for (server, version) in versions {
        let server = if server.is_empty() {
            redact(url)
        } else {
            server
        };
        if !crate::redis::version_supported(&version) {
            let (major, minor) = crate::redis::MIN_VERSION;
            anyhow::bail!(
                "Redis {version} at {server} is too old: the gateway needs Redis >= {major}.{minor} \
                 (history recovery reads XINFO STREAM's entries-added; cluster rooms use sharded pub/sub)"
            );
        }
        tracing::debug!(%server, %version, "redis version");
    }
    Ok(())
}

/// Keeps `<p>:node:<id>` alive for operators (`gateway nodes`): the node's listen address, start
/// time and local room count, refreshed every heartbeat with a TTL of one lease.
async fn node_record(app: Arc<App>) {
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut tick = tokio::time::interval(app.cfg.presence.heartbeat_interval());
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            // a permit stored by notify_one is not lost if it comes while a refresh is in flight
            _ = app.node_record.stop.notified() => return,
        }
        if app.is_draining() {
            return;
        }
        let rec = serde_json::json!({
            "node": &*app.node,
            "listen": app.cfg.server.listen,
            "started_at": started,
            "rooms": app.hub.room_count(),
            "sockets": app.sessions.len(),
            "version": env!("CARGO_PKG_VERSION"),
        })
        .to_string();
        let cmd = redis::cmd("SET")
            .arg(app.keys.node(&app.node))
            .arg(rec)
            .arg("PX")
            .arg(app.cfg.presence.ttl_ms)
            .clone();
        let _ = app
            .hub
            .store()
            .command::<()>(crate::metrics::redis_op::NODE_RECORD, &cmd)
            .await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `redis://user:pass@host` → `redis://user:***@host` for logs.
pub fn redact(url: &str) -> String {
    crate::config::redact_url(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_carry_64_random_bits_and_never_a_dot() {
        let a = new_node_id();
        let b = new_node_id();
        assert_ne!(a, b);
        for id in [&a, &b] {
            let (_, random) = id.rsplit_once('-').expect("host-random");
            assert_eq!(random.len(), 16, "{id}: 64 bits as 16 hex digits");
            assert!(random.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
        }
        assert_eq!(
            node_id("pod-1.example.com\n", 1),
            "pod-1examplecom-0000000000000001"
        );
        assert_eq!(node_id("", u64::MAX), "gw-ffffffffffffffff");
        assert_eq!(node_id("...", 0), "gw-0000000000000000");
        let long = node_id(&"h".repeat(100), 7);
        assert_eq!(long.len(), NODE_HOST_CHARS + 1 + 16);
        for id in [a, b, long, node_id("a b/c:{d}.e", 3)] {
            assert!(
                id.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                "{id}: only [A-Za-z0-9_-], so `<node>.<n>` splits on its last dot"
            );
        }
    }
}
