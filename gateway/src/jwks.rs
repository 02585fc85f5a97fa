//! An identity provider's key set (`auth.jwks_url`, RFC 7517): fetched at start, refreshed every
//! `auth.jwks_refresh_s`, and at once when a token names a `kid` the set does not hold (at most
//! once per `auth.jwks_min_refresh_s`, counted from the last fetch of any kind). Concurrent
//! refreshes coalesce: they queue on one lock, and whoever gets it after a fetch finds the new
//! set installed and does not fetch again. Each fetch replaces the whole set, so a key the
//! provider retired stops verifying; keys of another algorithm than the pinned one are ignored.
//! A failed fetch keeps the keys already held.
//!
//! The lookup is a read lock and a hash probe: the common path (a known `kid`) never awaits.
//! Token validation itself is `auth`'s; this module only says which key a `kid` names.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::time::Instant;

use crate::config::AuthConfig;
use crate::httpclient::HttpClient;

/// Largest key set we read; a real one is a few KB (Google's, with 2-3 RSA keys, is ~1.5 KB).
const MAX_SET_BYTES: usize = 1024 * 1024;
/// First retry after a failed first fetch; doubled up to [`FIRST_FETCH_MAX_BACKOFF`]. The node is
/// not ready until the set is loaded, so it retries much sooner than the refresh period.
const FIRST_FETCH_BACKOFF: Duration = Duration::from_millis(250);
const FIRST_FETCH_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What the set says about a token's `kid`.
pub enum Lookup {
    Found(Arc<DecodingKey>),
    /// Not in the set (or no set yet): a refresh may bring it.
    Unknown,
    /// The token names no `kid` and the set holds several keys: no refresh can tell which.
    NoKid,
}

/// The usable keys of one fetch.
#[derive(Default)]
struct KeySet {
    keys: Vec<(Option<String>, Arc<DecodingKey>)>,
}

impl KeySet {
    fn lookup(&self, kid: Option<&str>) -> Lookup {
        match kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|(k, _)| k.as_deref() == Some(kid))
                .map_or(Lookup::Unknown, |(_, key)| Lookup::Found(key.clone())),
            // a provider with a single key may leave `kid` out of its tokens
            None => match self.keys.as_slice() {
                [(_, key)] => Lookup::Found(key.clone()),
                [] => Lookup::Unknown,
                _ => Lookup::NoKid,
            },
        }
    }
}

/// The set, its fetcher and its refresh state.
pub struct Jwks {
    url: String,
    alg: Algorithm,
    client: HttpClient,
    fetch_timeout: Duration,
    refresh: Duration,
    min_refresh: Duration,
    /// Few keys (2-4 in practice): a linear scan is cheaper than hashing the kid.
    set: RwLock<Arc<KeySet>>,
    /// Set by the first successful fetch; readiness waits for it.
    loaded: AtomicBool,
    /// Held during a fetch; holds the time of the last attempt (for `min_refresh`).
    refresh_lock: tokio::sync::Mutex<Option<Instant>>,
    /// Fetches attempted, and failed (for metrics and tests).
    fetches: AtomicU64,
    failures: AtomicU64,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("url", &self.url)
            .field("alg", &self.alg)
            .field("loaded", &self.is_loaded())
            .finish()
    }
}

