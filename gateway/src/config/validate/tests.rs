use super::*;
use crate::config::env;

#[test]
fn hooks_need_a_url_a_long_secret_and_sane_bounds() {
    let e = |pairs: &[(&str, &str)]| {
        Config::from_toml_and_env("", "t", &env(pairs))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let secret = "s".repeat(32);
    let url = ("GATEWAY_HOOKS_PUBLISH_URL", "http://app.internal/hook");
    assert!(e(&[url]).contains("hooks.secret"), "{}", e(&[url]));
    assert!(e(&[url, ("GATEWAY_HOOKS_SECRET", "short")]).contains("at least 32"));
    assert!(
        e(&[
            ("GATEWAY_HOOKS_PUBLISH_URL", "ftp://x/"),
            ("GATEWAY_HOOKS_SECRET", &secret)
        ])
        .contains("hooks.publish_url")
    );
    assert!(
        e(&[
            url,
            ("GATEWAY_HOOKS_SECRET", &secret),
            ("GATEWAY_HOOKS_MAX_IN_FLIGHT", "0")
        ])
        .contains("hooks.max_in_flight")
    );
    assert!(
        e(&[
            url,
            ("GATEWAY_HOOKS_SECRET", &secret),
            ("GATEWAY_HOOKS_TIMEOUT_MS", "0")
        ])
        .contains("hooks.timeout_ms")
    );
    assert!(
        e(&[
            url,
            ("GATEWAY_HOOKS_SECRET", &secret),
            ("GATEWAY_HOOKS_PUBLISH_EVENTS", "[\"phx_join\"]")
        ])
        .contains("reserved")
    );
    let c = Config::from_toml_and_env(
        "",
        "t",
        &env(&[
            url,
            ("GATEWAY_HOOKS_SECRET", &secret),
            ("GATEWAY_HOOKS_PUBLISH_EVENTS", "[\"new_msg\", \"typing\"]"),
        ]),
    )
    .expect("valid hooks");
    assert_eq!(c.hooks.publish_events, ["new_msg", "typing"]);
    assert_eq!(c.hooks_secret().unwrap(), Some(secret.clone()));
    assert!(
        !c.to_masked_toml().contains(&secret),
        "the secret is masked"
    );
    // off by default: no URL, no secret needed
    let d = Config::default();
    assert_eq!(d.hooks.publish_url, None);
    assert_eq!(d.hooks.publish_events, ["new_msg"]);
    assert_eq!((d.hooks.timeout_ms, d.hooks.max_in_flight), (2000, 1024));
}

#[test]
fn the_events_hook_needs_a_url_a_secret_and_sane_batches() {
    let e = |pairs: &[(&str, &str)]| {
        Config::from_toml_and_env("", "t", &env(pairs))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let secret = "s".repeat(32);
    let url = ("GATEWAY_HOOKS_EVENTS_URL", "http://app.internal/events");
    let sec = ("GATEWAY_HOOKS_SECRET", secret.as_str());
    assert!(e(&[url]).contains("hooks.secret"), "{}", e(&[url]));
    assert!(e(&[("GATEWAY_HOOKS_EVENTS_URL", "app/events"), sec]).contains("hooks.events_url"));
    for (key, bad) in [
        ("GATEWAY_HOOKS_EVENTS_BATCH", "0"),
        ("GATEWAY_HOOKS_EVENTS_INTERVAL_MS", "0"),
        ("GATEWAY_HOOKS_EVENTS_RETRY_S", "100000"),
        ("GATEWAY_HOOKS_TIMEOUT_MS", "5"),
    ] {
        let want = key
            .trim_start_matches("GATEWAY_HOOKS_")
            .to_ascii_lowercase();
        assert!(e(&[url, sec, (key, bad)]).contains(&want), "{key}={bad}");
    }
    let c = Config::from_toml_and_env(
        "",
        "t",
        &env(&[url, sec, ("GATEWAY_HOOKS_EVENTS_RETRY_S", "0")]),
    )
    .expect("valid events hook");
    assert_eq!(c.hooks.events_retry(), std::time::Duration::ZERO);
    // off by default, with the documented defaults
    let d = Config::default();
    assert_eq!(d.hooks.events_url, None);
    assert_eq!(
        (
            d.hooks.events_batch,
            d.hooks.events_interval_ms,
            d.hooks.events_retry_s
        ),
        (100, 200, 60)
    );
}

#[test]
fn tls_and_sentinel_settings_are_checked_at_start() {
    let e = |toml: &str| {
        Config::from_toml_and_env(toml, "t", &[])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    // a certificate without its key, and the other way round
    let cert_only = "[redis]\nurl = \"rediss://h:1\"\ntls_cert_file = \"/x.crt\"\n";
    assert!(
        e(cert_only).contains("redis.tls_cert_file"),
        "{}",
        e(cert_only)
    );
    let key_only = "[redis]\nurl = \"rediss://h:1\"\ntls_key_file = \"/x.key\"\n";
    assert!(
        e(key_only).contains("redis.tls_key_file"),
        "{}",
        e(key_only)
    );
    let no_ca = "[redis]\nurl = \"rediss://h:1\"\ntls_ca_file = \"/nonexistent.pem\"\n";
    assert!(e(no_ca).contains("redis.tls_ca_file"), "{}", e(no_ca));
    // master credentials belong to sentinel mode; several sentinels are a list
    let stray = "[redis]\nmaster_password = \"p\"\n";
    assert!(e(stray).contains("redis.master_password"), "{}", e(stray));
    let c = Config::from_toml_and_env(
        "[redis]\nmode = \"sentinel\"\nurl = \"redis://a:26379,redis://:pw@b:26379\"\nmaster_password = \"mpw\"\n",
        "t",
        &[],
    )
    .expect("sentinel settings");
    assert_eq!(c.redis.sentinel_master, "mymaster");
    assert_eq!(c.redis.urls().len(), 2);
    assert_eq!(
        redact_url("redis://u:p1@a:1,redis://:p2@b:2"),
        "redis://u:***@a:1,redis://:***@b:2"
    );
}

#[test]
fn listen_addresses_are_checked() {
    for (addr, ok) in [
        ("0.0.0.0:4000", true),
        ("127.0.0.1:0", true),
        ("localhost:4000", true),
        ("gateway-0.gateway.svc:4000", true),
        ("[::]:4000", true),
        ("[::1]:4001", true),
        ("0.0.0.0:99999", false),
        ("localhost:99999", false),
        ("localhost", false),
        ("4000", false),
        (":4000", false),
        ("999.1.1.1:4000", false),
        ("my host:4000", false),
        ("[::g]:4000", false),
    ] {
        for (var, other) in [
            ("GATEWAY_SERVER_LISTEN", "GATEWAY_ADMIN_LISTEN"),
            ("GATEWAY_ADMIN_LISTEN", "GATEWAY_SERVER_LISTEN"),
        ] {
            let r =
                Config::from_toml_and_env("", "t", &env(&[(var, addr), (other, "127.0.0.1:0")]));
            assert_eq!(r.is_ok(), ok, "{var}={addr}: {r:?}");
            if let Err(e) = r {
                let e = e.to_string();
                let key = if var.contains("ADMIN") {
                    "admin.listen"
                } else {
                    "server.listen"
                };
                assert!(e.contains(key) && e.contains(var), "{e}");
            }
        }
    }
    let e = Config::from_toml_and_env(
        "",
        "t",
        &env(&[
            ("GATEWAY_SERVER_LISTEN", "127.0.0.1:4000"),
            ("GATEWAY_ADMIN_LISTEN", "127.0.0.1:4000"),
        ]),
    )
    .unwrap_err();
    assert!(e.to_string().contains("own port"), "{e}");
}

#[test]
fn bad_values_are_errors() {
    let e = Config::from_toml_and_env("", "t", &env(&[("GATEWAY_PRESENCE_TTL_MS", "soon")]))
        .unwrap_err();
    assert!(e.to_string().contains("GATEWAY_PRESENCE_TTL_MS"), "{e}");
    let e = Config::from_toml_and_env(
        "[presence]\nttl_ms = 1000\nheartbeat_interval_ms = 1000\n",
        "t",
        &[],
    )
    .unwrap_err();
    assert!(e.to_string().contains("presence.ttl_ms"), "{e}");
    assert!(Config::from_toml_and_env("[auth]\nalgorithm = \"none\"\n", "t", &[]).is_err());
    assert!(Config::from_toml_and_env("[auth]\nalgorithm = \"RS256\"\n", "t", &[]).is_err());
    for (toml, key) in [
        ("[auth]\njwks_url = \"https://idp/jwks\"\n", "auth.jwks_url"),
        (
            "[auth]\nalgorithm = \"RS256\"\njwks_url = \"idp/jwks\"\n",
            "auth.jwks_url",
        ),
        (
            "[auth]\nalgorithm = \"RS256\"\njwks_url = \"https://idp/jwks\"\npublic_key_file = \"/k\"\n",
            "auth.jwks_url",
        ),
        (
            "[auth]\nalgorithm = \"ES256\"\njwks_url = \"https://idp/jwks\"\njwks_min_refresh_s = 0\n",
            "auth.jwks_refresh_s",
        ),
    ] {
        let e = Config::from_toml_and_env(toml, "t", &[]).unwrap_err();
        assert!(e.to_string().contains(key), "{toml}: {e}");
    }
    let c = Config::from_toml_and_env(
        "[auth]\nalgorithm = \"RS256\"\n",
        "t",
        &env(&[(
            "GATEWAY_AUTH_JWKS_URL",
            "https://idp.example/.well-known/jwks.json",
        )]),
    )
    .expect("RS256 with a JWKS URL");
    assert_eq!(
        (
            c.auth.jwks_refresh_s,
            c.auth.jwks_min_refresh_s,
            c.auth.jwks_fetch_timeout_ms
        ),
        (300, 30, 2000)
    );
    assert!(
        Config::from_toml_and_env("[rooms]\nclient_events = [\"presence_diff\"]\n", "t", &[])
            .is_err()
    );
    assert!(Config::from_toml_and_env("[redis]\nprefix = \"a b\"\n", "t", &[]).is_err());
}

#[test]
fn history_settings_are_checked() {
    let c = Config::from_toml_and_env("", "t", &[]).unwrap();
    assert_eq!((c.rooms.history_len, c.rooms.history_on_join), (100, 20));
    let e = Config::from_toml_and_env(
        "",
        "t",
        &env(&[
            ("GATEWAY_ROOMS_HISTORY_LEN", "10"),
            ("GATEWAY_ROOMS_HISTORY_ON_JOIN", "11"),
        ]),
    )
    .unwrap_err();
    assert!(e.to_string().contains("rooms.history_on_join"), "{e}");
    // worker threads: 0 (one per core) up to the cap
    for (v, ok) in [("0", true), ("1", true), ("1024", true), ("1025", false)] {
        let r = Config::from_toml_and_env("", "t", &env(&[("GATEWAY_SERVER_WORKER_THREADS", v)]));
        assert_eq!(r.is_ok(), ok, "worker_threads = {v}");
        if let Err(e) = r {
            assert!(e.to_string().contains("server.worker_threads"), "{e}");
        }
    }
    // history off: history_on_join does not matter
    let c =
        Config::from_toml_and_env("", "t", &env(&[("GATEWAY_ROOMS_HISTORY_LEN", "0")])).unwrap();
    assert_eq!(c.rooms.history_len, 0);
    let e = Config::from_toml_and_env("", "t", &env(&[("GATEWAY_ROOMS_HISTORY_LEN", "1000")]))
        .unwrap_err();
    assert!(e.to_string().contains("server.outbound_queue"), "{e}");
    Config::from_toml_and_env(
        "",
        "t",
        &env(&[
            ("GATEWAY_ROOMS_HISTORY_LEN", "1000"),
            ("GATEWAY_SERVER_OUTBOUND_QUEUE", "1016"),
        ]),
    )
    .unwrap();
}
