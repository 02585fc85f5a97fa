//! JWT → [`Identity`]. The algorithm is pinned by configuration (an HS256 token is never checked
//! against an RSA key, `alg: none` is never accepted), `exp` is required, `nbf` checked, both with a
//! small leeway; `sub` must be a non-empty string; `aud` / `iss` are enforced when configured, and
//! every refusal names the claim at fault. The HS256 secret comes through `Config::hs256_secret`,
//! which refuses a blank or short one, so an empty key is never a key. RS256 / ES256 keys come from
//! a PEM file or from an identity provider's key set ([`crate::jwks`]), chosen by the token's `kid`;
//! only a `kid` the set does not hold yet makes [`Verifier::identify`] wait (for a refresh).
//!
//! A token that fails verification is not an error here: the caller decides whether the socket stays
//! anonymous (the seed's behaviour) or is refused with HTTP 401 (`auth.reject_invalid_tokens`).
//! Sockets, rooms and Redis are out of scope.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;
use serde_json::Value;

use crate::config::{AuthConfig, Config};
use crate::httpclient::{self, HttpClient};
use crate::jwks::{self, Jwks};

/// Who is behind a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A verified token: `sub` and `username` (falling back to `sub`).
    User(Arc<User>),
    Anonymous,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub username: String,
    /// Until when (Unix ms) the token stays valid: its `exp` plus the leeway. An open socket or
    /// channel signed in with it ends then (see `expiry`).
    pub valid_until_ms: i64,
    /// The private rooms the token lets its bearer join (claim `rooms`).
    pub rooms: RoomGrant,
}

/// The claim `rooms`: which private rooms a token may join. Public rooms ignore it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RoomGrant {
    /// No claim, or an empty list: no private room.
    #[default]
    None,
    /// `"*"` in the list: every room.
    All,
    /// These room ids (as given; an id that is not a valid room id simply never matches).
    Some(Vec<String>),
}

impl RoomGrant {
    pub fn allows(&self, room: &str) -> bool {
        match self {
            RoomGrant::None => false,
            RoomGrant::All => true,
            RoomGrant::Some(ids) => ids.iter().any(|r| r == room),
        }
    }

    fn from_claim(v: Option<Value>) -> Result<Self, AuthError> {
        const RULE: AuthError = AuthError::BadClaim {
            claim: "rooms",
            rule: "be an array of room ids",
        };
        let list = match v {
            None | Some(Value::Null) => return Ok(RoomGrant::None),
            Some(Value::Array(a)) => a,
            Some(_) => return Err(RULE),
        };
        let mut ids = Vec::with_capacity(list.len());
        for v in list {
            match v {
                Value::String(s) if s == "*" => return Ok(RoomGrant::All),
                Value::String(s) => ids.push(s),
                _ => return Err(RULE),
            }
        }
        Ok(if ids.is_empty() {
            RoomGrant::None
        } else {
            RoomGrant::Some(ids)
        })
    }
}

impl Identity {
    pub fn user(&self) -> Option<&User> {
        match self {
            Identity::User(u) => Some(u),
            Identity::Anonymous => None,
        }
    }
}

/// Why a token was refused. The `Display` text is short and safe to send to the client
/// (`auth_error` in the join reply, the body of an HTTP 401); it names the claim at fault and
/// never echoes the token or library internals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("invalid signature")]
    BadSignature,
    #[error("algorithm not accepted")]
    BadAlgorithm,
    #[error("wrong audience")]
    BadAudience,
    #[error("wrong issuer")]
    BadIssuer,
    /// A required claim is absent: `exp`, `sub`, or `aud` / `iss` when configured.
    #[error("missing claim: {0}")]
    MissingClaim(&'static str),
    /// A claim of the wrong type or value: `sub must be a string`, `exp must be a number`.
    #[error("{claim} must {rule}")]
    BadClaim {
        claim: &'static str,
        rule: &'static str,
    },
    #[error("malformed token")]
    Malformed,
    #[error("no verification key configured")]
    NoKey,
    /// JWKS: the token's `kid` is not in the provider's key set, even after a refresh.
    #[error("unknown signing key (kid)")]
    UnknownKey,
    /// JWKS: the token names no `kid` and the key set holds several keys.
    #[error("token header has no kid")]
    NoKid,
    /// JWKS: the key set has not been fetched yet.
    #[error("signing keys not available yet")]
    KeysUnavailable,
    /// A valid token whose `sub` is banned (`POST /api/users/<sub>/disconnect` with `ban_s`).
    #[error("banned")]
    Banned,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a valid {alg} public key (PEM): {message}")]
    Pem {
        path: String,
        alg: String,
        message: String,
    },
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
}

