//! Tests of the outbound queue and its writer: framing, partial writes returned in order, an idle
//! writer holding nothing, the byte and frame bounds, and the close rules (first request wins,
//! queued frames before a close except 4008, a client's close echoed at once).

use super::frame::frame_parts;
use super::*;
use crate::deflate;

async fn framed(m: Out) -> Vec<u8> {
    let ((head, n), parts) = frame_parts(&m);
    let mut wire = head[..n].to_vec();
    parts.iter().for_each(|p| wire.extend_from_slice(p));
    wire
}

#[tokio::test]
async fn frames_text_with_the_right_header() {
    assert_eq!(
        framed(Out::Text(Bytes::from_static(b"hi"))).await,
        vec![0x81, 2, b'h', b'i']
    );
    let b = framed(Out::Text(Bytes::from(vec![b'x'; 300]))).await;
    assert_eq!(&b[..4], &[0x81, 126, 1, 44]);
    assert_eq!(b.len(), 304);
    let b = framed(Out::Text(Bytes::from(vec![b'x'; 70_000]))).await;
    assert_eq!(&b[..2], &[0x81, 127]);
    assert_eq!(u64::from_be_bytes(b[2..10].try_into().unwrap()), 70_000);
    assert_eq!(b.len(), 70_010);
    assert_eq!(
        framed(Out::Pong(Bytes::from_static(b"p"))).await,
        vec![0x8A, 1, b'p']
    );
}

#[tokio::test]
async fn wraps_a_shared_payload_small_and_large() {
    let b = framed(Out::Wrapped(
        Bytes::from_static(b"[1,"),
        Bytes::from_static(b"{}"),
    ))
    .await;
    assert_eq!(b, b"\x81\x06[1,{}]".to_vec());
    let big = format!("{{\"k\":\"{}\"}}", "y".repeat(5000));
    let b = framed(Out::Wrapped(
        Bytes::from_static(b"[\"3\",null,\"t\",\"e\","),
        Bytes::from(big.clone()),
    ))
    .await;
    let text = std::str::from_utf8(&b[4..]).unwrap();
    assert_eq!(usize::from(u16::from_be_bytes([b[2], b[3]])), text.len());
    let v: serde_json::Value = serde_json::from_str(text).unwrap();
    assert_eq!(v[4]["k"].as_str().unwrap().len(), 5000);
}

#[tokio::test]
async fn what_the_kernel_does_not_take_at_once_is_returned_in_order() {
    use tokio::io::AsyncReadExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = tokio::net::TcpStream::connect(l.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = l.accept().await.unwrap();
    let (_r, mut w) = server.into_split();
    // plain and compressed frames (permessage-deflate) mixed: a split inside either is resumed
    let frame = |i: usize| match i % 3 {
        0 => Out::Deflated(deflate::compressed(&Bytes::from(
            (0..20_000)
                .map(|k| format!("{},", k * i))
                .collect::<String>(),
        ))),
        1 => Out::DeflatedWrapped(
            deflate::stored(b"[1,"),
            deflate::compressed(&Bytes::from(vec![b'a' + (i % 26) as u8; 50_000])),
        ),
        _ => Out::Wrapped(
            Bytes::from_static(b"[1,"),
            Bytes::from(vec![b'a' + (i % 26) as u8; 100_000]),
        ),
    };
    // the client reads nothing until the socket's buffers are full
    let mut expected = Vec::new();
    let mut rest = None;
    for batch in 0..400 {
        let chunk: Vec<Out> = (0..4).map(|i| frame(batch * 4 + i)).collect();
        for i in 0..4 {
            expected.extend(framed(frame(batch * 4 + i)).await);
        }
        if let Some(r) = write_now(&w, chunk.iter()).unwrap() {
            rest = Some(r);
            break;
        }
    }
    let rest = rest.expect("megabytes to a client that does not read fill the socket");
    assert!(!rest.is_empty());
    let rest: Vec<u8> = rest.iter().flat_map(|b| b.iter().copied()).collect();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        got
    });
    w.write_all(&rest).await.unwrap();
    w.shutdown().await.unwrap();
    let got = reader.await.unwrap();
    assert_eq!(got.len(), expected.len());
    assert!(
        got == expected,
        "the stream differs from the frames in order"
    );
}

