//! The publish hook (DESIGN §12): the application in the loop of a push. An allowed push of an
//! event of `hooks.publish_events`, past the rate and body limits, is posted to
//! `hooks.publish_url` as `{"room","event","body","user","conn","node","at"}`, signed with
//! `x-gateway-signature: sha256=<hex HMAC-SHA256(hooks.secret, raw body)>`, and the answer
//! becomes a [`Verdict`]. Every failure (another status, a timeout, not JSON, an unknown result,
//! `hooks.max_in_flight` reached) is [`Verdict::Unavailable`]: the push is not broadcast, and the
//! request is never retried (a timed-out one is abandoned, its late answer ignored).
//!
//! Knows nothing of sockets or of the order of a socket's pushes (that is the session's
//! `pushes` queue); its requests go through the shared pooled [`HttpClient`].
//!
//! The events hook (presence edges, batched and retried) is [`events`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper::{Request, StatusCode, Uri};
use serde_json::{Map, Value, json};
use sha2::Sha256;
use tokio::sync::Semaphore;

use crate::auth::User;
use crate::config::{Config, ConfigError};
use crate::httpclient::{self, HttpClient, HttpError};
use crate::metrics::{Metrics, hook_kind, hook_outcome};
use crate::rooms::RoomId;

pub mod events;
pub use events::EventsHook;

/// Largest answer read: a replacement body is at most `rooms.max_body_bytes` (4 KiB by default)
/// and may be escaped up to 6× in JSON; anything far beyond is not an answer we can use.
const MAX_ANSWER_BYTES: usize = 256 * 1024;
/// A refusal's reason is cut to this many characters before the client sees it.
pub const MAX_REASON_CHARS: usize = 200;
/// Idle connections kept to the application: enough for a busy node's steady rate of pushes
/// without reconnecting, far fewer than `max_in_flight`.
const MAX_IDLE_CONNECTIONS: usize = 64;

/// What the application decided about one push.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Broadcast the push; `Some`: with this payload instead (the application's body, checked by
    /// the same body rules, with the push's sender and time).
    Broadcast(Option<Value>),
    /// Answer the client `ok`; nothing is broadcast or stored.
    Ack,
    /// Answer the client this reason (at most [`MAX_REASON_CHARS`]); nothing is broadcast.
    Refuse(String),
    /// The replacement body breaks the body rules: the client gets `invalid payload`.
    InvalidBody,
    /// No usable answer: the client gets `unavailable`.
    Unavailable,
}

/// One push as the application sees it.
pub struct Push<'a> {
    pub room: &'a RoomId,
    pub event: &'a str,
    pub body: &'a Value,
    /// `None`: an anonymous push (`rooms.anonymous_events`).
    pub user: Option<&'a User>,
    pub conn: &'a str,
    pub node: &'a str,
    pub at_ms: i64,
}

/// The configured publish hook of this node.
pub struct PublishHook {
    uri: Uri,
    events: Vec<String>,
    secret: Vec<u8>,
    timeout: Duration,
    max_body_bytes: usize,
    /// One permit per request in flight (`hooks.max_in_flight`).
    in_flight: Arc<Semaphore>,
    client: HttpClient,
    metrics: Metrics,
}

impl std::fmt::Debug for PublishHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishHook")
            .field("uri", &self.uri)
            .field("events", &self.events)
            .finish()
    }
}

