//! The ingress end to end: real Tower, real ingress process, real hyper
//! backends and clients, all on 127.0.0.1:0.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Request;

#[tokio::test]
async fn keep_alive_routes_every_request_on_its_own() {
    let t = tower("30s");
    let api = Backend::start("api").await;
    let web = Backend::start("web").await;
    register(t.addr, "api-service", api.addr);
    register(t.addr, "frontend", web.addr);
    let ing = ingress(t.addr, &["/api:api-service", "/:frontend"], &[]);

    let mut c = Client::connect(ing.addr).await;
    for (path, want) in [
        ("/api", "api"),
        ("/", "web"),
        ("/api/x?q=1", "api"),
        ("/apiary", "web"),
        ("/api/../", "web"),
    ] {
        let a = c.get(path).await;
        assert_eq!(a.status, 200, "{path}");
        assert_eq!(a.headers["x-backend"], want, "{path}");
    }
    // The backend sees the normalised path and the query as sent.
    assert_eq!(api.seen.lock().unwrap()[1].path, "/api/x?q=1");
    assert_eq!(web.last_seen().path, "/");
}

#[tokio::test]
async fn pipelined_requests_are_routed_separately() {
    let t = tower("30s");
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    register(t.addr, "a", a.addr);
    register(t.addr, "b", b.addr);
    let ing = ingress(t.addr, &["/a:a", "/b:b"], &[]);
    let out = raw(
        ing.addr,
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\nGET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        DEADLINE,
    )
    .await;
    let order: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("x-backend: "))
        .collect();
    assert_eq!(order, ["a", "b", "a"], "{out}");
}

#[tokio::test]
async fn failover_past_a_dead_replica_loses_no_request() {
    let t = tower("30s");
    let live = Backend::start("live").await;
    register(t.addr, "svc", dead_addr());
    register(t.addr, "svc", live.addr);
    let ing = ingress(t.addr, &["/:svc"], &[]);
    for i in 0..30 {
        let a = get(ing.addr, &format!("/r{i}")).await;
        assert_eq!(a.status, 200, "request {i}: {}", a.body);
    }
    // POST with a body fails over too: nothing was sent to the dead replica.
    let mut c = Client::connect(ing.addr).await;
    for _ in 0..4 {
        let body = http_body_util::Full::new(Bytes::from_static(b"payload"))
            .map_err(|n| match n {})
            .boxed();
        let req = Request::post("/submit")
            .header("host", "x")
            .body(body)
            .unwrap();
        let a = c.send(req).await;
        assert_eq!(a.status, 200);
    }
    assert_eq!(live.last_seen().body_len, 7);
}

#[tokio::test]
async fn own_answers_404_503_502_504() {
    let t = tower("30s");
    let slow = Backend::start("slow").await;
    register(t.addr, "dead", dead_addr());
    register(t.addr, "slow", slow.addr);
    let ing = ingress(
        t.addr,
        &["/missing:nobody", "/dead:dead", "/slow:slow"],
        &["--backend-timeout", "300ms"],
    );
    let a = get(ing.addr, "/elsewhere").await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (404, "No route for this path.\n")
    );
    let a = get(ing.addr, "/missing").await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (503, "Service not found in Tower\n")
    );
    let a = get(ing.addr, "/dead").await;
    assert_eq!(a.status, 502, "{}", a.body);
    let a = get(ing.addr, "/slow?ms=3000").await;
    assert_eq!(a.status, 504, "{}", a.body);
    // A fast request to the same backend still works afterwards.
    let a = get(ing.addr, "/slow?ms=0").await;
    assert_eq!(a.status, 200);
}

