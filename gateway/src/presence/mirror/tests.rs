use super::*;

fn meta(user: &str) -> Meta {
    Meta {
        user_id: user.into(),
        username: format!("name-{user}"),
        online_at: 1,
        node: "n".into(),
    }
}

fn env(seq: u64, anon: u64, joins: &[(&str, &str)], leaves: &[&str]) -> Envelope {
    Envelope {
        seq,
        anon,
        joins: joins
            .iter()
            .map(|(c, u)| (c.to_string(), meta(u)))
            .collect(),
        leaves: leaves.iter().map(|s| s.to_string()).collect(),
    }
}

fn synced(seq: u64, anon: u64, metas: &[(&str, &str)]) -> Mirror {
    let mut m = Mirror::default();
    m.install(Snapshot {
        seq,
        anon,
        metas: metas
            .iter()
            .map(|(c, u)| (c.to_string(), meta(u)))
            .collect(),
    });
    m
}

fn state(m: &mut Mirror) -> Value {
    serde_json::from_slice(&m.state_payload(1000)).unwrap()
}

#[test]
fn first_snapshot_is_the_announced_state() {
    let mut m = synced(10, 2, &[("n.1", "u1"), ("n.2", "u1"), ("n.3", "u2")]);
    let s = state(&mut m);
    assert_eq!(s["u1"]["metas"].as_array().unwrap().len(), 2);
    assert_eq!(s["u2"]["metas"][0]["phx_ref"], "n.3");
    assert_eq!(s[""]["metas"], json!([{"phx_ref":"a1"},{"phx_ref":"a2"}]));
    assert_eq!(m.users(), 2);
    assert!(!m.has_pending(2, 1000));
    assert_eq!(m.take_diff(2, 1000), None);
}

#[test]
fn applies_in_order_and_detects_gaps() {
    let mut m = synced(10, 0, &[]);
    assert_eq!(m.apply(env(10, 0, &[("n.1", "u1")], &[])), Applied::Stale);
    assert_eq!(m.apply(env(11, 0, &[("n.1", "u1")], &[])), Applied::Changed);
    assert_eq!(m.seq(), 11);
    assert_eq!(m.apply(env(13, 0, &[], &[])), Applied::Gap);
    assert!(!m.is_synced());
    assert_eq!(m.apply(env(14, 1, &[], &["n.1"])), Applied::Buffered);
    // re-snapshot at 13; 14 is applied from the buffer
    let r = m.install(Snapshot {
        seq: 13,
        anon: 0,
        metas: [("n.1".to_string(), meta("u1"))].into(),
    });
    assert_eq!(r, Applied::Changed);
    assert_eq!(m.seq(), 14);
    assert_eq!(m.connections(), 0);
    assert_eq!(m.anon(), 1);
}