impl Jwks {
    /// The key set of `auth.jwks_url` for algorithm `alg` (nothing is fetched yet).
    pub fn new(auth: &AuthConfig, url: &str, alg: Algorithm, client: HttpClient) -> Self {
        Self {
            url: url.to_string(),
            alg,
            client,
            fetch_timeout: Duration::from_millis(auth.jwks_fetch_timeout_ms),
            refresh: Duration::from_secs(auth.jwks_refresh_s),
            min_refresh: Duration::from_secs(auth.jwks_min_refresh_s),
            set: RwLock::new(Arc::new(KeySet::default())),
            loaded: AtomicBool::new(false),
            refresh_lock: tokio::sync::Mutex::new(None),
            fetches: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    /// Whether a fetch has succeeded yet.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// `(attempted, failed)` fetches so far.
    pub fn fetch_counts(&self) -> (u64, u64) {
        (
            self.fetches.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }

    /// The key `kid` names in the current set (no I/O).
    pub fn lookup(&self, kid: Option<&str>) -> Lookup {
        self.current().lookup(kid)
    }

    fn current(&self) -> Arc<KeySet> {
        self.set.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// For a `kid` the set does not hold: refreshes the set unless a fetch happened within
    /// `min_refresh` (a concurrent caller's included), then looks again. Waits at most the fetch
    /// deadline in all, queueing included.
    pub async fn lookup_after_refresh(&self, kid: Option<&str>) -> Lookup {
        let deadline = Instant::now() + self.fetch_timeout;
        let Ok(mut last) = tokio::time::timeout_at(deadline, self.refresh_lock.lock()).await else {
            return self.lookup(kid);
        };
        // a fetch that finished while we queued may have brought it
        if let found @ Lookup::Found(_) = self.lookup(kid) {
            return found;
        }
        if last.is_some_and(|t| t.elapsed() < self.min_refresh) {
            return self.lookup(kid);
        }
        *last = Some(Instant::now());
        let _ = tokio::time::timeout_at(deadline, self.fetch("unknown kid")).await;
        self.lookup(kid)
    }

    /// Keeps the set fresh: the first fetch is retried quickly until it succeeds, then one every
    /// `refresh` (after a failure, one after `min_refresh`). Runs until the process ends.
    pub async fn run(self: Arc<Self>) {
        let mut backoff = FIRST_FETCH_BACKOFF;
        loop {
            let ok = {
                let mut last = self.refresh_lock.lock().await;
                *last = Some(Instant::now());
                self.fetch("refresh").await.is_ok()
            };
            let wait = match (ok, self.is_loaded()) {
                (true, _) => self.refresh,
                (false, true) => self.min_refresh.min(self.refresh),
                (false, false) => {
                    let w = backoff;
                    backoff = (backoff * 2).min(FIRST_FETCH_MAX_BACKOFF.min(self.min_refresh));
                    w
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// One fetch; on success the set is replaced. Call with `refresh_lock` held.
    async fn fetch(&self, why: &'static str) -> Result<usize, String> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let result = match self
            .client
            .get(&self.url, self.fetch_timeout, MAX_SET_BYTES)
            .await
        {
            Ok(r) if r.status.is_success() => parse_set(&r.body, self.alg),
            Ok(r) => Err(format!("HTTP {}", r.status)),
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok((set, ignored)) => {
                let n = set.keys.len();
                let kids: Vec<&str> = set.keys.iter().filter_map(|(k, _)| k.as_deref()).collect();
                if n == 0 {
                    tracing::warn!(url = %self.url, ignored, alg = ?self.alg,
                        "the JWKS holds no key for the configured algorithm: every token is refused (is auth.algorithm right?)");
                } else {
                    tracing::debug!(url = %self.url, why, keys = ?kids, ignored, "JWKS loaded");
                }
                if !self.is_loaded() {
                    tracing::info!(url = %self.url, keys = n, "JWKS loaded");
                }
                *self.set.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
                self.loaded.store(true, Ordering::Release);
                Ok(n)
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                let held = self.current().keys.len();
                tracing::warn!(url = %self.url, why, error = %e, keys_kept = held,
                    "JWKS fetch failed{}", if self.is_loaded() { "; the keys already held stay in use" } else { "; not ready until it succeeds" });
                Err(e)
            }
        }
    }
}

/// The keys of a JWKS document usable with `alg`, and how many others were ignored (another
/// algorithm or curve, an encryption key, a key this library cannot read).
fn parse_set(body: &[u8], alg: Algorithm) -> Result<(KeySet, usize), String> {
    #[derive(serde::Deserialize)]
    struct Raw {
        keys: Vec<serde_json::Value>,
    }
    let raw: Raw = serde_json::from_slice(body)
        .map_err(|e| format!("not a JWKS document ({{\"keys\": [...]}}): {e}"))?;
    let total = raw.keys.len();
    let mut set = KeySet::default();
    for v in raw.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(v) else {
            continue;
        };
        if !usable(&jwk, alg) {
            continue;
        }
        if let Ok(key) = DecodingKey::from_jwk(&jwk) {
            set.keys.push((jwk.common.key_id.clone(), Arc::new(key)));
        }
    }
    let ignored = total - set.keys.len();
    Ok((set, ignored))
}

fn usable(jwk: &Jwk, alg: Algorithm) -> bool {
    let c = &jwk.common;
    if matches!(&c.public_key_use, Some(u) if *u != PublicKeyUse::Signature) {
        return false;
    }
    let want = match alg {
        Algorithm::RS256 => KeyAlgorithm::RS256,
        Algorithm::ES256 => KeyAlgorithm::ES256,
        _ => return false,
    };
    if matches!(&c.key_algorithm, Some(a) if *a != want) {
        return false;
    }
    match (&jwk.algorithm, alg) {
        (AlgorithmParameters::RSA(_), Algorithm::RS256) => true,
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES256) => p.curve == EllipticCurve::P256,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    // RFC 7517 appendix A.1's public keys
    const EC: &str = r#"{"kty":"EC","crv":"P-256","x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4","y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM","use":"sig","kid":"ec1"}"#;
    const RSA: &str = r#"{"kty":"RSA","n":"0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw","e":"AQAB","alg":"RS256","kid":"rsa1"}"#;

    fn set(keys: &[&str]) -> Vec<u8> {
        let keys: Vec<serde_json::Value> = keys
            .iter()
            .map(|k| serde_json::from_str(k).unwrap())
            .collect();
        json!({ "keys": keys }).to_string().into_bytes()
    }

    fn kids(s: &KeySet) -> Vec<Option<&str>> {
        s.keys.iter().map(|(k, _)| k.as_deref()).collect()
    }

    #[test]
    fn keeps_only_keys_of_the_pinned_algorithm() {
        let hmac = r#"{"kty":"oct","k":"c2VjcmV0","kid":"h"}"#;
        let enc = EC
            .replace(r#""use":"sig""#, r#""use":"enc""#)
            .replace("ec1", "ec-enc");
        let p384 = r#"{"kty":"EC","crv":"P-384","x":"AAAA","y":"AAAA","kid":"p384"}"#;
        let weird = r#"{"kty":"XYZ","kid":"w"}"#;
        let rsa_as_es = RSA.replace(r#""alg":"RS256""#, r#""alg":"ES256""#);
        let body = set(&[EC, RSA, hmac, &enc, p384, weird, &rsa_as_es]);
        let (s, ignored) = parse_set(&body, Algorithm::RS256).unwrap();
        assert_eq!((kids(&s), ignored), (vec![Some("rsa1")], 6));
        let (s, ignored) = parse_set(&body, Algorithm::ES256).unwrap();
        assert_eq!((kids(&s), ignored), (vec![Some("ec1")], 6));
        assert!(parse_set(b"<html>", Algorithm::RS256).is_err());
        assert!(parse_set(b"{\"nokeys\":1}", Algorithm::RS256).is_err());
    }

    #[test]
    fn lookup_by_kid_and_a_single_key_without_kid() {
        let (s, _) = parse_set(&set(&[RSA]), Algorithm::RS256).unwrap();
        assert!(matches!(s.lookup(Some("rsa1")), Lookup::Found(_)));
        assert!(matches!(s.lookup(Some("other")), Lookup::Unknown));
        assert!(matches!(s.lookup(None), Lookup::Found(_)), "the only key");
        let two = RSA.replace("rsa1", "rsa2");
        let (s, _) = parse_set(&set(&[RSA, &two]), Algorithm::RS256).unwrap();
        assert!(matches!(s.lookup(None), Lookup::NoKid));
        assert!(matches!(KeySet::default().lookup(None), Lookup::Unknown));
    }
}
