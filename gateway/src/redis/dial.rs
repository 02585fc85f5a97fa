//! How a connection reaches a server: the URL's ACL user and password, and for `rediss://` the
//! TLS settings (`redis.tls_ca_file`: verify against that CA only instead of the system roots;
//! `redis.tls_cert_file` + `redis.tls_key_file`: mutual TLS). The server name or IP of the URL is
//! checked against the certificate in every case. Everything that opens a Redis connection takes
//! its [`ConnectionInfo`] or its stream from here, so the three modes and the pub/sub connection
//! share one notion of "how to connect".
//!
//! It also words connection errors for the log: a refusing server (wrong password, failed
//! verification, missing client certificate) is named as such, never with a secret.

use std::sync::Arc;

use redis::{
    ClientTlsConfig, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisResult,
    TlsCertificates,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::config::{RedisConfig, TlsFiles};

/// The TLS settings, read once per connect (a renewed certificate file is picked up by the next
/// connection).
#[derive(Clone, Default)]
pub struct Dial {
    files: TlsFiles,
}

impl Dial {
    pub fn new(cfg: &RedisConfig) -> RedisResult<Self> {
        let files = cfg.tls_files().map_err(|e| {
            redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "TLS settings",
                e.to_string(),
            ))
        })?;
        Ok(Self { files })
    }

    /// The redis-rs form of the TLS files.
    pub fn certificates(&self) -> Option<TlsCertificates> {
        if self.files.is_default() {
            return None;
        }
        Some(TlsCertificates {
            client_tls: self
                .files
                .client
                .as_ref()
                .map(|(cert, key)| ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
            root_cert: self.files.ca.clone(),
        })
    }

    /// The connection info of `url`, with the TLS files attached when it is `rediss://`.
    pub fn info(&self, url: impl IntoConnectionInfo) -> RedisResult<ConnectionInfo> {
        self.attach(url.into_connection_info()?)
    }

    /// `info` with the TLS files attached when its address is TLS.
    pub fn attach(&self, info: ConnectionInfo) -> RedisResult<ConnectionInfo> {
        match (info.addr(), self.certificates()) {
            (ConnectionAddr::TcpTls { .. }, Some(certs)) => {
                Ok(redis::Client::build_with_tls(info, certs)?
                    .get_connection_info()
                    .clone())
            }
            _ => Ok(info),
        }
    }

    /// A client for `url` (see [`Dial::info`]).
    pub fn client(&self, url: impl IntoConnectionInfo) -> RedisResult<redis::Client> {
        redis::Client::open(self.info(url)?)
    }

    /// A raw stream to the server of `info`, TCP or TLS (verified as redis-rs would), for a
    /// connection the gateway sets up itself (the named pub/sub connection); `None` for a unix
    /// socket.
    pub async fn stream(&self, info: &ConnectionInfo) -> std::io::Result<Option<Stream>> {
        match info.addr() {
            ConnectionAddr::Tcp(host, port) => {
                let tcp = TcpStream::connect((host.as_str(), *port)).await?;
                let _ = tcp.set_nodelay(true);
                Ok(Some(Stream::Tcp(tcp)))
            }
            ConnectionAddr::TcpTls {
                host,
                port,
                insecure,
                ..
            } => {
                if *insecure {
                    return Err(std::io::Error::other(
                        "a rediss:// URL with #insecure is not supported: set redis.tls_ca_file",
                    ));
                }
                let config = self.rustls_config()?;
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| std::io::Error::other(format!("server name {host}: {e}")))?;
                let tcp = TcpStream::connect((host.as_str(), *port)).await?;
                let _ = tcp.set_nodelay(true);
                let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                    .connect(name, tcp)
                    .await?;
                Ok(Some(Stream::Tls(Box::new(tls))))
            }
            _ => Ok(None),
        }
    }

    /// The rustls client configuration the TLS files describe: the CA file's roots, else the
    /// system's; the client certificate when set.
    fn rustls_config(&self) -> std::io::Result<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        match &self.files.ca {
            Some(pem) => {
                for cert in CertificateDer::pem_slice_iter(pem) {
                    roots
                        .add(cert.map_err(std::io::Error::other)?)
                        .map_err(std::io::Error::other)?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for cert in found.certs {
                    // an unusable system certificate is skipped, as by redis-rs
                    let _ = roots.add(cert);
                }
            }
        }
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        match &self.files.client {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(cert)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(std::io::Error::other)?;
                let key = PrivateKeyDer::from_pem_slice(key).map_err(std::io::Error::other)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(std::io::Error::other)
            }
            None => Ok(builder.with_no_client_auth()),
        }
    }
}

/// A TCP or TLS stream to one server.
pub enum Stream {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A connection error worded for the log: the error itself (which names `WRONGPASS`, `NOAUTH`,
/// the certificate problem, …) and, when it shows, what the operator should look at. It never
/// holds a password (redis-rs' errors do not carry the URL).
pub fn describe(e: &redis::RedisError) -> String {
    let mut text = e.to_string();
    if e.kind() == redis::ErrorKind::AuthenticationFailed && !text.contains("WRONGPASS") {
        // redis-rs reports the server's `-WRONGPASS` reply to AUTH without its text
        text = format!("WRONGPASS: {text}");
    }
    let hint = if text.contains("WRONGPASS") || text.contains("NOAUTH") {
        Some("Redis refused the credentials: check the user and password in redis.url")
    } else if text.contains("NOPERM") {
        Some("the Redis ACL user lacks a permission the gateway needs")
    } else if text.contains("CertificateRequired") {
        Some(
            "the server requires a client certificate: set redis.tls_cert_file and \
             redis.tls_key_file",
        )
    } else if text.contains("certificate") || text.contains("Certificate") {
        Some(
            "TLS certificate problem: check redis.tls_ca_file, the server name in redis.url, \
             or the client certificate (redis.tls_cert_file / redis.tls_key_file)",
        )
    } else if text.contains("alert") || text.contains("HandshakeFailure") {
        Some("the server ended the TLS handshake: does it require a client certificate?")
    } else if text.contains("InvalidContentType") || text.contains("CorruptMessage") {
        Some("TLS to a server that does not speak TLS: use redis:// or its tls-port")
    } else {
        None
    };
    match hint {
        Some(h) => format!("{text} ({h})"),
        None => text,
    }
}
