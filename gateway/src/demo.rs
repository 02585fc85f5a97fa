//! The demo page served at `/` on the public port: the seed's UI on the official `phoenix` client,
//! and the demo tokens it signs in with; `gateway dev`'s local Redis and `gateway token`'s tokens.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};

use crate::app::App;
use crate::http::{Body, json as json_response, text, typed};

/// The page.
pub const INDEX_HTML: &str = include_str!("../assets/index.html");

/// The official phoenix client (ES module build), read from the npm package installed for the
/// tests (`tests/node_modules/phoenix`, looked up from the working directory and from the
/// binary's location), or from the file named by `GATEWAY_PHOENIX_JS`.
pub fn phoenix_js() -> Option<String> {
    const REL: &str = "tests/node_modules/phoenix/priv/static/phoenix.mjs";
    let mut candidates: Vec<std::path::PathBuf> = Vec::new();
    if let Ok(p) = std::env::var("GATEWAY_PHOENIX_JS") {
        candidates.push(p.into());
    }
    candidates.push(REL.into());
    // a binary in <repo>/target/<profile>/ finds the repo's copy wherever it is started from
    if let Ok(exe) = std::env::current_exe() {
        candidates.extend(exe.ancestors().skip(1).take(4).map(|d| d.join(REL)));
    }
    candidates
        .into_iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
}

/// Anything on the public port that is not the socket endpoint.
pub fn public_page(app: &App, req: &Request<Incoming>) -> Response<Body> {
    match req.uri().path() {
        "/dev/tokens.json" => match app.demo_tokens.get() {
            Some(tokens) => {
                let list: Vec<Value> = tokens
                    .iter()
                    .map(|(name, token)| json!({"username": name, "token": token}))
                    .collect();
                json_response(StatusCode::OK, &Value::Array(list))
            }
            None => text(StatusCode::NOT_FOUND, "not found\n"),
        },
        "/" => typed(INDEX_HTML, "text/html; charset=utf-8"),
        "/phoenix.js" => match phoenix_js() {
            Some(js) => typed(js, "text/javascript; charset=utf-8"),
            None => text(
                StatusCode::NOT_FOUND,
                "phoenix.js not found: run `npm ci` in tests/\n",
            ),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// A development token (HS256) for `gateway token` and the demo users of `gateway dev`; `rooms`
/// non-empty adds the `rooms` claim of private rooms.
pub fn dev_token(
    secret: &str,
    sub: &str,
    username: Option<&str>,
    ttl: u64,
    rooms: &[String],
) -> anyhow::Result<String> {
    let now = jsonwebtoken::get_current_timestamp();
    let mut claims = serde_json::json!({
        "sub": sub,
        "username": username.unwrap_or(sub),
        "iat": now,
        "exp": now + ttl,
    });
    if !rooms.is_empty() {
        claims["rooms"] = serde_json::json!(rooms);
    }
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// `0.0.0.0:4000` or `[::]:4000` → `127.0.0.1:4000`; any other address as it is.
pub fn loopback(listen: &str) -> String {
    match listen.rsplit_once(':') {
        Some((host, port)) if host == "0.0.0.0" || host == "[::]" => format!("127.0.0.1:{port}"),
        _ => listen.to_string(),
    }
}

/// Returns a child redis-server when none answered at `url` (it is stopped when `dev` exits).
pub async fn ensure_redis(url: &str) -> anyhow::Result<Option<tokio::process::Child>> {
    let client = ::redis::Client::open(url)?;
    let ping = async {
        let mut c = client.get_multiplexed_async_connection().await?;
        ::redis::cmd("PING").query_async::<String>(&mut c).await
    };
    if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), ping).await {
        eprintln!("using the Redis at {}", crate::app::redact(url));
        return Ok(None);
    }
    let info = ::redis::IntoConnectionInfo::into_connection_info(url)?;
    let (host, port) = match info.addr() {
        ::redis::ConnectionAddr::Tcp(h, p) => (h.clone(), *p),
        _ => anyhow::bail!("gateway dev can only start a local Redis for a redis://host:port URL"),
    };
    if host != "127.0.0.1" && host != "localhost" {
        anyhow::bail!(
            "no Redis answers at {} and it is not local; start it or point GATEWAY_REDIS_URL elsewhere",
            crate::app::redact(url)
        );
    }
    eprintln!("no Redis at {host}:{port}: starting redis-server (in memory, stopped on exit)");
    let child = tokio::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot run redis-server: install it (apt-get install -y redis-server) or run scripts/dev.sh")?;
    for _ in 0..50 {
        let ping = async {
            let mut c = client.get_multiplexed_async_connection().await?;
            ::redis::cmd("PING").query_async::<String>(&mut c).await
        };
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(200), ping).await {
            return Ok(Some(child));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("redis-server did not come up on port {port}")
}
