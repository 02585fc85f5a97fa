//! Secrets: `auth.hs256_secret` and `admin.token`, given inline, by env or as a file (`*_file`),
//! so they never have to be committed. An empty or whitespace-only secret is an error wherever it
//! comes from, and an HS256 secret shorter than [`MIN_HS256_SECRET_BYTES`] is one unless
//! `auth.allow_short_hs256_secret` says otherwise. Also what keeps them out of output:
//! [`Config::to_masked_toml`] and [`redact_url`].

use std::path::PathBuf;

use super::{Config, ConfigError, MIN_HOOK_SECRET_BYTES};

/// Shortest HS256 secret accepted without `auth.allow_short_hs256_secret`: RFC 7518 §3.2 asks for
/// a key at least as long as the hash output (256 bits); a shorter one can be brute-forced
/// offline from any single token.
pub const MIN_HS256_SECRET_BYTES: usize = 32;

impl Config {
    /// The effective settings as TOML, secrets masked (for `gateway check-config`).
    pub fn to_masked_toml(&self) -> String {
        let mut c = self.clone();
        if c.auth.hs256_secret.is_some() {
            c.auth.hs256_secret = Some("***".into());
        }
        if c.admin.token.is_some() {
            c.admin.token = Some("***".into());
        }
        if c.hooks.secret.is_some() {
            c.hooks.secret = Some("***".into());
        }
        if c.redis.master_password.is_some() {
            c.redis.master_password = Some("***".into());
        }
        c.redis.url = c
            .redis
            .urls()
            .into_iter()
            .map(redact_url)
            .collect::<Vec<_>>()
            .join(",");
        toml::to_string(&c).unwrap_or_else(|e| format!("# cannot print settings: {e}\n"))
    }

    /// The HS256 secret from `hs256_secret` or `hs256_secret_file`; an empty, whitespace-only
    /// or (without `allow_short_hs256_secret`) short one is an error, never a key.
    pub fn hs256_secret(&self) -> Result<Option<String>, ConfigError> {
        read_secret(
            &self.auth.hs256_secret,
            ("auth.hs256_secret", "auth.hs256_secret_file"),
            &self.auth.hs256_secret_file,
            Some(self.hs256_min_len()),
        )
    }

    /// The admin token from `token` or `token_file`; an empty or whitespace-only one is an error
    /// (it would match an empty bearer).
    pub fn admin_token(&self) -> Result<Option<String>, ConfigError> {
        read_secret(
            &self.admin.token,
            ("admin.token", "admin.token_file"),
            &self.admin.token_file,
            None,
        )
    }

    /// The hook secret from `hooks.secret` or `hooks.secret_file`; a blank or short one is an
    /// error, never a key.
    pub fn hooks_secret(&self) -> Result<Option<String>, ConfigError> {
        let secret = read_secret(
            &self.hooks.secret,
            ("hooks.secret", "hooks.secret_file"),
            &self.hooks.secret_file,
            None,
        )?;
        if let Some(s) = &secret {
            let key = if self.hooks.secret.is_some() {
                "hooks.secret"
            } else {
                "hooks.secret_file"
            };
            check_hook_secret(s, key)?;
        }
        Ok(secret)
    }

    pub(super) fn hs256_min_len(&self) -> usize {
        if self.auth.allow_short_hs256_secret {
            1
        } else {
            MIN_HS256_SECRET_BYTES
        }
    }
}

/// Refuses a secret that is blank, or (an HS256 key, `hs256_min` given) shorter than `hs256_min`
/// bytes, naming the setting.
pub(super) fn check_secret(
    secret: &str,
    key: &'static str,
    hs256_min: Option<usize>,
) -> Result<(), ConfigError> {
    if secret.trim().is_empty() {
        return Err(ConfigError::Invalid {
            key,
            message: "is empty or only whitespace; give a real secret or leave the setting unset"
                .into(),
        });
    }
    if let Some(min_len) = hs256_min
        && secret.len() < min_len
    {
        return Err(ConfigError::Invalid {
            key,
            message: format!(
                "is {} bytes; an HS256 secret needs at least {min_len} (RFC 7518 §3.2). Use a longer \
                 one (e.g. `openssl rand -base64 48`), or set auth.allow_short_hs256_secret = true \
                 (GATEWAY_AUTH_ALLOW_SHORT_HS256_SECRET) to accept it anyway",
                secret.len()
            ),
        });
    }
    Ok(())
}

