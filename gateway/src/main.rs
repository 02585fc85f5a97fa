//! `gateway`: CLI → config → tracing → build the node → serve → wait for a signal → drain.
//!
//! Each subcommand's body is a thin call into the library (`catalog`, `app`, `auth`, `demo` for
//! the dev server's tokens and local Redis); what is left here is argument parsing, printing and
//! the order of start-up and drain, which must read top to bottom in one place.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio::sync::watch;

use gateway::app::{App, Gateway, new_node_id};
use gateway::catalog::{Catalog, CatalogError, iso8601_utc};
use gateway::config::{Config, LogFormat};
use gateway::demo;
use gateway::redis::keys::Keys;
use gateway::rooms::{Access, RoomId};

#[derive(Parser)]
#[command(
    name = "gateway",
    version,
    about = "Phoenix Channels V2 WebSocket gateway backed by Redis"
)]
struct Cli {
    /// Settings file (default: config/gateway.toml if it exists). Env GATEWAY_<SECTION>_<KEY> overrides it.
    #[arg(long, global = true, env = "GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve,
    /// Validate the settings and print the effective values (secrets masked).
    CheckConfig,
    /// Manage rooms (a room exists iff its record exists in Redis).
    Rooms {
        #[command(subcommand)]
        command: RoomsCommand,
    },
    /// Print a development token signed with auth.hs256_secret (`gateway dev` prints the
    /// GATEWAY_AUTH_HS256_SECRET=... line that makes this work against it).
    Token {
        /// The user id (`sub`), e.g. `gateway token alice`.
        #[arg(conflicts_with = "sub", required_unless_present = "sub")]
        user: Option<String>,
        /// The user id (`sub`), as a flag.
        #[arg(long)]
        sub: Option<String>,
        /// Display name (default: the user id).
        #[arg(long)]
        username: Option<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// Private rooms the bearer may join (the `rooms` claim), comma separated; `*` = all.
        #[arg(long, value_delimiter = ',')]
        rooms: Vec<String>,
    },
    /// Act on a user's connections on every node.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// List live gateway processes and their rooms.
    Nodes,
    /// One command for a newcomer: uses the Redis at redis.url or starts a local redis-server,
    /// creates room `lobby`, prints demo tokens, and serves the demo page at http://<listen>/.
    Dev,
}

#[derive(Subcommand)]
enum RoomsCommand {
    /// Create a room.
    Create {
        id: String,
        #[arg(long)]
        name: Option<String>,
        /// Only signed-in users whose token's `rooms` claim lists the room (or "*") may join.
        #[arg(long)]
        private: bool,
    },
    /// Close a user's channels in the room on every node (phx_close); prints how many.
    Kick {
        id: String,
        /// The user id (`sub`).
        user: String,
        /// Also refuse the user's joins of the room for this many seconds.
        #[arg(long, default_value_t = 0)]
        ban_s: u64,
    },
    /// List rooms.
    List,
    /// Show a room: signed-in users and the anonymous count (per node).
    Show { id: String },
    /// Delete a room (and its history); its channels are closed on every node.
    Delete { id: String },
    /// Print a room's newest broadcasts, oldest first: `<id> <event> <payload JSON>` per line.
    History {
        id: String,
        /// How many (at most 1000).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u16).range(1..=1000))]
        last: u16,
    },
}

