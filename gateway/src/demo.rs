//! The demo page served at `/` on the public port: the seed's UI on the official `phoenix` client,
//! and the demo tokens it signs in with.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};

use crate::app::App;
use crate::http::{Body, json as json_response, text, typed};

/// The page.
pub const INDEX_HTML: &str = include_str!("../assets/index.html");

/// The official phoenix client (ES module build), read from the npm package installed for the
/// tests (`tests/node_modules/phoenix`, looked up from the working directory and from the
/// binary's location), or from the file named by `GATEWAY_PHOENIX_JS`.
pub fn phoenix_js() -> Option<String> {
    const REL: &str = "tests/node_modules/phoenix/priv/static/phoenix.mjs";
    let mut candidates: Vec<std::path::PathBuf> = Vec::new();
    if let Ok(p) = std::env::var("GATEWAY_PHOENIX_JS") {
        candidates.push(p.into());
    }
    candidates.push(REL.into());
    // a binary in <repo>/target/<profile>/ finds the repo's copy wherever it is started from
    if let Ok(exe) = std::env::current_exe() {
        candidates.extend(exe.ancestors().skip(1).take(4).map(|d| d.join(REL)));
    }
    candidates
        .into_iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
}

/// Anything on the public port that is not the socket endpoint.
pub fn public_page(app: &App, req: &Request<Incoming>) -> Response<Body> {
    match req.uri().path() {
        "/dev/tokens.json" => match app.demo_tokens.get() {
            Some(tokens) => {
                let list: Vec<Value> = tokens
                    .iter()
                    .map(|(name, token)| json!({"username": name, "token": token}))
                    .collect();
                json_response(StatusCode::OK, &Value::Array(list))
            }
            None => text(StatusCode::NOT_FOUND, "not found\n"),
        },
        "/" => typed(INDEX_HTML, "text/html; charset=utf-8"),
        "/phoenix.js" => match phoenix_js() {
            Some(js) => typed(js, "text/javascript; charset=utf-8"),
            None => text(
                StatusCode::NOT_FOUND,
                "phoenix.js not found: run `npm ci` in tests/\n",
            ),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}