#[test]
fn diffs_coalesce_joins_and_leaves() {
    let mut m = synced(1, 0, &[("n.1", "u1")]);
    m.apply(env(2, 3, &[("n.2", "u2")], &[]));
    m.apply(env(3, 3, &[("n.3", "u3")], &[]));
    m.apply(env(4, 5, &[], &["n.3", "n.1"])); // n.3 joined and left within the window
    // the announced view is unchanged until the flush
    let s = state(&mut m);
    assert!(s.get("u1").is_some() && s.get("u2").is_none() && s.get("").is_none());
    let d = m.take_diff(5, 1000).unwrap();
    assert_eq!(d["joins"]["u2"]["metas"][0]["phx_ref"], "n.2");
    assert!(d["joins"].get("u3").is_none() && d["leaves"].get("u3").is_none());
    assert_eq!(d["leaves"]["u1"]["metas"][0]["phx_ref"], "n.1");
    let anon: Vec<_> = d["joins"][""]["metas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["phx_ref"].clone())
        .collect();
    assert_eq!(
        anon,
        vec![
            json!("a1"),
            json!("a2"),
            json!("a3"),
            json!("a4"),
            json!("a5")
        ]
    );
    assert_eq!(m.take_diff(5, 1000), None);
    // now state shows the new view
    let s = state(&mut m);
    assert!(s.get("u1").is_none() && s.get("u2").is_some());
    assert_eq!(s[""]["metas"].as_array().unwrap().len(), 5);
}

#[test]
fn anonymous_stack_shrinks_from_the_top_and_is_capped() {
    let mut m = synced(1, 5, &[]);
    let d = m.take_diff(2, 1000).unwrap();
    assert_eq!(
        d["leaves"][""]["metas"],
        json!([{"phx_ref":"a3"},{"phx_ref":"a4"},{"phx_ref":"a5"}])
    );
    assert!(d["joins"].as_object().unwrap().is_empty());
    // above the cap nothing changes on the wire
    let d = m.take_diff(10, 4).unwrap();
    assert_eq!(d["joins"][""]["metas"].as_array().unwrap().len(), 2); // a3, a4
    assert_eq!(m.take_diff(20, 4), None);
    assert_eq!(
        serde_json::from_slice::<Value>(&m.state_payload(4)).unwrap()[""]["metas"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
}

#[test]
fn a_connection_changing_user_leaves_the_old_key() {
    let mut m = synced(1, 0, &[("n.1", "u1")]);
    m.apply(env(2, 0, &[], &["n.1"]));
    m.apply(env(3, 0, &[("n.1", "u2")], &[]));
    let d = m.take_diff(0, 1000).unwrap();
    assert_eq!(d["leaves"]["u1"]["metas"][0]["phx_ref"], "n.1");
    assert_eq!(d["joins"]["u2"]["metas"][0]["phx_ref"], "n.1");
}

#[test]
fn zero_anonymous_is_no_key() {
    let mut m = synced(1, 0, &[]);
    assert_eq!(state(&mut m), json!({}));
}

#[test]
fn resnapshot_differences_become_the_next_diff() {
    let mut m = synced(1, 0, &[("n.1", "u1"), ("n.2", "u2")]);
    m.begin_resync();
    m.install(Snapshot {
        seq: 9,
        anon: 0,
        metas: [
            ("n.2".to_string(), meta("u2")),
            ("n.3".to_string(), meta("u3")),
        ]
        .into(),
    });
    let d = m.take_diff(0, 1000).unwrap();
    assert_eq!(d["leaves"]["u1"]["metas"][0]["phx_ref"], "n.1");
    assert_eq!(d["joins"]["u3"]["metas"][0]["phx_ref"], "n.3");
    assert!(d["joins"].get("u2").is_none());
}

/// The announced view built as a `serde_json::Value` tree (the way `state_payload` built it
/// before it wrote bytes directly), each user's metas in `phx_ref` order.
fn state_as_tree(m: &Mirror, cap: u64) -> Vec<u8> {
    let mut state = Map::new();
    let mut rows: Vec<(&Arc<str>, &Meta)> = Vec::new();
    for (conn, meta) in &m.metas {
        match m.dirty.get(conn) {
            None => rows.push((conn, meta)),
            Some(Some(before)) => rows.push((conn, before)),
            Some(None) => {}
        }
    }
    for (conn, before) in &m.dirty {
        if let (Some(b), false) = (before, m.metas.contains_key(conn)) {
            rows.push((conn, b));
        }
    }
    rows.sort_by(|a, b| a.0.cmp(b.0));
    for (conn, meta) in rows {
        add_meta(&mut state, conn, meta);
    }
    let n = m.anon_announced.min(cap);
    if n > 0 {
        state.insert(String::new(), anon_metas(1, n));
    }
    serde_json::to_vec(&Value::Object(state)).unwrap()
}

#[test]
fn state_bytes_are_what_the_value_tree_serialised_to() {
    let odd = |user: &str, name: &str| Meta {
        user_id: user.into(),
        username: name.into(),
        online_at: -17,
        node: "n".into(),
    };
    let mut m = Mirror::default();
    m.install(Snapshot {
        seq: 1,
        anon: 3,
        metas: [
            ("n.1".to_string(), meta("u1")),
            ("n.2".to_string(), meta("u1")),
            ("n.10".to_string(), meta("u1")),
            ("n.3".to_string(), odd("\"quoted\" \\ é", "tab\there \u{1}")),
            ("n.4".to_string(), odd("Z", "zed")),
            ("n.5".to_string(), odd("a", "ä")),
        ]
        .into(),
    });
    for cap in [1000, 2, 0] {
        m.state_cache = None;
        assert_eq!(
            String::from_utf8(m.state_payload(cap).to_vec()).unwrap(),
            String::from_utf8(state_as_tree(&m, cap)).unwrap(),
            "cap {cap}"
        );
    }
    // pending changes (not announced yet): a join, a leave, a user change
    m.apply(env(2, 5, &[("n.6", "u6")], &["n.4"]));
    m.apply(env(3, 5, &[("n.5", "u7")], &["n.5"]));
    m.state_cache = None;
    let bytes = m.state_payload(1000);
    assert_eq!(bytes.as_ref(), state_as_tree(&m, 1000).as_slice());
    let s: Value = serde_json::from_slice(&bytes).unwrap();
    assert!(
        s.get("u6").is_none() && s.get("Z").is_some() && s["a"]["metas"][0]["phx_ref"] == "n.5"
    );
    // after the flush the new view, and an empty room is `{}`
    m.take_diff(5, 1000);
    assert_eq!(
        m.state_payload(1000).as_ref(),
        state_as_tree(&m, 1000).as_slice()
    );
    assert_eq!(Mirror::default().state_payload(1000).as_ref(), b"{}");
}