/// The claims the gateway reads, typed loosely so that a wrong type is named (`sub must be a
/// string`) instead of failing as an undecodable token.
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<Value>,
    #[serde(default)]
    username: Option<Value>,
    #[serde(default)]
    exp: Option<Value>,
    #[serde(default)]
    rooms: Option<Value>,
}

/// The start-up warning for a public-key algorithm without `auth.audience`, if it applies. Such a
/// key is usually an identity provider's, shared by every service it signs tokens for: without an
/// `aud` check, a token minted for any of them signs in here. Still accepted (set on purpose, an
/// audience-less deployment is the operator's call), but said once at start.
pub fn missing_audience_warning(auth: &AuthConfig) -> Option<String> {
    match (auth.algorithm.as_str(), &auth.audience) {
        (alg @ ("RS256" | "ES256"), None) => Some(format!(
            "auth.audience (GATEWAY_AUTH_AUDIENCE) is not set with {alg}: a token this key signed \
             for any other service is accepted too; set it to the aud your issuer puts in tokens \
             for this gateway"
        )),
        _ => None,
    }
}

/// Where the verification key comes from.
enum Keys {
    /// The HS256 secret or a PEM public key (`None`: no secret, every token refused).
    Fixed(Option<Arc<DecodingKey>>),
    /// An identity provider's key set, chosen by the token's `kid`.
    Jwks(Arc<Jwks>),
}

/// Verifies tokens with the configured key and rules.
pub struct Verifier {
    keys: Keys,
    alg: Algorithm,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = match &self.keys {
            Keys::Fixed(k) => format!("fixed (present: {})", k.is_some()),
            Keys::Jwks(j) => format!("{j:?}"),
        };
        f.debug_struct("Verifier")
            .field("algorithm", &self.alg)
            .field("keys", &keys)
            .finish()
    }
}

/// Longest token we look at; a JWT is a few hundred bytes, this bounds the work per attempt.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// A key for a token, or why there is none yet.
enum KeyFor {
    Key(Arc<DecodingKey>),
    Refused(AuthError),
    /// JWKS: not in the set held now; a refresh may bring it.
    Refresh(Option<String>),
}

impl Verifier {
    pub fn from_config(cfg: &Config) -> Result<Self, KeyError> {
        let a = &cfg.auth;
        let (alg, keys) = match a.algorithm.as_str() {
            alg @ ("RS256" | "ES256") => {
                let alg = if alg == "RS256" {
                    Algorithm::RS256
                } else {
                    Algorithm::ES256
                };
                match &a.jwks_url {
                    Some(url) => {
                        let client = HttpClient::new(&httpclient::Options::default());
                        (alg, Keys::Jwks(Arc::new(Jwks::new(a, url, alg, client))))
                    }
                    None => (alg, Keys::Fixed(Some(Arc::new(pem_key(a, alg)?)))),
                }
            }
            _ => (
                Algorithm::HS256,
                Keys::Fixed(
                    cfg.hs256_secret()?
                        .map(|s| Arc::new(DecodingKey::from_secret(s.as_bytes()))),
                ),
            ),
        };
        let mut v = Validation::new(alg);
        v.leeway = a.leeway_s;
        v.validate_exp = true;
        v.validate_nbf = true;
        // `exp` and `sub` are checked after decoding (`claims_to_user`), so their errors name
        // the claim and say what is wrong with it
        let mut required = vec![];
        match &a.audience {
            Some(aud) => {
                v.set_audience(&[aud]);
                required.push("aud");
            }
            None => v.validate_aud = false,
        }
        if let Some(iss) = &a.issuer {
            v.set_issuer(&[iss]);
            required.push("iss");
        }
        v.set_required_spec_claims(&required);
        Ok(Self {
            keys,
            alg,
            validation: v,
        })
    }

