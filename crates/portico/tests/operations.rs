//! Operations end to end: the admin listener (metrics, health, routes,
//! endpoints, the status page in a real browser), the access log, and
//! config reloads, against real processes.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use tokio_tungstenite::tungstenite::Message;

fn admin(ing: &Proc) -> SocketAddr {
    ing.logged_addr("admin listening on ")
}

/// Parse the Prometheus text format strictly enough that a malformed line
/// fails: `name{label="value",...} number`, comments, and `# EOF`.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            assert!(
                line.is_empty()
                    || line.starts_with("# HELP ")
                    || line.starts_with("# TYPE ")
                    || line.starts_with("# UNIT ")
                    || line == "# EOF",
                "bad comment line {line:?}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value in {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad name in {line:?}"
        );
        if name_end < series.len() {
            let labels = &series[name_end..];
            assert!(
                labels.starts_with('{') && labels.ends_with('}'),
                "bad labels in {line:?}"
            );
            for pair in labels[1..labels.len() - 1]
                .split("\",")
                .filter(|p| !p.is_empty())
            {
                let (k, v) = pair
                    .split_once("=\"")
                    .unwrap_or_else(|| panic!("bad label {pair:?} in {line:?}"));
                assert!(
                    k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "bad label name in {line:?}"
                );
                assert!(!v.contains('\n'));
            }
        }
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        out.insert(series.to_owned(), value);
    }
    out
}

async fn metrics(addr: SocketAddr) -> HashMap<String, f64> {
    let a = get(addr, "/metrics").await;
    assert_eq!(a.status, 200);
    assert!(
        a.body.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF"
    );
    parse_metrics(&a.body)
}

