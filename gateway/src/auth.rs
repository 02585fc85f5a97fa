//! JWT → [`Identity`]. The algorithm is pinned by configuration (an HS256 token is never checked
//! against an RSA key, `alg: none` is never accepted), `exp` is required, `nbf` checked, both with a
//! small leeway; `aud` / `iss` are enforced when configured. The HS256 secret comes through
//! `Config::hs256_secret`, which refuses a blank or short one, so an empty key is never a key.
//!
//! A token that fails verification is not an error here: the caller decides whether the socket stays
//! anonymous (the seed's behaviour) or is refused with HTTP 401 (`auth.reject_invalid_tokens`).
//! Sockets, rooms and Redis are out of scope.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;

use crate::config::{AuthConfig, Config};

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
/// (`auth_error` in the join reply); it never echoes the token or library internals.
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
    #[error("missing claim")]
    MissingClaim,
    #[error("malformed token")]
    Malformed,
    #[error("no verification key configured")]
    NoKey,
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

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    username: Option<String>,
    /// Required by the validation (`exp` is in the required claims).
    #[serde(default)]
    exp: u64,
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

/// Verifies tokens with the configured key and rules.
pub struct Verifier {
    key: Option<DecodingKey>,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.validation.algorithms)
            .field("has_key", &self.key.is_some())
            .finish()
    }
}

/// Longest token we look at; a JWT is a few hundred bytes, this bounds the work per attempt.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

impl Verifier {
    pub fn from_config(cfg: &Config) -> Result<Self, KeyError> {
        let a = &cfg.auth;
        let (alg, key) = match a.algorithm.as_str() {
            "RS256" | "ES256" => {
                let path = a
                    .public_key_file
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                let pem = std::fs::read(&path).map_err(|source| KeyError::Read {
                    path: path.clone(),
                    source,
                })?;
                let (alg, key) = if a.algorithm == "RS256" {
                    (Algorithm::RS256, DecodingKey::from_rsa_pem(&pem))
                } else {
                    (Algorithm::ES256, DecodingKey::from_ec_pem(&pem))
                };
                let key = key.map_err(|e| KeyError::Pem {
                    path,
                    alg: a.algorithm.clone(),
                    message: e.to_string(),
                })?;
                (alg, Some(key))
            }
            _ => (
                Algorithm::HS256,
                cfg.hs256_secret()?
                    .map(|s| DecodingKey::from_secret(s.as_bytes())),
            ),
        };
        let mut v = Validation::new(alg);
        v.leeway = a.leeway_s;
        v.validate_exp = true;
        v.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
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
        Ok(Self { key, validation: v })
    }

