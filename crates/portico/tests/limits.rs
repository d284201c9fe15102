//! Limits and resource exhaustion (issue 6): body size, requests per
//! connection, a UDP flood on the Tower, running out of file descriptors.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::sync::atomic::Ordering;
use std::time::Duration;

#[tokio::test]
async fn request_bodies_past_the_limit_get_413() {
    let (_t, b, ing) = one_backend(&["--max-body-bytes", "1000"]).await;
    let status = |out: &str| out.get(9..12).unwrap_or("").to_owned();
    // Declared too long: refused before anything is forwarded.
    let big = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n{}",
        "a".repeat(2000)
    );
    let out = raw(ing.addr, big.as_bytes(), DEADLINE).await;
    assert_eq!(status(&out), "413", "{out}");
    assert_eq!(b.hits.load(Ordering::SeqCst), 0);
    // Streamed (chunked) past the limit: cut off, answered 413.
    let chunk = format!("{:x}\r\n{}\r\n", 800, "c".repeat(800));
    let chunked = format!("POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}{chunk}0\r\n\r\n");
    let out = raw(ing.addr, chunked.as_bytes(), DEADLINE).await;
    assert_eq!(status(&out), "413", "{out}");
    // Within the limit: served.
    let ok = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\nConnection: close\r\n\r\n{}",
        "o".repeat(900)
    );
    let out = raw(ing.addr, ok.as_bytes(), DEADLINE).await;
    assert_eq!(status(&out), "200", "{out}");
    assert!(out.ends_with("received=900\n"));
}

