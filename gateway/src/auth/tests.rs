//! Tests of token verification: valid and refused tokens, errors that name the claim, leeway,
//! audience and issuer, missing or empty secrets, the missing-audience warning.

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
            rooms: RoomGrant::None,
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
        Err(AuthError::MissingClaim("exp"))
    );
    assert_eq!(
        v.verify(&hs(K, json!({"exp":now()+60}))),
        Err(AuthError::MissingClaim("sub"))
    );
    assert_eq!(
        v.verify(&hs(K, json!({"sub":"","exp":now()+60}))),
        Err(AuthError::BadClaim {
            claim: "sub",
            rule: "not be empty"
        })
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
fn errors_name_the_claim_and_what_is_wrong() {
    let v = verifier(K);
    let msg = |claims: serde_json::Value| match v.verify(&hs(K, claims)) {
        Ok(u) => panic!("accepted: {u:?}"),
        Err(e) => e.to_string(),
    };
    assert_eq!(msg(json!({"sub":"1"})), "missing claim: exp");
    assert_eq!(msg(json!({"exp":now()+60})), "missing claim: sub");
    assert_eq!(
        msg(json!({"sub":null,"exp":now()+60})),
        "missing claim: sub"
    );
    assert_eq!(
        msg(json!({"sub":42,"exp":now()+60})),
        "sub must be a string"
    );
    assert_eq!(
        msg(json!({"sub":{"id":1},"exp":now()+60})),
        "sub must be a string"
    );
    assert_eq!(
        msg(json!({"sub":"","exp":now()+60})),
        "sub must not be empty"
    );
    assert_eq!(
        msg(json!({"sub":"1","exp":"tomorrow"})),
        "exp must be a number (seconds since 1970)"
    );
    assert_eq!(
        msg(json!({"sub":"1","exp":now()+60,"username":7})),
        "username must be a string"
    );
    assert_eq!(msg(json!({"sub":"1","exp":now()-3600})), "token expired");
    // the claims of a token whose signature fails are never looked at
    assert_eq!(
        v.verify(&hs("other-secret", json!({"sub":42,"exp":now()+60}))),
        Err(AuthError::BadSignature)
    );
    // a null username is no username: the id stands in
    let u = v
        .verify(&hs(K, json!({"sub":"1","exp":now()+60,"username":null})))
        .unwrap();
    assert_eq!(u.username, "1");
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
    assert_eq!(
        v.verify(&hs(K, no_iss)),
        Err(AuthError::MissingClaim("iss"))
    );
    let no_aud = json!({"sub":"1","exp":now()+60,"iss":"me"});
    assert_eq!(
        v.verify(&hs(K, no_aud)),
        Err(AuthError::MissingClaim("aud"))
    );
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
    assert_eq!(v.identify_now(None), Some((Identity::Anonymous, None)));
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

#[test]
fn the_rooms_claim_lists_private_rooms() {
    let v = verifier(K);
    let u = v
        .verify(&hs(K, json!({"sub":"1","exp":now()+60,"rooms":["a","b"]})))
        .unwrap();
    assert!(u.rooms.allows("a") && u.rooms.allows("b") && !u.rooms.allows("c"));
    let u = v
        .verify(&hs(K, json!({"sub":"1","exp":now()+60,"rooms":["x","*"]})))
        .unwrap();
    assert_eq!(u.rooms, RoomGrant::All);
    let u = v.verify(&hs(K, json!({"sub":"1","exp":now()+60}))).unwrap();
    assert_eq!(u.rooms, RoomGrant::None);
    assert!(!u.rooms.allows("a"));
    for bad in [json!("a"), json!([1]), json!({"a":1})] {
        assert_eq!(
            v.verify(&hs(K, json!({"sub":"1","exp":now()+60,"rooms":bad}))),
            Err(AuthError::BadClaim {
                claim: "rooms",
                rule: "be an array of room ids"
            })
        );
    }
}