#[tokio::test]
async fn an_idle_writer_holds_no_write_state() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let _client = tokio::net::TcpStream::connect(l.local_addr().unwrap())
        .await
        .unwrap();
    let (_r, w) = l.accept().await.unwrap().0.into_split();
    let out = Outbox::new(Limits::frames(4), crate::metrics::Metrics::new());
    let writer = write_task(out, w, Duration::from_secs(1));
    // a writer task while the kernel pushes back is this big: a write under way is boxed
    let size = std::mem::size_of_val(&writer);
    assert!(size <= 256, "writer future: {size} bytes");
}

#[test]
fn first_close_request_wins() {
    let c = Outbox::new(Limits::frames(4), crate::metrics::Metrics::new());
    c.close(close::SLOW_CONSUMER);
    c.close(close::RESTART);
    assert_eq!(c.code(), u32::from(close::SLOW_CONSUMER));
    assert!(
        !c.send(Bytes::from_static(b"x")),
        "a closing socket takes nothing"
    );
}

#[test]
fn a_full_queue_closes_the_socket_as_slow() {
    let c = Outbox::new(Limits::frames(2), crate::metrics::Metrics::new());
    assert!(c.send(Bytes::from_static(b"1")) && c.send(Bytes::from_static(b"2")));
    assert!(!c.send(Bytes::from_static(b"3")));
    assert_eq!(c.code(), u32::from(close::SLOW_CONSUMER));
    let mut got: [Option<Out>; 10] = Default::default();
    assert_eq!(c.take_into(&mut got), 2);
}

#[test]
fn the_queue_is_bounded_in_bytes_too_but_an_empty_one_takes_any_frame() {
    let limits = Limits {
        frames: 100,
        bytes: 100,
    };
    let c = Outbox::new(limits, crate::metrics::Metrics::new());
    assert!(
        c.send(Bytes::from(vec![b'x'; 1000])),
        "an empty queue takes one big frame"
    );
    let mut got: [Option<Out>; 4] = Default::default();
    assert_eq!(c.take_into(&mut got), 1);
    assert_eq!(c.queue().bytes, 0);
    assert!(c.send(Bytes::from(vec![b'x'; 60])));
    assert!(c.send_wrapped(Bytes::from_static(b"[1,"), Bytes::from(vec![b'y'; 36])));
    assert_eq!(c.queue().bytes, 100);
    assert!(
        !c.send(Bytes::from_static(b"z")),
        "101 bytes: over the bound"
    );
    assert_eq!(c.code(), u32::from(close::SLOW_CONSUMER));
}

/// Everything the client reads until the server closes: (opcode, payload) per frame.
async fn frames_written(out: Outbox) -> Vec<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = tokio::net::TcpStream::connect(l.local_addr().unwrap())
        .await
        .unwrap();
    let (_r, w) = l.accept().await.unwrap().0.into_split();
    out.attach(w, Duration::from_secs(2));
    out.ended().await;
    let mut wire = Vec::new();
    client.read_to_end(&mut wire).await.unwrap();
    let mut frames = Vec::new();
    let mut at = 0;
    while at < wire.len() {
        let (op, len) = (wire[at] & 0x0f, usize::from(wire[at + 1] & 0x7f));
        assert!(len < 126, "short frames only");
        frames.push((op, wire[at + 2..at + 2 + len].to_vec()));
        at += 2 + len;
    }
    frames
}