#[tokio::test]
async fn metrics_parse_and_move_with_traffic() {
    let t = tower("30s");
    let b = Backend::start("b").await;
    register(t.addr, "svc", b.addr);
    // A flag that no longer has an effect still starts the ingress.
    let ing = ingress(
        t.addr,
        &["/app:svc", "/none:nobody"],
        &["--fair-interval", "4"],
    );
    wait_synced(&ing, 1).await;
    assert!(
        ing.log_text().contains("--fair-interval has no effect"),
        "{}",
        ing.log_text()
    );
    let admin = admin(&ing);
    let ok = r#"portico_requests_total{route="/app",service="svc",status_class="2xx"}"#;
    let unavailable =
        r#"portico_requests_total{route="/none",service="nobody",status_class="5xx"}"#;
    let not_found = r#"portico_requests_total{route="none",service="",status_class="4xx"}"#;
    let before = metrics(admin).await;
    let mut c = Client::connect(ing.addr).await;
    for _ in 0..7 {
        assert_eq!(c.get("/app/x").await.status, 200);
    }
    assert_eq!(c.get("/none").await.status, 503);
    assert_eq!(c.get("/elsewhere").await.status, 404);
    drop(c);
    let m = metrics(admin).await;
    let moved = |k: &str| m.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
    assert_eq!(moved(ok), 7.0);
    assert_eq!(moved(unavailable), 1.0);
    assert_eq!(moved(not_found), 1.0);
    assert_eq!(
        moved(r#"portico_request_duration_seconds_count{route="/app"}"#),
        7.0
    );
    assert_eq!(
        m[r#"portico_endpoints{service="svc",state="healthy"}"#],
        1.0
    );
    assert_eq!(m["portico_discovery_synced"], 1.0);
    assert!(m["portico_connections_total"] >= 1.0);
    // Seven requests in a row to one replica: pooled, so at least one
    // backend connection and fewer than one per request; the last one
    // goes back to the pool.
    let opened = moved("portico_upstream_connections_total");
    assert!((1.0..7.0).contains(&opened), "{opened} backend connections");
    let deadline = std::time::Instant::now() + DEADLINE;
    while metrics(admin).await["portico_upstream_idle_connections"] < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no idle pooled connection"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    // Read from tokio at scrape time: the requests above took some.
    let busy = m["portico_worker_busy_seconds_total"];
    assert!(busy > 0.0, "{busy}");

    assert_eq!(get(admin, "/healthz").await.status, 200);
    assert_eq!(get(admin, "/readyz").await.status, 200);
    let routes: serde_json::Value =
        serde_json::from_str(&get(admin, "/routes").await.body).unwrap();
    let app = routes
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["prefix"] == "/app")
        .unwrap();
    assert_eq!(app["service"], "svc");
    assert_eq!(app["responses"]["2xx"], 7);
    let endpoints: serde_json::Value =
        serde_json::from_str(&get(admin, "/endpoints").await.body).unwrap();
    assert_eq!(endpoints["svc"][0]["address"], b.addr.to_string());
    assert_eq!(endpoints["svc"][0]["state"], "healthy");
    assert_eq!(endpoints["nobody"].as_array().unwrap().len(), 0);

    // The Tower has metrics of its own.
    let tm = get(t.addr, "/metrics").await;
    let tm = parse_metrics(&tm.body);
    assert_eq!(tm["portico_tower_registrations"], 1.0);
    assert!(tm[r#"portico_tower_requests_total{command="REGISTER"}"#] >= 1.0);
}

/// Each worker thread keeps its own idle backend connections, up to the
/// whole --pool-max-idle, as each nginx worker keeps its `keepalive`: however
/// the clients fall on the workers, their backend connections are reused.
/// (With the limit split between the workers, a worker holding 3 of the 4
/// clients reopened one per request.)
#[tokio::test]
async fn every_worker_reuses_its_backend_connections() {
    let (_t, _b, ing) = one_backend(&["--threads", "2", "--pool-max-idle", "4"]).await;
    let admin = admin(&ing);
    let addr = ing.addr;
    let clients: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = Client::connect(addr).await;
                for _ in 0..50 {
                    assert_eq!(c.get("/x").await.status, 200);
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    let m = metrics(admin).await;
    let opened = m["portico_upstream_connections_total"];
    assert!(opened <= 8.0, "{opened} backend connections for 4 clients");
    assert!(m["portico_upstream_idle_connections"] <= 8.0);
}

#[tokio::test]
async fn readyz_follows_the_towers_watch() {
    let t = tower("30s");
    let ing = ingress(t.addr, &["/:svc"], &[]);
    wait_synced(&ing, 1).await;
    let admin = admin(&ing);
    assert_eq!(get(admin, "/readyz").await.status, 200);
    drop(t);
    let log = ing.log.clone();
    eventually(DEADLINE, "watch lost", || {
        log.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("lost the Tower's watch"))
    })
    .await;
    assert_eq!(get(admin, "/readyz").await.status, 503);
    assert_eq!(
        get(admin, "/healthz").await.status,
        200,
        "alive all the same"
    );
}

type WebSocket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A WebSocket through the ingress at `addr`, shown to echo.
async fn websocket(addr: SocketAddr) -> WebSocket {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(format!("ws://{addr}/"), stream)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    assert_echoes(&mut ws, "open").await;
    ws
}

async fn assert_echoes(ws: &mut WebSocket, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    let back = tokio::time::timeout(DEADLINE, ws.next()).await.unwrap();
    assert_eq!(back.unwrap().unwrap(), Message::text(text));
}

/// Close `ws` and read until the tunnel has ended.
async fn close(mut ws: WebSocket) {
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = tokio::time::timeout(DEADLINE, ws.next()).await.unwrap() {}
}

async fn active_connections(admin: SocketAddr) -> f64 {
    metrics(admin).await["portico_active_connections"]
}

#[tokio::test]
async fn websocket_tunnels_hold_their_connection_slots_and_count_as_active() {
    let t = tower("30s");
    let echo = websocket_echo().await;
    register(t.addr, "ws", echo);
    let ing = ingress(t.addr, &["/:ws"], &["--max-connections", "2"]);
    wait_synced(&ing, 1).await;
    let first = websocket(ing.addr).await;
    let mut second = websocket(ing.addr).await;
    let out = raw(ing.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", DEADLINE).await;
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert!(out.ends_with("At capacity.\n"), "{out}");
    assert_eq!(active_connections(admin(&ing)).await, 2.0);

    // A tunnel that ends gives its slot back.
    close(first).await;
    let deadline = std::time::Instant::now() + DEADLINE;
    while active_connections(admin(&ing)).await != 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "slot never given back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let third = websocket(ing.addr).await;
    assert_echoes(&mut second, "still open").await;
    close(third).await;
    close(second).await;
}

#[tokio::test]
async fn sigterm_drain_waits_for_an_open_tunnel() {
    let t = tower("30s");
    let echo = websocket_echo().await;
    register(t.addr, "ws", echo);
    // Longer than the test's own deadline: an exit is the tunnel's doing.
    let mut ing = ingress(t.addr, &["/:ws"], &["--drain-timeout", "120s"]);
    wait_synced(&ing, 1).await;
    let mut ws = websocket(ing.addr).await;
    ing.signal(nix::sys::signal::Signal::SIGTERM);
    let log = ing.log.clone();
    eventually(DEADLINE, "drain waiting for one connection", || {
        log.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("draining connections") && l.contains("open=1"))
    })
    .await;
    // The tunnel still carries messages while the drain waits for it.
    assert_echoes(&mut ws, "during the drain").await;
    assert!(
        ing.child.try_wait().unwrap().is_none(),
        "exited under a tunnel"
    );
    close(ws).await;
    let status = ing.wait_exit(DEADLINE);
    assert!(status.success(), "{status:?}");
    assert!(ing.log_text().contains("drained"), "{}", ing.log_text());
}

#[tokio::test]
async fn the_drain_timeout_closes_tunnels_left_open() {
    let t = tower("30s");
    let echo = websocket_echo().await;
    register(t.addr, "ws", echo);
    let mut ing = ingress(t.addr, &["/:ws"], &["--drain-timeout", "1s"]);
    wait_synced(&ing, 1).await;
    let mut ws = websocket(ing.addr).await;
    ing.signal(nix::sys::signal::Signal::SIGTERM);
    let status = ing.wait_exit(DEADLINE);
    assert!(status.success(), "{status:?}");
    assert!(
        ing.log_text().contains("drain timeout passed"),
        "{}",
        ing.log_text()
    );
    // The client sees its tunnel end.
    while let Some(Ok(_)) = tokio::time::timeout(DEADLINE, ws.next()).await.unwrap() {}
}

#[tokio::test]
async fn access_log_lines_carry_route_endpoint_and_request_id() {
    let t = tower("30s");
    let b = Backend::start("b").await;
    register(t.addr, "svc", b.addr);
    let log = AccessLogFile::new("access");
    let ing = log.ingress(t.addr, "json");
    let mut c = Client::connect(ing.addr).await;
    assert_eq!(
        c.send(get_req("/given", &[("x-request-id", "req-123")]))
            .await
            .status,
        200
    );
    assert_eq!(
        b.last_seen().header("x-request-id"),
        Some("req-123"),
        "kept and passed on"
    );
    assert_eq!(c.get("/made").await.status, 200);
    let made = b.last_seen().header("x-request-id").unwrap().to_owned();
    assert_eq!(made.len(), 32, "generated when absent");
    let lines: Vec<serde_json::Value> = log
        .lines(2)
        .await
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first = &lines[0];
    assert_eq!(first["uri"], "/given");
    assert_eq!(first["status"], 200);
    assert_eq!(first["route"], "/");
    assert_eq!(first["service"], "svc");
    assert_eq!(first["endpoint"], b.addr.to_string());
    assert_eq!(first["attempts"], 1);
    assert_eq!(first["request_id"], "req-123");
    assert_eq!(
        first["bytes"].as_u64().unwrap() as usize,
        "backend=b GET /given\n".len()
    );
    assert!(first["duration_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(lines[1]["request_id"], made.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_in_a_browser_shows_routes_and_endpoints_live() {
    let t = tower("30s");
    let a = Backend::start("a").await;
    register(t.addr, "shop", a.addr);
    let ing = ingress(t.addr, &["/shop:shop", "/:web"], &[]);
    wait_synced(&ing, 1).await;
    let url = format!("http://{}/", admin(&ing));

    let dom = tokio::task::spawn_blocking({
        let url = url.clone();
        move || browser_dom(&url, None)
    })
    .await
    .unwrap();
    assert!(
        dom.contains("/shop") && dom.contains("shop"),
        "routes shown: {dom}"
    );
    assert!(dom.contains(&a.addr.to_string()), "endpoint shown");
    assert!(
        dom.contains("no live endpoint"),
        "a routed service with none is shown"
    );
    assert!(dom.contains(">ready<"), "readiness shown");

    // A new registration shows up without anything but the page's own refresh.
    let b = Backend::start("b").await;
    register(t.addr, "web", b.addr);
    let dom = tokio::task::spawn_blocking({
        let url = url.clone();
        move || browser_dom(&url, None)
    })
    .await
    .unwrap();
    assert!(dom.contains(&b.addr.to_string()), "new endpoint shown");

    let artifacts = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("status-page.png");
    tokio::task::spawn_blocking({
        let shot = shot.clone();
        move || browser_dom(&url, Some(&shot))
    })
    .await
    .unwrap();
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG"),
        "screenshot saved at {}",
        shot.display()
    );
    println!("status page screenshot: {}", shot.display());
}

#[tokio::test]
async fn reload_swaps_routes_keeps_open_streams_and_refuses_bad_files() {
    let t = tower("30s");
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    register(t.addr, "a", a.addr);
    register(t.addr, "b", b.addr);
    let dir = std::env::temp_dir().join(format!("portico-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("portico.toml");
    std::fs::write(&cfg, "[[route]]\nprefix = \"/\"\nservice = \"a\"\n").unwrap();
    let cfg_arg = cfg.to_str().unwrap().to_owned();
    let ing = ingress(t.addr, &[], &["--config", &cfg_arg]);
    wait_synced(&ing, 1).await;
    assert_eq!(get(ing.addr, "/").await.headers["x-backend"], "a");

    // A long download is under way on a when the routes change.
    let s = tokio::net::TcpStream::connect(ing.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(get_req("/download?bytes=1048576", &[]))
        .await
        .unwrap();
    let mut stream = resp.into_body();
    let first = stream.frame().await.unwrap().unwrap();
    let mut got = first.data_ref().map_or(0, |d| d.len());

    let reloads = |ing: &Proc| ing.log_text().matches("config reloaded").count();
    std::fs::write(
        &cfg,
        "[[route]]\nprefix = \"/\"\nservice = \"b\"\nstrip_prefix = false\n",
    )
    .unwrap();
    let log = ing.log.clone();
    eventually(DEADLINE, "reload applied", || {
        log.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("config reloaded"))
    })
    .await;
    assert_eq!(
        get(ing.addr, "/").await.headers["x-backend"],
        "b",
        "new requests follow the new routes"
    );

    // The open stream carries on to the end.
    a.release.notify_one();
    while let Some(frame) = tokio::time::timeout(DEADLINE, stream.frame())
        .await
        .unwrap()
    {
        got += frame.unwrap().data_ref().map_or(0, |d| d.len());
    }
    assert_eq!(got, 1_048_576);

    // A broken file is refused with the reason; traffic carries on.
    let applied = reloads(&ing);
    std::fs::write(&cfg, "[[route]]\nprefix = \"/\"\n").unwrap();
    eventually(DEADLINE, "refusal logged", || {
        log.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("config refused") && l.contains("missing field `service`"))
    })
    .await;
    assert_eq!(reloads(&ing), applied);
    assert_eq!(get(ing.addr, "/").await.headers["x-backend"], "b");
    let m = parse_metrics(&get(admin(&ing), "/metrics").await.body);
    assert!(m[r#"portico_config_reloads_total{result="refused"}"#] >= 1.0);

    // SIGHUP reloads even when the file did not change.
    std::fs::write(&cfg, "[[route]]\nprefix = \"/\"\nservice = \"a\"\n").unwrap();
    eventually(DEADLINE, "fixed file applied", || reloads(&ing) > applied).await;
    let before = reloads(&ing);
    ing.signal(nix::sys::signal::Signal::SIGHUP);
    eventually(DEADLINE, "SIGHUP reload", || reloads(&ing) > before).await;
    assert_eq!(get(ing.addr, "/").await.headers["x-backend"], "a");
    assert_eq!(
        a.hits.load(Ordering::SeqCst) + b.hits.load(Ordering::SeqCst),
        5
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_fair_interval_out_of_range_stops_the_start_with_the_reason() {
    for bad in ["0", "256", "x"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_portico"))
            .args(["ingress", "--route", "/:svc", "--fair-interval", bad])
            .output()
            .unwrap();
        assert!(!out.status.success(), "--fair-interval {bad} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--fair-interval"), "{err}");
    }
}