#[tokio::test]
async fn forwarding_headers() {
    let t = tower("30s");
    let b = Backend::start("b").await;
    register(t.addr, "svc", b.addr);
    let ing = ingress(t.addr, &["/:svc"], &[]);
    let mut c = Client::connect(ing.addr).await;
    let sent = [
        ("x-forwarded-for", "203.0.113.7, 10.0.0.1"),
        ("x-real-ip", "6.6.6.6"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "evil.example"),
        ("connection", "keep-alive, x-hop"),
        ("x-hop", "secret"),
        ("keep-alive", "timeout=5"),
        ("x-end", "kept"),
    ];
    // Without a body our own client writes the fields; with one, hyper's
    // client gets them in the map. The backend must see the same.
    for with_body in [false, true] {
        let mut req = get_req("/h", &sent);
        if with_body {
            *req.method_mut() = hyper::Method::POST;
            *req.body_mut() = http_body_util::Full::new(Bytes::from_static(b"payload"))
                .map_err(|n| match n {})
                .boxed();
        }
        assert_eq!(c.send(req).await.status, 200);
        let seen = b.last_seen();
        let one = |name: &str| -> Option<String> {
            let values = seen.headers.get(name)?;
            assert_eq!(values.len(), 1, "{name} (body: {with_body}): {values:?}");
            values.first().cloned()
        };
        assert_eq!(
            one("x-forwarded-for").as_deref(),
            Some("203.0.113.7, 10.0.0.1, 127.0.0.1")
        );
        assert_eq!(one("x-real-ip").as_deref(), Some("127.0.0.1"));
        assert_eq!(one("x-forwarded-proto").as_deref(), Some("http"));
        assert_eq!(one("x-forwarded-host").as_deref(), Some("test.local"));
        assert_eq!(one("host").as_deref(), Some("test.local"), "Host is kept");
        assert_eq!(one("x-request-id").map(|id| id.len()), Some(32));
        assert_eq!(one("x-end").as_deref(), Some("kept"));
        assert_eq!(one("x-hop"), None);
        assert_eq!(one("keep-alive"), None);
    }
    // A client's request id is kept, not doubled.
    let req = get_req("/h", &[("x-request-id", "abc-123")]);
    assert_eq!(c.send(req).await.status, 200);
    assert_eq!(
        b.last_seen().headers.get("x-request-id"),
        Some(&vec!["abc-123".to_owned()])
    );
}

/// RFC 9112 3.2.2: a proxy makes the Host it forwards from an absolute-form
/// target (its port too, never its userinfo) rather than passing the one
/// received; hosts differing only in case are the same host.
#[tokio::test]
async fn an_absolute_form_target_names_the_host_the_backend_sees() {
    let t = tower("30s");
    let b = Backend::start("b").await;
    register(t.addr, "svc", b.addr);
    let ing = ingress(t.addr, &["/:svc"], &[]);
    for (request, host) in [
        (
            &b"GET http://user@a.example:8080/p HTTP/1.1\r\nHost: A.example:9090\r\nConnection: close\r\n\r\n"[..],
            "a.example:8080",
        ),
        (
            b"GET http://A.Example/q HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
            "A.Example",
        ),
        (
            b"GET /r HTTP/1.1\r\nHost: a.example:7\r\nConnection: close\r\n\r\n",
            "a.example:7",
        ),
    ] {
        let out = raw(ing.addr, request, DEADLINE).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        let seen = b.last_seen();
        assert_eq!(seen.headers.get("host"), Some(&vec![host.to_owned()]));
    }
}