#[tokio::test]
async fn connections_close_after_the_request_limit() {
    let t = tower("30s");
    let b = Backend::start("b").await;
    register(t.addr, "svc", b.addr);
    let ing = ingress(t.addr, &["/:svc"], &["--max-requests-per-connection", "3"]);
    let three = "GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\nGET /3 HTTP/1.1\r\nHost: x\r\n\r\nGET /4 HTTP/1.1\r\nHost: x\r\n\r\n";
    // `raw` returns when the server closes: after the third answer.
    let out = raw(ing.addr, three.as_bytes(), DEADLINE).await;
    assert_eq!(out.matches("HTTP/1.1 200").count(), 3, "{out}");
    assert!(out.contains("connection: close"), "{out}");
    assert!(!out.contains("GET /4"));
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn the_tower_survives_a_udp_flood_with_its_registrations() {
    let t = Proc::start(
        &[
            "tower",
            "--listen",
            "127.0.0.1:0",
            "--max-entries",
            "2000",
            "--max-per-name",
            "50",
        ],
        "tower listening on udp ",
    );
    assert_eq!(
        udp(t.addr, b"REGISTER|keep|127.0.0.1|8080"),
        "OK|REGISTERED|keep"
    );
    let rss_before = rss_kib(t.child.id());
    let started = std::time::Instant::now();
    // 4 senders x 25,000 datagrams: valid registrations under many names,
    // lookups, garbage, oversized datagrams, LIST. Replies are not waited for.
    let senders: Vec<_> = (0..4u32)
        .map(|n| {
            let addr = t.addr;
            std::thread::spawn(move || {
                let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                let big = vec![b'Z'; 4000];
                for i in 0..25_000u32 {
                    let msg: Vec<u8> = match i % 6 {
                        0 => format!(
                            "REGISTER|flood{}|10.0.{}.{}|{}",
                            i % 500,
                            n,
                            i % 250,
                            1 + i % 60_000
                        )
                        .into_bytes(),
                        1 => format!("LOOKUP|flood{}", i % 500).into_bytes(),
                        2 => vec![0xff, 0x00, b'|', (i % 251) as u8],
                        3 => big.clone(),
                        4 => b"LIST".to_vec(),
                        _ => b"DEREGISTER|nope|1.2.3.4|5".to_vec(),
                    };
                    let _ = s.send_to(&msg, addr);
                }
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    let took = started.elapsed();
    println!(
        "100,000 datagrams sent in {took:?} ({:.0}/s)",
        100_000.0 / took.as_secs_f64()
    );
    // Still answering, the valid registration intact, the caps held. The
    // Tower's queue may still be full of flood for a moment, so ask as a
    // real client does: again on silence.
    assert_eq!(udp_retrying(t.addr, b"PING"), "OK|PONG|tower");
    assert_eq!(
        udp_retrying(t.addr, b"LOOKUP|keep"),
        "OK|LOOKUP|keep|127.0.0.1|8080"
    );
    let list = udp_retrying(t.addr, b"LIST");
    let count: usize = list.split('|').nth(2).unwrap().parse().unwrap();
    assert!(count <= 2000, "cap held: {count}");
    let rss_after = rss_kib(t.child.id());
    println!("tower RSS {rss_before} KiB before, {rss_after} KiB after, {count} registrations");
    assert!(
        rss_after < rss_before + 32 * 1024,
        "memory bounded: {rss_before} -> {rss_after} KiB"
    );
}

/// One heartbeat as `portico register` sends it: up to 3 tries, a second
/// each. True when answered.
fn heartbeat(s: &std::net::UdpSocket, tower: std::net::SocketAddr) -> bool {
    let mut buf = [0u8; 2048];
    for _ in 0..3 {
        s.send_to(b"REGISTER|hb|127.0.0.1|7", tower).unwrap();
        if let Ok((n, _)) = s.recv_from(&mut buf) {
            assert_eq!(&buf[..n], b"OK|REGISTERED|hb");
            return true;
        }
    }
    false
}

#[test]
fn a_list_flood_leaves_heartbeats_answered_and_replies_small() {
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::sync::Arc;
    let t = Proc::start(
        &["tower", "--listen", "127.0.0.1:0", "--max-per-name", "2000"],
        "tower listening on udp ",
    );
    // 1,200 registrations: a LIST of them was 33-64 KB, encoded under the
    // table's lock for every datagram.
    let reg = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    reg.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 256];
    for i in 0..1200u32 {
        let msg = format!("REGISTER|svc{}|10.1.{}.{}|80", i % 40, i / 200, 1 + i % 200);
        reg.send_to(msg.as_bytes(), t.addr).unwrap();
        let (n, _) = reg.recv_from(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"OK|REGISTERED|"));
    }
    // One source floods LIST at 20,000 a second; another reads what comes back.
    let flood = Arc::new(std::net::UdpSocket::bind("127.0.0.2:0").unwrap());
    flood
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (replies, largest) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let sender = {
        let (flood, stop, tower) = (flood.clone(), stop.clone(), t.addr);
        std::thread::spawn(move || {
            let start = std::time::Instant::now();
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Paced in 5 ms steps: 100 datagrams per step.
                for _ in 0..100 {
                    let _ = flood.send_to(b"LIST", tower);
                }
                sent += 100;
                let due = start + Duration::from_micros(sent * 50);
                std::thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
            }
            sent
        })
    };
    let reader = {
        let (flood, stop) = (flood.clone(), stop.clone());
        let (replies, largest) = (replies.clone(), largest.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, _)) = flood.recv_from(&mut buf) {
                    assert!(buf[..n].starts_with(b"OK|LIST|"));
                    replies.fetch_add(1, Ordering::Relaxed);
                    largest.fetch_max(n, Ordering::Relaxed);
                }
            }
        })
    };
    // Meanwhile 40 heartbeats from this host's usual address, 50 ms apart.
    let hb = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    hb.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut unanswered = 0;
    for _ in 0..40 {
        if !heartbeat(&hb, t.addr) {
            unanswered += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().unwrap();
    reader.join().unwrap();
    let (replies, largest) = (
        replies.load(Ordering::Relaxed),
        largest.load(Ordering::Relaxed),
    );
    println!("{sent} LIST sent, {replies} replies, largest {largest} bytes");
    assert_eq!(unanswered, 0, "heartbeats unanswered under the LIST flood");
    assert!(replies > 0, "the flood was answered");
    assert!(largest <= 1232, "a LIST reply of {largest} bytes");
}

#[tokio::test]
async fn accept_survives_running_out_of_descriptors() {
    let t = tower("30s");
    let b = Backend::start("b").await;
    register(t.addr, "svc", b.addr);
    // The ingress may hold only 48 descriptors (soft and hard), so it runs
    // out long before these 120 clients are all accepted.
    let tower = t.addr.to_string();
    let ing = Proc::start_with_fd_limit(
        48,
        &[
            "ingress",
            "--listen",
            "127.0.0.1:0",
            "--tower",
            &tower,
            "--route",
            "/:svc",
            "--admin",
            "off",
        ],
        "ingress listening on ",
    );
    wait_synced(&ing, 1).await;
    let mut held = Vec::new();
    for _ in 0..120 {
        held.push(tokio::net::TcpStream::connect(ing.addr).await.unwrap());
    }
    let log = ing.log.clone();
    eventually(DEADLINE, "EMFILE noticed", || {
        log.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("out of resources"))
    })
    .await;
    drop(held);
    // Once descriptors are free again, new clients are served.
    let mut served = false;
    for _ in 0..400 {
        let out = raw(
            ing.addr,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            Duration::from_secs(2),
        )
        .await;
        if out.starts_with("HTTP/1.1 200") {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(served, "the accept loop recovered");
}

#[tokio::test]
async fn h2_rapid_reset_flood_is_cut_off_and_others_are_served() {
    let (_t, b, ing) = one_backend(&[]).await;
    // CVE-2023-44487: open a stream and reset it at once, thousands of times.
    let tcp = tokio::net::TcpStream::connect(ing.addr).await.unwrap();
    let (client, conn): (h2::client::SendRequest<bytes::Bytes>, _) =
        h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(conn);
    let mut opened = 0;
    for _ in 0..5000 {
        let req = hyper::Request::get(format!("http://{}/flood", ing.addr))
            .body(())
            .unwrap();
        let Ok(ready) = tokio::time::timeout(DEADLINE, client.clone().ready()).await else {
            break;
        };
        let Ok(mut ready) = ready else { break };
        let Ok((_, mut stream)) = ready.send_request(req, false) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        opened += 1;
    }
    // The flooding connection is ended by the server (GOAWAY), or survives
    // having cost nothing; either way the ingress serves everyone else.
    let ended = tokio::time::timeout(DEADLINE, driver).await;
    println!(
        "rapid reset: {opened} streams opened and reset; connection ended: {}",
        ended.is_ok()
    );
    for _ in 0..5 {
        assert_eq!(get(ing.addr, "/normal").await.status, 200);
    }
    assert!(
        b.hits.load(Ordering::SeqCst) < 5000,
        "reset streams mostly never reached the backend"
    );
}

#[tokio::test]
async fn a_slow_reader_cannot_hold_a_connection_past_the_timeouts() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = tower("30s");
    let b = Backend::start("b").await;
    register(t.addr, "svc", b.addr);
    let ing = ingress(
        t.addr,
        &["/:svc"],
        &["--idle-timeout", "300ms", "--backend-timeout", "300ms"],
    );
    wait_synced(&ing, 1).await;
    // Ask for 64 MiB and read nothing: writes stall once buffers fill.
    let mut s = tokio::net::TcpStream::connect(ing.addr).await.unwrap();
    s.write_all(b"GET /download?bytes=67108864 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    b.release.notify_one();
    // Meanwhile others are served.
    assert_eq!(get(ing.addr, "/other").await.status, 200);
    // Once the watchdog gives up, the connection is closed: reading now
    // ends well short of 64 MiB.
    let started = std::time::Instant::now();
    let stalled_for = Duration::from_millis(1500);
    tokio::time::sleep(stalled_for).await;
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match tokio::time::timeout(DEADLINE, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got += n,
            Err(_) => panic!("connection still open {:?} later", started.elapsed()),
        }
    }
    assert!(got < 64 << 20, "closed before the whole body: {got} bytes");
}

/// A backend that answers every request with an endless body, as fast
/// as it is taken. `closed` is notified when the ingress closes one of its
/// connections.
async fn endless_backend() -> (std::net::SocketAddr, std::sync::Arc<tokio::sync::Notify>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let closed = std::sync::Arc::new(tokio::sync::Notify::new());
    let c = closed.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let c = c.clone();
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|x| x == b"\r\n\r\n") {
                    match r.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let write = async {
                    let chunk = vec![b'x'; 64 * 1024];
                    let head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n";
                    if w.write_all(head).await.is_ok() {
                        while w.write_all(&chunk).await.is_ok() {}
                    }
                };
                // The ingress closing shows as the end of its side, or as a
                // write that fails.
                let read_end = async { while !matches!(r.read(&mut buf).await, Ok(0) | Err(_)) {} };
                tokio::select! {
                    _ = write => {}
                    _ = read_end => {}
                }
                c.notify_one();
            });
        }
    });
    (addr, closed)
}

