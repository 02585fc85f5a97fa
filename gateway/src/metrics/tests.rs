//! Tests of the metric families: rendering without ids, every label value exported at zero, and
//! labels (constants and literals at call sites across `src/`) within their closed sets.

use super::*;
use std::collections::{BTreeMap, BTreeSet};

/// Every labelled family and the closed set of its one label.
const CLOSED_SETS: [(&str, &str, &[&str]); 14] = [
    ("gateway_connections", "kind", &conn_kind::ALL),
    ("gateway_joins_total", "result", &join_result::ALL),
    ("gateway_pushes_total", "result", &push_result::ALL),
    (
        "gateway_presence_frames_total",
        "event",
        &presence_event::ALL,
    ),
    ("gateway_closes_total", "code", &close_code::ALL),
    (
        "gateway_redis_script_duration_seconds",
        "script",
        &script::ALL,
    ),
    ("gateway_redis_errors_total", "op", &redis_op::ALL),
    (
        "gateway_pubsub_interruptions_total",
        "event",
        &pubsub_event::ALL,
    ),
    (
        "gateway_history_recoveries_total",
        "outcome",
        &recovery_outcome::ALL,
    ),
    // two labels: each checked as its own closed set, their product below
    ("gateway_hook_requests_total", "hook", &hook_kind::ALL),
    ("gateway_hook_requests_total", "outcome", &hook_outcome::ALL),
    ("gateway_hook_duration_seconds", "hook", &hook_kind::ALL),
    ("gateway_upgrade_seconds", "phase", &upgrade_phase::ALL),
    (
        "gateway_hook_events_total",
        "result",
        &hook_event_result::ALL,
    ),
];

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
        "gateway_ready 0",
    ] {
        assert!(text.contains(name), "missing {name}");
    }
}

#[test]
fn fresh_metrics_export_every_label_value_at_zero() {
    let text = String::from_utf8(Metrics::new().render().1).unwrap();
    for hook in hook_kind::ALL {
        for outcome in hook_outcome::ALL {
            let line =
                format!("gateway_hook_requests_total{{hook=\"{hook}\",outcome=\"{outcome}\"}} 0\n");
            assert!(text.contains(&line), "fresh /metrics lacks {line:?}");
        }
    }
    for (family, label, values) in CLOSED_SETS {
        if family == "gateway_hook_requests_total" {
            continue;
        }
        // a histogram's series show in its _count
        let sample = if family.ends_with("_seconds") {
            format!("{family}_count")
        } else {
            family.to_string()
        };
        for v in values {
            let line = format!("{sample}{{{label}=\"{v}\"}} 0\n");
            assert!(text.contains(&line), "fresh /metrics lacks {line:?}");
        }
    }
    // ...and every labelled family is one of those, with exactly its closed set
    let m = Metrics::new();
    let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for fam in m.0.registry.gather() {
        for metric in fam.get_metric() {
            for pair in metric.get_label() {
                seen.entry(format!("{}{{{}}}", fam.name(), pair.name()))
                    .or_default()
                    .insert(pair.value().to_string());
            }
        }
    }
    seen.remove("gateway_build_info{version}");
    let want: BTreeMap<String, BTreeSet<String>> = CLOSED_SETS
        .iter()
        .map(|(f, l, vs)| {
            (
                format!("{f}{{{l}}}"),
                vs.iter().map(|v| v.to_string()).collect(),
            )
        })
        .collect();
    assert_eq!(seen, want);
}

#[test]
fn close_label_maps_into_its_closed_set() {
    let mut produced = BTreeSet::new();
    for code in 0..=u16::MAX {
        let l = close_label(code);
        assert!(close_code::ALL.contains(&l), "{code} → {l}");
        produced.insert(l);
    }
    for l in close_code::ALL {
        assert!(produced.contains(l), "no close code maps to {l}");
    }
    let m = Metrics::new();
    m.connection_opened(false);
    m.connection_closed(false, 4001);
    let text = String::from_utf8(m.render().1).unwrap();
    assert!(text.contains("gateway_closes_total{code=\"4001\"} 1\n"));
    assert!(text.contains("gateway_connections{kind=\"anonymous\"} 0\n"));
}

