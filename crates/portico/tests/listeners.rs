//! The Tower's HTTP API and the admin listener against careless or hostile
//! clients (issue 18): web pages writing to the registry, slow and idle
//! connections, too many connections or blocking queries, and metric
//! series that outlive their services. Real processes, 127.0.0.1 only.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn tower_with(extra: &[&str]) -> Proc {
    let mut args = vec!["tower", "--listen", "127.0.0.1:0", "--ttl", "30s"];
    args.extend_from_slice(extra);
    Proc::start(&args, "tower listening on udp ")
}

const API: &str = r#"{"name":"api","ip":"127.0.0.1","port":8181}"#;

async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    use http_body_util::BodyExt;
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "tower");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = http_body_util::Full::new(bytes::Bytes::from(body.to_owned()))
        .map_err(|n| match n {})
        .boxed();
    Client::connect(addr)
        .await
        .send(req.body(body).unwrap())
        .await
}

/// Read until the server closes the connection; None if it is still open
/// at the deadline.
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> Option<String> {
    let mut out = Vec::new();
    match tokio::time::timeout(within, s.read_to_end(&mut out)).await {
        Ok(_) => Some(String::from_utf8_lossy(&out).into_owned()),
        Err(_) => None,
    }
}

#[tokio::test]
async fn web_pages_cannot_write_to_the_registry() {
    let t = tower("30s");
    let json = ("content-type", "application/json");

    // A page can POST text/plain (or a form) anywhere without asking first.
    let a = send(
        t.addr,
        "POST",
        "/v1/register",
        &[("content-type", "text/plain")],
        API,
    )
    .await;
    assert_eq!(a.status, 415, "{}", a.body);
    assert!(a.body.contains("application/json"), "{}", a.body);
    let a = send(t.addr, "POST", "/v1/register", &[], API).await;
    assert_eq!(a.status, 415, "no content type: {}", a.body);

    // JSON from a page of another origin: refused, whatever the method.
    let evil = ("origin", "https://evil.example");
    let a = send(t.addr, "POST", "/v1/register", &[json, evil], API).await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.body.contains("--http-allow-origin"), "{}", a.body);
    let a = send(t.addr, "GET", "/v1/services", &[evil], "").await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert_eq!(udp(t.addr, b"LOOKUP|api"), "ERR|NOT_FOUND|api");

    // Programs (no Origin) write as before, with JSON.
    let a = send(t.addr, "POST", "/v1/register", &[json], API).await;
    assert_eq!(a.status, 200, "{}", a.body);
}

#[tokio::test]
async fn a_listed_origin_may_call_the_api() {
    let t = tower_with(&["--http-allow-origin", "https://ops.example"]);
    let evil = ("origin", "https://evil.example");
    let a = send(t.addr, "GET", "/v1/services", &[evil], "").await;
    assert_eq!(a.status, 403, "{}", a.body);

    // Its CORS preflight is answered, and it writes.
    let ops = ("origin", "https://ops.example");
    let a = send(
        t.addr,
        "OPTIONS",
        "/v1/register",
        &[ops, ("access-control-request-method", "POST")],
        "",
    )
    .await;
    assert_eq!(a.status, 204);
    assert_eq!(
        a.headers["access-control-allow-origin"],
        "https://ops.example"
    );
    assert!(a.headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("content-type"));
    let a = send(
        t.addr,
        "POST",
        "/v1/register",
        &[("content-type", "application/json; charset=utf-8"), ops],
        API,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        a.headers["access-control-allow-origin"],
        "https://ops.example"
    );
    assert_eq!(udp(t.addr, b"LOOKUP|api"), "OK|LOOKUP|api|127.0.0.1|8181");
}

