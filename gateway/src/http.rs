//! HTTP plumbing shared by the public and the admin listener: the accept loop, the HTTP/1
//! builder with its header timeout, and small response helpers. Knows nothing of the gateway.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use hyper_util::rt::TokioTimer;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub type Body = Full<Bytes>;

/// A plain-text response (`text/plain; charset=utf-8`): refusals say why in a line a person or
/// a log can read.
pub fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut r = typed(body.to_string(), "text/plain; charset=utf-8");
    *r.status_mut() = status;
    r
}

/// A `200` response of the given content type.
pub fn typed(body: impl Into<Bytes>, content_type: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// A JSON response.
pub fn json(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut r = typed(v.to_string(), "application/json");
    *r.status_mut() = status;
    r
}

/// Accepts connections until `stop` changes and hands each to `on_conn`. An accept error (EMFILE
/// at the fd limit, say) is logged and retried; it never ends the loop.
pub async fn accept_loop(
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    what: &'static str,
    mut on_conn: impl FnMut(TcpStream, SocketAddr),
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, peer)) => on_conn(tcp, peer),
                Err(e) => {
                    tracing::warn!(listener = what, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => return,
        }
    }
}

/// HTTP/1 with a timer, so the header read timeout (the slowloris guard) is really enforced.
pub fn http1() -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    b
}

/// Takes an upgraded connection's TCP stream back from hyper, as owned halves (no lock between
/// reader and writer) with the bytes hyper had read past the upgrade request (the first frames,
/// if the client sent them at once); hyper's read buffer is let go. None when the connection is
/// not a plain TCP stream.
pub fn upgraded_tcp(
    io: TokioIo<hyper::upgrade::Upgraded>,
) -> Option<((OwnedReadHalf, Bytes), OwnedWriteHalf)> {
    let parts = io.into_inner().downcast::<TokioIo<TcpStream>>().ok()?;
    let (r, w) = parts.io.into_inner().into_split();
    Some(((r, parts.read_buf), w))
}
