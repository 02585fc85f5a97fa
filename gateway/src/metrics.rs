//! Metric families, registered once in one registry and served as Prometheus text on the admin
//! port. Names are `gateway_<subsystem>_<name>`; every label comes from a closed set (never a room
//! or user id), so the series count is fixed whatever the traffic.

use std::sync::Arc;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramTimer, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Label values of `gateway_joins_total{result}`.
pub mod join_result {
    pub const OK: &str = "ok";
    pub const NO_ROOM: &str = "no_room";
    pub const INVALID: &str = "invalid";
    pub const UNAVAILABLE: &str = "unavailable";
    pub const REFUSED: &str = "refused";
}

/// Label values of `gateway_pushes_total{result}`.
pub mod push_result {
    pub const OK: &str = "ok";
    pub const NOT_SIGNED_IN: &str = "not_signed_in";
    pub const UNKNOWN_EVENT: &str = "unknown_event";
    pub const INVALID: &str = "invalid";
    pub const UNAVAILABLE: &str = "unavailable";
}

struct Inner {
    registry: Registry,
    connections: IntGaugeVec,
    rooms_local: IntGauge,
    joins: IntCounterVec,
    pushes: IntCounterVec,
    fanout_frames: IntCounter,
    presence_frames: IntCounterVec,
    script_seconds: HistogramVec,
    redis_errors: IntCounterVec,
    pubsub_reconnects: IntCounter,
    pubsub_lag: Histogram,
    slow_closes: IntCounter,
    closes: IntCounterVec,
    heartbeat_rooms: IntGauge,
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
        let build = must(IntGaugeVec::new(
            Opts::new("gateway_build_info", "Build information"),
            &["version"],
        ));
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        reg(Box::new(connections.clone()));
        reg(Box::new(rooms_local.clone()));
        reg(Box::new(joins.clone()));
        reg(Box::new(pushes.clone()));
        reg(Box::new(fanout_frames.clone()));
        reg(Box::new(presence_frames.clone()));
        reg(Box::new(script_seconds.clone()));
        reg(Box::new(redis_errors.clone()));
        reg(Box::new(pubsub_reconnects.clone()));
        reg(Box::new(pubsub_lag.clone()));
        reg(Box::new(slow_closes.clone()));
        reg(Box::new(closes.clone()));
        reg(Box::new(heartbeat_rooms.clone()));
        reg(Box::new(build));
        #[cfg(target_os = "linux")]
        reg(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
        // Pre-create the closed label sets so every series exists from the first scrape.
        for k in ["signed_in", "anonymous"] {
            connections.with_label_values(&[k]);
        }
        for r in [
            join_result::OK,
            join_result::NO_ROOM,
            join_result::INVALID,
            join_result::UNAVAILABLE,
            join_result::REFUSED,
        ] {
            joins.with_label_values(&[r]);
        }
        for r in [
            push_result::OK,
            push_result::NOT_SIGNED_IN,
            push_result::UNKNOWN_EVENT,
            push_result::INVALID,
            push_result::UNAVAILABLE,
        ] {
            pushes.with_label_values(&[r]);
        }
        for e in ["presence_state", "presence_diff", "presence_count"] {
            presence_frames.with_label_values(&[e]);
        }
        for s in ["join", "leave", "heartbeat", "snapshot", "sync"] {
            script_seconds.with_label_values(&[s]);
            redis_errors.with_label_values(&[s]);
        }
        for op in ["publish", "ping", "node_record"] {
            redis_errors.with_label_values(&[op]);
        }
        redis_errors.with_label_values(&["pubsub"]);
        Metrics(Arc::new(Inner {
            registry,
            connections,
            rooms_local,
            joins,
            pushes,
            fanout_frames,
            presence_frames,
            script_seconds,
            redis_errors,
            pubsub_reconnects,
            pubsub_lag,
            slow_closes,
            closes,
            heartbeat_rooms,
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
    pub fn pubsub_lag(&self, secs: f64) {
        self.0.pubsub_lag.observe(secs);
    }
    pub fn slow_consumer(&self) {
        self.0.slow_closes.inc();
    }
    pub fn heartbeat_rooms(&self, n: usize) {
        self.0.heartbeat_rooms.set(n as i64);
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

fn kind(signed_in: bool) -> &'static str {
    if signed_in { "signed_in" } else { "anonymous" }
}

/// Close codes as a closed label set.
fn close_label(code: u16) -> &'static str {
    use crate::protocol::close;
    match code {
        1000 => "1000",
        1001 => "1001",
        1005 => "1005",
        1006 => "1006",
        close::MALFORMED => "1007",
        close::TOO_BIG => "1009",
        close::INTERNAL => "1011",
        close::RESTART => "1012",
        close::IDLE_TIMEOUT => "4000",
        close::SLOW_CONSUMER => "4008",
        close::REFUSED_JOINS => "4009",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_without_ids() {
        let m = Metrics::new();
        m.connection_opened(true);
        m.join(join_result::OK);
        let (ty, body) = m.render();
        assert!(ty.starts_with("text/plain"));
        let text = String::from_utf8(body).unwrap();
        for name in [
            "gateway_connections{kind=\"signed_in\"} 1",
            "gateway_joins_total{result=\"ok\"} 1",
            "gateway_build_info",
            "gateway_redis_script_duration_seconds_bucket",
            "gateway_pubsub_reconnects_total 0",
        ] {
            assert!(text.contains(name), "missing {name}");
        }
    }
}
