//! Metric families, registered once in one registry and served as Prometheus text on the admin
//! port. Names are `gateway_<subsystem>_<name>`; every label comes from a closed set (never a room
//! or user id), so the series count is fixed whatever the traffic.

use std::sync::Arc;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramTimer, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Label values of `gateway_connections{kind}`.
pub mod conn_kind {
    pub const SIGNED_IN: &str = "signed_in";
    pub const ANONYMOUS: &str = "anonymous";
    pub const ALL: [&str; 2] = [SIGNED_IN, ANONYMOUS];
}

/// Label values of `gateway_joins_total{result}`.
pub mod join_result {
    pub const OK: &str = "ok";
    pub const NO_ROOM: &str = "no_room";
    pub const INVALID: &str = "invalid";
    pub const UNAVAILABLE: &str = "unavailable";
    pub const REFUSED: &str = "refused";
    /// Over `server.join_rate_per_s` / `server.join_burst`: nothing happened.
    pub const RATE_LIMITED: &str = "rate_limited";
    pub const ALL: [&str; 6] = [OK, NO_ROOM, INVALID, UNAVAILABLE, REFUSED, RATE_LIMITED];
}

/// Label values of `gateway_pushes_total{result}`.
pub mod push_result {
    pub const OK: &str = "ok";
    pub const NOT_SIGNED_IN: &str = "not_signed_in";
    pub const UNKNOWN_EVENT: &str = "unknown_event";
    pub const INVALID: &str = "invalid";
    pub const UNAVAILABLE: &str = "unavailable";
    /// Over the socket's push rate limit (`server.push_rate_per_s` / `server.push_burst`).
    pub const RATE_LIMITED: &str = "rate_limited";
    /// The publish hook answered `refuse`.
    pub const REFUSED: &str = "refused";
    pub const ALL: [&str; 7] = [
        OK,
        NOT_SIGNED_IN,
        UNKNOWN_EVENT,
        INVALID,
        UNAVAILABLE,
        RATE_LIMITED,
        REFUSED,
    ];
}

/// Label values of `gateway_hook_requests_total{hook}` and `gateway_hook_duration_seconds{hook}`.
pub mod hook_kind {
    pub const PUBLISH: &str = "publish";
    pub const EVENTS: &str = "events";
    pub const ALL: [&str; 2] = [PUBLISH, EVENTS];
}

/// Label values of `gateway_hook_requests_total{outcome}`.
pub mod hook_outcome {
    /// A valid answer that lets the push through (`broadcast`, `ack`).
    pub const OK: &str = "ok";
    /// The application answered `refuse`.
    pub const REFUSED: &str = "refused";
    /// No answer: another status than 2xx, or the connection failed.
    pub const HTTP_ERROR: &str = "http_error";
    /// No answer within `hooks.timeout_ms` (the request was abandoned).
    pub const TIMEOUT: &str = "timeout";
    /// A 2xx answer we cannot use: not JSON, an unknown result, a replacement body that breaks
    /// the body rules.
    pub const INVALID: &str = "invalid";
    /// Not sent: `hooks.max_in_flight` requests were already in flight.
    pub const OVERLOADED: &str = "overloaded";
    pub const ALL: [&str; 6] = [OK, REFUSED, HTTP_ERROR, TIMEOUT, INVALID, OVERLOADED];
}

/// Label values of `gateway_hook_events_total{result}` (the events hook's deliveries).
pub mod hook_event_result {
    pub const SENT: &str = "sent";
    pub const RETRIED: &str = "retried";
    pub const DROPPED: &str = "dropped";
    pub const ALL: [&str; 3] = [SENT, RETRIED, DROPPED];
}

/// Label values of `gateway_presence_frames_total{event}`: the presence events sent to clients.
pub mod presence_event {
    pub const STATE: &str = "presence_state";
    pub const DIFF: &str = "presence_diff";
    pub const COUNT: &str = "presence_count";
    pub const ALL: [&str; 3] = [STATE, DIFF, COUNT];
}

/// Label values of `gateway_redis_script_duration_seconds{script}`: the Lua scripts of `lua/`.
pub mod script {
    pub const JOIN: &str = "join";
    pub const LEAVE: &str = "leave";
    pub const HEARTBEAT: &str = "heartbeat";
    pub const SNAPSHOT: &str = "snapshot";
    pub const SYNC: &str = "sync";
    /// `publish.lua`: a broadcast appended to the room's history and published.
    pub const BROADCAST: &str = "broadcast";
    /// `history.lua`: a read of a room's history (a cold room, or a recovery not in memory).
    pub const HISTORY: &str = "history";
    pub const ALL: [&str; 7] = [JOIN, LEAVE, HEARTBEAT, SNAPSHOT, SYNC, BROADCAST, HISTORY];
}