#[tokio::test]
async fn a_half_sent_head_and_an_idle_connection_are_closed() {
    let t = tower_with(&["--http-header-timeout", "1s", "--http-idle-timeout", "2s"]);

    // Half a head: closed after the header timeout, never answered.
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(t.addr).await.unwrap();
    s.write_all(b"GET /v1/services HTTP/1.1\r\nHost: tower\r\n")
        .await
        .unwrap();
    let got = closed_within(&mut s, DEADLINE).await;
    let got = got.expect("a half-sent head still held its connection at the deadline");
    assert!(got.is_empty(), "answered: {got}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    // The rest of the head now finds the connection gone.
    let _ = s.write_all(b"\r\n").await;
    assert_eq!(closed_within(&mut s, DEADLINE).await.as_deref(), Some(""));

    // A connection that never says anything owes its head too: closed at
    // the header timeout, long before the idle one.
    let quiet = tower_with(&["--http-header-timeout", "1s", "--http-idle-timeout", "60s"]);
    let mut s = tokio::net::TcpStream::connect(quiet.addr).await.unwrap();
    let got = closed_within(&mut s, DEADLINE).await;
    assert_eq!(
        got.as_deref(),
        Some(""),
        "a silent connection was still open"
    );

    // A keep-alive connection that goes quiet after its request.
    let mut s = tokio::net::TcpStream::connect(t.addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: tower\r\n\r\n")
        .await
        .unwrap();
    let got = closed_within(&mut s, DEADLINE).await;
    let got = got.expect("an idle connection was still open at the deadline");
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
}

#[tokio::test]
async fn past_the_connection_cap_a_client_gets_503() {
    let t = tower_with(&["--http-max-connections", "2"]);
    // Two keep-alive clients, each answered, so both hold a slot.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = Client::connect(t.addr).await;
        assert_eq!(c.get("/healthz").await.status, 200);
        held.push(c);
    }
    let a = get(t.addr, "/healthz").await;
    assert_eq!(a.status, 503, "{}", a.body);
    assert!(a.body.contains("--http-max-connections"), "{}", a.body);

    // A slot comes back when a client leaves.
    drop(held.pop());
    let deadline = Instant::now() + DEADLINE;
    loop {
        if get(t.addr, "/healthz").await.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "no slot came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn watches_waiting(tower: SocketAddr) -> u64 {
    let text = get(tower, "/metrics").await.body;
    text.lines()
        .find_map(|l| l.strip_prefix("portico_tower_watches "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(u64::MAX)
}

#[tokio::test]
async fn past_the_watch_cap_a_blocking_query_gets_503_at_once() {
    let t = tower_with(&["--http-max-watches", "1"]);
    let doc: serde_json::Value =
        serde_json::from_str(&get(t.addr, "/v1/services").await.body).unwrap();
    let (index, epoch) = (
        doc["index"].as_u64().unwrap(),
        doc["epoch"].as_u64().unwrap(),
    );
    let blocking = format!("/v1/services?index={index}&epoch={epoch}&wait=60s");

    let addr = t.addr;
    let path = blocking.clone();
    let first = tokio::spawn(async move { get(addr, &path).await });
    let deadline = Instant::now() + DEADLINE;
    while watches_waiting(t.addr).await != 1 {
        assert!(Instant::now() < deadline, "the first query never waited");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let started = Instant::now();
    let a = get(t.addr, &blocking).await;
    assert_eq!(a.status, 503, "{}", a.body);
    assert!(a.body.contains("--http-max-watches"), "{}", a.body);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the refusal waited"
    );
    // Plain reads are not blocking queries: they still answer.
    assert_eq!(get(t.addr, "/v1/services").await.status, 200);

    // A change answers the first; its slot is free again.
    register(t.addr, "api", "127.0.0.1:8181".parse().unwrap());
    let a = tokio::time::timeout(DEADLINE, first)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.status, 200);
    while watches_waiting(t.addr).await != 0 {
        assert!(Instant::now() < deadline, "the slot never came back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn the_admin_listener_closes_a_half_sent_head() {
    let t = tower("30s");
    let ing = ingress(t.addr, &["/:svc"], &[]);
    let admin = ing.logged_addr("admin listening on ");
    assert_eq!(get(admin, "/healthz").await.status, 200);
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\n")
        .await
        .unwrap();
    // Its header timeout is a fixed 10 s.
    let got = closed_within(&mut s, Duration::from_secs(40)).await;
    let got = got.expect("a half-sent head still held the admin connection");
    assert!(got.is_empty(), "answered: {got}");
}

/// `portico_endpoints` series from the admin listener: labels -> value.
async fn endpoint_series(admin: SocketAddr) -> std::collections::HashMap<String, f64> {
    let a = get(admin, "/metrics").await;
    assert_eq!(a.status, 200);
    a.body
        .lines()
        .filter_map(|l| l.strip_prefix("portico_endpoints{"))
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(labels, v)| (labels.trim_end_matches('}').to_owned(), v.parse().unwrap()))
        .collect()
}

#[tokio::test]
async fn endpoint_series_follow_the_towers_services_and_are_capped() {
    let (t, _b, ing) = one_backend(&[]).await;
    let admin = ing.logged_addr("admin listening on ");

    // Throwaway registrations past the cap of 1,000 services: the routed
    // one keeps its series, 999 others get theirs, 6 are summed in _other.
    let replica: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let names: Vec<String> = (0..1005).map(|i| format!("s{i:04}")).collect();
    for name in &names {
        register(t.addr, name, replica);
    }
    let other = r#"service="_other",state="healthy""#;
    let deadline = Instant::now() + DEADLINE;
    let series = loop {
        let series = endpoint_series(admin).await;
        if series.get(other) == Some(&6.0) {
            break series;
        }
        assert!(
            Instant::now() < deadline,
            "no _other series counting 6: {} series, _other {:?}",
            series.len(),
            series.get(other)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(series.len(), 3 * 1001, "1,000 services and _other");
    assert_eq!(series[r#"service="svc",state="healthy""#], 1.0);
    assert_eq!(series[r#"service="s0998",state="healthy""#], 1.0);
    assert!(!series.contains_key(r#"service="s0999",state="healthy""#));

    // Gone from the Tower, gone from the metrics.
    for name in &names {
        let reply = udp(
            t.addr,
            format!("DEREGISTER|{name}|{}|{}", replica.ip(), replica.port()).as_bytes(),
        );
        assert!(reply.starts_with("OK|"), "{reply}");
    }
    loop {
        let series = endpoint_series(admin).await;
        if series.len() == 3 {
            assert_eq!(series[r#"service="svc",state="healthy""#], 1.0);
            break;
        }
        assert!(
            Instant::now() < deadline + DEADLINE,
            "stale series left: {} series",
            series.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
