//! Limits and resource exhaustion (issue 6): body size, requests per
//! connection, a UDP flood on the Tower, running out of file descriptors.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::sync::atomic::Ordering;
use std::time::Duration;

#[tokio::test]
async fn request_bodies_past_the_limit_get_413() {
    let t = tower("30s");
    let b = Backend::start("b").await;
    register(t.addr, "svc", b.addr);
    let ing = ingress(t.addr, &["/:svc"], &["--max-body-bytes", "1000"]);
    wait_synced(&ing, 1).await;
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
    // lookups, garbage, oversized datagrams. Replies are not waited for.
    let senders: Vec<_> = (0..4u32)
        .map(|n| {
            let addr = t.addr;
            std::thread::spawn(move || {
                let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                let big = vec![b'Z'; 4000];
                for i in 0..25_000u32 {
                    let msg: Vec<u8> = match i % 5 {
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
    // Still answering, the valid registration intact, the caps held.
    assert_eq!(udp(t.addr, b"PING"), "OK|PONG|tower");
    assert_eq!(udp(t.addr, b"LOOKUP|keep"), "OK|LOOKUP|keep|127.0.0.1|8080");
    let list = udp(t.addr, b"LIST");
    let count: usize = list.split('|').nth(2).unwrap().parse().unwrap();
    assert!(count <= 2000, "cap held: {count}");
    let rss_after = rss_kib(t.child.id());
    println!("tower RSS {rss_before} KiB before, {rss_after} KiB after, {count} registrations");
    assert!(
        rss_after < rss_before + 32 * 1024,
        "memory bounded: {rss_before} -> {rss_after} KiB"
    );
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