impl PublishHook {
    /// The hook of `hooks.publish_url`, or `None` when it is unset. Reads the secret (a file
    /// that cannot be read, or a short secret, is an error: the start stops).
    pub fn from_config(cfg: &Config, metrics: Metrics) -> Result<Option<Self>, ConfigError> {
        let Some(url) = &cfg.hooks.publish_url else {
            return Ok(None);
        };
        let bad = |message: String| ConfigError::Invalid {
            key: "hooks.publish_url",
            message,
        };
        let uri: Uri = url.parse().map_err(|e| bad(format!("{url:?}: {e}")))?;
        let secret = cfg.hooks_secret()?.ok_or(ConfigError::Invalid {
            key: "hooks.secret",
            message: "required with hooks.publish_url".into(),
        })?;
        let opts = httpclient::Options {
            max_idle_per_host: MAX_IDLE_CONNECTIONS,
            ..httpclient::Options::default()
        };
        Ok(Some(Self {
            uri,
            events: cfg.hooks.publish_events.clone(),
            secret: secret.into_bytes(),
            timeout: cfg.hooks.timeout(),
            max_body_bytes: cfg.rooms.max_body_bytes,
            in_flight: Arc::new(Semaphore::new(
                cfg.hooks.max_in_flight.min(Semaphore::MAX_PERMITS),
            )),
            client: HttpClient::new(&opts),
            metrics,
        }))
    }

    /// Whether pushes of `event` go through the hook.
    pub fn applies_to(&self, event: &str) -> bool {
        self.events.iter().any(|e| e == event)
    }

    /// Asks the application about `push` and waits at most `hooks.timeout_ms`.
    pub async fn call(&self, push: &Push<'_>) -> Verdict {
        let (verdict, outcome) = self.exchange(push).await;
        self.metrics.hook_request(hook_kind::PUBLISH, outcome);
        verdict
    }

    async fn exchange(&self, push: &Push<'_>) -> (Verdict, &'static str) {
        let Ok(_permit) = self.in_flight.clone().try_acquire_owned() else {
            return (Verdict::Unavailable, hook_outcome::OVERLOADED);
        };
        let body = request_body(push);
        let req = Request::post(self.uri.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::USER_AGENT, httpclient::USER_AGENT)
            .header("x-gateway-signature", signature(&self.secret, &body))
            .body(Full::new(Bytes::from(body)));
        let Ok(req) = req else {
            // a URL that parsed as a `Uri` always builds a request; kept total
            return (Verdict::Unavailable, hook_outcome::HTTP_ERROR);
        };
        let started = Instant::now();
        let answer = self.client.send(req, self.timeout, MAX_ANSWER_BYTES).await;
        self.metrics
            .hook_duration(hook_kind::PUBLISH, started.elapsed().as_secs_f64());
        let (status, answer) = match answer {
            Ok(r) => (r.status, r.body),
            Err(e) => {
                let outcome = match e {
                    HttpError::Timeout(_) => hook_outcome::TIMEOUT,
                    HttpError::TooLarge(_) => hook_outcome::INVALID,
                    HttpError::Url(_) | HttpError::Request(_) => hook_outcome::HTTP_ERROR,
                };
                tracing::debug!(error = %e, outcome, "publish hook failed");
                return (Verdict::Unavailable, outcome);
            }
        };
        match read_answer(status, &answer) {
            Err(outcome) => {
                tracing::debug!(%status, outcome, "publish hook answer not usable");
                (Verdict::Unavailable, outcome)
            }
            Ok(Verdict::Broadcast(Some(new_body))) => {
                let mut p = Map::new();
                p.insert("body".into(), new_body);
                match crate::rooms::broadcast_payload(
                    push.event,
                    &p,
                    push.user,
                    push.at_ms,
                    self.max_body_bytes,
                ) {
                    Ok(payload) => (Verdict::Broadcast(Some(payload)), hook_outcome::OK),
                    Err(_) => (Verdict::InvalidBody, hook_outcome::INVALID),
                }
            }
            Ok(v @ Verdict::Refuse(_)) => (v, hook_outcome::REFUSED),
            Ok(v) => (v, hook_outcome::OK),
        }
    }
}

/// The request's JSON: `{"room","event","body","user","conn","node","at"}`.
fn request_body(push: &Push<'_>) -> Vec<u8> {
    let v = json!({
        "room": push.room.as_str(),
        "event": push.event,
        "body": push.body,
        "user": push.user.map(|u| json!({"id": u.id, "username": u.username})),
        "conn": push.conn,
        "node": push.node,
        "at": push.at_ms,
    });
    // a `Value` always serialises
    serde_json::to_vec(&v).unwrap_or_default()
}