/// Label values of `gateway_history_recoveries_total{outcome}`: joins with `since`.
pub mod recovery_outcome {
    /// Every event after `since` was delivered (at least one).
    pub const RECOVERED: &str = "recovered";
    /// Some events after `since` are gone (trimmed, or an id the room never had): the reply said
    /// `"recovered": false` and the last `rooms.history_on_join` events followed.
    pub const GAP: &str = "gap";
    /// Nothing had happened since `since` (`"recovered": true`, no event to deliver).
    pub const NONE: &str = "none";
    pub const ALL: [&str; 3] = [RECOVERED, GAP, NONE];
}

/// Label values of `gateway_redis_errors_total{op}`: every script, plus the plain commands and
/// the pub/sub connection.
pub mod redis_op {
    use super::script;
    pub const PUBLISH: &str = "publish";
    pub const EXISTS: &str = "exists";
    pub const PING: &str = "ping";
    pub const NODE_RECORD: &str = "node_record";
    /// The pub/sub connection was lost or its probe did not come back.
    pub const PUBSUB: &str = "pubsub";
    /// The events hook's acknowledgement: an `HDEL` of sent events from a room's outbox.
    pub const EVENTS_ACK: &str = "events_ack";
    pub const ALL: [&str; 13] = [
        script::JOIN,
        script::LEAVE,
        script::HEARTBEAT,
        script::SNAPSHOT,
        script::SYNC,
        script::BROADCAST,
        script::HISTORY,
        PUBLISH,
        EXISTS,
        PING,
        NODE_RECORD,
        PUBSUB,
        EVENTS_ACK,
    ];
}

/// Label values of `gateway_pubsub_interruptions_total{event}`: what made the subscriber
/// re-snapshot its rooms.
pub mod pubsub_event {
    /// The standalone connection was rebuilt (lost, or its probe did not come back).
    pub const RECONNECT: &str = "reconnect";
    /// A cluster shard connection dropped (a failover, a killed node, a network cut).
    pub const DISCONNECT: &str = "disconnect";
    /// The cluster client re-subscribed rooms by itself (after a disconnect or a failover).
    pub const RESUBSCRIBE: &str = "resubscribe";
    /// A shard's probe did not come back: the shard is unreachable (readiness is false).
    pub const SHARD_LOST: &str = "shard_lost";
    /// A shard's probe came back after a loss.
    pub const SHARD_BACK: &str = "shard_back";
    /// A slot moved to another master and the server dropped one of the node's channels with it
    /// (one per channel; the node subscribes it again on the new owner).
    pub const SLOT_MOVED: &str = "slot_moved";
    pub const ALL: [&str; 6] = [
        RECONNECT,
        DISCONNECT,
        RESUBSCRIBE,
        SHARD_LOST,
        SHARD_BACK,
        SLOT_MOVED,
    ];
}

/// Label values of `gateway_upgrade_seconds{phase}`: where the time of an upgrade is counted from.
pub mod upgrade_phase {
    /// From the connection's accept (the client's wait to send its request included).
    pub const ACCEPT: &str = "accept";
    /// From the request's arrival: the gateway's own share.
    pub const REQUEST: &str = "request";
    pub const ALL: [&str; 2] = [ACCEPT, REQUEST];
}

/// Label values of `gateway_closes_total{code}`: the close codes the gateway sends or sees, each
/// as its number, and `other`. [`close_label`] maps a code into this set.
pub mod close_code {
    pub const OTHER: &str = "other";
    pub const ALL: [&str; 15] = [
        "1000", "1001", "1002", "1005", "1006", "1007", "1009", "1011", "1012", "4000", "4001",
        "4003", "4008", "4009", OTHER,
    ];
}