#[tokio::test]
async fn an_h2_client_cannot_pin_a_backend_connection_with_pings() {
    let t = tower("30s");
    let (backend, closed) = endless_backend().await;
    register(t.addr, "svc", backend);
    let ing = ingress(
        t.addr,
        &["/:svc"],
        &["--idle-timeout", "2s", "--backend-timeout", "2s"],
    );
    wait_synced(&ing, 1).await;
    // A raw HTTP/2 client whose streams start with a window of 0: no
    // response byte can move. It PINGs every 0.5 s, so the connection is
    // never quiet.
    let tcp = tokio::net::TcpStream::connect(ing.addr).await.unwrap();
    let (mut client, mut conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    let mut pings = conn.ping_pong().unwrap();
    tokio::spawn(conn);
    tokio::spawn(async move {
        while pings.ping(h2::Ping::opaque()).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let req = hyper::Request::get("http://test.local/endless")
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    let resp = tokio::time::timeout(DEADLINE, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let started = std::time::Instant::now();
    // Cancelled at the idle timeout (2 s), with room for a loaded machine.
    tokio::time::timeout(Duration::from_secs(10), closed.notified())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the backend connection was still open after {:?}",
                started.elapsed()
            )
        });
    let _body = resp;
}

#[tokio::test]
async fn a_stalled_body_sender_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = tower("30s");
    let b = Backend::start("b").await;
    register(t.addr, "svc", b.addr);
    let ing = ingress(
        t.addr,
        &["/:svc"],
        &["--idle-timeout", "300ms", "--backend-timeout", "300ms"],
    );
    wait_synced(&ing, 1).await;
    let mut s = tokio::net::TcpStream::connect(ing.addr).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\npartial")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest))
        .await
        .expect("never cut off")
        .ok();
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(get(ing.addr, "/other").await.status, 200);
}

