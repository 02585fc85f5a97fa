//! The Redis TLS settings read and checked at start: [`RedisConfig::tls_files`] turns
//! `redis.tls_ca_file`, `redis.tls_cert_file` and `redis.tls_key_file` into [`TlsFiles`] (PEM),
//! so an unreadable file or a certificate without its key stops the start, not the first dial.

use std::path::Path;

use super::{ConfigError, RedisConfig};

impl RedisConfig {
    /// The TLS files, read and parsed: the CA (if set) and the client certificate and key (if
    /// set). An unreadable or unparsable file, or a certificate without its key, is a
    /// configuration error, reported at start.
    pub fn tls_files(&self) -> Result<TlsFiles, ConfigError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        fn bad(key: &'static str, message: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key,
                message: message.into(),
            }
        }
        fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
            std::fs::read(path).map_err(|e| bad(key, format!("{}: {e}", path.display())))
        }
        fn certs(key: &'static str, path: &Path, pem: &[u8]) -> Result<(), ConfigError> {
            let n = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(key, format!("{}: {e}", path.display())))?
                .len();
            if n == 0 {
                return Err(bad(key, format!("{}: no PEM certificate", path.display())));
            }
            Ok(())
        }
        let ca = match &self.tls_ca_file {
            Some(p) => {
                let pem = read("redis.tls_ca_file", p)?;
                certs("redis.tls_ca_file", p, &pem)?;
                Some(pem)
            }
            None => None,
        };
        let client = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(c), Some(k)) => {
                let cert = read("redis.tls_cert_file", c)?;
                certs("redis.tls_cert_file", c, &cert)?;
                let key = read("redis.tls_key_file", k)?;
                PrivateKeyDer::from_pem_slice(&key)
                    .map_err(|e| bad("redis.tls_key_file", format!("{}: {e}", k.display())))?;
                Some((cert, key))
            }
            (Some(_), None) => {
                return Err(bad(
                    "redis.tls_cert_file",
                    "a client certificate needs its key: set redis.tls_key_file too",
                ));
            }
            (None, Some(_)) => {
                return Err(bad(
                    "redis.tls_key_file",
                    "a client key needs its certificate: set redis.tls_cert_file too",
                ));
            }
            (None, None) => None,
        };
        Ok(TlsFiles { ca, client })
    }
}

/// The contents of the TLS files (PEM), checked by [`RedisConfig::tls_files`].
#[derive(Clone, Default)]
pub struct TlsFiles {
    /// The CA bundle of `redis.tls_ca_file`; `None`: the system roots.
    pub ca: Option<Vec<u8>>,
    /// The client certificate (chain) and key, for mutual TLS.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl TlsFiles {
    /// Whether the default `rediss://` handling (system roots, no client certificate) suffices.
    pub fn is_default(&self) -> bool {
        self.ca.is_none() && self.client.is_none()
    }
}