#[tokio::test]
async fn what_was_queued_before_a_close_goes_out_first_except_for_4008() {
    let out = Outbox::new(Limits::frames(8), crate::metrics::Metrics::new());
    out.send(Bytes::from_static(b"reply 1"));
    out.send(Bytes::from_static(b"reply 2"));
    out.close(close::REFUSED_JOINS);
    assert!(
        !out.send(Bytes::from_static(b"late")),
        "nothing after the close"
    );
    let got = frames_written(out).await;
    assert_eq!(
        got,
        vec![
            (1, b"reply 1".to_vec()),
            (1, b"reply 2".to_vec()),
            (8, 4009u16.to_be_bytes().to_vec()),
        ]
    );

    // a slow consumer's queue is what it could not take: it is dropped
    let out = Outbox::new(Limits::frames(2), crate::metrics::Metrics::new());
    out.send(Bytes::from_static(b"1"));
    out.send(Bytes::from_static(b"2"));
    out.send(Bytes::from_static(b"3"));
    let got = frames_written(out).await;
    assert_eq!(got, vec![(8, 4008u16.to_be_bytes().to_vec())]);
}

#[tokio::test]
async fn a_clients_close_is_echoed_at_once_without_the_queue() {
    let out = Outbox::new(Limits::frames(8), crate::metrics::Metrics::new());
    out.send(Bytes::from_static(b"a broadcast"));
    out.echo_close(1000);
    out.close(close::RESTART);
    assert_eq!(out.closed_code(), 1000);
    let got = frames_written(out).await;
    assert_eq!(got, vec![(8, 1000u16.to_be_bytes().to_vec())]);

    let out = Outbox::new(Limits::frames(8), crate::metrics::Metrics::new());
    out.echo_close(NO_STATUS);
    assert_eq!(frames_written(out).await, vec![(8, Vec::new())]);
}

#[test]
fn a_close_with_code_0_is_not_lost() {
    let out = Outbox::new(Limits::frames(2), crate::metrics::Metrics::new());
    out.close(0);
    assert_eq!(
        out.code(),
        1002,
        "0 reads as open: it becomes a protocol error"
    );
}

#[test]
fn a_drained_queue_gives_its_memory_back() {
    let c = Outbox::new(Limits::frames(100), crate::metrics::Metrics::new());
    for _ in 0..40 {
        assert!(c.send(Bytes::from_static(b"x")));
    }
    let mut got: [Option<Out>; 30] = Default::default();
    assert_eq!(c.take_into(&mut got), 30);
    assert!(
        c.queue().frames.capacity() >= 10,
        "not drained yet: storage kept"
    );
    assert_eq!(c.take_into(&mut got), 10);
    let cap = c.queue().frames.capacity();
    assert_eq!(cap, 0);
}

/// Every frame in `wire` as (opcode, payload), any length.
fn parse_frames(wire: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut frames = Vec::new();
    let mut at = 0;
    while at < wire.len() {
        let op = wire[at] & 0x0f;
        let (len, head) = match wire[at + 1] & 0x7f {
            126 => (
                usize::from(u16::from_be_bytes([wire[at + 2], wire[at + 3]])),
                4,
            ),
            127 => {
                let b: [u8; 8] = wire[at + 2..at + 10].try_into().expect("8 bytes");
                (u64::from_be_bytes(b) as usize, 10)
            }
            n => (usize::from(n), 2),
        };
        frames.push((op, wire[at + head..at + head + len].to_vec()));
        at += head + len;
    }
    frames
}

/// A connected pair: the server's write half and the client's stream.
async fn pair() -> (OwnedWriteHalf, tokio::net::TcpStream) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = tokio::net::TcpStream::connect(l.local_addr().unwrap())
        .await
        .unwrap();
    let (_r, w) = l.accept().await.unwrap().0.into_split();
    (w, client)
}

