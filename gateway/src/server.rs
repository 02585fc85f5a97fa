//! The public listener: accepts TCP connections, serves HTTP/1, and upgrades
//! `GET /socket/websocket?vsn=2.0.0` to a WebSocket after every check that can still be answered
//! with a plain HTTP status (vsn 403, origin 403, bad token 401 when configured, limits 503).
//! The upgraded socket goes to `session::run`; Phoenix frames and Redis are not handled here.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, RETRY_AFTER, SEC_WEBSOCKET_EXTENSIONS, SEC_WEBSOCKET_PROTOCOL};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;

use crate::app::{App, Gateway};
use crate::auth::AuthError;
use crate::config::ServerConfig;
use crate::http::{Body, accept_loop, http1, text, upgraded_tcp};

/// Upgrades in progress (`server.max_pending_upgrades`): a place is taken when an upgrade
/// request is read and given back once its 101 is sent (or it is refused), so a reconnect storm
/// is answered 503 + `Retry-After` at once instead of queueing token checks and Redis reads.
#[derive(Clone)]
struct Pending(Option<Arc<Semaphore>>);

impl Pending {
    fn new(max: usize) -> Self {
        Self((max > 0).then(|| Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS)))))
    }

    /// `Err(())` when the limit is reached; `Ok(None)` when there is no limit.
    fn enter(&self) -> Result<Option<OwnedSemaphorePermit>, ()> {
        match &self.0 {
            None => Ok(None),
            Some(s) => s.clone().try_acquire_owned().map(Some).map_err(|_| ()),
        }
    }
}

/// Seconds a client refused by `server.max_pending_upgrades` is told to wait (`Retry-After`);
/// phoenix.js ignores the header and retries on its own backoff (10 ms … 5 s).
const RETRY_AFTER_S: &str = "1";

/// Binds the public listener with `server.listen_backlog` (capped by `net.core.somaxconn`).
pub async fn bind_public(cfg: &ServerConfig) -> std::io::Result<TcpListener> {
    crate::http::bind(&cfg.listen, cfg.listen_backlog, "public").await
}

/// The public listener: `/socket/websocket` upgrades, and the demo page.
/// Until the node is assembled (Redis reached), every request gets 503. Each connection is
/// served on its own task: the accept loop never waits for a handshake.
pub async fn serve_public(gw: Arc<Gateway>, listener: TcpListener, stop: watch::Receiver<bool>) {
    let pending = Pending::new(gw.cfg.server.max_pending_upgrades);
    accept_loop(listener, stop, "public", |tcp, peer| {
        let accepted = Instant::now();
        let _ = tcp.set_nodelay(true);
        let gw = gw.clone();
        let pending = pending.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let app = gw.app().cloned();
                let pending = pending.clone();
                async move {
                    Ok::<_, Infallible>(match app {
                        Some(app) => handle(app, req, peer, accepted, pending).await,
                        None => text(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "starting: Redis not reachable yet\n",
                        ),
                    })
                }
            });
            let _ = http1()
                .serve_connection(TokioIo::new(tcp), svc)
                .with_upgrades()
                .await;
        });
    })
    .await
}

/// Query parameters, percent-decoded; later occurrences win (so `vsn` is the client's last one).
fn query_params(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let dec = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (dec(k), dec(v))
        })
        .collect()
}

fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The token of `Sec-WebSocket-Protocol: phoenix, base64url.bearer.phx.<b64>` (standard or URL
/// alphabet, padding optional), and whether the client offered `phoenix`.
fn subprotocol_token(req: &Request<Incoming>) -> (Option<String>, bool) {
    let mut token = None;
    let mut phoenix = false;
    for v in req.headers().get_all(SEC_WEBSOCKET_PROTOCOL) {
        let Ok(s) = v.to_str() else { continue };
        for p in s.split(',').map(str::trim) {
            if p == "phoenix" {
                phoenix = true;
            } else if let Some(b64) = p.strip_prefix("base64url.bearer.phx.") {
                let norm: String = b64
                    .trim_end_matches('=')
                    .chars()
                    .map(|c| match c {
                        '-' => '+',
                        '_' => '/',
                        c => c,
                    })
                    .collect();
                if let Ok(bytes) = base64::engine::general_purpose::STANDARD_NO_PAD.decode(norm)
                    && let Ok(t) = String::from_utf8(bytes)
                {
                    token = Some(t);
                }
            }
        }
    }
    (token, phoenix)
}

/// Every refusal is plain HTTP with a short `text/plain` reason (`unsupported vsn: use 2.0.0`,
/// `origin not allowed`, `token expired`, …), so a developer sees why in the browser's network tab.
async fn handle(
    app: Arc<App>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    accepted: Instant,
    pending: Pending,
) -> Response<Body> {
    let arrived = Instant::now();
    if req.uri().path() != "/socket/websocket" {
        return crate::demo::public_page(&app, &req);
    }
    let params = query_params(req.uri().query().unwrap_or(""));
    // V2 only: Phoenix treats a missing vsn as 1.0.0 and answers 403 to what it cannot serve
    match param(&params, "vsn") {
        Some(v) if v.starts_with("2.0.") => {}
        _ => return text(StatusCode::FORBIDDEN, "unsupported vsn: use 2.0.0\n"),
    }
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return text(StatusCode::BAD_REQUEST, "expected a WebSocket upgrade\n");
    }
    let origins = &app.cfg.server.allowed_origins;
    if !origins.is_empty() {
        let origin = req.headers().get("origin").and_then(|o| o.to_str().ok());
        if let Some(o) = origin
            && !origins.iter().any(|a| a == o)
        {
            return text(StatusCode::FORBIDDEN, "origin not allowed\n");
        }
    }
    if app.is_draining() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "draining\n");
    }
    // before any work: a storm beyond the limit costs one short answer per request
    let Ok(upgrading) = pending.enter() else {
        app.metrics.upgrade_shed();
        let mut r = text(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many upgrades in progress\n",
        );
        r.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_S));
        return r;
    };
    // taken before the 101 and held by the socket's task until its session ends, so concurrent
    // upgrades cannot exceed the limit; every early return below gives it back
    let Some(permit) = app.admit() else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "too many connections\n");
    };
    let (sub_token, offered_phoenix) = subprotocol_token(&req);
    let token = sub_token.or_else(|| {
        param(&params, "token")
            .filter(|t| !t.is_empty())
            .map(String::from)
    });
    // waits only for a JWKS refresh (a kid not held yet); the permit is held meanwhile
    let verified = app.verifier.identify(token.as_deref()).await;
    // a valid token of a banned user signs nothing in (DESIGN §11): one EXISTS per signed-in upgrade
    let (identity, error) = app.unless_banned(verified).await;
    if let Some(e) = &error {
        if *e == AuthError::Banned && app.cfg.auth.reject_invalid_tokens {
            tracing::debug!(%peer, "banned user refused");
            return text(StatusCode::FORBIDDEN, "banned\n");
        }
        if app.cfg.auth.reject_invalid_tokens {
            tracing::debug!(%peer, error = %e, "refused token");
            return text(StatusCode::UNAUTHORIZED, &format!("{e}\n"));
        }
        tracing::debug!(%peer, error = %e, "token refused; socket stays anonymous");
    }
    // permessage-deflate, when enabled and offered in a form we take (no per-socket state)
    let deflate = if app.cfg.server.compression {
        crate::deflate::negotiate_headers(req.headers())
    } else {
        None
    };
    let (resp, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(x) => x,
        Err(e) => return text(StatusCode::BAD_REQUEST, &format!("{e}\n")),
    };
    let socket = app.next_socket();
    // The upgrade's task ends once the 101 is through: the session is a task of its own, so an
    // open socket costs one task (its future inline), not an upgrade task holding a boxed session.
    let task = async move {
        let upgraded = fut.await;
        drop(upgrading);
        match upgraded {
            Ok(ws) => {
                app.metrics.upgrade_seconds(
                    accepted.elapsed().as_secs_f64(),
                    arrived.elapsed().as_secs_f64(),
                );
                // the public listener only ever serves plain TCP streams
                let Some((read, write)) = upgraded_tcp(ws.into_inner()) else {
                    tracing::error!(socket, "upgraded connection is not a TCP stream; dropped");
                    return;
                };
                let session = crate::session::run(
                    app,
                    read,
                    write,
                    (identity, error),
                    (socket, deflate.is_some()),
                    permit,
                );
                if socket == 1 {
                    tracing::debug!(bytes = std::mem::size_of_val(&session), "session task size");
                }
                tokio::spawn(session);
            }
            Err(e) => tracing::debug!(%peer, error = %e, "upgrade did not complete"),
        }
    };
    tokio::spawn(task);
    let mut resp = resp.map(|_| Full::new(Bytes::new()));
    if offered_phoenix {
        resp.headers_mut()
            .insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static("phoenix"));
    }
    if let Some(answer) = deflate {
        resp.headers_mut()
            .insert(SEC_WEBSOCKET_EXTENSIONS, HeaderValue::from_static(answer));
    }
    resp
}

/// Takes the TCP stream back from hyper ([`upgraded_tcp`]) and runs the session on it.
/// `_permit`: this socket's place under `server.max_connections`, held until its session ends;
/// `deflate`: permessage-deflate was negotiated.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing_decodes_and_last_wins() {
        let p = query_params("token=abc%20def&vsn=1.0.0&nested%5Ba%5D=1&vsn=2.0.0");
        assert_eq!(param(&p, "token"), Some("abc def"));
        assert_eq!(param(&p, "vsn"), Some("2.0.0"));
        assert_eq!(param(&p, "nested[a]"), Some("1"));
        assert_eq!(param(&p, "missing"), None);
    }

    #[test]
    fn pending_upgrades_are_bounded_and_given_back() {
        let off = Pending::new(0);
        assert!(matches!(off.enter(), Ok(None)));
        let two = Pending::new(2);
        let a = two.enter().expect("first");
        let b = two.enter().expect("second");
        assert!(a.is_some() && b.is_some());
        assert!(two.enter().is_err(), "a third upgrade is refused");
        drop(a);
        assert!(two.enter().is_ok(), "a finished upgrade frees its place");
    }
}
