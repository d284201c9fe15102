//! Rolling replacement under load (issue 3): during a closed-loop load run,
//! five times over, two new replicas start and register, then the two old
//! ones are deregistered and killed at once. Every request must succeed.
//! Prints its counts; `PORTICO_ROLLING_SECS` sets the run length (20 s).
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_replacement_under_load_loses_nothing() {
    let secs: u64 = std::env::var("PORTICO_ROLLING_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let rounds = 5;
    let t = tower("30s");
    let ing = ingress(t.addr, &["/:svc"], &[]);
    let mut live = vec![
        Backend::start("gen0-a").await,
        Backend::start("gen0-b").await,
    ];
    for b in &live {
        register(t.addr, "svc", b.addr);
    }
    wait_synced(&ing, 1).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (stats, tasks) = spawn_load(ing.addr, 8, 2, stop.clone());
    let started = Instant::now();
    let step = Duration::from_secs(secs) / (rounds + 1);
    let mut retired = Vec::new();
    for round in 1..=rounds {
        tokio::time::sleep_until((started + step * round).into()).await;
        let fresh = vec![
            Backend::start(&format!("gen{round}-a")).await,
            Backend::start(&format!("gen{round}-b")).await,
        ];
        for b in &fresh {
            register(t.addr, "svc", b.addr);
        }
        for old in live.drain(..) {
            let reply = udp(
                t.addr,
                format!("DEREGISTER|svc|127.0.0.1|{}", old.addr.port()).as_bytes(),
            );
            assert_eq!(reply, "OK|DEREGISTERED|svc");
            old.kill();
            retired.push(old);
        }
        live = fresh;
    }
    tokio::time::sleep_until((started + Duration::from_secs(secs)).into()).await;
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.unwrap();
    }
    let (ok, non_2xx, errors) = stats.summary();
    let per_generation: Vec<usize> = retired
        .iter()
        .chain(live.iter())
        .map(|b| b.hits.load(Ordering::SeqCst))
        .collect();
    println!(
        "rolling replacement: {secs}s, {rounds} rounds: requests ok={ok} non_2xx={non_2xx} socket_errors={errors}; hits per replica {per_generation:?}"
    );
    if non_2xx + errors > 0 {
        let log = ing.log_text();
        let failures: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("request failed"))
            .take(5)
            .collect();
        println!(
            "first failures logged by the ingress:\n{}",
            failures.join("\n")
        );
    }
    assert_eq!((non_2xx, errors), (0, 0));
    assert!(
        per_generation.iter().all(|&h| h > 0),
        "every generation served: {per_generation:?}"
    );
}
