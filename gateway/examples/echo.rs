//! A WebSocket echo server made of the gateway's own reading rules — the HTTP upgrade as the
//! public listener takes it ([`gateway::http::upgraded_tcp`]), [`gateway::wsread::FrameReader`]
//! and [`gateway::wsmessage::Assembler`] — so that Autobahn|Testsuite can hold those rules to
//! RFC 6455 with messages echoed (`scripts/conformance.sh`). A test tool, not part of the product.
//!
//! It echoes text and binary messages, answers pings, and answers a close frame or fails the
//! connection exactly as the gateway does (the same code for the same frames). With `--deflate` it
//! negotiates permessage-deflate as the gateway does ([`gateway::deflate`]: the same offers taken,
//! the same answer, no context takeover) and echoes every message compressed with the gateway's
//! compressor, so Autobahn's cases 12 and 13 check both directions.
//!
//! `cargo run --release --example echo -- [--listen ADDR] [--max-message-bytes N]
//! [--idle-timeout-ms N] [--deflate]` prints `{"event":"listening","addr":"HOST:PORT"}` on stdout once it
//! listens.

use std::convert::Infallible;
use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use gateway::http::{Body, accept_loop, http1, text, upgraded_tcp};
use gateway::protocol::close;
use gateway::wsmessage::{Assembler, Event, Message, Violation};
use gateway::wsread::FrameReader;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, SEC_WEBSOCKET_EXTENSIONS};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::Instant;

#[derive(Parser, Clone, Copy)]
struct Opts {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// The largest message (Autobahn's case 9 sends up to 16 MiB).
    #[arg(long, default_value_t = 16 << 20)]
    max_message_bytes: usize,
    /// As `server.idle_timeout_ms`: the idle limit, and a fragmented message's time.
    #[arg(long, default_value_t = 60_000)]
    idle_timeout_ms: u64,
    /// Accept permessage-deflate (as `server.compression`) and echo messages compressed.
    #[arg(long)]
    deflate: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let opts = Opts::parse();
    let listener = TcpListener::bind(opts.listen).await?;
    let addr = listener.local_addr()?;
    let mut out = std::io::stdout().lock();
    writeln!(out, r#"{{"event":"listening","addr":"{addr}"}}"#)?;
    out.flush()?;
    drop(out);
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    accept_loop(listener, stop, "echo", move |tcp, _peer| {
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| async move {
                Ok::<_, Infallible>(upgrade(req, opts))
            });
            let _ = http1()
                .serve_connection(TokioIo::new(tcp), svc)
                .with_upgrades()
                .await;
        });
    })
    .await;
    Ok(())
}

fn upgrade(mut req: Request<Incoming>, opts: Opts) -> Response<Body> {
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return text(StatusCode::BAD_REQUEST, "expected a WebSocket upgrade\n");
    }
    let deflate = if opts.deflate {
        gateway::deflate::negotiate_headers(req.headers())
    } else {
        None
    };
    let (resp, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(x) => x,
        Err(e) => return text(StatusCode::BAD_REQUEST, &format!("{e}\n")),
    };
    tokio::spawn(async move {
        if let Ok(ws) = fut.await
            && let Some((read, write)) = upgraded_tcp(ws.into_inner())
        {
            let deflate = deflate.is_some();
            echo(read, write, Opts { deflate, ..opts }).await;
        }
    });
    let mut resp = resp.map(|_| Full::new(Bytes::new()));
    if let Some(answer) = deflate {
        resp.headers_mut()
            .insert(SEC_WEBSOCKET_EXTENSIONS, HeaderValue::from_static(answer));
    }
    resp
}

/// Serves one connection: the gateway's read loop, with an echo where the gateway decodes.
async fn echo((read, early): (OwnedReadHalf, Bytes), mut w: OwnedWriteHalf, opts: Opts) {
    let idle = Duration::from_millis(opts.idle_timeout_ms);
    let mut rd = FrameReader::new(read, early, opts.max_message_bytes).deflating(opts.deflate);
    let z = opts.deflate;
    let mut messages = Assembler::new(opts.max_message_bytes, idle);
    let code = loop {
        let now = Instant::now();
        let until = match messages.deadline() {
            Some(d) => (now + idle).min(Instant::from_std(d)),
            None => now + idle,
        };
        let frame = match tokio::time::timeout_at(until, rd.next()).await {
            Err(_) => break Some(close::IDLE_TIMEOUT),
            Ok(Err(e)) => match Violation::of_read(&e) {
                None => return,
                Some(v) => break Some(v.close_code()),
            },
            Ok(Ok(f)) => f,
        };
        let sent = match messages.push(frame, Instant::now().into_std()) {
            Ok(Event::Message(Message::Text(t))) => send_message(&mut w, 0x1, t, z).await,
            Ok(Event::Message(Message::Binary(b))) => send_message(&mut w, 0x2, b, z).await,
            Ok(Event::Ping(p)) => send(&mut w, 0xA, &p).await,
            Ok(Event::Partial | Event::Pong) => Ok(()),
            Ok(Event::Close(code)) => break code,
            Err(v) => break Some(v.close_code()),
        };
        if sent.is_err() {
            return;
        }
    };
    // the close frame last, as the gateway's writer sends it: a code, or nothing for nothing
    let payload = code.map(u16::to_be_bytes);
    let _ = send(&mut w, 0x8, payload.as_ref().map_or(&[][..], |p| &p[..])).await;
    let _ = w.shutdown().await;
}

/// Echoes a message: compressed as the gateway compresses (RSV1, the sync tail left off) when
/// permessage-deflate was negotiated, whatever its size, else as it came.
async fn send_message(
    w: &mut OwnedWriteHalf,
    opcode: u8,
    payload: Vec<u8>,
    deflate: bool,
) -> std::io::Result<()> {
    if !deflate {
        return send(w, opcode, &payload).await;
    }
    let c = gateway::deflate::compressed(&Bytes::from(payload));
    let body = &c[..c.len() - gateway::deflate::SYNC_TAIL.len()];
    send(w, 0x40 | opcode, body).await
}

/// Writes one final, unmasked server frame (`opcode` may carry RSV1).
async fn send(w: &mut OwnedWriteHalf, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut frame = Vec::with_capacity(10 + payload.len());
    frame.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => frame.push(n as u8),
        n if n <= usize::from(u16::MAX) => {
            frame.push(126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    w.write_all(&frame).await
}
