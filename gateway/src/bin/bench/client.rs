//! The bench's WebSocket client: open a socket to a gateway (anonymous or with an HS256 token),
//! send, read until a frame matches, join a room, and open and join crowds of sockets spread over
//! the gateways, a bounded number in flight. Every scenario builds on these.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use fastwebsockets::{FragmentCollector, Frame, OpCode, Payload};
use http_body_util::Empty;
use hyper::Request;
use hyper::header::{CONNECTION, UPGRADE};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

pub struct SpawnExecutor;
impl<F> hyper::rt::Executor<F> for SpawnExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}

pub type Ws = FragmentCollector<TokioIo<hyper::upgrade::Upgraded>>;

pub async fn open(addr: &str, token: Option<&str>) -> anyhow::Result<Ws> {
    let (ws, _) = handshake(addr, token, None).await?;
    Ok(FragmentCollector::new(ws))
}

/// Connects to `addr` and upgrades `/socket/websocket?vsn=2.0.0` (with `token` if any, and a
/// `Sec-WebSocket-Extensions` offer if any); the socket and the server's 101 response.
pub async fn handshake(
    addr: &str,
    token: Option<&str>,
    extensions: Option<&str>,
) -> anyhow::Result<(
    fastwebsockets::WebSocket<TokioIo<hyper::upgrade::Upgraded>>,
    hyper::Response<hyper::body::Incoming>,
)> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    tcp.set_nodelay(true)?;
    let q = token.map(|t| format!("&token={t}")).unwrap_or_default();
    let mut req = Request::builder()
        .method("GET")
        // origin-form (a path, the host in `Host`): uWebSockets answers an absolute URI with 505
        .uri(format!("/socket/websocket?vsn=2.0.0{q}"))
        .header("Host", addr)
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "upgrade")
        .header(
            "Sec-WebSocket-Key",
            fastwebsockets::handshake::generate_key(),
        )
        .header("Sec-WebSocket-Version", "13");
    if let Some(e) = extensions {
        req = req.header("Sec-WebSocket-Extensions", e);
    }
    let req = req.body(Empty::<Bytes>::new())?;
    Ok(fastwebsockets::handshake::client(&SpawnExecutor, req, tcp).await?)
}

pub async fn send(ws: &mut Ws, text: String) -> anyhow::Result<()> {
    ws.write_frame(Frame::text(Payload::Owned(text.into_bytes())))
        .await?;
    Ok(())
}

/// Reads text frames until one satisfies `f` (which sees the parsed frame).
pub async fn until(
    ws: &mut Ws,
    mut f: impl FnMut(&serde_json::Value) -> bool,
) -> anyhow::Result<serde_json::Value> {
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Text => {
                let v: serde_json::Value = serde_json::from_slice(&frame.payload)?;
                if f(&v) {
                    return Ok(v);
                }
            }
            OpCode::Close => bail!("closed by the gateway"),
            _ => {}
        }
    }
}

pub async fn join(ws: &mut Ws, topic: &str) -> anyhow::Result<()> {
    send(
        ws,
        serde_json::json!(["1", "1", topic, "phx_join", {}]).to_string(),
    )
    .await?;
    let r = until(ws, |v| v[3] == "phx_reply" && v[1] == "1").await?;
    if r[4]["status"] != "ok" {
        bail!("join refused: {}", r[4]);
    }
    Ok(())
}

pub fn hs256(secret: &str, sub: &str) -> anyhow::Result<String> {
    let now = jsonwebtoken::get_current_timestamp();
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": sub, "username": sub, "exp": now + 3600}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// How long one open + join may take before the scenario gives up on it (a server that never
/// answers must not hang a bench run).
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens a socket to `addr` and joins `topic`; returns it and the time that took (µs).
pub async fn open_and_join(
    addr: &str,
    topic: &str,
    token: Option<&str>,
) -> anyhow::Result<(Ws, u64)> {
    let t = Instant::now();
    let ws = tokio::time::timeout(JOIN_TIMEOUT, async {
        let mut ws = open(addr, token).await?;
        join(&mut ws, topic).await?;
        Ok::<_, anyhow::Error>(ws)
    })
    .await
    .with_context(|| format!("no join reply from {addr} within {JOIN_TIMEOUT:?}"))??;
    Ok((ws, t.elapsed().as_micros() as u64))
}

/// Opens and joins `n` viewers (anonymous, or each signed in as its own user with `secret`),
/// spread over the gateways round-robin, `in_flight` at a time (a new one starts as soon as one
/// is answered); returns them, the join latencies (µs) and the time it all took.
pub async fn crowd(
    gateways: &[String],
    topic: &str,
    n: usize,
    secret: Option<&str>,
    in_flight: usize,
) -> anyhow::Result<(Vec<Ws>, Vec<u64>, Duration)> {
    let started = Instant::now();
    let mut all = Vec::with_capacity(n);
    let mut lat = Vec::with_capacity(n);
    let mut pending = tokio::task::JoinSet::new();
    let mut next = 0;
    while all.len() < n {
        while next < n && pending.len() < in_flight.max(1) {
            let addr = gateways[next % gateways.len()].clone();
            let topic = topic.to_string();
            let token = secret
                .map(|s| hs256(s, &format!("idle-{next}")))
                .transpose()?;
            pending.spawn(async move { open_and_join(&addr, &topic, token.as_deref()).await });
            next += 1;
        }
        let Some(done) = pending.join_next().await else {
            break;
        };
        let (ws, us) = done??;
        all.push(ws);
        lat.push(us);
    }
    Ok((all, lat, started.elapsed()))
}

/// Keeps idle sockets read (pongs, presence frames) so their queues never fill.
pub fn drain_in_background(sockets: Vec<Ws>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let tasks: Vec<_> = sockets
            .into_iter()
            .map(|mut ws| tokio::spawn(async move { while ws.read_frame().await.is_ok() {} }))
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    })
}

/// Opens and joins `n` anonymous sockets spread over the gateways, 64 at a time.
pub async fn joined(gateways: &[String], topic: &str, n: usize) -> anyhow::Result<Vec<Ws>> {
    Ok(crowd(gateways, topic, n, None, 64).await?.0)
}