#[tokio::test]
async fn a_tower_answering_garbage_gets_a_clear_503_not_a_crash() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // One port, UDP and TCP, both answering nonsense.
    let addr = port_below_ephemeral_range();
    let udp = tokio::net::UdpSocket::bind(addr).await.unwrap();
    let tcp = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((_, from)) = udp.recv_from(&mut buf).await {
            let _ = udp
                .send_to(b"\xffOK|LOOKUP|svc|not-an-ip|99999999", from)
                .await;
        }
    });
    tokio::spawn(async move {
        while let Ok((mut s, _)) = tcp.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{not json")
                    .await;
            });
        }
    });
    let ing = ingress(addr, &["/:svc"], &[]);
    for _ in 0..5 {
        let a = get(ing.addr, "/").await;
        assert_eq!(a.status, 503, "{}", a.body);
        assert!(a.body.starts_with("Tower unreachable"), "{}", a.body);
    }
    let admin = ing.logged_addr("admin listening on ");
    assert_eq!(get(admin, "/healthz").await.status, 200);
    assert_eq!(get(admin, "/readyz").await.status, 503);
}

/// One HTTP/2 frame: length, type, flags, stream id, payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[tokio::test]
async fn h2_continuation_flood_is_cut_off_with_bounded_memory() {
    use tokio::io::AsyncWriteExt;
    let (_t, _b, ing) = one_backend(&[]).await;
    let rss_before = rss_kib(ing.child.id());
    let mut s = tokio::net::TcpStream::connect(ing.addr).await.unwrap();
    s.write_all(PREFACE).await.unwrap();
    s.write_all(&frame(0x4, 0, 0, &[])).await.unwrap(); // SETTINGS
                                                        // HEADERS without END_HEADERS, then CONTINUATION frames that never end
                                                        // the block, each a 16 KiB literal header field (HPACK: literal, new name).
    let mut field = vec![0x00, 0x03, b'x', b'-', b'a', 0x7f];
    let value_len: usize = 16_000;
    let mut rest = value_len - 127; // HPACK 7-bit prefix integer
    while rest >= 128 {
        field.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    field.push(rest as u8);
    field.extend(std::iter::repeat_n(b'v', value_len));
    // HEADERS (0x1) with no flags: neither END_HEADERS nor END_STREAM.
    s.write_all(&frame(0x1, 0, 1, &field)).await.unwrap();
    let mut sent = 0usize;
    for _ in 0..1000 {
        // CONTINUATION (0x9) with no END_HEADERS flag.
        if s.write_all(&frame(0x9, 0, 1, &field)).await.is_err() {
            break;
        }
        sent += 1;
    }
    println!("continuation flood: {sent} frames of 16 KiB written before the server cut it off");
    assert!(sent < 1000, "the server read 16 MiB of one header block");
    let rss_after = rss_kib(ing.child.id());
    assert!(
        rss_after < rss_before + 32 * 1024,
        "memory bounded: {rss_before} -> {rss_after} KiB"
    );
    assert_eq!(get(ing.addr, "/normal").await.status, 200);
}

#[tokio::test]
async fn h2_ping_flood_keeps_memory_bounded_and_others_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_t, _b, ing) = one_backend(&[]).await;
    let rss_before = rss_kib(ing.child.id());
    let s = tokio::net::TcpStream::connect(ing.addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    // Read (and drop) whatever comes back, so the server is not simply
    // blocked on a full socket; what is measured is its own bookkeeping.
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n) = r.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    });
    w.write_all(PREFACE).await.unwrap();
    w.write_all(&frame(0x4, 0, 0, &[])).await.unwrap();
    let mut batch = Vec::new();
    for i in 0..1000u64 {
        batch.extend(frame(0x6, 0, 0, &i.to_be_bytes()));
    }
    let mut sent = 0;
    for _ in 0..100 {
        if w.write_all(&batch).await.is_err() {
            break;
        }
        sent += 1000;
    }
    println!("ping flood: {sent} PINGs written");
    assert_eq!(get(ing.addr, "/normal").await.status, 200);
    let rss_after = rss_kib(ing.child.id());
    assert!(
        rss_after < rss_before + 32 * 1024,
        "memory bounded: {rss_before} -> {rss_after} KiB"
    );
    drop(w);
    reader.abort();
}