    /// The key set, when keys come from `auth.jwks_url`: its refresher is to be spawned
    /// ([`Jwks::run`]) and readiness waits for [`Jwks::is_loaded`].
    pub fn jwks(&self) -> Option<&Arc<Jwks>> {
        match &self.keys {
            Keys::Jwks(j) => Some(j),
            Keys::Fixed(_) => None,
        }
    }

    /// Whether keys are there to verify with (false only until a JWKS is first fetched).
    pub fn is_ready(&self) -> bool {
        self.jwks().is_none_or(|j| j.is_loaded())
    }

    fn key_for(&self, token: &str) -> KeyFor {
        if token.len() > MAX_TOKEN_BYTES {
            return KeyFor::Refused(AuthError::Malformed);
        }
        match &self.keys {
            Keys::Fixed(Some(k)) => KeyFor::Key(k.clone()),
            Keys::Fixed(None) => KeyFor::Refused(AuthError::NoKey),
            Keys::Jwks(set) => {
                let header = match jsonwebtoken::decode_header(token) {
                    Ok(h) => h,
                    Err(e) => return KeyFor::Refused(map_error(&e)),
                };
                // no refresh for a token that could never verify here
                if header.alg != self.alg {
                    return KeyFor::Refused(AuthError::BadAlgorithm);
                }
                match set.lookup(header.kid.as_deref()) {
                    jwks::Lookup::Found(k) => KeyFor::Key(k),
                    jwks::Lookup::NoKid => KeyFor::Refused(AuthError::NoKid),
                    jwks::Lookup::Unknown => KeyFor::Refresh(header.kid),
                }
            }
        }
    }

    /// Verifies `token` with the keys held now (no fetch: a JWKS token whose `kid` is unknown is
    /// refused; [`Verifier::identify`] refreshes the set first).
    pub fn verify(&self, token: &str) -> Result<User, AuthError> {
        match self.key_for(token) {
            KeyFor::Key(k) => self.verify_with(token, &k),
            KeyFor::Refused(e) => Err(e),
            KeyFor::Refresh(_) => Err(self.unknown_key_error()),
        }
    }

    fn unknown_key_error(&self) -> AuthError {
        if self.is_ready() {
            AuthError::UnknownKey
        } else {
            AuthError::KeysUnavailable
        }
    }

    fn verify_with(&self, token: &str, key: &DecodingKey) -> Result<User, AuthError> {
        match jsonwebtoken::decode::<Claims>(token, key, &self.validation) {
            Ok(data) => self.claims_to_user(data.claims),
            // jsonwebtoken reads the registered claims only after the signature verified, and a
            // `sub` of another type than string breaks that read (a JSON error, not a claim
            // error): the claims are the signer's, so they may be read again to name the fault
            Err(e) if matches!(e.kind(), ErrorKind::Json(_)) => {
                match jsonwebtoken::dangerous::insecure_decode_claims::<Claims>(token) {
                    Ok(claims) => Err(self
                        .claims_to_user(claims)
                        .err()
                        .unwrap_or(AuthError::Malformed)),
                    Err(_) => Err(AuthError::Malformed),
                }
            }
            Err(e) => Err(map_error(&e)),
        }
    }