/// Every label constant declared in this file's label modules is in its module's `ALL`.
#[test]
fn every_label_constant_is_in_its_set() {
    let sets: BTreeMap<&str, &[&str]> = [
        ("conn_kind", &conn_kind::ALL[..]),
        ("join_result", &join_result::ALL[..]),
        ("push_result", &push_result::ALL[..]),
        ("presence_event", &presence_event::ALL[..]),
        ("script", &script::ALL[..]),
        ("redis_op", &redis_op::ALL[..]),
        ("close_code", &close_code::ALL[..]),
        ("pubsub_event", &pubsub_event::ALL[..]),
        ("recovery_outcome", &recovery_outcome::ALL[..]),
        ("hook_kind", &hook_kind::ALL[..]),
        ("hook_outcome", &hook_outcome::ALL[..]),
        ("hook_event_result", &hook_event_result::ALL[..]),
        ("upgrade_phase", &upgrade_phase::ALL[..]),
    ]
    .into_iter()
    .collect();
    let src = include_str!("../metrics.rs");
    let src = &src[..src.find("#[cfg(test)]").unwrap()];
    let mut modules = 0;
    for block in src.split("\npub mod ").skip(1) {
        let name = block.split_whitespace().next().unwrap();
        let body = &block[..block.find("\n}").unwrap()];
        let set = sets
            .get(name)
            .unwrap_or_else(|| panic!("label module {name} is not checked here"));
        modules += 1;
        for line in body.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("pub const ")
                && !rest.starts_with("ALL")
            {
                let value = rest.split('"').nth(1).expect("a string constant");
                assert!(set.contains(&value), "{name}: {value} is not in ALL");
            }
        }
    }
    assert_eq!(modules, sets.len());
}

/// The label values written as literals at the call sites (`presence_frames("…")`,
/// `script_timer("…")`, `redis_error("…")`, `command::<_>("…")`, `run("…")`) anywhere in
/// `src/` are members of the closed sets, so none of them is missing from start-up.
#[test]
fn call_site_literals_are_in_the_closed_sets() {
    fn sources(dir: &std::path::Path, out: &mut Vec<(String, String)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                sources(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push((
                    p.display().to_string(),
                    std::fs::read_to_string(&p).unwrap(),
                ));
            }
        }
    }
    /// The string literal right after each `needle` (call sites passing a variable are skipped).
    fn literals<'a>(src: &'a str, needle: &str, generic: bool) -> Vec<&'a str> {
        let mut out = Vec::new();
        for (i, _) in src.match_indices(needle) {
            let mut rest = &src[i + needle.len()..];
            if generic {
                // command::<T>("op", …)
                let Some(j) = rest.find(">(") else { continue };
                rest = &rest[j + 2..];
            }
            if let Some(lit) = rest.strip_prefix('"') {
                out.push(&lit[..lit.find('"').unwrap()]);
            }
        }
        out
    }
    let mut files = Vec::new();
    sources(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    let checks: [(&str, bool, &[&str]); 5] = [
        ("presence_frames(", false, &presence_event::ALL),
        ("script_timer(", false, &script::ALL),
        (".run(", false, &script::ALL),
        ("redis_error(", false, &redis_op::ALL),
        ("command::<", true, &redis_op::ALL),
    ];
    let mut found = 0;
    for (path, src) in &files {
        // the module and these tests name the calls in prose
        if path.ends_with("metrics.rs") || path.ends_with("metrics/tests.rs") {
            continue;
        }
        for (needle, generic, set) in checks {
            for lit in literals(src, needle, generic) {
                found += 1;
                assert!(
                    set.contains(&lit),
                    "{path}: {needle}\"{lit}\" is not in its closed set"
                );
            }
        }
    }
    // the scan does see the call sites (fan-out passes literals)
    assert!(found >= 5, "only {found} literal call sites found");
}