#[derive(Subcommand)]
enum UsersCommand {
    /// Close every socket of a user on every node (close code 4003); prints how many.
    Disconnect {
        /// The user id (`sub`).
        user: String,
        /// Also let no token with this `sub` sign in for this many seconds.
        #[arg(long, default_value_t = 0)]
        ban_s: u64,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // the settings are read before the runtime is built (they say how many threads it has) and
    // before logging starts (they say how it is written)
    let cfg = match Config::load(cli.config.as_deref()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    init_logging(&cfg.log);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if cfg.server.worker_threads > 0 {
        builder.worker_threads(cfg.server.worker_threads);
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let json = cfg.log.format == LogFormat::Json;
    match rt.block_on(run(cli, cfg)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // a log pipeline reads every line as JSON; a person reads the plain line
            if json {
                tracing::error!(error = format!("{e:#}"), "stopped");
            } else {
                eprintln!("error: {e:#}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs to stderr as `log.format` says, filtered by `log.level` (checked when the settings
/// were loaded).
fn init_logging(log: &gateway::config::LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_new(&log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log.format {
        LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // one object per line: timestamp (RFC 3339, UTC), level, target, fields (message
        // included); no span lists, no colours
        LogFormat::Json => fmt
            .json()
            .with_current_span(false)
            .with_span_list(false)
            .with_ansi(false)
            .init(),
    }
}

async fn run(cli: Cli, cfg: Config) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve => serve(cfg, None).await,
        Command::Dev => {
            // a newcomer's demo stays on this machine unless a settings file or
            // GATEWAY_SERVER_LISTEN says where to listen
            let told = cli.config.is_some() || std::env::var_os("GATEWAY_SERVER_LISTEN").is_some();
            dev(cfg, told).await
        }
        Command::CheckConfig => {
            gateway::auth::Verifier::from_config(&cfg)?;
            cfg.admin_token()?;
            cfg.hooks_secret()?;
            if let Some(w) = gateway::auth::missing_audience_warning(&cfg.auth) {
                eprintln!("warning: {w}");
            }
            print!("{}", cfg.to_masked_toml());
            eprintln!("configuration is valid");
            Ok(())
        }
        Command::Rooms { command } => rooms(cfg, command).await,
        Command::Users {
            command: UsersCommand::Disconnect { user, ban_s },
        } => {
            let cat = catalog(&cfg)?;
            let n = cat
                .disconnect(&user, ban_s)
                .await
                .map_err(redis_error(&cfg))?;
            println!(
                "closed {n} socket{} of {user}",
                if n == 1 { "" } else { "s" }
            );
            if ban_s > 0 {
                println!("{user} banned for {ban_s} s");
            }
            Ok(())
        }
        Command::Token {
            user,
            sub,
            username,
            ttl,
            rooms,
        } => {
            let sub = user
                .or(sub)
                .context("give a user id: gateway token <sub>")?;
            let secret = cfg.hs256_secret()?.context(
                "no auth.hs256_secret configured: set GATEWAY_AUTH_HS256_SECRET to the gateway's \
                 secret (`gateway dev` prints the line to use with it)",
            )?;
            println!(
                "{}",
                demo::dev_token(&secret, &sub, username.as_deref(), ttl, &rooms)?
            );
            Ok(())
        }
        Command::Nodes => {
            let cat = catalog(&cfg)?;
            let nodes = cat.nodes().await.map_err(redis_error(&cfg))?;
            if nodes.is_empty() {
                println!("no live gateway nodes");
            }
            for n in nodes {
                println!(
                    "{}  listen={}  rooms={}  sockets={}  version={}",
                    n["node"].as_str().unwrap_or("?"),
                    n["listen"].as_str().unwrap_or("?"),
                    n["rooms"],
                    n["sockets"],
                    n["version"].as_str().unwrap_or("?"),
                );
            }
            Ok(())
        }
    }
}

fn catalog(cfg: &Config) -> anyhow::Result<Catalog> {
    Ok(Catalog::new(
        gateway::redis::Pool::new(&cfg.redis)?,
        Keys::new(&cfg.redis.prefix),
    ))
}

/// A catalogue error for the CLI: a Redis failure names the Redis (its URL, password masked);
/// the cause is printed once.
fn redis_error(cfg: &Config) -> impl Fn(CatalogError) -> anyhow::Error + '_ {
    move |e| match e {
        CatalogError::Redis(_) | CatalogError::Pool(_) => anyhow::anyhow!(
            "the Redis at {} ({} mode): {e}",
            gateway::app::redact(&cfg.redis.url),
            match cfg.redis.mode {
                gateway::config::RedisMode::Standalone => "standalone",
                gateway::config::RedisMode::Cluster => "cluster",
                gateway::config::RedisMode::Sentinel => "sentinel",
            }
        ),
        other => anyhow::anyhow!("{other}"),
    }
}

fn room_id(id: &str) -> anyhow::Result<RoomId> {
    RoomId::parse(id).map_err(|_| {
        anyhow::anyhow!("invalid room id {id:?}: use 1-64 characters of [A-Za-z0-9_-]")
    })
}

async fn rooms(cfg: Config, cmd: RoomsCommand) -> anyhow::Result<()> {
    let cat = catalog(&cfg)?;
    let redis = redis_error(&cfg);
    match cmd {
        RoomsCommand::Create { id, name, private } => {
            let access = if private {
                Access::Private
            } else {
                Access::Public
            };
            let r = cat
                .create(&room_id(&id)?, name.as_deref(), access)
                .await
                .map_err(redis)?;
            println!("created room {} ({}, {})", r.id, r.name, r.access);
        }
        RoomsCommand::Kick { id, user, ban_s } => {
            let n = cat
                .kick(&room_id(&id)?, &user, ban_s)
                .await
                .map_err(redis)?;
            println!(
                "kicked {user} from {id}: {n} channel{} closed",
                if n == 1 { "" } else { "s" }
            );
            if ban_s > 0 {
                println!("{user} banned from {id} for {ban_s} s");
            }
        }
        RoomsCommand::List => {
            let rooms = cat.list().await.map_err(redis)?;
            // tab-separated under a header, for people and for `cut -f`
            println!("ID\tNAME\tCREATED (UTC)\tACCESS");
            for r in &rooms {
                let created = iso8601_utc(r.created_at);
                println!("{}\t{}\t{created}\t{}", r.id, r.name, r.access);
            }
            if rooms.is_empty() {
                eprintln!("no rooms (create one: gateway rooms create <id>)");
            }
        }
        RoomsCommand::Show { id } => {
            let id = room_id(&id)?;
            let rec = cat
                .get(&id)
                .await
                .map_err(&redis)?
                .with_context(|| format!("room {id} does not exist"))?;
            let p = cat.presence(&id).await.map_err(redis)?;
            println!("room {} ({})", rec.id, rec.name);
            println!("created {}", iso8601_utc(rec.created_at));
            println!("access: {}", rec.access);
            println!("signed-in users: {}", p.users.len());
            for u in &p.users {
                println!(
                    "  {}  {}  ({} connection{})",
                    u.id,
                    u.username,
                    u.connections,
                    if u.connections == 1 { "" } else { "s" }
                );
            }
            println!("Anonymous: {}", p.anonymous);
            let mut nodes: Vec<_> = p.anonymous_by_node.iter().collect();
            nodes.sort();
            for (n, c) in nodes {
                println!("  {n}: {c}");
            }
            let mut leases: Vec<_> = p.leases.iter().collect();
            leases.sort();
            if !leases.is_empty() {
                println!("node leases (Redis clock):");
            }
            for (n, exp) in leases {
                println!("  {n} until {}", iso8601_utc(*exp));
            }
        }
        RoomsCommand::Delete { id } => {
            cat.delete(&room_id(&id)?).await.map_err(redis)?;
            println!("deleted room {id}");
        }
        RoomsCommand::History { id, last } => {
            let id = room_id(&id)?;
            cat.get(&id)
                .await
                .map_err(&redis)?
                .with_context(|| format!("room {id} does not exist"))?;
            let events = cat.history(&id, usize::from(last)).await.map_err(redis)?;
            if events.is_empty() {
                eprintln!("room {id} has no history");
            }
            for e in events {
                println!("{}\t{}\t{}", e.id, e.event, e.payload);
            }
        }
    }
    Ok(())
}

/// Demo users of `gateway dev`.
const DEMO_USERS: [(&str, &str); 2] = [("1", "test_user"), ("2", "test_user2")];
/// The HS256 secret `gateway dev` uses when none is configured. Development only; 32+ bytes, the
/// shortest HS256 secret the gateway accepts.
const DEV_SECRET: &str = "dev-only-hs256-secret-never-use-in-production";

async fn dev(mut cfg: Config, listen_told: bool) -> anyhow::Result<()> {
    if cfg.hs256_secret()?.is_none() && cfg.auth.algorithm == "HS256" {
        cfg.auth.hs256_secret = Some(DEV_SECRET.into());
    }
    if !listen_told {
        cfg.server.listen = demo::loopback(&cfg.server.listen);
    }
    // a cluster or sentinels are the operator's to run; `dev` starts a local server only in standalone mode
    let child = match cfg.redis.mode {
        gateway::config::RedisMode::Standalone => demo::ensure_redis(&cfg.redis.url).await?,
        gateway::config::RedisMode::Cluster | gateway::config::RedisMode::Sentinel => None,
    };
    let cat = catalog(&cfg)?;
    let lobby = room_id("lobby")?;
    match cat.create(&lobby, Some("Lobby"), Access::Public).await {
        Ok(_) | Err(gateway::catalog::CatalogError::Exists(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let secret = cfg.hs256_secret()?.unwrap_or_default();
    let mut tokens = Vec::new();
    for (sub, name) in DEMO_USERS {
        tokens.push((
            name,
            demo::dev_token(&secret, sub, Some(name), 24 * 3600, &[])?,
        ));
    }
    let r = serve(cfg, Some(tokens)).await;
    if let Some(mut c) = child {
        let _ = c.kill().await;
    }
    r
}

async fn serve(cfg: Config, demo_tokens: Option<Vec<(&str, String)>>) -> anyhow::Result<()> {
    // secrets in files are read now, so a blank or short one stops the start before any port is
    // bound (inline and env secrets were checked when the settings were loaded)
    cfg.hs256_secret()?;
    cfg.admin_token()?;
    cfg.hooks_secret()?;
    let node = new_node_id();
    let gw = Gateway::new(cfg)?;
    // bind before connecting to Redis: a port conflict is reported at once
    let public = gateway::server::bind_public(&gw.cfg.server)
        .await
        .with_context(|| format!("cannot listen on {}", gw.cfg.server.listen))?;
    let admin = TcpListener::bind(&gw.cfg.admin.listen)
        .await
        .with_context(|| format!("cannot listen on {}", gw.cfg.admin.listen))?;
    let public_addr = public.local_addr()?;
    let admin_addr = admin.local_addr()?;
    // both ports answer from now on: health and metrics at once, the public port 503 until the
    // node is assembled; the admin port stays up through the drain, so probes see readiness 503
    gw.start();
    let (_admin_stop, admin_stop_rx) = watch::channel(false);
    tokio::spawn(gateway::admin::serve_admin(
        gw.clone(),
        admin,
        admin_stop_rx,
    ));
    let (stop_tx, stop_rx) = watch::channel(false);
    let public_task = tokio::spawn(gateway::server::serve_public(gw.clone(), public, stop_rx));
    println!(
        "{}",
        serde_json::json!({"event": "starting", "public": public_addr.to_string(), "admin": admin_addr.to_string(), "node": &node})
    );
    // Redis is reached in the background of the listeners; a signal meanwhile just ends the
    // process (nothing was written to Redis yet)
    let app = tokio::select! {
        app = App::build(&gw, node) => app?,
        _ = wait_for_signal() => return Ok(()),
    };
    gw.set_app(app.clone());
    app.start();
    tracing::info!(node = %app.node, public = %public_addr, admin = %admin_addr, "gateway listening");
    // one machine-readable line on stdout for scripts and tests: the node serves sessions now
    println!(
        "{}",
        serde_json::json!({"event": "listening", "public": public_addr.to_string(), "admin": admin_addr.to_string(), "node": &*app.node})
    );
    if let Some(tokens) = demo_tokens {
        let _ = app.demo_tokens.set(
            tokens
                .iter()
                .map(|(n, t)| (n.to_string(), t.clone()))
                .collect(),
        );
        let host = match public_addr.ip() {
            ip if ip.is_unspecified() => "127.0.0.1".to_string(),
            ip => ip.to_string(),
        };
        let base = format!("http://{host}:{}", public_addr.port());
        eprintln!("\n  demo page:   {base}/   (room lobby; watch anonymously or sign in)");
        eprintln!(
            "  socket:      ws://{host}:{}/socket/websocket?vsn=2.0.0",
            public_addr.port()
        );
        eprintln!("  admin:       http://{admin_addr}/metrics  /health/ready");
        for (name, t) in tokens {
            eprintln!("  token {name:<10} {t}");
            eprintln!("    page as {name}: {base}/?token={t}");
        }
        // argv[0] as typed (target/release/gateway from scripts/dev.sh), else the name on PATH
        let bin = std::env::args()
            .next()
            .filter(|a| a.contains('/'))
            .unwrap_or_else(|| "gateway".into());
        if app.cfg.auth.hs256_secret.as_deref() == Some(DEV_SECRET) {
            eprintln!("  more tokens: GATEWAY_AUTH_HS256_SECRET={DEV_SECRET} {bin} token alice");
        } else {
            eprintln!(
                "  more tokens: {bin} token alice   (with this server's auth.hs256_secret in its env or --config)"
            );
        }
        eprintln!();
    }
    wait_for_signal().await;
    drain(&app, stop_tx, public_task).await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: draining"),
                _ = int.recv() => tracing::info!("SIGINT: draining"),
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Readiness off, stop accepting, wait `server.drain_grace_ms`, remove this node's presence and
/// its node record (`<p>:node:<id>`) from Redis, close sockets in batches with 1012 (clients reconnect elsewhere), exit within
/// `server.shutdown_timeout_ms`.
async fn drain(
    app: &Arc<App>,
    stop: watch::Sender<bool>,
    public_task: tokio::task::JoinHandle<()>,
) {
    let started = tokio::time::Instant::now();
    let deadline = started + app.cfg.server.shutdown_timeout();
    app.draining
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = stop.send(true);
    let _ = public_task.await;
    tokio::time::sleep_until(started + app.cfg.server.drain_grace()).await;
    let sockets = app.sessions.len();
    let _ = tokio::time::timeout_at(
        deadline,
        futures_util::future::join(app.hub.release_all(), app.remove_node_record()),
    )
    .await;
    // the release's member_removed / room_vacated events, and whatever else is queued
    if let Some(hook) = &app.events_hook {
        hook.flush(deadline).await;
    }
    tracing::info!(
        after_ms = started.elapsed().as_millis() as u64,
        "presence and node record released; closing sockets"
    );
    for batch in app.sessions.all().chunks(app.cfg.server.drain_batch) {
        for ctl in batch {
            ctl.close(gateway::protocol::close::RESTART);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // every admitted connection, not only the sessions seen above: a socket whose upgrade
    // completes now closes itself with 1012 as its session starts (`session::run`)
    while app.open_connections() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tracing::info!(
        sockets,
        left = app.open_connections(),
        took_ms = started.elapsed().as_millis() as u64,
        "drained"
    );
}
