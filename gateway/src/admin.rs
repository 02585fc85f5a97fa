//! The admin listener: `/metrics`, `/health/live`, `/health/ready` (open), and the rooms API
//! (guarded by `admin.token` as a bearer token). Never served on the public port.
//!
//! | method and path | does |
//! |---|---|
//! | `GET /metrics` | Prometheus text (`gateway_ready` evaluated as `/health/ready` would be) |
//! | `GET /health/live` | 200 while the process runs |
//! | `GET /health/ready` | 200 when the JWKS (if any) is loaded, Redis answers, pub/sub is up and the node is not draining; else 503 with the reason. On a cluster, a lost shard counts only on nodes with rooms on it |
//! | `GET /api/rooms` | room records |
//! | `POST /api/rooms` `{"id","name"?,"access"?}` | create a room (201, 409 if it exists); `access` `public` (default) or `private` |
//! | `GET /api/rooms/<id>` | record + presence (users, anonymous count per node, leases) |
//! | `DELETE /api/rooms/<id>` | delete the room; its channels get `phx_close` on every node |
//! | `POST /api/rooms/<id>/broadcast` `{"event","payload"}` | broadcast an event into the room (kept in its history) |
//! | `GET /api/rooms/<id>/history?last=N` | the room's newest N broadcasts (default 20), oldest first |
//! | `POST /api/rooms/<id>/kick` `{"user","ban_s"?}` | close the user's channels in the room on every node; `{"kicked":K}` (404: no such room) |
//! | `POST /api/users/<sub>/disconnect` `{"ban_s"?}` | close the user's sockets on every node with 4003; `{"closed":K}` |

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::app::{App, Gateway};
use crate::catalog::{Catalog, CatalogError};
use crate::history::HistoryError;
use crate::http::{Body, text};
use crate::rooms::{Access, RoomId, is_reserved};

/// Largest admin request body.
const MAX_BODY: usize = 64 * 1024;
/// `GET /api/rooms/<id>/history` without `last`.
const DEFAULT_HISTORY_LAST: usize = 20;
/// The most events one history request returns.
const MAX_HISTORY_LAST: usize = 1000;

/// Served from the process's first moment: health and metrics answer before Redis is reached.
pub async fn serve_admin(gw: Arc<Gateway>, listener: TcpListener, stop: watch::Receiver<bool>) {
    crate::http::accept_loop(listener, stop, "admin", |tcp, _| {
        let gw = gw.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let gw = gw.clone();
                async move { Ok::<_, Infallible>(Box::pin(handle(gw, req)).await) }
            });
            let _ = crate::http::http1()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    })
    .await
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    crate::http::json(status, v)
}

fn error(status: StatusCode, msg: &str) -> Response<Body> {
    json_response(status, &json!({ "error": msg }))
}

/// Readiness: the JWKS (if any) has been fetched once, Redis has been reached and answers a PING
/// within the deadline, pub/sub is up, not draining. On Redis Cluster a shard whose probe is lost
/// makes the node unready only when one of its rooms with local members sits on that shard: the
/// other nodes keep taking traffic through another shard's failover.
pub async fn ready(gw: &Gateway) -> Result<(), Cow<'static, str>> {
    if !gw.verifier.is_ready() {
        return Err("signing keys not loaded yet (auth.jwks_url)".into());
    }
    let Some(app) = gw.app() else {
        return Err("starting: redis not reachable yet".into());
    };
    if app.is_draining() {
        return Err("draining".into());
    }
    let redis = app.hub.store().redis();
    if redis.is_cluster() {
        shards_ready(app).await?;
    } else if !app.hub.pubsub_up() {
        return Err("pub/sub down: Redis is unreachable, or a room lost its subscription".into());
    }
    match tokio::time::timeout(app.cfg.redis.command_timeout(), redis.ping()).await {
        Ok(Ok(())) => Ok(()),
        _ => {
            app.metrics.redis_error(crate::metrics::redis_op::PING);
            Err("redis not reachable".into())
        }
    }
}