/// A request target over 16 KiB gets 414 however long it is: one too long
/// for the head's buffer (`--max-header-bytes`, 64 KiB) too, which hyper
/// would answer 431. On a kept-alive connection as on a new one.
#[tokio::test]
async fn a_target_longer_than_the_head_buffer_gets_414() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_t, b, ing) = one_backend(&[]).await;
    let status = |out: &str| out.get(9..12).unwrap_or("").to_owned();
    for len in [20_000, 100 * 1024, 1024 * 1024] {
        let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(len));
        let out = raw(ing.addr, long.as_bytes(), DEADLINE).await;
        assert_eq!(status(&out), "414", "{len}: {out}");
        assert!(out.ends_with("Request target too long.\n"), "{len}: {out}");
    }
    // The second request of a connection, after a served one.
    let mut s = tokio::net::TcpStream::connect(ing.addr).await.unwrap();
    s.write_all(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut s, |got| {
        String::from_utf8_lossy(got).contains("GET /first\n")
    })
    .await;
    let long = format!(
        "GET /{} HTTP/1.1\r\nHost: x\r\n\r\n",
        "b".repeat(100 * 1024)
    );
    // The proxy may answer and close before it has read all of this.
    let _ = s.write_all(long.as_bytes()).await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest)).await;
    let rest = String::from_utf8_lossy(&rest);
    assert_eq!(status(&rest), "414", "{rest}");
    assert_eq!(
        b.hits.load(Ordering::SeqCst),
        1,
        "only /first was forwarded"
    );
}

