//! The demo page served at `/` on the public port: the seed's UI on the official `phoenix` client.

/// The page.
pub const INDEX_HTML: &str = include_str!("../assets/index.html");

/// The official phoenix client (ES module build), read from the npm package installed for the
/// tests (`tests/node_modules/phoenix`), or from `GATEWAY_PHOENIX_JS` if set.
pub fn phoenix_js() -> Option<String> {
    let candidates = [
        std::env::var("GATEWAY_PHOENIX_JS").ok(),
        Some("tests/node_modules/phoenix/priv/static/phoenix.mjs".to_string()),
        Some("../tests/node_modules/phoenix/priv/static/phoenix.mjs".to_string()),
    ];
    candidates
        .into_iter()
        .flatten()
        .find_map(|p| std::fs::read_to_string(p).ok())
}
