//! Outbound HTTP: one pooled HTTP/1.1 client for the calls the gateway makes itself (the JWKS
//! fetch, the publish hook). Connections are kept alive and reused per host, `https://`
//! is verified against the system's root certificates (the server name is checked against the
//! certificate), every request has a deadline covering connect, headers and body, and a response
//! body is read only up to a cap. Knows nothing of what it fetches.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{HeaderMap, Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// How the client connects and how long it keeps idle connections.
#[derive(Debug, Clone)]
pub struct Options {
    /// Deadline of a TCP connect (the TLS handshake counts against the request's deadline).
    pub connect_timeout: Duration,
    /// An idle pooled connection is closed after this long: shorter than the keep-alive most
    /// servers and load balancers grant (60 s or more), so we rarely reuse one they just closed.
    pub idle_timeout: Duration,
    /// Idle connections kept per host.
    pub max_idle_per_host: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(30),
            max_idle_per_host: 8,
        }
    }
}

/// An answer, its body read in full (up to the cap).
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("invalid URL: {0}")]
    Url(String),
    #[error("no answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// Connect, TLS (an untrusted certificate says `invalid peer certificate …`) or protocol.
    #[error("{0}")]
    Request(String),
    #[error("response body larger than {0} bytes")]
    TooLarge(usize),
}

/// A cloneable handle on one connection pool.
#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpClient")
    }
}

impl HttpClient {
    /// A client trusting the system's roots (`/etc/ssl/certs`, or `SSL_CERT_FILE` /
    /// `SSL_CERT_DIR`). Without any root certificate it still serves `http://` URLs, and every
    /// `https://` one fails its verification (said once, at WARN).
    pub fn new(opts: &Options) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::debug!(error = %e, "a system root certificate could not be loaded");
        }
        let (added, _ignored) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            tracing::warn!(
                "no system root certificates found (install ca-certificates or set SSL_CERT_FILE): \
                 outbound https:// requests will fail verification"
            );
        }
        Self::with_roots(opts, roots)
    }

    /// A client trusting only `roots` (tests, private CAs).
    pub fn with_roots(opts: &Options, roots: rustls::RootCertStore) -> Self {
        // ring, not aws-lc-rs: no C toolchain beyond cc and a much shorter build. rustls 0.23.48
        // deprecates it for lacking post-quantum key exchange, which guards confidentiality
        // against later decryption; what we fetch (public keys) is not secret. Revisit (the
        // `aws-lc-rs` feature) when a caller sends secrets.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(roots).with_no_client_auth())
            // ring supports every safe default version; kept total rather than panicking
            .unwrap_or_else(|_| {
                rustls::ClientConfig::builder()
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth()
            });
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(opts.connect_timeout));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(opts.idle_timeout)
            .pool_max_idle_per_host(opts.max_idle_per_host)
            .build(https);
        Self { client }
    }

    /// `GET url`, answered within `timeout` (connect, headers and body), body at most `max_body`.
    pub async fn get(
        &self,
        url: &str,
        timeout: Duration,
        max_body: usize,
    ) -> Result<Response, HttpError> {
        let uri: Uri = url.parse().map_err(|e| HttpError::Url(format!("{e}")))?;
        let req = Request::get(uri)
            .header(hyper::header::USER_AGENT, USER_AGENT)
            .body(Full::new(Bytes::new()))
            .map_err(|e| HttpError::Url(e.to_string()))?;
        self.send(req, timeout, max_body).await
    }

    /// Sends `req`, answered within `timeout` (connect, headers and body), body at most `max_body`.
    pub async fn send(
        &self,
        req: Request<Full<Bytes>>,
        timeout: Duration,
        max_body: usize,
    ) -> Result<Response, HttpError> {
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| HttpError::Request(error_chain(&e)))?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, max_body)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        HttpError::TooLarge(max_body)
                    } else {
                        HttpError::Request(e.to_string())
                    }
                })?
                .to_bytes();
            Ok(Response {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| HttpError::Timeout(timeout))?
    }
}

pub(crate) const USER_AGENT: &str = concat!("phoenix-redis-gateway/", env!("CARGO_PKG_VERSION"));

/// The error and its causes on one line: hyper-util's "client error (Connect)" alone hides
/// whether the port was closed or the certificate untrusted.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A keep-alive HTTP/1.1 server answering every request with `body`; counts connections.
    async fn server(body: &'static str) -> (String, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let c = conns.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    loop {
                        let Ok(n) = s.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            let resp = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            if s.write_all(resp.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (format!("http://{addr}/"), conns)
    }

    #[tokio::test]
    async fn reuses_one_connection_and_caps_the_body() {
        let (url, conns) = server("hello").await;
        let c = HttpClient::new(&Options::default());
        for _ in 0..3 {
            let r = c.get(&url, Duration::from_secs(2), 100).await.unwrap();
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(&r.body[..], b"hello");
        }
        assert_eq!(
            conns.load(Ordering::SeqCst),
            1,
            "keep-alive: one connection"
        );
        assert!(matches!(
            c.get(&url, Duration::from_secs(2), 3).await,
            Err(HttpError::TooLarge(3))
        ));
    }

    #[tokio::test]
    async fn a_silent_server_times_out_and_a_closed_port_is_an_error() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", l.local_addr().unwrap());
        let c = HttpClient::new(&Options::default());
        let t = std::time::Instant::now();
        assert!(matches!(
            c.get(&url, Duration::from_millis(200), 100).await,
            Err(HttpError::Timeout(_))
        ));
        assert!(t.elapsed() < Duration::from_secs(1));
        drop(l);
        let e = c.get(&url, Duration::from_secs(2), 100).await.unwrap_err();
        assert!(matches!(e, HttpError::Request(_)), "{e}");
    }

    #[tokio::test]
    async fn https_to_an_untrusted_server_fails_verification() {
        // a TLS server is not needed to see the verifier refuse: with no roots at all, any
        // certificate is untrusted; here the handshake never completes because the peer speaks
        // plain HTTP, which is an error as well (never a silent plaintext fallback)
        let (url, _) = server("x").await;
        let url = url.replace("http://", "https://");
        let c = HttpClient::with_roots(&Options::default(), rustls::RootCertStore::empty());
        assert!(c.get(&url, Duration::from_secs(2), 100).await.is_err());
    }
}