/// Refuses a hook secret shorter than [`MIN_HOOK_SECRET_BYTES`].
pub(super) fn check_hook_secret(secret: &str, key: &'static str) -> Result<(), ConfigError> {
    check_secret(secret, key, None)?;
    if secret.len() < MIN_HOOK_SECRET_BYTES {
        return Err(ConfigError::Invalid {
            key,
            message: format!(
                "is {} bytes; the hook secret needs at least {MIN_HOOK_SECRET_BYTES} (e.g. \
                 `openssl rand -base64 48`)",
                secret.len()
            ),
        });
    }
    Ok(())
}

fn read_secret(
    inline: &Option<String>,
    (inline_key, file_key): (&'static str, &'static str),
    file: &Option<PathBuf>,
    hs256_min: Option<usize>,
) -> Result<Option<String>, ConfigError> {
    if let Some(s) = inline {
        check_secret(s, inline_key, hs256_min)?;
        return Ok(Some(s.clone()));
    }
    let Some(p) = file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(p).map_err(|e| ConfigError::Invalid {
        key: file_key,
        message: format!("{}: {e}", p.display()),
    })?;
    // editors and `echo` add a line end; nothing else is trimmed (a secret may contain spaces)
    let secret = text.trim_end_matches(['\r', '\n']).to_string();
    check_secret(&secret, file_key, hs256_min).map_err(|e| match e {
        ConfigError::Invalid { key, message } => ConfigError::Invalid {
            key,
            message: format!("{}: {message}", p.display()),
        },
        other => other,
    })?;
    Ok(Some(secret))
}

