//! Loading: `config/gateway.toml` (or `--config PATH`) parsed, `GATEWAY_<SECTION>_<KEY>`
//! environment overrides applied with the type each setting has, then [`Config::validate`]. Every
//! error names the key and where its value came from (the file, or the variable that set it):
//! `blame` finds the one setting that does not deserialize.

use std::collections::BTreeMap;
use std::path::Path;

use super::{Config, ConfigError};

/// The sections, in the order `check-config` prints them. Env variables are matched against these.
const SECTIONS: [&str; 8] = [
    "server", "admin", "redis", "auth", "presence", "rooms", "hooks", "log",
];

/// `GATEWAY_*` variables that are not settings: the settings file (`--config`), the log filter's
/// short name (an alias of `GATEWAY_LOG_LEVEL`), the demo page's phoenix.js. Any other
/// `GATEWAY_<WORD>_...` must name a setting; a `GATEWAY_<WORD>` without `_` (e.g. the tests'
/// `GATEWAY_BIN`) is not a setting's shape and is left alone.
const NOT_SETTINGS: [&str; 3] = ["GATEWAY_CONFIG", "GATEWAY_LOG", "GATEWAY_PHOENIX_JS"];

impl Config {
    /// Loads `path` (when given or when the default `config/gateway.toml` exists), applies the
    /// process environment, and validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with_env(path, &env)
    }

    pub fn load_with_env(
        path: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<Self, ConfigError> {
        let default_path = Path::new("config/gateway.toml");
        let (text, origin) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|error| ConfigError::Read {
                    path: p.to_path_buf(),
                    error,
                })?,
                p.display().to_string(),
            ),
            None if default_path.exists() => (
                std::fs::read_to_string(default_path).map_err(|error| ConfigError::Read {
                    path: default_path.to_path_buf(),
                    error,
                })?,
                default_path.display().to_string(),
            ),
            None => (String::new(), "<defaults>".to_string()),
        };
        Self::from_toml_and_env(&text, &origin, env)
    }

    /// Parses TOML text, applies `GATEWAY_<SECTION>_<KEY>` overrides from `env`, validates.
    /// `origin` names the text in errors (a path, or `<defaults>`).
    pub fn from_toml_and_env(
        text: &str,
        origin: &str,
        env: &[(String, String)],
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        let file = format!("config file {origin}");
        let defaults =
            toml::Table::try_from(Config::default()).map_err(|e| ConfigError::Parse {
                path: origin.to_string(),
                message: e.to_string(),
            })?;
        // (section, key) → the variable that set it, so an error blames the variable
        let mut from_env: BTreeMap<(String, String), String> = BTreeMap::new();
        for (name, section, key, value) in settings_in_env(env)? {
            let default = defaults
                .get(section)
                .and_then(|s| s.as_table())
                .and_then(|s| s.get(&key));
            let parsed = env_value(default, value).map_err(|message| ConfigError::Setting {
                origin: format!("environment variable {name}"),
                key: format!("{section}.{key}"),
                message,
            })?;
            let sect = table
                .entry(section.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let Some(t) = sect.as_table_mut() else {
                return Err(ConfigError::Setting {
                    origin: file,
                    key: section.to_string(),
                    message: format!("must be a section ([{section}])"),
                });
            };
            t.insert(key.clone(), parsed);
            from_env.insert((section.to_string(), key), name.to_string());
        }
        let origin_of = |section: &str, key: &str| {
            from_env
                .get(&(section.to_string(), key.to_string()))
                .map(|v| format!("environment variable {v}"))
                .unwrap_or_else(|| file.clone())
        };
        let cfg: Config = match toml::Value::Table(table.clone()).try_into() {
            Ok(cfg) => cfg,
            Err(e) => {
                let e: toml::de::Error = e;
                return Err(blame(&table, &origin_of).unwrap_or(ConfigError::Parse {
                    path: origin.to_string(),
                    message: e.message().to_string(),
                }));
            }
        };
        cfg.validate().map_err(|e| match e {
            // a cross-field rule broken by a variable names the variable
            ConfigError::Invalid { key, message } => match key.split_once('.') {
                Some((section, k)) if from_env.contains_key(&(section.into(), k.into())) => {
                    ConfigError::Setting {
                        origin: origin_of(section, k),
                        key: key.to_string(),
                        message,
                    }
                }
                _ => ConfigError::Invalid { key, message },
            },
            other => other,
        })?;
        Ok(cfg)
    }
}