/// A backend may answer before it reads a request's body. The rest of the
/// body, read by the proxy after the response, is body, not a new request:
/// it must not be taken for a request target (an unsolicited 414), nor be
/// held to the header timeout.
#[tokio::test]
async fn a_body_read_after_an_early_answer_is_not_a_new_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Answers each request as soon as its head is in, without its body.
    let early = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let early_addr = early.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = early.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
                    .await;
                // Read (and drop) whatever else comes, until the proxy closes.
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    let t = tower("30s");
    register(t.addr, "early", early_addr);
    let ing = ingress(t.addr, &["/:early"], &["--header-timeout", "1s"]);
    wait_synced(&ing, 1).await;

    let mut s = tokio::net::TcpStream::connect(ing.addr).await.unwrap();
    s.write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 20002\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut s, |got| got.ends_with(b"ok\n")).await;
    // Now the body, which looks like a request line over 16 KiB, slowly:
    // past the header timeout in all.
    let body = format!("x {}", "a".repeat(20_000));
    let started = std::time::Instant::now();
    for piece in body.as_bytes().chunks(5_000) {
        s.write_all(piece).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    }
    assert!(started.elapsed() > std::time::Duration::from_secs(1));
    s.write_all(b"GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest)).await;
    let rest = String::from_utf8_lossy(&rest);
    assert!(!rest.contains("414"), "an answer to no request: {rest}");
    assert!(
        rest.is_empty() || rest.starts_with("HTTP/1.1 200"),
        "only an answer to GET /next, if any: {rest}"
    );
}

/// Read from `s` until what came satisfies `done`, within the deadline.
async fn read_until(s: &mut tokio::net::TcpStream, done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    while !done(&got) {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    got
}

/// One GET on `s`, its response read whole (a Content-Length body).
async fn keep_alive_get(s: &mut tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET /idle HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = s.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.parse().ok())
            .expect("a content-length");
        if body.len() >= length {
            return;
        }
    }
}

/// A keep-alive connection between requests holds its socket and a small
/// state, no read or write buffer (hyper's held 8 KiB and more each): the
/// ingress's RSS grows by well under the 4 KiB of one buffer per
/// connection held. Memory, not speed: the bound is set far from both.
/// One thread, as the benchmark runs it (the current-thread scheduler).
#[tokio::test]
async fn idle_keep_alive_connections_hold_no_buffers() {
    const HELD: usize = 2_000;
    let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit");
    let want = limit.0.max(3 * HELD as u64).min(limit.1);
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, want, limit.1)
        .expect("raise the test's own descriptor limit");
    let t = tower("30s");
    let b = Backend::start("b").await;
    register(t.addr, "svc", b.addr);
    let ing = ingress(t.addr, &["/:svc"], &["--threads", "1"]);
    let connect = || tokio::net::TcpStream::connect(ing.addr);
    let mut warm = connect().await.expect("connect");
    wait_for_value("routed", &true, Duration::from_millis(20), || async {
        let mut s = connect().await.expect("connect");
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        out.starts_with(b"HTTP/1.1 200")
    })
    .await;
    // The allocator's and the runtime's first growth happens here.
    let mut held = Vec::with_capacity(2 * HELD);
    for _ in 0..HELD / 4 {
        let mut s = connect().await.expect("connect");
        keep_alive_get(&mut s).await;
        held.push(s);
    }
    keep_alive_get(&mut warm).await;
    let before = rss_kib(ing.child.id());
    for _ in 0..HELD {
        let mut s = connect().await.expect("connect");
        keep_alive_get(&mut s).await;
        held.push(s);
    }
    // Every connection is idle and kept: one more request on the first.
    keep_alive_get(&mut warm).await;
    let after = rss_kib(ing.child.id());
    let per_connection = (after.saturating_sub(before) * 1024) as usize / HELD;
    println!("{HELD} idle keep-alive connections: RSS {before} -> {after} KiB, {per_connection} bytes each");
    assert!(
        per_connection < 3 * 1024,
        "an idle connection holds {per_connection} bytes"
    );
}