/// A new connection costs the client as few segments as TCP allows: the
/// request is acknowledged by the response (no ACK of its own), and the
/// last response carries the FIN. Counted on the client's socket by `ss`;
/// only the segments without data are counted, as the response may span
/// several. The best of three tries: a slow moment may let the proxy's
/// delayed-ACK timer fire once, which only ever adds.
#[tokio::test]
async fn a_closing_exchange_sends_the_fin_with_the_response() {
    use std::io::{Read, Write};
    let t = tower("30s");
    let b = Backend::start("b").await;
    register(t.addr, "svc", b.addr);
    let ing = ingress(t.addr, &["/:svc"], &[]);
    let mut fewest = u64::MAX;
    for _ in 0..3 {
        let addr = ing.addr;
        let (got, counts) = tokio::task::spawn_blocking(move || {
            let mut c = std::net::TcpStream::connect(addr).expect("connect");
            c.set_read_timeout(Some(DEADLINE)).expect("timeout");
            c.write_all(b"GET /fin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .expect("send");
            let mut got = String::new();
            c.read_to_string(&mut got).expect("read to the end");
            let local = c.local_addr().expect("address").to_string();
            let out = std::process::Command::new("ss")
                .args(["-tinaH", "src", &local])
                .output()
                .expect("run ss (iproute2)");
            (got, String::from_utf8_lossy(&out.stdout).into_owned())
        })
        .await
        .expect("client");
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        assert!(got.contains("backend=b GET /fin"), "{got}");
        let field = |name: &str| -> u64 {
            counts
                .split_whitespace()
                .find_map(|f| f.strip_prefix(name))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in: {counts}"))
        };
        // The SYN-ACK, and nothing else without data.
        fewest = fewest.min(field("segs_in:") - field("data_segs_in:"));
    }
    assert_eq!(fewest, 1, "segments without data, besides the SYN-ACK");
}

#[tokio::test]
async fn ten_megabytes_stream_both_ways() {
    const TEN_MB: usize = 10 * 1024 * 1024;
    let t = tower("30s");
    let b = Backend::start("b").await;
    register(t.addr, "svc", b.addr);
    let ing = ingress(t.addr, &["/:svc"], &[]);

    // Download: the backend sends its first chunk and holds the rest until
    // the client has it, which only a streaming proxy can deliver.
    let mut c = Client::connect(ing.addr).await;
    let resp = {
        let req = get_req(&format!("/download?bytes={TEN_MB}"), &[]);
        let s = tokio::net::TcpStream::connect(ing.addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
                .await
                .unwrap();
        tokio::spawn(conn);
        sender.send_request(req).await.unwrap()
    };
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0usize;
    let mut released = false;
    while let Some(frame) = tokio::time::timeout(DEADLINE, body.frame())
        .await
        .expect("download stalled")
    {
        got += frame.unwrap().data_ref().map_or(0, |d| d.len());
        if !released && got > 0 {
            released = true;
            b.release.notify_one();
        }
    }
    assert_eq!(got, TEN_MB);

    // Upload: the client sends its first chunk and the rest only once the
    // backend has seen it.
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let body = ChannelReqBody(rx).boxed();
    let req = Request::post("/upload")
        .header("host", "x")
        .body(body)
        .unwrap();
    let arrived = b.arrived.clone();
    let feeder = tokio::spawn(async move {
        let chunk = Bytes::from(vec![b'u'; 64 * 1024]);
        tx.send(chunk.clone()).await.unwrap();
        tokio::time::timeout(DEADLINE, arrived.notified())
            .await
            .expect("first upload chunk never reached the backend");
        for _ in 1..(TEN_MB / chunk.len()) {
            tx.send(chunk.clone()).await.unwrap();
        }
    });
    let a = c.send(req).await;
    feeder.await.unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(a.body, format!("received={TEN_MB}\n"));
}

struct ChannelReqBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelReqBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|o| o.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

#[tokio::test]
async fn a_thousand_concurrent_connections() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();

    let t = tower("30s");
    let b = Backend::start("b").await;
    register(t.addr, "svc", b.addr);
    let ing = ingress(t.addr, &["/:svc"], &[]);
    // All 1,000 connections are open at once before any request is sent
    // (the seed refused everything past 64).
    let mut clients = Vec::new();
    for _ in 0..1000 {
        clients.push(Client::connect(ing.addr).await);
    }
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| tokio::spawn(async move { c.get("/").await.status }))
        .collect();
    let mut ok = 0;
    for task in tasks {
        if task.await.unwrap() == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 1000);
}

#[tokio::test]
async fn past_the_connection_limit_clients_get_503_at_capacity() {
    let t = tower("30s");
    let b = Backend::start("b").await;
    register(t.addr, "svc", b.addr);
    let ing = ingress(t.addr, &["/:svc"], &["--max-connections", "2"]);
    let mut c1 = Client::connect(ing.addr).await;
    let mut c2 = Client::connect(ing.addr).await;
    assert_eq!(c1.get("/").await.status, 200);
    assert_eq!(c2.get("/").await.status, 200);
    let out = raw(ing.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", DEADLINE).await;
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert!(out.ends_with("At capacity.\n"), "{out}");
    drop(c1);
    // Once a slot frees, new clients are served again.
    let mut served = false;
    for _ in 0..200 {
        if get_status_raw(ing.addr).await == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(served);
    assert_eq!(c2.get("/").await.status, 200);
}

async fn get_status_raw(addr: std::net::SocketAddr) -> u16 {
    let out = raw(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        DEADLINE,
    )
    .await;
    out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn malformed_and_oversized_requests() {
    let t = tower("30s");
    let b = Backend::start("b").await;
    register(t.addr, "svc", b.addr);
    let ing = ingress(t.addr, &["/:svc"], &[]);
    let status = |out: String| out.get(9..12).unwrap_or("").to_owned();

    let out = raw(ing.addr, b"GET / HTTP/1.1\r\n\r\n", DEADLINE).await;
    assert_eq!(status(out), "400", "HTTP/1.1 without Host (RFC 9112 3.2)");
    let out = raw(ing.addr, b"HELLO THERE\r\n\r\n", DEADLINE).await;
    assert_eq!(status(out), "400", "not HTTP");
    let out = raw(
        ing.addr,
        b"GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n",
        DEADLINE,
    )
    .await;
    assert_eq!(status(out), "400", "absolute-form naming another host");
    let long_uri = format!(
        "GET /{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "a".repeat(20_000)
    );
    let out = raw(ing.addr, long_uri.as_bytes(), DEADLINE).await;
    assert_eq!(status(out), "414");
    let big_header = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    let out = raw(ing.addr, big_header.as_bytes(), DEADLINE).await;
    assert_eq!(status(out), "431");
    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let out = raw(
        ing.addr,
        format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes(),
        DEADLINE,
    )
    .await;
    assert_eq!(status(out), "431");
    assert_eq!(
        b.hits.load(Ordering::SeqCst),
        0,
        "nothing reached the backend"
    );
}

#[tokio::test]
async fn header_and_idle_timeouts_close_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = tower("30s");
    let b = Backend::start("b").await;
    register(t.addr, "svc", b.addr);
    let ing = ingress(
        t.addr,
        &["/:svc"],
        &["--header-timeout", "300ms", "--idle-timeout", "600ms"],
    );

    // A head trickled in and never finished is cut at the header timeout.
    let mut s = tokio::net::TcpStream::connect(ing.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut buf))
        .await
        .expect("not closed")
        .ok();
    assert!(started.elapsed() >= Duration::from_millis(250));

    // A keep-alive connection with nothing to do is closed at the idle timeout,
    // and not at the (shorter) header timeout.
    let mut s = tokio::net::TcpStream::connect(ing.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    s.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let idle_from = std::time::Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest))
        .await
        .expect("idle connection never closed")
        .ok();
    assert!(
        idle_from.elapsed() >= Duration::from_millis(500),
        "closed after {:?}",
        idle_from.elapsed()
    );
}