/// The settings variables of `env`: `(variable, section, key, value)`. `GATEWAY_LOG` is
/// `GATEWAY_LOG_LEVEL`'s short name (both set: an error). A `GATEWAY_<WORD>_...` variable whose
/// word is no section is an error, as a typo in a key is.
fn settings_in_env(
    env: &[(String, String)],
) -> Result<Vec<(&str, &'static str, String, &str)>, ConfigError> {
    let mut out = Vec::new();
    let has = |n: &str| env.iter().any(|(k, _)| k == n);
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("GATEWAY_") else {
            continue;
        };
        if name == "GATEWAY_LOG" {
            if has("GATEWAY_LOG_LEVEL") {
                return Err(ConfigError::Setting {
                    origin: "environment variables GATEWAY_LOG and GATEWAY_LOG_LEVEL".into(),
                    key: "log.level".into(),
                    message: "both are set: GATEWAY_LOG is the short name of GATEWAY_LOG_LEVEL; \
                              set one"
                        .into(),
                });
            }
            out.push((name.as_str(), "log", "level".to_string(), value.as_str()));
            continue;
        }
        if NOT_SETTINGS.contains(&name.as_str()) {
            continue;
        }
        let rest = rest.to_ascii_lowercase();
        let Some(section) = SECTIONS.iter().find(|s| rest.starts_with(&format!("{s}_"))) else {
            let Some((word, _)) = rest.split_once('_') else {
                continue; // not a settings variable's shape (e.g. GATEWAY_BIN used by the tests)
            };
            return Err(ConfigError::Setting {
                origin: format!("environment variable {name}"),
                key: word.to_string(),
                message: format!(
                    "no such section: GATEWAY_<SECTION>_<KEY> variables name a setting, with \
                     SECTION one of {}",
                    SECTIONS.join(", ")
                ),
            });
        };
        let key = rest[section.len() + 1..].to_string();
        out.push((name.as_str(), *section, key, value.as_str()));
    }
    Ok(out)
}

/// Finds the one setting that makes `table` not deserialize (an unknown section or key, a value
/// of the wrong type) by trying each on its own, so the error names it and where it came from.
fn blame(table: &toml::Table, origin_of: &dyn Fn(&str, &str) -> String) -> Option<ConfigError> {
    for (section, value) in table {
        if !SECTIONS.contains(&section.as_str()) {
            return Some(ConfigError::Setting {
                origin: origin_of(section, ""),
                key: section.clone(),
                message: format!("unknown section or key (sections: {})", SECTIONS.join(", ")),
            });
        }
        let Some(keys) = value.as_table() else {
            return Some(ConfigError::Setting {
                origin: origin_of(section, ""),
                key: section.clone(),
                message: format!("must be a section ([{section}])"),
            });
        };
        for (key, v) in keys {
            let one = toml::Table::from_iter([(
                section.clone(),
                toml::Value::Table(toml::Table::from_iter([(key.clone(), v.clone())])),
            )]);
            if let Err(e) = toml::Value::Table(one).try_into::<Config>() {
                return Some(ConfigError::Setting {
                    origin: origin_of(section, key),
                    key: format!("{section}.{key}"),
                    message: e.message().trim().to_string(),
                });
            }
        }
    }
    None
}