/// Cluster readiness of pub/sub: the subscriber is connected, no room lost its channel to a slot
/// move, some shard answers its probe, and no shard holding a room of this node is lost. While a
/// probe is lost the slot map is read again first (bounded), so the answer names the master of
/// the moment, not one a past failover replaced.
async fn shards_ready(app: &App) -> Result<(), Cow<'static, str>> {
    if !app.hub.pubsub_connected() {
        return Err(
            "pub/sub down: the subscriber is not connected, or a room lost its subscription".into(),
        );
    }
    let (lost, probes) = app.hub.lost_probes();
    if probes > 0 && lost.len() == probes {
        return Err("pub/sub down: no Redis shard answers its probe".into());
    }
    if lost.is_empty() {
        return Ok(());
    }
    let redis = app.hub.store().redis();
    let _ = tokio::time::timeout(app.cfg.redis.command_timeout() / 2, redis.refresh_shards()).await;
    let shards = redis.shards();
    let needed =
        crate::redis::cluster::shards_needed_down(&shards, &lost, &app.hub.room_channels());
    match needed.first() {
        None => Ok(()),
        Some((addr, rooms)) => Err(format!(
            "pub/sub down: Redis shard {addr} is unreachable and serves {rooms} room(s) of this node"
        )
        .into()),
    }
}

async fn handle(gw: Arc<Gateway>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/health/live") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/health/ready") => match ready(&gw).await {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("not ready: {why}\n"),
            ),
        },
        (&Method::GET, "/metrics") => {
            // one PING per scrape: `gateway_ready` says what a probe would hear now
            gw.metrics.ready(ready(&gw).await.is_ok());
            let (ty, body) = gw.metrics.render();
            let mut r = Response::new(Full::new(Bytes::from(body)));
            if let Ok(v) = hyper::header::HeaderValue::from_str(&ty) {
                r.headers_mut().insert(CONTENT_TYPE, v);
            }
            r
        }
        (_, p) if p == "/api" || p.starts_with("/api/") => match gw.app() {
            Some(app) => api(app.clone(), req).await,
            None => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "starting: redis not reachable yet",
            ),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