/// Waits until the writer has lent its socket (it is idle).
async fn lent(out: &Outbox) {
    for _ in 0..200 {
        if out.queue().sock.is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the idle writer never lent its socket");
}

#[tokio::test]
async fn an_idle_writers_socket_takes_a_send_at_once_without_the_queue() {
    use tokio::io::AsyncReadExt;
    let (w, mut client) = pair().await;
    let out = Outbox::new(Limits::frames(8), crate::metrics::Metrics::new());
    out.attach(w, Duration::from_secs(2));
    lent(&out).await;
    for m in ["one", "two", "three"] {
        assert!(out.send(Bytes::from(m)));
        let q = out.queue();
        assert!(
            q.frames.is_empty() && q.frames.capacity() == 0 && q.sock.is_some(),
            "written directly: nothing queued, no slot allocated, the writer not woken"
        );
    }
    out.close(close::RESTART);
    out.ended().await;
    assert!(
        out.queue().sock.is_none(),
        "the socket ends with the writer"
    );
    let mut wire = Vec::new();
    client.read_to_end(&mut wire).await.unwrap();
    assert_eq!(
        parse_frames(&wire),
        vec![
            (1, b"one".to_vec()),
            (1, b"two".to_vec()),
            (1, b"three".to_vec()),
            (8, 1012u16.to_be_bytes().to_vec()),
        ]
    );
}

#[tokio::test]
async fn a_direct_write_the_kernel_takes_part_of_is_finished_first_even_before_a_4008() {
    use tokio::io::AsyncReadExt;
    let (w, mut client) = pair().await;
    let out = Outbox::new(Limits::frames(3), crate::metrics::Metrics::new());
    out.attach(w, Duration::from_secs(5));
    lent(&out).await;
    // the client reads nothing yet: the kernel takes a part of 8 MB at most
    let big = Bytes::from(vec![b'x'; 8 << 20]);
    assert!(out.send(big.clone()));
    assert!(
        matches!(out.queue().frames.front(), Some(Out::Raw(_))),
        "the rest of the big frame is queued as raw bytes"
    );
    // queued behind it, in order; then the queue overflows: 4008 drops the whole frames queued
    // after the started one, but the started frame is finished before the close frame
    assert!(out.send(Bytes::from_static(b"after")));
    let mut n = 0;
    while out.send(Bytes::from_static(b"more")) {
        n += 1;
        assert!(n < 10, "the queue is bounded");
    }
    assert_eq!(out.code(), u32::from(close::SLOW_CONSUMER));
    let reader = tokio::spawn(async move {
        let mut wire = Vec::new();
        client.read_to_end(&mut wire).await.unwrap();
        wire
    });
    out.ended().await;
    let frames = parse_frames(&reader.await.unwrap());
    assert_eq!(frames.len(), 2, "the big frame whole, then the close");
    assert_eq!(frames[0].1.len(), big.len());
    assert_eq!(frames[1], (8, 4008u16.to_be_bytes().to_vec()));
}

#[tokio::test]
async fn frames_queued_behind_a_started_direct_write_follow_it_in_order() {
    use tokio::io::AsyncReadExt;
    let (w, mut client) = pair().await;
    let out = Outbox::new(Limits::frames(64), crate::metrics::Metrics::new());
    out.attach(w, Duration::from_secs(5));
    lent(&out).await;
    let big = Bytes::from(vec![b'y'; 8 << 20]);
    assert!(out.send(big.clone()));
    for i in 0..20u8 {
        assert!(out.send(Bytes::from(vec![b'a' + i; 3])));
    }
    let reader = tokio::spawn(async move {
        let mut wire = Vec::new();
        client.read_to_end(&mut wire).await.unwrap();
        wire
    });
    // once drained, the writer lends the socket again and later sends go direct
    lent(&out).await;
    assert!(out.send(Bytes::from_static(b"last")));
    out.close(close::RESTART);
    out.ended().await;
    let frames = parse_frames(&reader.await.unwrap());
    assert_eq!(frames.len(), 23);
    assert_eq!(frames[0].1.len(), big.len());
    for i in 0..20u8 {
        assert_eq!(frames[1 + usize::from(i)], (1, vec![b'a' + i; 3]));
    }
    assert_eq!(frames[21], (1, b"last".to_vec()));
    assert_eq!(frames[22], (8, 1012u16.to_be_bytes().to_vec()));
}

#[tokio::test]
async fn a_cork_writes_each_idle_sockets_frames_together_when_dropped() {
    use tokio::io::AsyncReadExt;
    let (w, mut client) = pair().await;
    let out = Outbox::new(Limits::frames(8), crate::metrics::Metrics::new());
    out.attach(w, Duration::from_secs(2));
    lent(&out).await;
    let cork = Cork::new();
    let inner = Cork::new();
    assert!(out.send(Bytes::from_static(b"m1")));
    drop(inner);
    assert!(out.send(Bytes::from_static(b"m2")));
    assert_eq!(
        out.queue().frames.len(),
        2,
        "held under the cork (a nested cork is the same cork)"
    );
    drop(cork);
    {
        let q = out.queue();
        assert!(q.frames.is_empty() && q.frames.capacity() == 0 && q.bytes == 0);
        assert!(
            q.sock.is_some(),
            "written by the cork: the writer was not needed"
        );
    }
    // without a cork a send goes straight out again
    assert!(out.send(Bytes::from_static(b"m3")));
    assert!(out.queue().frames.is_empty());
    out.close(close::RESTART);
    out.ended().await;
    let mut wire = Vec::new();
    client.read_to_end(&mut wire).await.unwrap();
    assert_eq!(
        parse_frames(&wire),
        vec![
            (1, b"m1".to_vec()),
            (1, b"m2".to_vec()),
            (1, b"m3".to_vec()),
            (8, 1012u16.to_be_bytes().to_vec()),
        ]
    );
}

/// Reads one server frame off `client`: (first byte, payload).
async fn read_frame(client: &mut tokio::net::TcpStream) -> (u8, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut h = [0u8; 2];
    client.read_exact(&mut h).await.unwrap();
    let len = match h[1] {
        126 => usize::from(client.read_u16().await.unwrap()),
        127 => client.read_u64().await.unwrap() as usize,
        n => usize::from(n),
    };
    let mut payload = vec![0u8; len];
    client.read_exact(&mut payload).await.unwrap();
    (h[0], payload)
}

#[tokio::test]
async fn a_deflating_socket_gets_large_payloads_compressed_once_and_small_ones_as_they_are() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = tokio::net::TcpStream::connect(l.local_addr().unwrap())
        .await
        .unwrap();
    let (_r, w) = l.accept().await.unwrap().0.into_split();
    let out = Outbox::new(Limits::frames(8), crate::metrics::Metrics::new()).deflating(true);
    out.attach(w, Duration::from_secs(5));
    let big = Bytes::from(
        (0..400)
            .map(|i| format!(r#"{{"user{i}":{{"metas":[{{"phx_ref":"n.{i}"}}]}}}}"#))
            .collect::<Vec<_>>()
            .join(","),
    );
    assert!(big.len() >= deflate::MIN_BYTES);
    // the shared payload is compressed once: another socket's frame reuses the same bytes
    let Out::Deflated(c1) = Out::Text(big.clone()).deflated() else {
        panic!("a large payload is compressed")
    };
    let Out::Deflated(c2) = Out::Text(big.clone()).deflated() else {
        panic!("a large payload is compressed")
    };
    assert_eq!(c1.as_ptr(), c2.as_ptr());
    assert!(out.send(Bytes::from_static(b"[null,null,\"t\",\"small\",{}]")));
    assert!(out.send(big.clone()));
    assert!(out.send_wrapped(
        Bytes::from_static(b"[\"3\",null,\"t\",\"presence_state\","),
        big.clone()
    ));
    let (op, p) = read_frame(&mut client).await;
    assert_eq!((op, &p[..]), (0x81, &b"[null,null,\"t\",\"small\",{}]"[..]));
    let (op, p) = read_frame(&mut client).await;
    assert_eq!(op, 0xC1, "RSV1 marks a compressed message");
    assert!(p.len() * 3 < big.len());
    assert_eq!(deflate::inflate(&p, 1 << 20).unwrap(), &big[..]);
    let (op, p) = read_frame(&mut client).await;
    assert_eq!(op, 0xC1);
    let mut want = b"[\"3\",null,\"t\",\"presence_state\",".to_vec();
    want.extend_from_slice(&big);
    want.push(b']');
    assert_eq!(deflate::inflate(&p, 1 << 20).unwrap(), want);
    out.close(1000);
    out.ended().await;
}