/// `sha256=<hex of HMAC-SHA256(secret, body)>`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256=");
    for b in digest {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The application's answer, or the outcome label of why it is not usable. A `broadcast` with a
/// `body` is returned as `Broadcast(Some(<the body>))`, to be checked by the caller.
fn read_answer(status: StatusCode, body: &[u8]) -> Result<Verdict, &'static str> {
    if !status.is_success() {
        return Err(hook_outcome::HTTP_ERROR);
    }
    let v: Value = serde_json::from_slice(body).map_err(|_| hook_outcome::INVALID)?;
    let Value::Object(m) = v else {
        return Err(hook_outcome::INVALID);
    };
    match m.get("result").and_then(Value::as_str) {
        Some("broadcast") => Ok(Verdict::Broadcast(m.get("body").cloned())),
        Some("ack") => Ok(Verdict::Ack),
        Some("refuse") => {
            let reason = m
                .get("reason")
                .and_then(Value::as_str)
                .filter(|r| !r.is_empty())
                .unwrap_or("refused");
            Ok(Verdict::Refuse(
                reason.chars().take(MAX_REASON_CHARS).collect(),
            ))
        }
        _ => Err(hook_outcome::INVALID),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hex_hmac_sha256() {
        // RFC 4231 test case 2
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn answers() {
        let ok = StatusCode::OK;
        let r = |s: &str| read_answer(ok, s.as_bytes());
        assert_eq!(r(r#"{"result":"broadcast"}"#), Ok(Verdict::Broadcast(None)));
        assert_eq!(
            r(r#"{"result":"broadcast","body":"x"}"#),
            Ok(Verdict::Broadcast(Some(json!("x"))))
        );
        assert_eq!(r(r#"{"result":"ack"}"#), Ok(Verdict::Ack));
        assert_eq!(
            r(r#"{"result":"refuse","reason":"spam"}"#),
            Ok(Verdict::Refuse("spam".into()))
        );
        let long = format!(r#"{{"result":"refuse","reason":"{}"}}"#, "é".repeat(300));
        assert_eq!(r(&long), Ok(Verdict::Refuse("é".repeat(MAX_REASON_CHARS))));
        for bad in [
            "",
            "nope",
            "[]",
            r#"{"result":"maybe"}"#,
            r#"{"result":1}"#,
            "{}",
        ] {
            assert_eq!(r(bad), Err(hook_outcome::INVALID), "{bad}");
        }
        assert_eq!(
            read_answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                br#"{"result":"broadcast"}"#
            ),
            Err(hook_outcome::HTTP_ERROR)
        );
        assert_eq!(
            read_answer(StatusCode::NO_CONTENT, b""),
            Err(hook_outcome::INVALID)
        );
    }

    #[test]
    fn the_request_names_the_room_by_id_and_the_sender_or_null() {
        let room = RoomId::parse("lobby").unwrap();
        let user = User {
            id: "7".into(),
            username: "ann".into(),
            valid_until_ms: 0,
            rooms: Default::default(),
        };
        let body = json!("hi");
        let mut push = Push {
            room: &room,
            event: "new_msg",
            body: &body,
            user: Some(&user),
            conn: "n.1",
            node: "n",
            at_ms: 5,
        };
        let v: Value = serde_json::from_slice(&request_body(&push)).unwrap();
        assert_eq!(
            v,
            json!({"room": "lobby", "event": "new_msg", "body": "hi",
                   "user": {"id": "7", "username": "ann"}, "conn": "n.1", "node": "n", "at": 5})
        );
        push.user = None;
        let v: Value = serde_json::from_slice(&request_body(&push)).unwrap();
        assert_eq!(v["user"], Value::Null);
    }
}
