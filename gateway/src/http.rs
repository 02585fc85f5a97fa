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
use tokio::net::{TcpListener, TcpSocket, TcpStream};
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

/// The kernel's cap on any listen backlog (`net.core.somaxconn`), if it can be read.
fn somaxconn() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The backlog the kernel will really use for a request of `wanted`: `listen(2)` silently
/// truncates it to `somaxconn`.
pub fn effective_backlog(wanted: u32, somaxconn: Option<u32>) -> u32 {
    somaxconn.map_or(wanted, |cap| wanted.min(cap))
}

/// Binds `addr` (`host:port`, resolved) and listens with `backlog` (tokio's own `bind` uses
/// 128, which a reconnect storm overflows). `SO_REUSEADDR` is set as tokio's `bind` does, so a
/// restarted process rebinds at once. Logs when `net.core.somaxconn` caps the backlog.
pub async fn bind(addr: &str, backlog: u32, what: &'static str) -> std::io::Result<TcpListener> {
    let mut last = None;
    for sa in tokio::net::lookup_host(addr).await? {
        let socket = if sa.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(sa) {
            Ok(()) => {
                let cap = somaxconn();
                let used = effective_backlog(backlog, cap);
                if used < backlog {
                    tracing::info!(
                        listener = what,
                        wanted = backlog,
                        somaxconn = used,
                        "listen backlog capped by net.core.somaxconn (raise it with sysctl to get the full queue)"
                    );
                }
                return socket.listen(backlog);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{addr} resolves to no address"),
        )
    }))
}

/// Whether an accept error concerns only the connection being accepted (the peer reset it
/// while it waited in the queue): the next accept is tried at once.
fn per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    )
}

/// Pause after an accept error that concerns the listener (EMFILE/ENFILE at the fd limit,
/// ENOBUFS): the queue stays full until something frees a descriptor, and accepting again at
/// once would spin. Short, because every waiting client is held meanwhile.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(20);

/// Accepts connections until `stop` changes and hands each to `on_conn`, which must not wait
/// (it spawns the connection's task), so a slow upgrade never holds the queue. An accept error
/// never ends the loop: one of a single connection is skipped at once; one of the listener
/// (EMFILE at the fd limit, say) is logged, at most once a second, and retried after a short
/// pause.
pub async fn accept_loop(
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    what: &'static str,
    mut on_conn: impl FnMut(TcpStream, SocketAddr),
) {
    let mut last_warn: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, peer)) => on_conn(tcp, peer),
                Err(e) if per_connection(&e) => {
                    tracing::debug!(listener = what, error = %e, "accept: connection gone");
                }
                Err(e) => {
                    if last_warn.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        tracing::warn!(listener = what, error = %e, "accept failed; retrying");
                        last_warn = Some(tokio::time::Instant::now());
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                        _ = stop.changed() => return,
                    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backlog_is_capped_by_somaxconn() {
        assert_eq!(effective_backlog(4096, Some(128)), 128);
        assert_eq!(effective_backlog(100, Some(4096)), 100);
        assert_eq!(effective_backlog(4096, None), 4096);
    }

    #[tokio::test]
    async fn bind_listens_and_refuses_an_unresolvable_address() {
        let l = bind("127.0.0.1:0", 64, "test").await.expect("bound");
        let addr = l.local_addr().expect("addr");
        let c = TcpStream::connect(addr).await.expect("connected");
        let (s, peer) = l.accept().await.expect("accepted");
        assert_eq!(peer, c.local_addr().expect("local"));
        drop(s);
        assert!(bind("no-such-host.invalid:1", 64, "test").await.is_err());
        // the port is taken: a clear error, not a panic
        assert!(bind(&addr.to_string(), 64, "test").await.is_err());
    }

    #[test]
    fn reset_connections_do_not_pause_the_loop() {
        use std::io::{Error, ErrorKind};
        assert!(per_connection(&Error::from(ErrorKind::ConnectionAborted)));
        assert!(!per_connection(&Error::from_raw_os_error(24))); // EMFILE
    }
}