/// Converts an env string to a TOML value of the type the setting has: strings stay strings
/// (a numeric secret is still a secret), others are parsed as TOML literals (`5000`, `true`,
/// `["new_msg","typing"]`).
fn env_value(default: Option<&toml::Value>, raw: &str) -> Result<toml::Value, String> {
    match default {
        None | Some(toml::Value::String(_)) => Ok(toml::Value::String(raw.to_string())),
        Some(_) => {
            let doc: BTreeMap<String, toml::Value> = toml::from_str(&format!("v = {raw}"))
                .map_err(|_| {
                    format!("{raw:?} is not a valid value (numbers, true/false, [\"a\",\"b\"])")
                })?;
            doc.get("v")
                .cloned()
                .ok_or_else(|| format!("{raw:?} is not a valid value"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LogFormat, env};

    #[test]
    fn defaults_are_valid() {
        let c = Config::from_toml_and_env("", "t", &[]).expect("defaults");
        assert_eq!(c, Config::default());
        assert_eq!(c.redis.prefix, "gw");
    }

    #[test]
    fn shipped_file_documents_the_defaults() {
        let text = include_str!("../../../config/gateway.toml");
        let c = Config::from_toml_and_env(text, "config/gateway.toml", &[]).expect("valid");
        assert_eq!(c, Config::default());
        // every key of every section appears in the file (commented out for optional ones)
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        for (section, keys) in &defaults {
            assert!(
                text.contains(&format!("[{section}]")),
                "[{section}] missing"
            );
            for key in keys.as_table().unwrap().keys() {
                assert!(
                    text.contains(&format!("{key} =")),
                    "{section}.{key} missing"
                );
            }
        }
    }

    #[test]
    fn env_overrides_file_and_keeps_types() {
        let c = Config::from_toml_and_env(
            "[presence]\nttl_ms = 9000\n",
            "t",
            &env(&[
                ("GATEWAY_PRESENCE_TTL_MS", "3000"),
                ("GATEWAY_PRESENCE_HEARTBEAT_INTERVAL_MS", "1000"),
                // digits only, 32 of them: still a string, not a number
                (
                    "GATEWAY_AUTH_HS256_SECRET",
                    "12345678901234567890123456789012",
                ),
                ("GATEWAY_REDIS_PREFIX", "t1"),
                ("GATEWAY_ROOMS_CLIENT_EVENTS", "[\"new_msg\",\"typing\"]"),
                ("GATEWAY_AUTH_REJECT_INVALID_TOKENS", "true"),
                ("GATEWAY_BIN", "/x"),
            ]),
        )
        .expect("valid");
        assert_eq!(c.presence.ttl_ms, 3000);
        assert_eq!(c.presence.heartbeat_interval_ms, 1000);
        assert_eq!(
            c.auth.hs256_secret.as_deref(),
            Some("12345678901234567890123456789012")
        );
        assert_eq!(c.redis.prefix, "t1");
        assert_eq!(c.rooms.client_events, vec!["new_msg", "typing"]);
        assert!(c.auth.reject_invalid_tokens);
    }

    #[test]
    fn errors_name_the_key_and_where_its_value_came_from() {
        // a wrong type in the file: the key and the file
        let e = Config::from_toml_and_env("[presence]\nttl_ms = \"soon\"\n", "gw.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("config file gw.toml") && e.contains("presence.ttl_ms"),
            "{e}"
        );
        let e = Config::from_toml_and_env("[server]\nlisten = 4000\n", "gw.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("server.listen") && e.contains("invalid type"),
            "{e}"
        );
        // the same from the environment: the variable, never the file
        for (var, value, key) in [
            ("GATEWAY_PRESENCE_TTL_MS", "soon", "presence.ttl_ms"),
            ("GATEWAY_SERVER_LISTN", "x", "server.listn"),
            ("GATEWAY_LOG_FORMAT", "xml", "log.format"),
            ("GATEWAY_REDIS_MODE", "sentinal", "redis.mode"),
            // a cross-field rule broken by a variable
            ("GATEWAY_PRESENCE_TTL_MS", "100", "presence.ttl_ms"),
        ] {
            let e = Config::from_toml_and_env(
                "[server]\nlisten = \"0.0.0.0:4000\"\n",
                "gw.toml",
                &env(&[(var, value)]),
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.starts_with(&format!("environment variable {var}: {key}:")),
                "{var}={value}: {e}"
            );
            assert!(!e.contains("gw.toml"), "{e}");
        }
    }

    #[test]
    fn unknown_sections_in_the_environment_are_refused() {
        let e = Config::from_toml_and_env("", "t", &env(&[("GATEWAY_FOO_BAR", "1")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("environment variable GATEWAY_FOO_BAR") && e.contains("no such section"),
            "{e}"
        );
        // the gateway's own variables that are not settings, and names without a section's shape
        Config::from_toml_and_env(
            "",
            "t",
            &env(&[
                ("GATEWAY_CONFIG", "/x.toml"),
                ("GATEWAY_PHOENIX_JS", "/x.js"),
                ("GATEWAY_BIN", "/x"),
                ("GATEWAY_LOG", "warn"),
                ("PATH", "/bin"),
            ]),
        )
        .expect("not settings");
        let e = Config::from_toml_and_env("[nope]\nx = 1\n", "gw.toml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("gw.toml") && e.contains("nope"), "{e}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = Config::from_toml_and_env("[server]\nlisten_port = 1\n", "t", &[]).unwrap_err();
        assert!(e.to_string().contains("listen_port"), "{e}");
        let e =
            Config::from_toml_and_env("", "t", &env(&[("GATEWAY_SERVER_LISTN", "x")])).unwrap_err();
        assert!(e.to_string().contains("listn"), "{e}");
        assert!(Config::from_toml_and_env("[nope]\n", "t", &[]).is_err());
    }

    #[test]
    fn an_unreadable_file_is_named_with_its_os_error_once() {
        let e = Config::load_with_env(Some(Path::new("/nonexistent/gw.toml")), &[]).unwrap_err();
        assert!(std::error::Error::source(&e).is_none());
        // as main prints it, and as it reads inside an anyhow chain
        for text in [e.to_string(), format!("{:#}", anyhow::Error::from(e))] {
            assert!(text.contains("/nonexistent/gw.toml"), "{text}");
            assert_eq!(text.matches("os error").count(), 1, "{text}");
        }
    }

    #[test]
    fn log_settings() {
        let c = Config::from_toml_and_env("", "t", &[]).unwrap();
        assert_eq!(
            (c.log.format, c.log.level.as_str()),
            (LogFormat::Text, "info")
        );
        let c = Config::from_toml_and_env(
            "[log]\nformat = \"text\"\nlevel = \"debug\"\n",
            "t",
            &env(&[("GATEWAY_LOG_FORMAT", "json")]),
        )
        .unwrap();
        assert_eq!(
            (c.log.format, c.log.level.as_str()),
            (LogFormat::Json, "debug")
        );
        // GATEWAY_LOG is GATEWAY_LOG_LEVEL's short name
        for var in ["GATEWAY_LOG", "GATEWAY_LOG_LEVEL"] {
            let c =
                Config::from_toml_and_env("", "t", &env(&[(var, "warn,gateway::server=debug")]))
                    .unwrap();
            assert_eq!(c.log.level, "warn,gateway::server=debug");
        }
        let e = Config::from_toml_and_env(
            "",
            "t",
            &env(&[("GATEWAY_LOG", "warn"), ("GATEWAY_LOG_LEVEL", "info")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("both are set"), "{e}");
        for bad in ["", "foo=bar=baz["] {
            let e = Config::from_toml_and_env("", "t", &env(&[("GATEWAY_LOG_LEVEL", bad)]))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("GATEWAY_LOG_LEVEL") && e.contains("log.level"),
                "{e}"
            );
        }
    }
}