/// `redis://user:password@host` → `redis://user:***@host` (for logs and `check-config`); a
/// comma-separated list (cluster seeds, sentinels) has each of its URLs redacted.
pub fn redact_url(url: &str) -> String {
    if url.contains(',') {
        return url
            .split(',')
            .map(|u| redact_url(u.trim()))
            .collect::<Vec<_>>()
            .join(",");
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.rsplit_once('@') {
        Some((cred, host)) => {
            let user = cred.split_once(':').map(|(u, _)| u).unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::env;

    #[test]
    fn redaction_masks_every_password_of_a_seed_list() {
        assert_eq!(redact_url("redis://u:pw@h:1"), "redis://u:***@h:1");
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
        assert_eq!(
            redact_url("redis://:pw@a:1,redis://:pw@b:2"),
            "redis://:***@a:1,redis://:***@b:2"
        );
    }

    #[test]
    fn secrets_come_from_files_too() {
        let dir = std::env::temp_dir().join(format!("gw-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("secret");
        std::fs::write(&f, "from-a-file-0123456789abcdef01234\n").unwrap();
        let c = Config::from_toml_and_env(
            "",
            "t",
            &env(&[
                ("GATEWAY_AUTH_HS256_SECRET_FILE", f.to_str().unwrap()),
                ("GATEWAY_ADMIN_TOKEN_FILE", f.to_str().unwrap()),
            ]),
        )
        .expect("valid");
        assert_eq!(
            c.hs256_secret().unwrap().as_deref(),
            Some("from-a-file-0123456789abcdef01234")
        );
        assert_eq!(
            c.admin_token().unwrap().as_deref(),
            Some("from-a-file-0123456789abcdef01234")
        );
        let missing = Config::from_toml_and_env(
            "",
            "t",
            &env(&[("GATEWAY_AUTH_HS256_SECRET_FILE", "/nonexistent/secret")]),
        )
        .unwrap();
        assert!(
            missing
                .hs256_secret()
                .unwrap_err()
                .to_string()
                .contains("/nonexistent/secret")
        );
        let both = Config::from_toml_and_env(
            "[auth]\nhs256_secret = \"a\"\nhs256_secret_file = \"/x\"\n",
            "t",
            &[],
        );
        assert!(both.is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn masked_output_hides_secrets() {
        let c = Config::from_toml_and_env(
            "[auth]\nhs256_secret = \"s3cret-s3cret-s3cret-s3cret-s3cret\"\n[redis]\nurl = \"redis://u:pw@h:1\"\n",
            "t",
            &[],
        )
        .expect("valid");
        let out = c.to_masked_toml();
        assert!(!out.contains("s3cret") && !out.contains("pw@"), "{out}");
        assert!(out.contains("redis://u:***@h:1"), "{out}");
    }

    /// A temp dir unique to one test (tests run in parallel in one process).
    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gw-cfg-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn blank_secrets_are_refused_inline_env_and_file() {
        for blank in ["", "   ", "\t\n"] {
            let toml = format!("[auth]\nhs256_secret = {blank:?}\n");
            let e = Config::from_toml_and_env(&toml, "t", &[]).unwrap_err();
            assert!(e.to_string().contains("auth.hs256_secret"), "{e}");
            assert!(e.to_string().contains("empty"), "{e}");
            let e = Config::from_toml_and_env(
                "",
                "t",
                &env(&[
                    ("GATEWAY_AUTH_HS256_SECRET", blank),
                    // the opt-in for short secrets never lets a blank one through
                    ("GATEWAY_AUTH_ALLOW_SHORT_HS256_SECRET", "true"),
                ]),
            )
            .unwrap_err();
            assert!(e.to_string().contains("auth.hs256_secret"), "{e}");
            let toml = format!("[admin]\ntoken = {blank:?}\n");
            let e = Config::from_toml_and_env(&toml, "t", &[]).unwrap_err();
            assert!(e.to_string().contains("admin.token"), "{e}");
        }
        let dir = temp_dir("blank");
        for (i, blank) in ["", "\n", "\r\n", "  \n"].iter().enumerate() {
            let f = dir.join(format!("secret{i}"));
            std::fs::write(&f, blank).unwrap();
            let c = Config::from_toml_and_env(
                "",
                "t",
                &env(&[
                    ("GATEWAY_AUTH_HS256_SECRET_FILE", f.to_str().unwrap()),
                    ("GATEWAY_ADMIN_TOKEN_FILE", f.to_str().unwrap()),
                    ("GATEWAY_AUTH_ALLOW_SHORT_HS256_SECRET", "true"),
                ]),
            )
            .expect("the file is read later, when the secret is used");
            let e = c.hs256_secret().unwrap_err().to_string();
            assert!(
                e.contains("auth.hs256_secret_file") && e.contains("empty"),
                "{e}"
            );
            let e = c.admin_token().unwrap_err().to_string();
            assert!(e.contains("admin.token_file") && e.contains("empty"), "{e}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn short_hs256_secrets_need_the_opt_in() {
        let short = "0123456789"; // 10 bytes
        let e = Config::from_toml_and_env("", "t", &env(&[("GATEWAY_AUTH_HS256_SECRET", short)]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("auth.hs256_secret"), "{e}");
        assert!(e.contains("allow_short_hs256_secret"), "{e}");
        let c = Config::from_toml_and_env(
            "",
            "t",
            &env(&[
                ("GATEWAY_AUTH_HS256_SECRET", short),
                ("GATEWAY_AUTH_ALLOW_SHORT_HS256_SECRET", "true"),
            ]),
        )
        .expect("opted in");
        assert_eq!(c.hs256_secret().unwrap().as_deref(), Some(short));
        let exact = "x".repeat(MIN_HS256_SECRET_BYTES);
        let c = Config::from_toml_and_env("", "t", &env(&[("GATEWAY_AUTH_HS256_SECRET", &exact)]))
            .expect("32 bytes is enough");
        assert_eq!(c.hs256_secret().unwrap(), Some(exact.clone()));

        let dir = temp_dir("short");
        let f = dir.join("secret");
        std::fs::write(&f, format!("{short}\n")).unwrap();
        let path = f.to_str().unwrap();
        let c =
            Config::from_toml_and_env("", "t", &env(&[("GATEWAY_AUTH_HS256_SECRET_FILE", path)]))
                .unwrap();
        let e = c.hs256_secret().unwrap_err().to_string();
        assert!(
            e.contains("auth.hs256_secret_file") && e.contains("10 bytes"),
            "{e}"
        );
        let c = Config::from_toml_and_env(
            "",
            "t",
            &env(&[
                ("GATEWAY_AUTH_HS256_SECRET_FILE", path),
                ("GATEWAY_AUTH_ALLOW_SHORT_HS256_SECRET", "true"),
            ]),
        )
        .unwrap();
        assert_eq!(c.hs256_secret().unwrap().as_deref(), Some(short));
        // a short admin token is the operator's business: only blank ones are refused
        let c = Config::from_toml_and_env("[admin]\ntoken = \"t\"\n", "t", &[]).unwrap();
        assert_eq!(c.admin_token().unwrap().as_deref(), Some("t"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