/// On one thread (tokio's current-thread scheduler, where the signal, the
/// accept loop and the connections share it) and on several.
#[tokio::test]
async fn sigterm_drains_in_flight_requests() {
    for threads in ["1", "2"] {
        drains_in_flight_requests(threads).await;
    }
}

async fn drains_in_flight_requests(threads: &str) {
    let t = tower("30s");
    let b = Backend::start("b").await;
    register(t.addr, "svc", b.addr);
    let args = ["--drain-timeout", "10s", "--threads", threads];
    let mut ing = ingress(t.addr, &["/:svc"], &args);
    let addr = ing.addr;
    let in_flight = tokio::spawn(async move { get(addr, "/gate").await });
    tokio::time::timeout(DEADLINE, b.arrived.notified())
        .await
        .expect("request never reached the backend");
    ing.signal(nix::sys::signal::Signal::SIGTERM);
    // Stops accepting promptly...
    let deadline = std::time::Instant::now() + DEADLINE;
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "still accepting after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ...but the accepted request still gets its answer.
    b.release.notify_one();
    let a = in_flight.await.unwrap();
    assert_eq!((a.status, a.body.as_str()), (200, "backend=b gate\n"));
    // The keep-alive client is told this was the connection's last.
    assert_eq!(
        a.headers.get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    let status = ing.wait_exit(DEADLINE);
    assert!(status.success(), "{status:?}");
    assert!(ing.log_text().contains("drained"), "{}", ing.log_text());
}

/// Write `request`, shut the write side (as `nc -N` does), and read until
/// the ingress closes.
async fn half_closed_exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut out))
        .await
        .expect("the connection was not closed after the response")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_client_that_half_closes_after_its_request_gets_the_response() {
    let t = tower("30s");
    let b = Backend::start("b").await;
    register(t.addr, "svc", b.addr);
    // An idle timeout past the test's deadline: the close must follow the
    // response, not the timeout.
    let ing = ingress(t.addr, &["/:svc"], &["--idle-timeout", "120s"]);
    wait_synced(&ing, 1).await;

    // The backend answers after the end of input has arrived.
    let out = half_closed_exchange(ing.addr, b"GET /slow?ms=200 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with("backend=b slow\n"), "{out}");

    let out = half_closed_exchange(
        ing.addr,
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with("received=5\n"), "{out}");

    // Pipelined requests are all answered, in order.
    let out = half_closed_exchange(
        ing.addr,
        b"GET /slow?ms=100 HTTP/1.1\r\nHost: x\r\n\r\nGET /second HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!(out.matches("HTTP/1.1 200").count(), 2, "{out}");
    assert!(out.ends_with("backend=b GET /second\n"), "{out}");
}

/// A backend that reads a request head and never answers. `arrived` is
/// notified when a head has come, `closed` when the ingress then closes
/// that connection.
async fn silent_backend() -> (
    std::net::SocketAddr,
    std::sync::Arc<tokio::sync::Notify>,
    std::sync::Arc<tokio::sync::Notify>,
) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let arrived = std::sync::Arc::new(tokio::sync::Notify::new());
    let closed = std::sync::Arc::new(tokio::sync::Notify::new());
    let (a, c) = (arrived.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (a, c) = (a.clone(), c.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            seen.extend_from_slice(&buf[..n]);
                            if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                                a.notify_one();
                                seen.clear();
                            }
                        }
                    }
                }
                c.notify_one();
            });
        }
    });
    (addr, arrived, closed)
}

