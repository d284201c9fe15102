//! The soak (issue 6): mixed load for PORTICO_SOAK_SECS (600 by default):
//! keep-alive and new-connection GETs, uploads and WebSocket sessions, while
//! replicas churn (a new one registers and an old one is deregistered every
//! 5 s) and one backend is killed outright every 30 s. Prints requests,
//! non-2xx, socket errors, the ingress's peak RSS and its open descriptors
//! at start and end. Ignored in CI (it runs for minutes): scripts/soak.sh.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs for minutes: scripts/soak.sh"]
async fn soak() {
    let secs: u64 = std::env::var("PORTICO_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let t = tower("30s");
    let ws = websocket_echo().await;
    register(t.addr, "ws", ws);
    // Pooled backend connections close after 10 s idle, so that descriptors
    // can be compared soon after the load stops.
    let ing = ingress(
        t.addr,
        &["/ws:ws", "/:svc"],
        &["--pool-idle-timeout", "10s"],
    );
    let pid = ing.child.id();
    let mut live = vec![
        Backend::start("r0").await,
        Backend::start("r1").await,
        Backend::start("r2").await,
    ];
    for b in &live {
        register(t.addr, "svc", b.addr);
    }
    wait_synced(&ing, 1).await;
    let fds_start = fds(pid);
    let rss_start = status_kib(pid, "VmRSS:");

    let stop = Arc::new(AtomicBool::new(false));
    let (stats, mut tasks) = spawn_load(ing.addr, 8, 4, stop.clone());
    let uploads_ok = Arc::new(AtomicUsize::new(0));
    let uploads_failed = Arc::new(AtomicUsize::new(0));
    let ws_ok = Arc::new(AtomicUsize::new(0));
    let ws_failed = Arc::new(AtomicUsize::new(0));
    const UPLOADERS: usize = 2;
    // Uploads of 256 KiB on their own connections.
    for _ in 0..UPLOADERS {
        let (stop, ok, err, addr) = (
            stop.clone(),
            uploads_ok.clone(),
            uploads_failed.clone(),
            ing.addr,
        );
        tasks.push(tokio::spawn(async move {
            let body = vec![b'u'; 256 * 1024];
            while !stop.load(Ordering::SeqCst) {
                let req = format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                let mut bytes = req.into_bytes();
                bytes.extend_from_slice(&body);
                let out = raw(addr, &bytes, DEADLINE).await;
                if out.starts_with("HTTP/1.1 200") && out.ends_with(&format!("received={}\n", body.len())) {
                    ok.fetch_add(1, Ordering::SeqCst);
                } else {
                    err.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    // WebSocket sessions: connect, 20 messages, close.
    for _ in 0..2 {
        let (stop, ok, err, addr) = (stop.clone(), ws_ok.clone(), ws_failed.clone(), ing.addr);
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let session = async {
                    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
                    let (mut ws, _) =
                        tokio_tungstenite::client_async(format!("ws://{addr}/ws"), stream)
                            .await
                            .ok()?;
                    for i in 0..20 {
                        ws.send(Message::text(format!("m{i}"))).await.ok()?;
                        match ws.next().await {
                            Some(Ok(Message::Text(t))) if t.as_str() == format!("m{i}") => {}
                            _ => return None,
                        }
                    }
                    ws.close(None).await.ok()?;
                    Some(())
                };
                match tokio::time::timeout(DEADLINE, session).await {
                    Ok(Some(())) => ok.fetch_add(1, Ordering::SeqCst),
                    _ => err.fetch_add(1, Ordering::SeqCst),
                };
            }
        }));
    }

    let started = Instant::now();
    let mut peak_rss = status_kib(pid, "VmHWM:");
    let mut next_churn = started + Duration::from_secs(5);
    let mut next_kill = started + Duration::from_secs(30);
    let mut generation = 3;
    let mut retired = Vec::new();
    let mut draining: Vec<(Instant, Backend)> = Vec::new();
    let mut kills = 0usize;
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        peak_rss = peak_rss.max(status_kib(pid, "VmHWM:"));
        let now = Instant::now();
        // A deregistered replica is stopped once its requests had time to end.
        while draining.first().is_some_and(|(at, _)| *at <= now) {
            let (_, old) = draining.remove(0);
            old.kill();
            retired.push(old);
        }
        if now >= next_kill {
            // Killed outright: no deregistration, connections cut.
            let victim = live.remove(0);
            victim.kill();
            retired.push(victim);
            kills += 1;
            let fresh = Backend::start(&format!("r{generation}")).await;
            generation += 1;
            register(t.addr, "svc", fresh.addr);
            live.push(fresh);
            next_kill += Duration::from_secs(30);
        } else if now >= next_churn {
            // Rolling: a new replica in, the oldest deregistered, then stopped.
            let fresh = Backend::start(&format!("r{generation}")).await;
            generation += 1;
            register(t.addr, "svc", fresh.addr);
            live.push(fresh);
            let old = live.remove(0);
            udp(
                t.addr,
                format!("DEREGISTER|svc|127.0.0.1|{}", old.addr.port()).as_bytes(),
            );
            draining.push((now + Duration::from_secs(2), old));
            next_churn += Duration::from_secs(5);
        }
        // Keep registrations alive (the Tower's TTL is 30 s).
        for b in &live {
            register(t.addr, "svc", b.addr);
        }
        register(t.addr, "ws", ws);
    }
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.unwrap();
    }
    // Let the ingress settle: pooled and client connections close by their
    // idle timeouts, so count descriptors once nothing is left in flight.
    let settle = Instant::now();
    while fds(pid) > fds_start + 8 && settle.elapsed() < Duration::from_secs(45) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let fds_end = fds(pid);
    let rss_end = status_kib(pid, "VmRSS:");
    let (ok, non_2xx, errors) = stats.summary();
    let (up_ok, up_failed) = (
        uploads_ok.load(Ordering::SeqCst),
        uploads_failed.load(Ordering::SeqCst),
    );
    let (ws_ok, ws_failed) = (
        ws_ok.load(Ordering::SeqCst),
        ws_failed.load(Ordering::SeqCst),
    );
    println!("soak: {secs}s, {generation} replicas started, {kills} killed outright, the rest drained and stopped");
    println!("soak: GETs ok={ok} non_2xx={non_2xx} socket_errors={errors}");
    println!("soak: uploads ok={up_ok} failed={up_failed}; websocket sessions ok={ws_ok} failed={ws_failed}");
    println!("soak: ingress RSS start {rss_start} KiB, peak {peak_rss} KiB, end {rss_end} KiB; open fds start {fds_start}, end {fds_end}");
    assert_eq!((non_2xx, errors, ws_failed), (0, 0, 0));
    // An upload in flight to a backend that is killed cannot be re-sent (its
    // body went out and POST is not idempotent): at most one per uploader
    // per kill is the expected cost, and nothing else may fail.
    assert!(
        up_failed <= kills * UPLOADERS,
        "{up_failed} uploads failed, {kills} kills"
    );
    assert!(
        fds_end <= fds_start + 8,
        "descriptors leaked: {fds_start} -> {fds_end}"
    );
}