    fn claims_to_user(&self, claims: Claims) -> Result<User, AuthError> {
        let Claims {
            sub,
            username,
            exp,
            rooms,
        } = claims;
        let exp = match exp {
            None => return Err(AuthError::MissingClaim("exp")),
            Some(v) => v.as_u64().ok_or(AuthError::BadClaim {
                claim: "exp",
                rule: "be a number (seconds since 1970)",
            })?,
        };
        let sub = match sub {
            None => return Err(AuthError::MissingClaim("sub")),
            Some(Value::String(s)) => s,
            Some(_) => {
                return Err(AuthError::BadClaim {
                    claim: "sub",
                    rule: "be a string",
                });
            }
        };
        if sub.is_empty() {
            // the empty key is where anonymous viewers live on the wire; no user may have it
            return Err(AuthError::BadClaim {
                claim: "sub",
                rule: "not be empty",
            });
        }
        let username = match username {
            None => None,
            Some(Value::String(u)) => Some(u),
            Some(_) => {
                return Err(AuthError::BadClaim {
                    claim: "username",
                    rule: "be a string",
                });
            }
        };
        let username = username
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| sub.clone());
        let valid_until_ms =
            (exp.saturating_add(self.validation.leeway) as i64).saturating_mul(1000);
        let rooms = RoomGrant::from_claim(rooms)?;
        Ok(User {
            id: sub,
            username,
            valid_until_ms,
            rooms,
        })
    }

    /// `verify` mapped to an [`Identity`] (`None` token → anonymous, no error), with the keys
    /// held now; `None` when the token names a JWKS key not held (see [`Verifier::identify`]).
    pub fn identify_now(&self, token: Option<&str>) -> Option<(Identity, Option<AuthError>)> {
        let Some(t) = token else {
            return Some((Identity::Anonymous, None));
        };
        match self.key_for(t) {
            KeyFor::Key(k) => Some(to_identity(self.verify_with(t, &k))),
            KeyFor::Refused(e) => Some((Identity::Anonymous, Some(e))),
            KeyFor::Refresh(_) => None,
        }
    }

    /// The identity `token` gives. The common path (HS256, a PEM key, a `kid` already held) does
    /// not wait; a `kid` the JWKS lacks waits for a refresh (at most `auth.jwks_fetch_timeout_ms`).
    pub async fn identify(&self, token: Option<&str>) -> (Identity, Option<AuthError>) {
        if let Some(r) = self.identify_now(token) {
            return r;
        }
        // cold path, boxed: the caller's future (a session's) stays small
        Box::pin(self.identify_after_refresh(token.unwrap_or_default())).await
    }

    async fn identify_after_refresh(&self, token: &str) -> (Identity, Option<AuthError>) {
        let (Some(set), KeyFor::Refresh(kid)) = (self.jwks(), self.key_for(token)) else {
            return to_identity(self.verify(token));
        };
        match set.lookup_after_refresh(kid.as_deref()).await {
            jwks::Lookup::Found(k) => to_identity(self.verify_with(token, &k)),
            jwks::Lookup::NoKid => (Identity::Anonymous, Some(AuthError::NoKid)),
            jwks::Lookup::Unknown => (Identity::Anonymous, Some(self.unknown_key_error())),
        }
    }
}

fn to_identity(r: Result<User, AuthError>) -> (Identity, Option<AuthError>) {
    match r {
        Ok(u) => (Identity::User(Arc::new(u)), None),
        Err(e) => (Identity::Anonymous, Some(e)),
    }
}

fn map_error(e: &jsonwebtoken::errors::Error) -> AuthError {
    match e.kind() {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::MissingAlgorithm => AuthError::BadAlgorithm,
        ErrorKind::InvalidAudience => AuthError::BadAudience,
        ErrorKind::InvalidIssuer => AuthError::BadIssuer,
        ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(claim_name(c)),
        ErrorKind::InvalidClaimFormat(c) => AuthError::BadClaim {
            claim: claim_name(c),
            rule: "be a number (seconds since 1970)",
        },
        _ => AuthError::Malformed,
    }
}

/// The registered claims jsonwebtoken reports on, as static names (`AuthError` stays `Copy`).
fn claim_name(c: &str) -> &'static str {
    match c {
        "exp" => "exp",
        "nbf" => "nbf",
        "sub" => "sub",
        "aud" => "aud",
        "iss" => "iss",
        _ => "a registered claim",
    }
}

fn pem_key(a: &AuthConfig, alg: Algorithm) -> Result<DecodingKey, KeyError> {
    let path = a
        .public_key_file
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let pem = std::fs::read(&path).map_err(|source| KeyError::Read {
        path: path.clone(),
        source,
    })?;
    let key = if alg == Algorithm::RS256 {
        DecodingKey::from_rsa_pem(&pem)
    } else {
        DecodingKey::from_ec_pem(&pem)
    };
    key.map_err(|e| KeyError::Pem {
        path,
        alg: a.algorithm.clone(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests;