async fn api(app: Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let expected = match app.cfg.admin_token() {
        Ok(Some(t)) => t,
        Ok(None) => return error(StatusCode::NOT_FOUND, "admin API disabled: set admin.token"),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), expected.as_bytes())) {
        return error(StatusCode::UNAUTHORIZED, "missing or wrong admin token");
    }
    let catalog = Catalog::new(app.pool.clone(), app.keys.clone());
    let method = req.method().clone();
    let query = req.uri().query().map(str::to_string);
    let path = req.uri().path().trim_end_matches('/').to_string();
    let parts: Vec<&str> = path.split('/').skip(2).collect(); // after "/api"
    let body = match read_json(req).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let room_id = |s: &str| {
        RoomId::parse(s).map_err(|_| Box::new(error(StatusCode::BAD_REQUEST, "invalid room id")))
    };
    let result = match (&method, parts.as_slice()) {
        (&Method::GET, ["rooms"]) => catalog
            .list()
            .await
            .map(|l| json_response(StatusCode::OK, &json!(l))),
        (&Method::POST, ["rooms"]) => {
            let Some(id) = body.get("id").and_then(Value::as_str) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "body must be {\"id\": \"<room id>\"}",
                );
            };
            let id = match room_id(id) {
                Ok(id) => id,
                Err(r) => return *r,
            };
            let name = body.get("name").and_then(Value::as_str);
            let access = match body.get("access") {
                None | Some(Value::Null) => Access::Public,
                Some(Value::String(a)) if a == "public" => Access::Public,
                Some(Value::String(a)) if a == "private" => Access::Private,
                Some(_) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "access must be \"public\" or \"private\"",
                    );
                }
            };
            catalog.create(&id, name, access).await.map(|r| {
                // joinable here at once, even if this node found the id missing a moment ago
                app.hub.forget_missing(&id);
                json_response(StatusCode::CREATED, &json!(r))
            })
        }
        (m, ["rooms", id, rest @ ..]) => {
            let id = match room_id(id) {
                Ok(id) => id,
                Err(r) => return *r,
            };
            match (m, rest) {
                (&Method::GET, []) => match catalog.get(&id).await {
                    Ok(Some(rec)) => catalog.presence(&id).await.map(|p| {
                        json_response(StatusCode::OK, &json!({"room": rec, "presence": p}))
                    }),
                    Ok(None) => Err(CatalogError::Missing(id)),
                    Err(e) => Err(e),
                },
                (&Method::DELETE, []) => catalog
                    .delete(&id)
                    .await
                    .map(|()| json_response(StatusCode::OK, &json!({"deleted": id.as_str()}))),
                (&Method::POST, ["broadcast"]) => {
                    return broadcast(&app, &catalog, &id, &body).await;
                }
                (&Method::GET, ["history"]) => {
                    return history(&catalog, &id, query.as_deref()).await;
                }
                (&Method::POST, ["kick"]) => {
                    let Some(user) = body.get("user").and_then(Value::as_str) else {
                        return error(
                            StatusCode::BAD_REQUEST,
                            "body must be {\"user\": \"<sub>\", \"ban_s\": N}",
                        );
                    };
                    let ban_s = match ban_seconds(&body) {
                        Ok(b) => b,
                        Err(r) => return *r,
                    };
                    catalog
                        .kick(&id, user, ban_s)
                        .await
                        .map(|k| json_response(StatusCode::OK, &json!({"kicked": k})))
                }
                _ => return error(StatusCode::NOT_FOUND, "no such endpoint"),
            }
        }
        (&Method::POST, ["users", sub, "disconnect"]) if !sub.is_empty() => {
            // the user id as the token has it (a `sub` may hold any character: percent-encoded)
            let sub = percent_encoding::percent_decode_str(sub).decode_utf8_lossy();
            let ban_s = match ban_seconds(&body) {
                Ok(b) => b,
                Err(r) => return *r,
            };
            catalog
                .disconnect(&sub, ban_s)
                .await
                .map(|k| json_response(StatusCode::OK, &json!({"closed": k})))
        }
        _ => return error(StatusCode::NOT_FOUND, "no such endpoint"),
    };
    match result {
        Ok(r) => r,
        Err(CatalogError::Exists(id)) => {
            error(StatusCode::CONFLICT, &format!("room {id} already exists"))
        }
        Err(CatalogError::Missing(id)) => {
            error(StatusCode::NOT_FOUND, &format!("room {id} does not exist"))
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

/// `ban_s` of a kick or disconnect: absent, null or 0 is no ban.
fn ban_seconds(body: &Value) -> Result<u64, Box<Response<Body>>> {
    match body.get("ban_s") {
        None | Some(Value::Null) => Ok(0),
        Some(v) => v.as_u64().ok_or_else(|| {
            Box::new(error(
                StatusCode::BAD_REQUEST,
                "ban_s must be a whole number of seconds",
            ))
        }),
    }
}

async fn broadcast(app: &App, catalog: &Catalog, id: &RoomId, body: &Value) -> Response<Body> {
    let Some(event) = body.get("event").and_then(Value::as_str) else {
        return error(
            StatusCode::BAD_REQUEST,
            "body must be {\"event\": \"...\", \"payload\": {...}}",
        );
    };
    if is_reserved(event) || event.is_empty() {
        return error(StatusCode::BAD_REQUEST, "reserved event name");
    }
    let payload = body.get("payload").cloned().unwrap_or_else(|| json!({}));
    if !payload.is_object() {
        return error(StatusCode::BAD_REQUEST, "payload must be a JSON object");
    }
    match catalog.get(id).await {
        Ok(Some(_)) => {}
        Ok(None) => return error(StatusCode::NOT_FOUND, &format!("room {id} does not exist")),
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
    // appended to the room's history and published in one script call, like a client's push
    // (an "id" in the payload is replaced by the stream id)
    match app
        .hub
        .history()
        .broadcast(&app.keys.room(id), &id.topic(), event, &payload)
        .await
    {
        Ok(p) => json_response(
            StatusCode::OK,
            &json!({
                "room": id.as_str(),
                "event": event,
                "id": p.id.map(|i| i.to_string()),
            }),
        ),
        Err(HistoryError::NoRoom) => {
            error(StatusCode::NOT_FOUND, &format!("room {id} does not exist"))
        }
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "redis not reachable"),
    }
}

/// `GET /api/rooms/<id>/history?last=N`: the room's newest N broadcasts (default 20, at most
/// 1000), oldest first, each `{"id","event","payload"}` with the payload as clients got it.
async fn history(catalog: &Catalog, id: &RoomId, query: Option<&str>) -> Response<Body> {
    let mut last = DEFAULT_HISTORY_LAST;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("last", v)) => match v.parse::<usize>() {
                Ok(n) if (1..=MAX_HISTORY_LAST).contains(&n) => last = n,
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &format!("last must be a number from 1 to {MAX_HISTORY_LAST}"),
                    );
                }
            },
            _ => return error(StatusCode::BAD_REQUEST, "the only parameter is last"),
        }
    }
    match catalog.get(id).await {
        Ok(Some(_)) => {}
        Ok(None) => return error(StatusCode::NOT_FOUND, &format!("room {id} does not exist")),
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
    match catalog.history(id, last).await {
        Ok(events) => json_response(
            StatusCode::OK,
            &json!({"room": id.as_str(), "events": events}),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

async fn read_json(req: Request<Incoming>) -> Result<Value, Response<Body>> {
    let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body too large or unreadable",
            ));
        }
    };
    if bytes.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(&bytes)
        .map_err(|_| error(StatusCode::BAD_REQUEST, "body is not valid JSON"))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
