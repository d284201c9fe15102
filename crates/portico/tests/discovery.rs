//! Event-driven discovery end to end: the Tower's HTTP API and watch, the
//! ingress's local table, fallback to LOOKUP, faults under load, signed
//! registration. Real processes and sockets, 127.0.0.1 only.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let a = get(addr, path).await;
    (
        a.status,
        serde_json::from_str(&a.body).unwrap_or(serde_json::Value::Null),
    )
}

async fn http_post(addr: std::net::SocketAddr, path: &str, json: &str) -> (u16, String) {
    use http_body_util::BodyExt;
    let mut c = Client::connect(addr).await;
    let body = http_body_util::Full::new(bytes::Bytes::from(json.to_owned()))
        .map_err(|n| match n {})
        .boxed();
    let req = hyper::Request::post(path)
        .header("host", "tower")
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    let a = c.send(req).await;
    (a.status, a.body)
}

#[tokio::test]
async fn tower_http_api_lists_watches_and_registers() {
    let t = tower("30s");
    register(t.addr, "api", "127.0.0.1:8181".parse().unwrap());
    let (status, doc) = http_get(t.addr, "/v1/services").await;
    assert_eq!(status, 200);
    assert_eq!(doc["services"]["api"][0]["port"], 8181);
    let index = doc["index"].as_u64().unwrap();
    let epoch = doc["epoch"].as_u64().unwrap();

    // A blocking query returns as soon as something changes.
    let addr = t.addr;
    let started = Instant::now();
    let watch = tokio::spawn(async move {
        http_get(
            addr,
            &format!("/v1/services?index={index}&epoch={epoch}&wait=20s"),
        )
        .await
    });
    tokio::task::yield_now().await;
    let (status, body) = http_post(
        t.addr,
        "/v1/register",
        r#"{"name":"web","ip":"::1","port":9000}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, doc) = tokio::time::timeout(DEADLINE, watch)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, 200);
    assert!(doc["index"].as_u64().unwrap() > index);
    assert_eq!(doc["services"]["web"][0]["ip"], "::1");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "watch waited for its timeout"
    );

    // And waits out its `wait` when nothing changes.
    let index = doc["index"].as_u64().unwrap();
    let started = Instant::now();
    let (_, doc) = http_get(
        t.addr,
        &format!("/v1/services?index={index}&epoch={epoch}&wait=300ms"),
    )
    .await;
    assert_eq!(doc["index"].as_u64().unwrap(), index);
    assert!(started.elapsed() >= Duration::from_millis(250));

    // Another epoch (a restarted Tower) answers at once.
    let started = Instant::now();
    http_get(
        t.addr,
        &format!(
            "/v1/services?index={index}&epoch={}&wait=20s",
            epoch.wrapping_add(1)
        ),
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(5));

    let (status, _) = http_get(t.addr, "/v1/services/web").await;
    assert_eq!(status, 200);
    let (status, body) = http_post(
        t.addr,
        "/v1/deregister",
        r#"{"name":"web","ip":"::1","port":9000}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = http_get(t.addr, "/v1/services/web").await;
    assert_eq!(status, 404);
    let (status, _) = http_post(
        t.addr,
        "/v1/register",
        r#"{"name":"bad name","ip":"::1","port":1}"#,
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = http_post(t.addr, "/v1/register", "not json").await;
    assert_eq!(status, 400);
    // The UDP side sees HTTP registrations and vice versa.
    assert_eq!(udp(t.addr, b"LOOKUP|web"), "ERR|NOT_FOUND|web");
}

#[tokio::test]
async fn registration_reaches_traffic_within_milliseconds_and_deregistration_stops_it() {
    let t = tower("30s");
    let a = Backend::start("a").await;
    register(t.addr, "svc", a.addr);
    let ing = ingress(t.addr, &["/:svc"], &[]);
    wait_synced(&ing, 1).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (stats, tasks) = spawn_load(ing.addr, 4, 0, stop.clone());
    eventually(DEADLINE, "load flowing", || {
        a.hits.load(Ordering::SeqCst) > 50
    })
    .await;

    let b = Backend::start("b").await;
    let registered_at = Instant::now();
    register(t.addr, "svc", b.addr);
    eventually(DEADLINE, "new replica gets traffic", || {
        b.hits.load(Ordering::SeqCst) > 0
    })
    .await;
    let first = b.arrivals.lock().unwrap()[0];
    let delay = first.duration_since(registered_at);
    println!("register -> first request: {delay:?}");

    let deregistered_at = Instant::now();
    assert_eq!(
        udp(
            t.addr,
            format!("DEREGISTER|svc|127.0.0.1|{}", a.addr.port()).as_bytes()
        ),
        "OK|DEREGISTERED|svc"
    );
    // Keep the load on well past the deregistration, so that a replica
    // still in the table would show up in a's arrivals.
    let b_hits = b.hits.load(Ordering::SeqCst);
    eventually(DEADLINE, "load runs 500 ms past the deregistration", || {
        deregistered_at.elapsed() > Duration::from_millis(500)
            && b.hits.load(Ordering::SeqCst) > b_hits + 200
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let last_a = *a.arrivals.lock().unwrap().last().unwrap();
    let tail = last_a.saturating_duration_since(deregistered_at);
    println!("deregister -> last request to the old replica: {tail:?}");
    let (ok, non_2xx, errors) = stats.summary();
    println!("requests ok={ok} non_2xx={non_2xx} socket_errors={errors}");
    assert_eq!((non_2xx, errors), (0, 0));
    // Generous bounds: the figures above are the measurement; these only
    // catch a discovery path that is broken, not one that is slow.
    assert!(delay < Duration::from_secs(1), "{delay:?}");
    assert!(
        tail < Duration::from_millis(250),
        "old replica still served {tail:?} after deregistration"
    );
}

#[tokio::test]
async fn a_killed_replica_costs_no_failed_request() {
    let t = tower("30s");
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    register(t.addr, "svc", a.addr);
    register(t.addr, "svc", b.addr);
    let ing = ingress(t.addr, &["/:svc"], &[]);
    wait_synced(&ing, 1).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (stats, tasks) = spawn_load(ing.addr, 6, 2, stop.clone());
    eventually(DEADLINE, "both replicas busy", || {
        a.hits.load(Ordering::SeqCst) > 100 && b.hits.load(Ordering::SeqCst) > 100
    })
    .await;
    // Crash a: no deregistration; the Tower still lists it.
    a.kill();
    let after = b.hits.load(Ordering::SeqCst);
    eventually(DEADLINE, "load continues", || {
        b.hits.load(Ordering::SeqCst) > after + 1000
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let (ok, non_2xx, errors) = stats.summary();
    println!("requests ok={ok} non_2xx={non_2xx} socket_errors={errors}");
    assert_eq!((non_2xx, errors), (0, 0));
}

#[tokio::test]
async fn tower_killed_and_restarted_under_load_loses_no_request() {
    // Below the ephemeral range: while the Tower is down the ingress keeps
    // connecting to its port, and a closed ephemeral port on loopback can be
    // taken by such a connect to itself, keeping the Tower from coming back.
    let port = port_below_ephemeral_range().to_string();
    let first = Proc::start(
        &["tower", "--listen", &port, "--ttl", "1s"],
        "tower listening on udp ",
    );
    let tower_addr: std::net::SocketAddr =
        format!("127.0.0.1:{}", first.addr.port()).parse().unwrap();
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    // Workloads heartbeat every 200 ms, as `portico register` would.
    let beating = Arc::new(AtomicBool::new(true));
    let heartbeat = {
        let beating = beating.clone();
        let (pa, pb) = (a.addr.port(), b.addr.port());
        std::thread::spawn(move || {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            while beating.load(Ordering::SeqCst) {
                for p in [pa, pb] {
                    let _ = s.send_to(format!("REGISTER|svc|127.0.0.1|{p}").as_bytes(), tower_addr);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    eventually(DEADLINE, "registered", || {
        udp(tower_addr, b"LIST").starts_with("OK|LIST|2|")
    })
    .await;
    let ing = ingress(tower_addr, &["/:svc"], &[]);
    wait_synced(&ing, 1).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (stats, tasks) = spawn_load(ing.addr, 4, 2, stop.clone());
    let hits = || a.hits.load(Ordering::SeqCst) + b.hits.load(Ordering::SeqCst);
    eventually(DEADLINE, "load flowing", || hits() > 200).await;

    drop(first); // SIGKILL: no goodbye
    let log = ing.log.clone();
    eventually(DEADLINE, "ingress notices", || {
        log.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("lost the Tower's watch"))
    })
    .await;
    let during = hits();
    eventually(DEADLINE, "serving from the last known table", || {
        hits() > during + 500
    })
    .await;

    let second = Proc::start(
        &["tower", "--listen", &tower_addr.to_string(), "--ttl", "1s"],
        "tower listening on udp ",
    );
    wait_synced(&ing, 2).await;
    let after = hits();
    eventually(DEADLINE, "serving after the restart", || {
        hits() > after + 500
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    beating.store(false, Ordering::SeqCst);
    heartbeat.join().unwrap();
    drop(second);
    let (ok, non_2xx, errors) = stats.summary();
    println!("requests ok={ok} non_2xx={non_2xx} socket_errors={errors}");
    assert_eq!((non_2xx, errors), (0, 0));
    assert!(a.hits.load(Ordering::SeqCst) > 0 && b.hits.load(Ordering::SeqCst) > 0);
}

#[tokio::test]
async fn falls_back_to_lookup_against_a_udp_only_tower() {
    let t = Proc::start(
        &["tower", "--listen", "127.0.0.1:0", "--http", "off"],
        "tower listening on udp ",
    );
    let a = Backend::start("a").await;
    register(t.addr, "svc", a.addr);
    let ing = ingress(t.addr, &["/:svc"], &[]);
    let log = ing.log.clone();
    eventually(DEADLINE, "fallback logged", || {
        log.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("has no HTTP API") && l.contains("falling back"))
    })
    .await;
    assert_eq!(get(ing.addr, "/").await.status, 200);
    // Per-request LOOKUP sees a new replica on the very next request.
    let b = Backend::start("b").await;
    register(t.addr, "svc", b.addr);
    assert_eq!(
        get(ing.addr, "/").await.headers["x-backend"],
        "b",
        "new replicas are served first"
    );
}

#[tokio::test]
async fn forced_lookup_mode_works_against_an_http_tower() {
    let t = tower("30s");
    let a = Backend::start("a").await;
    register(t.addr, "svc", a.addr);
    let ing = ingress(t.addr, &["/:svc"], &["--discovery", "lookup"]);
    assert_eq!(get(ing.addr, "/").await.status, 200);
    assert!(ing.log_text().contains("one UDP LOOKUP per request"));
}

#[tokio::test]
async fn p2c_balancing_serves_from_every_replica() {
    let t = tower("30s");
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    register(t.addr, "svc", a.addr);
    register(t.addr, "svc", b.addr);
    let ing = ingress(t.addr, &["/:svc"], &["--balance", "p2c"]);
    wait_synced(&ing, 1).await;
    // Hold one request on a; p2c sends the rest to b, which has none in flight.
    let addr = ing.addr;
    let gated = tokio::spawn(async move { get(addr, "/gate").await });
    tokio::time::timeout(DEADLINE, async {
        loop {
            if a.hits.load(Ordering::SeqCst) + b.hits.load(Ordering::SeqCst) > 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    let (held, free) = if a.hits.load(Ordering::SeqCst) == 1 {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let mut c = Client::connect(ing.addr).await;
    for _ in 0..20 {
        assert_eq!(c.get("/x").await.status, 200);
    }
    assert_eq!(
        held.hits.load(Ordering::SeqCst),
        1,
        "the busy replica got no new request"
    );
    assert_eq!(free.hits.load(Ordering::SeqCst), 20);
    held.release.notify_one();
    assert_eq!(gated.await.unwrap().status, 200);
}

#[tokio::test]
async fn signed_registration_refuses_unsigned_and_replayed_writes() {
    let dir = std::env::temp_dir().join(format!("portico-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_path = dir.join("tower.key");
    std::fs::write(&key_path, "s3cret-key-of-enough-length\n").unwrap();
    let key_arg = key_path.to_str().unwrap();
    let t = Proc::start(
        &["tower", "--listen", "127.0.0.1:0", "--key-file", key_arg],
        "tower listening on udp ",
    );

    // Unsigned writes are refused and change nothing; reads stay open.
    let reply = udp(t.addr, b"REGISTER|api|127.0.0.1|8181");
    assert!(
        reply.starts_with("ERR|unauthorized: this Tower requires signed writes"),
        "{reply}"
    );
    assert_eq!(udp(t.addr, b"LOOKUP|api"), "ERR|NOT_FOUND|api");
    let (status, _) = http_post(
        t.addr,
        "/v1/register",
        r#"{"name":"api","ip":"127.0.0.1","port":8181}"#,
    )
    .await;
    assert_eq!(status, 401);

    // A signed write is accepted once; the same datagram again is a replay.
    let key = portico::registry::auth::Key::from_bytes(b"s3cret-key-of-enough-length");
    let request = portico_wire::decode_request(b"REGISTER|api|127.0.0.1|8181").unwrap();
    let signed = portico::registry::auth::sign(&key, &request, portico::registry::unix_ms());
    assert_eq!(udp(t.addr, &signed), "OK|REGISTERED|api");
    assert_eq!(udp(t.addr, &signed), "ERR|unauthorized: replayed signature");
    // Signed with another key, or too old: refused.
    let forged = portico::registry::auth::sign(
        &portico::registry::auth::Key::from_bytes(b"not-the-towers-key!!"),
        &request,
        portico::registry::unix_ms(),
    );
    assert_eq!(
        udp(t.addr, &forged),
        "ERR|unauthorized: bad signature (is the key the Tower's?)"
    );
    let old = portico::registry::auth::sign(&key, &request, portico::registry::unix_ms() - 120_000);
    assert!(udp(t.addr, &old).starts_with("ERR|unauthorized: timestamp outside"));
    // Unsigned DEREGISTER cannot remove it either.
    assert!(udp(t.addr, b"DEREGISTER|api|127.0.0.1|8181").starts_with("ERR|unauthorized"));
    assert_eq!(udp(t.addr, b"LOOKUP|api"), "OK|LOOKUP|api|127.0.0.1|8181");

    // `portico register --key-file` signs its heartbeats and its goodbye.
    let tower = t.addr.to_string();
    let mut reg = std::process::Command::new(env!("CARGO_BIN_EXE_portico"))
        .args([
            "register",
            "--name",
            "web",
            "--port",
            "9000",
            "--tower",
            &tower,
            "--key-file",
            key_arg,
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually(DEADLINE, "signed heartbeat accepted", || {
        udp(t.addr, b"LOOKUP|web") == "OK|LOOKUP|web|127.0.0.1|9000"
    })
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(reg.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(reg.wait().unwrap().success());
    assert_eq!(udp(t.addr, b"LOOKUP|web"), "ERR|NOT_FOUND|web");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn active_health_checks_take_a_failing_replica_out_and_back() {
    let t = tower("30s");
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    register(t.addr, "svc", a.addr);
    register(t.addr, "svc", b.addr);
    let ing = ingress(
        t.addr,
        &["/:svc"],
        &[
            "--health-check",
            "svc:/healthz,interval=50ms,timeout=1s,fall=2,rise=2",
        ],
    );
    wait_synced(&ing, 1).await;
    // a accepts connections but answers its health check with 503.
    a.healthy.store(false, Ordering::SeqCst);
    let log = ing.log.clone();
    eventually(DEADLINE, "a taken out of rotation", || {
        log.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("out of rotation"))
    })
    .await;
    let before = a.hits.load(Ordering::SeqCst);
    let mut c = Client::connect(ing.addr).await;
    for _ in 0..20 {
        assert_eq!(c.get("/x").await.headers["x-backend"], "b");
    }
    assert_eq!(a.hits.load(Ordering::SeqCst), before);
    // Healthy again: back in rotation after `rise` passes.
    a.healthy.store(true, Ordering::SeqCst);
    eventually(DEADLINE, "a back in rotation", || {
        log.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("back in rotation"))
    })
    .await;
    let mut served_by_a = false;
    for _ in 0..10 {
        served_by_a |= c.get("/x").await.headers["x-backend"] == "a";
    }
    assert!(served_by_a);
}

/// The Tower's count of LOOKUPs (over UDP and HTTP), from its /metrics.
async fn tower_lookups(tower: std::net::SocketAddr) -> u64 {
    let body = get(tower, "/metrics").await.body;
    let line = body
        .lines()
        .find(|l| l.starts_with(r#"portico_tower_requests_total{command="LOOKUP"} "#))
        .expect("the Tower counts LOOKUPs");
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_request_right_after_its_register_is_routed() {
    // Read your writes: once the Tower answered OK|REGISTERED, the ingress
    // routes to the new service, whether or not its watch has told it yet.
    let t = tower("30s");
    let a = Backend::start("a").await;
    let names: Vec<String> = (0..50).map(|i| format!("new{i:02}")).collect();
    let routes: Vec<String> = names.iter().map(|n| format!("/{n}:{n}")).collect();
    let routes: Vec<&str> = routes.iter().map(String::as_str).collect();
    // A generous timeout: what is tested is that the Tower is asked, not how fast
    // a loaded machine answers.
    let ing = ingress(
        t.addr,
        &routes,
        &["--discovery", "watch", "--tower-timeout", "2s"],
    );
    wait_synced(&ing, 1).await;
    let mut failed = Vec::new();
    for name in &names {
        register(t.addr, name, a.addr);
        let answer = get(ing.addr, &format!("/{name}")).await;
        if answer.status != 200 {
            failed.push(format!("{name}: {} {}", answer.status, answer.body.trim()));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of 50 failed: {failed:?}",
        failed.len()
    );
}

#[tokio::test]
async fn a_flood_for_an_unknown_service_costs_the_tower_a_few_lookups() {
    let t = tower("30s");
    let ing = ingress(t.addr, &["/:ghost"], &["--discovery", "watch"]);
    wait_synced(&ing, 1).await;
    let before = tower_lookups(t.addr).await;
    let started = Instant::now();
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let addr = ing.addr;
            tokio::spawn(async move { get(addr, "/x").await })
        })
        .collect();
    for task in tasks {
        let answer = task.await.unwrap();
        assert_eq!(
            (answer.status, answer.body.as_str()),
            (503, "Service not found in Tower\n")
        );
    }
    let elapsed = started.elapsed();
    let lookups = tower_lookups(t.addr).await - before;
    println!("200 requests for an unknown service in {elapsed:?}: {lookups} LOOKUPs");
    // The Tower was asked before the 503s; then one question at a time, and
    // a NOT_FOUND believed for a second while the table does not change.
    assert!(lookups >= 1, "the ingress never asked the Tower");
    assert!(
        lookups <= 2 + elapsed.as_secs(),
        "{lookups} LOOKUPs for 200 requests in {elapsed:?}"
    );
}

/// A UDP-only Tower that knows `services` and answers each LOOKUP with a
/// stray reply naming another service, then the true reply, then the stray
/// again: a duplicate or forged datagram from the Tower's own address, which
/// must not be taken as the answer to this request or a later one.
fn tower_with_strays(services: Vec<(&'static str, std::net::SocketAddr)>) -> std::net::SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    std::thread::spawn(move || {
        let reply = |name: &str, a: std::net::SocketAddr| {
            format!("OK|LOOKUP|{name}|{}|{}", a.ip(), a.port())
        };
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let answers = match text.strip_prefix("LOOKUP|") {
                Some(name) => match services.iter().find(|(n, _)| *n == name) {
                    Some((n, a)) => {
                        let (other, b) = services.iter().find(|(o, _)| o != n).unwrap();
                        let stray = reply(other, *b);
                        vec![stray.clone(), reply(n, *a), stray]
                    }
                    None => vec![format!("ERR|NOT_FOUND|{name}")],
                },
                None if text == "PING" => vec!["OK|PONG|tower".to_owned()],
                None => vec!["ERR|unknown command".to_owned()],
            };
            for a in answers {
                let _ = socket.send_to(a.as_bytes(), from);
            }
        }
    });
    addr
}

#[tokio::test]
async fn lookup_replies_are_matched_to_their_request() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let t = tower_with_strays(vec![("a", a.addr), ("b", b.addr)]);
    let ing = ingress(
        t,
        &["/a:a", "/b:b"],
        &["--discovery", "lookup", "--tower-timeout", "2s"],
    );
    let mut c = Client::connect(ing.addr).await;
    for _ in 0..20 {
        for (path, want) in [("/a", "a"), ("/b", "b")] {
            let answer = c.get(path).await;
            assert_eq!(answer.status, 200, "{path}: {}", answer.body);
            assert_eq!(answer.headers["x-backend"], want, "{path} went astray");
        }
    }
}