#[tokio::test]
async fn a_client_that_resets_cancels_its_backend_request() {
    use tokio::io::AsyncWriteExt;
    let t = tower("30s");
    let (backend, arrived, closed) = silent_backend().await;
    register(t.addr, "svc", backend);
    let ing = ingress(t.addr, &["/:svc"], &[]);
    wait_synced(&ing, 1).await;
    let mut s = tokio::net::TcpStream::connect(ing.addr).await.unwrap();
    s.write_all(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::timeout(DEADLINE, arrived.notified())
        .await
        .expect("the request never reached the backend");
    // Closed with SO_LINGER 0: a reset, not a FIN.
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
    tokio::time::timeout(DEADLINE, closed.notified())
        .await
        .expect("the backend request outlived its client");
}

#[tokio::test]
async fn http2_prior_knowledge_clients_are_routed_per_stream() {
    let t = tower("30s");
    let a = Backend::start("a").await;
    let w = Backend::start("w").await;
    register(t.addr, "a", a.addr);
    register(t.addr, "w", w.addr);
    let ing = ingress(t.addr, &["/a:a", "/:w"], &[]);
    let s = tokio::net::TcpStream::connect(ing.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(s),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for (path, want) in [("/a/1", "a"), ("/x", "w"), ("/a", "a")] {
        let req = Request::get(format!("http://h2.local{path}"))
            .body(empty())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-backend"], want);
    }
    assert_eq!(a.last_seen().header("host"), Some("h2.local"));
}

#[tokio::test]
async fn tower_down_is_a_clear_503_and_recovery_is_automatic() {
    let b = Backend::start("b").await;
    // A port where no Tower answers yet. It lies below the ephemeral range:
    // the ingress keeps trying to connect to it, and a closed ephemeral port
    // on loopback can be taken by such a connect to itself (TCP simultaneous
    // open), which would then keep the Tower from binding it.
    let tower_addr = port_below_ephemeral_range();
    let ing = ingress(tower_addr, &["/:svc"], &["--tower-timeout", "100ms"]);
    let a = get(ing.addr, "/").await;
    assert_eq!(a.status, 503);
    assert!(a.body.starts_with("Tower unreachable"), "{}", a.body);

    // The Tower comes up on that port: the same ingress routes, no restart.
    let t = Proc::start(
        &["tower", "--listen", &tower_addr.to_string()],
        "tower listening on udp ",
    );
    register(t.addr, "svc", b.addr);
    assert_eq!(get(ing.addr, "/").await.status, 200);
}

#[tokio::test]
async fn a_backend_sending_garbage_is_a_502_and_harms_no_one_else() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = tower("30s");
    let good = Backend::start("good").await;
    let garbage = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let garbage_addr = garbage.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = garbage.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"SSH-2.0-OpenSSH\r\n\x00\x01garbage\r\n\r\n")
                    .await;
            });
        }
    });
    register(t.addr, "bad", garbage_addr);
    register(t.addr, "good", good.addr);
    let ing = ingress(t.addr, &["/bad:bad", "/:good"], &[]);
    let mut c = Client::connect(ing.addr).await;
    let a = c.send(get_req("/bad", &[])).await;
    assert_eq!(a.status, 502, "{}", a.body);
    // The same client connection goes on serving.
    assert_eq!(c.get("/fine").await.status, 200);
}

/// Backend connections are kept for the next request. (That one idle for
/// `--pool-idle-timeout` is not used again is the pool's unit test
/// `a_connection_idle_for_the_timeout_is_not_checked_out`, with no wait.)
#[tokio::test]
async fn pooled_backend_connections_are_reused() {
    let t = tower("30s");
    let web = Backend::start("web").await;
    register(t.addr, "web", web.addr);
    let ing = ingress(t.addr, &["/:web"], &[]);
    let mut c = Client::connect(ing.addr).await;
    assert_eq!(c.get("/").await.status, 200);
    let first = web.last_seen().peer;
    assert_eq!(c.get("/").await.status, 200);
    assert_eq!(
        web.last_seen().peer,
        first,
        "the pooled connection is reused"
    );
}