    /// Verifies `token` and returns the user it names.
    pub fn verify(&self, token: &str) -> Result<User, AuthError> {
        let key = self.key.as_ref().ok_or(AuthError::NoKey)?;
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed);
        }
        let data =
            jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => AuthError::Expired,
                    ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                    ErrorKind::InvalidSignature => AuthError::BadSignature,
                    ErrorKind::InvalidAlgorithm
                    | ErrorKind::InvalidAlgorithmName
                    | ErrorKind::MissingAlgorithm => AuthError::BadAlgorithm,
                    ErrorKind::InvalidAudience => AuthError::BadAudience,
                    ErrorKind::InvalidIssuer => AuthError::BadIssuer,
                    ErrorKind::MissingRequiredClaim(_) => AuthError::MissingClaim,
                    _ => AuthError::Malformed,
                }
            })?;
        let Claims { sub, username, exp } = data.claims;
        let sub = sub.unwrap_or_default();
        if sub.is_empty() {
            // the empty key is where anonymous viewers live on the wire; no user may have it
            return Err(AuthError::MissingClaim);
        }
        let username = username
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| sub.clone());
        let valid_until_ms =
            (exp.saturating_add(self.validation.leeway) as i64).saturating_mul(1000);
        Ok(User {
            id: sub,
            username,
            valid_until_ms,
        })
    }

    /// `verify` mapped to an [`Identity`] (`None` token → anonymous, no error).
    pub fn identify(&self, token: Option<&str>) -> (Identity, Option<AuthError>) {
        match token {
            None => (Identity::Anonymous, None),
            Some(t) => match self.verify(t) {
                Ok(u) => (Identity::User(Arc::new(u)), None),
                Err(e) => (Identity::Anonymous, Some(e)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    /// 32+ bytes: shorter HS256 secrets are refused by the configuration.
    const K: &str = "unit-test-hs256-secret-0123456789abcdef";

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn verifier(secret: &str) -> Verifier {
        let mut cfg = Config::default();
        cfg.auth.hs256_secret = Some(secret.into());
        Verifier::from_config(&cfg).expect("verifier")
    }

    fn hs(secret: &str, claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("encode")
    }

    #[test]
    fn accepts_a_valid_token_and_falls_back_to_sub() {
        let v = verifier(K);
        let u = v
            .verify(&hs(K, json!({"sub":"42","username":"ann","exp":now()+60})))
            .unwrap();
        assert_eq!(
            u,
            User {
                id: "42".into(),
                username: "ann".into(),
                valid_until_ms: u.valid_until_ms,
            }
        );
        assert!(
            u.valid_until_ms >= (now() as i64 + 60) * 1000,
            "exp plus the leeway"
        );
        let u = v.verify(&hs(K, json!({"sub":"7","exp":now()+60}))).unwrap();
        assert_eq!(u.username, "7");
    }

    #[test]
    fn refuses_bad_tokens() {
        let v = verifier(K);
        assert_eq!(
            v.verify(&hs("other", json!({"sub":"1","exp":now()+60}))),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            v.verify(&hs(K, json!({"sub":"1","exp":now()-3600}))),
            Err(AuthError::Expired)
        );
        assert_eq!(
            v.verify(&hs(K, json!({"sub":"1","exp":now()+60,"nbf":now()+3600}))),
            Err(AuthError::NotYetValid)
        );
        assert_eq!(
            v.verify(&hs(K, json!({"sub":"1"}))),
            Err(AuthError::MissingClaim)
        );
        assert_eq!(
            v.verify(&hs(K, json!({"exp":now()+60}))),
            Err(AuthError::MissingClaim)
        );
        assert_eq!(
            v.verify(&hs(K, json!({"sub":"","exp":now()+60}))),
            Err(AuthError::MissingClaim)
        );
        assert_eq!(v.verify("garbage"), Err(AuthError::Malformed));
        // alg: none, unsigned
        let none = format!(
            "{}.{}.",
            B64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            B64.encode(json!({"sub":"1","exp":now()+60}).to_string())
        );
        assert!(v.verify(&none).is_err());
        // HS384 with the right secret is still refused: the algorithm is pinned
        let t = encode(
            &Header::new(Algorithm::HS384),
            &json!({"sub":"1","exp":now()+60}),
            &EncodingKey::from_secret(K.as_bytes()),
        )
        .unwrap();
        assert_eq!(v.verify(&t), Err(AuthError::BadAlgorithm));
    }

    #[test]
    fn expiry_has_a_small_leeway() {
        let v = verifier(K);
        assert!(v.verify(&hs(K, json!({"sub":"1","exp":now()-2}))).is_ok());
        assert!(v.verify(&hs(K, json!({"sub":"1","exp":now()-30}))).is_err());
    }

    #[test]
    fn audience_and_issuer_when_configured() {
        let mut cfg = Config::default();
        cfg.auth.hs256_secret = Some(K.into());
        cfg.auth.audience = Some("gw".into());
        cfg.auth.issuer = Some("me".into());
        let v = Verifier::from_config(&cfg).unwrap();
        let ok = json!({"sub":"1","exp":now()+60,"aud":"gw","iss":"me"});
        assert!(v.verify(&hs(K, ok)).is_ok());
        let bad_aud = json!({"sub":"1","exp":now()+60,"aud":"x","iss":"me"});
        assert_eq!(v.verify(&hs(K, bad_aud)), Err(AuthError::BadAudience));
        let no_iss = json!({"sub":"1","exp":now()+60,"aud":"gw"});
        assert_eq!(v.verify(&hs(K, no_iss)), Err(AuthError::MissingClaim));
        // without configured audience, a token carrying aud is fine
        assert!(
            verifier(K)
                .verify(&hs(K, json!({"sub":"1","exp":now()+60,"aud":"x"})))
                .is_ok()
        );
    }

    #[test]
    fn no_secret_means_every_token_is_refused() {
        let v = Verifier::from_config(&Config::default()).unwrap();
        assert_eq!(
            v.verify(&hs(K, json!({"sub":"1","exp":now()+60}))),
            Err(AuthError::NoKey)
        );
        assert_eq!(v.identify(None).0, Identity::Anonymous);
    }

    #[test]
    fn an_empty_secret_file_is_refused_not_used_as_a_key() {
        let dir = std::env::temp_dir().join(format!("gw-auth-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (i, blank) in ["", "\n", " \r\n"].iter().enumerate() {
            let f = dir.join(format!("secret{i}"));
            std::fs::write(&f, blank).unwrap();
            let mut cfg = Config::default();
            cfg.auth.hs256_secret_file = Some(f.clone());
            cfg.auth.allow_short_hs256_secret = true;
            match Verifier::from_config(&cfg) {
                Err(e) => assert!(e.to_string().contains("auth.hs256_secret_file"), "{e}"),
                Ok(v) => panic!(
                    "a blank secret file gave a verifier; a token signed with the empty key: {:?}",
                    v.verify(&hs("", json!({"sub":"admin","exp":now()+60})))
                ),
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn warns_about_a_missing_audience_only_with_public_key_algorithms() {
        let mut a = AuthConfig::default();
        assert_eq!(missing_audience_warning(&a), None, "HS256");
        for alg in ["RS256", "ES256"] {
            a.algorithm = alg.into();
            a.audience = None;
            let w = missing_audience_warning(&a).expect("warning");
            assert!(w.contains("auth.audience") && w.contains(alg), "{w}");
            a.audience = Some("gateway".into());
            assert_eq!(missing_audience_warning(&a), None, "{alg} with audience");
        }
    }
}