struct Inner {
    registry: Registry,
    connections: IntGaugeVec,
    compressed: IntGauge,
    rooms_local: IntGauge,
    joins: IntCounterVec,
    pushes: IntCounterVec,
    fanout_frames: IntCounter,
    presence_frames: IntCounterVec,
    script_seconds: HistogramVec,
    redis_errors: IntCounterVec,
    pubsub_reconnects: IntCounter,
    pubsub_lag: Histogram,
    pubsub_events: IntCounterVec,
    slow_closes: IntCounter,
    closes: IntCounterVec,
    heartbeat_rooms: IntGauge,
    recoveries: IntCounterVec,
    hook_requests: IntCounterVec,
    hook_seconds: HistogramVec,
    hook_events: IntCounterVec,
    ready: IntGauge,
    upgrade_seconds: HistogramVec,
    upgrades_shed: IntCounter,
}

/// Cheap to clone; every component holds one.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

fn must<T>(r: prometheus::Result<T>) -> T {
    // Only fails on invalid names or duplicate registration, which are programming errors caught
    // by the unit test below.
    r.unwrap_or_else(|e| panic!("metric definition: {e}"))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| must(registry.register(c));
        let connections = must(IntGaugeVec::new(
            Opts::new("gateway_connections", "Open WebSocket connections by kind"),
            &["kind"],
        ));
        let compressed = must(IntGauge::new(
            "gateway_connections_compressed",
            "Open WebSocket connections that negotiated permessage-deflate (server.compression)",
        ));
        let rooms_local = must(IntGauge::new(
            "gateway_rooms_local",
            "Rooms with local members on this node (each is one pub/sub subscription)",
        ));
        let joins = must(IntCounterVec::new(
            Opts::new("gateway_joins_total", "Channel joins by result"),
            &["result"],
        ));
        let pushes = must(IntCounterVec::new(
            Opts::new("gateway_pushes_total", "Client pushes by result"),
            &["result"],
        ));
        let fanout_frames = must(IntCounter::new(
            "gateway_fanout_frames_total",
            "Room broadcast frames queued to local sockets",
        ));
        let presence_frames = must(IntCounterVec::new(
            Opts::new(
                "gateway_presence_frames_total",
                "Presence frames queued to local sockets by event",
            ),
            &["event"],
        ));
        let script_seconds = must(HistogramVec::new(
            HistogramOpts::new(
                "gateway_redis_script_duration_seconds",
                "Redis presence script round trip by script",
            )
            .buckets(vec![
                0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["script"],
        ));
        let redis_errors = must(IntCounterVec::new(
            Opts::new(
                "gateway_redis_errors_total",
                "Failed Redis calls by operation",
            ),
            &["op"],
        ));
        let pubsub_reconnects = must(IntCounter::new(
            "gateway_pubsub_reconnects_total",
            "Pub/sub connections rebuilt after a loss or a failed probe",
        ));
        let pubsub_lag = must(Histogram::with_opts(
            HistogramOpts::new(
                "gateway_pubsub_lag_seconds",
                "Time from PUBLISH of the node's probe to its arrival on the subscriber",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        ));
        let pubsub_events = must(IntCounterVec::new(
            Opts::new(
                "gateway_pubsub_interruptions_total",
                "Topology changes and re-subscriptions that made the node re-snapshot its rooms",
            ),
            &["event"],
        ));
        let slow_closes = must(IntCounter::new(
            "gateway_slow_consumer_closes_total",
            "Sockets closed because their outbound queue overflowed",
        ));
        let closes = must(IntCounterVec::new(
            Opts::new("gateway_closes_total", "Closed sockets by close code"),
            &["code"],
        ));
        let heartbeat_rooms = must(IntGauge::new(
            "gateway_presence_heartbeat_rooms",
            "Rooms renewed by the last presence heartbeat of this node",
        ));
        let recoveries = must(IntCounterVec::new(
            Opts::new(
                "gateway_history_recoveries_total",
                "Joins with `since` (lossless reconnect) by outcome",
            ),
            &["outcome"],
        ));
        let hook_requests = must(IntCounterVec::new(
            Opts::new(
                "gateway_hook_requests_total",
                "Requests to the application's hooks by hook and outcome",
            ),
            &["hook", "outcome"],
        ));
        let hook_seconds = must(HistogramVec::new(
            HistogramOpts::new(
                "gateway_hook_duration_seconds",
                "Round trip of a hook request (sent ones; timeouts count at the deadline)",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["hook"],
        ));
        let hook_events = must(IntCounterVec::new(
            Opts::new(
                "gateway_hook_events_total",
                "Events of the events hook by delivery result",
            ),
            &["result"],
        ));
        let ready = must(IntGauge::new(
            "gateway_ready",
            "1 when /health/ready would answer 200 (Redis answers, pub/sub up, not draining), \
             else 0; evaluated at each scrape",
        ));
        let upgrade_seconds = must(HistogramVec::new(
            HistogramOpts::new(
                "gateway_upgrade_seconds",
                "Completed WebSocket upgrades: time to the 101 sent from the connection's accept \
                 (phase=accept: includes the client's wait to send its request) or from the \
                 request's arrival (phase=request: the gateway's own work, token and ban checks)",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["phase"],
        ));
        let upgrades_shed = must(IntCounter::new(
            "gateway_upgrades_shed_total",
            "Upgrade requests answered 503 because server.max_pending_upgrades were in progress",
        ));
        let build = must(IntGaugeVec::new(
            Opts::new("gateway_build_info", "Build information"),
            &["version"],
        ));
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        reg(Box::new(connections.clone()));
        reg(Box::new(compressed.clone()));
        reg(Box::new(rooms_local.clone()));
        reg(Box::new(joins.clone()));
        reg(Box::new(pushes.clone()));
        reg(Box::new(fanout_frames.clone()));
        reg(Box::new(presence_frames.clone()));
        reg(Box::new(script_seconds.clone()));
        reg(Box::new(redis_errors.clone()));
        reg(Box::new(pubsub_reconnects.clone()));
        reg(Box::new(pubsub_lag.clone()));
        reg(Box::new(pubsub_events.clone()));
        reg(Box::new(slow_closes.clone()));
        reg(Box::new(closes.clone()));
        reg(Box::new(heartbeat_rooms.clone()));
        reg(Box::new(recoveries.clone()));
        reg(Box::new(hook_requests.clone()));
        reg(Box::new(hook_seconds.clone()));
        reg(Box::new(hook_events.clone()));
        reg(Box::new(ready.clone()));
        reg(Box::new(upgrade_seconds.clone()));
        reg(Box::new(upgrades_shed.clone()));
        reg(Box::new(build));
        #[cfg(target_os = "linux")]
        reg(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
        // Every series of every closed label set exists from start-up: a fresh node's
        // dashboards show 0, not "No data".
        init(&connections, &conn_kind::ALL);
        init(&joins, &join_result::ALL);
        init(&pushes, &push_result::ALL);
        init(&presence_frames, &presence_event::ALL);
        init(&closes, &close_code::ALL);
        init(&pubsub_events, &pubsub_event::ALL);
        init(&script_seconds, &script::ALL);
        init(&redis_errors, &redis_op::ALL);
        init(&recoveries, &recovery_outcome::ALL);
        for hook in hook_kind::ALL {
            for outcome in hook_outcome::ALL {
                hook_requests.with_label_values(&[hook, outcome]);
            }
        }
        init(&hook_seconds, &hook_kind::ALL);
        init(&hook_events, &hook_event_result::ALL);
        init(&upgrade_seconds, &upgrade_phase::ALL);
        Metrics(Arc::new(Inner {
            registry,
            connections,
            compressed,
            rooms_local,
            joins,
            pushes,
            fanout_frames,
            presence_frames,
            script_seconds,
            redis_errors,
            pubsub_reconnects,
            pubsub_lag,
            pubsub_events,
            slow_closes,
            closes,
            heartbeat_rooms,
            recoveries,
            hook_requests,
            hook_seconds,
            hook_events,
            ready,
            upgrade_seconds,
            upgrades_shed,
        }))
    }

    pub fn connection_opened(&self, signed_in: bool) {
        self.0
            .connections
            .with_label_values(&[kind(signed_in)])
            .inc();
    }
    pub fn connection_closed(&self, signed_in: bool, code: u16) {
        self.0
            .connections
            .with_label_values(&[kind(signed_in)])
            .dec();
        self.0.closes.with_label_values(&[close_label(code)]).inc();
    }
    /// A socket that negotiated permessage-deflate opened (`+1`) or closed (`-1`).
    pub fn compressed_connection(&self, delta: i64) {
        self.0.compressed.add(delta);
    }
    pub fn rooms_local(&self, n: usize) {
        self.0.rooms_local.set(n as i64);
    }
    pub fn join(&self, result: &'static str) {
        self.0.joins.with_label_values(&[result]).inc();
    }
    pub fn push(&self, result: &'static str) {
        self.0.pushes.with_label_values(&[result]).inc();
    }
    pub fn fanout(&self, frames: usize) {
        self.0.fanout_frames.inc_by(frames as u64);
    }
    pub fn presence_frames(&self, event: &'static str, frames: usize) {
        self.0
            .presence_frames
            .with_label_values(&[event])
            .inc_by(frames as u64);
    }
    pub fn script_timer(&self, script: &'static str) -> HistogramTimer {
        self.0
            .script_seconds
            .with_label_values(&[script])
            .start_timer()
    }
    pub fn redis_error(&self, op: &'static str) {
        self.0.redis_errors.with_label_values(&[op]).inc();
    }
    pub fn pubsub_reconnect(&self) {
        self.0.pubsub_reconnects.inc();
    }
    /// One of [`pubsub_event::ALL`].
    pub fn pubsub_event(&self, event: &'static str) {
        self.0.pubsub_events.with_label_values(&[event]).inc();
    }
    pub fn pubsub_lag(&self, secs: f64) {
        self.0.pubsub_lag.observe(secs);
    }
    pub fn slow_consumer(&self) {
        self.0.slow_closes.inc();
    }
    pub fn heartbeat_rooms(&self, n: usize) {
        self.0.heartbeat_rooms.set(n as i64);
    }
    pub fn recovery(&self, outcome: &'static str) {
        self.0.recoveries.with_label_values(&[outcome]).inc();
    }
    /// One hook request's outcome (`hook_kind`, `hook_outcome`).
    pub fn hook_request(&self, hook: &'static str, outcome: &'static str) {
        self.0
            .hook_requests
            .with_label_values(&[hook, outcome])
            .inc();
    }
    pub fn hook_duration(&self, hook: &'static str, secs: f64) {
        self.0.hook_seconds.with_label_values(&[hook]).observe(secs);
    }
    /// Events of the events hook by delivery result (`hook_event_result`).
    pub fn hook_events(&self, result: &'static str, n: usize) {
        self.0
            .hook_events
            .with_label_values(&[result])
            .inc_by(n as u64);
    }
    /// The readiness `/metrics` just evaluated, so an alert can see a node that is up but not
    /// ready (a scrape of a dead node fails instead: Prometheus' `up`).
    /// A completed upgrade: `accept` and `request` seconds since its connection was accepted
    /// and since its request arrived.
    pub fn upgrade_seconds(&self, accept: f64, request: f64) {
        let h = &self.0.upgrade_seconds;
        h.with_label_values(&[upgrade_phase::ACCEPT])
            .observe(accept);
        h.with_label_values(&[upgrade_phase::REQUEST])
            .observe(request);
    }
    /// An upgrade refused by `server.max_pending_upgrades`.
    pub fn upgrade_shed(&self) {
        self.0.upgrades_shed.inc();
    }
    pub fn ready(&self, ready: bool) {
        self.0.ready.set(i64::from(ready));
    }

    /// The text exposition format.
    pub fn render(&self) -> (String, Vec<u8>) {
        let enc = TextEncoder::new();
        let mut buf = Vec::new();
        if let Err(e) = enc.encode(&self.0.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        (enc.format_type().to_string(), buf)
    }
}

/// Creates the series of each label value (at zero).
fn init<T: prometheus::core::MetricVecBuilder>(
    vec: &prometheus::core::MetricVec<T>,
    values: &[&str],
) {
    for v in values {
        vec.with_label_values(&[v]);
    }
}

fn kind(signed_in: bool) -> &'static str {
    if signed_in {
        conn_kind::SIGNED_IN
    } else {
        conn_kind::ANONYMOUS
    }
}

/// Close codes as a closed label set: always a member of [`close_code::ALL`].
fn close_label(code: u16) -> &'static str {
    use crate::protocol::close;
    match code {
        1000 => "1000",
        1001 => "1001",
        1002 => "1002",
        1005 => "1005",
        1006 => "1006",
        close::MALFORMED => "1007",
        close::TOO_BIG => "1009",
        close::INTERNAL => "1011",
        close::RESTART => "1012",
        close::IDLE_TIMEOUT => "4000",
        // token expired in an open session (DESIGN §10)
        close::TOKEN_EXPIRED => "4001",
        // disconnected by an operator (DESIGN §11)
        close::DISCONNECTED => "4003",
        close::SLOW_CONSUMER => "4008",
        close::REFUSED_JOINS => "4009",
        _ => close_code::OTHER,
    }
}

#[cfg(test)]
mod tests;
