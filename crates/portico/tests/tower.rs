//! The Tower's UDP protocol end to end, against the real `portico tower`.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use std::time::{Duration, Instant};

#[test]
fn every_command_byte_for_byte() {
    let t = tower("30s");
    let a = t.addr;
    assert_eq!(udp(a, b"PING"), "OK|PONG|tower");
    assert_eq!(udp(a, b"REGISTER|web|127.0.0.1|8181"), "OK|REGISTERED|web");
    assert_eq!(udp(a, b"REGISTER|web|127.0.0.1|8182"), "OK|REGISTERED|web");
    // Round robin over the two replicas.
    let first = udp(a, b"LOOKUP|web");
    let second = udp(a, b"LOOKUP|web");
    let mut both = [first.clone(), second];
    both.sort();
    assert_eq!(
        both,
        [
            "OK|LOOKUP|web|127.0.0.1|8181",
            "OK|LOOKUP|web|127.0.0.1|8182"
        ]
    );
    assert_eq!(udp(a, b"LOOKUP|web"), first);
    assert_eq!(udp(a, b"LOOKUP|nope"), "ERR|NOT_FOUND|nope");
    let list = udp(a, b"LIST");
    assert!(
        list == "OK|LIST|2|web:127.0.0.1:8181:29,web:127.0.0.1:8182:29"
            || list == "OK|LIST|2|web:127.0.0.1:8181:30,web:127.0.0.1:8182:30"
            || list.starts_with("OK|LIST|2|web:127.0.0.1:8181:2"),
        "{list}"
    );
    assert_eq!(
        udp(a, b"DEREGISTER|web|127.0.0.1|8181"),
        "OK|DEREGISTERED|web"
    );
    assert_eq!(
        udp(a, b"DEREGISTER|web|127.0.0.1|8181"),
        "ERR|NOT_FOUND|web"
    );
    for _ in 0..3 {
        assert_eq!(udp(a, b"LOOKUP|web"), "OK|LOOKUP|web|127.0.0.1|8182");
    }
}

#[test]
fn ipv6_endpoints() {
    let t = tower("30s");
    assert_eq!(udp(t.addr, b"REGISTER|v6|::1|9000"), "OK|REGISTERED|v6");
    assert_eq!(udp(t.addr, b"LOOKUP|v6"), "OK|LOOKUP|v6|::1|9000");
    assert_eq!(
        udp(t.addr, b"LIST")
            .split('|')
            .nth(3)
            .unwrap()
            .split(':')
            .next(),
        Some("v6")
    );
}

#[test]
fn malformed_datagrams_get_err_and_change_nothing() {
    let t = tower("30s");
    let a = t.addr;
    assert_eq!(udp(a, b"REGISTER|keep|127.0.0.1|1"), "OK|REGISTERED|keep");
    let cases: &[(&[u8], &str)] = &[
        (b"HELLO", "ERR|unknown command"),
        (b"", "ERR|unknown command"),
        (b"REGISTER|x|127.0.0.1", "ERR|REGISTER syntax: name|ip|port"),
        (
            b"REGISTER|x|not-an-ip|80",
            "ERR|REGISTER syntax: name|ip|port",
        ),
        (
            b"REGISTER|x|127.0.0.1|99999",
            "ERR|REGISTER syntax: name|ip|port",
        ),
        (b"DEREGISTER|keep", "ERR|DEREGISTER syntax: name|ip|port"),
        (b"\xff\xfe\x00", "ERR|request is not UTF-8 text"),
    ];
    for (input, want) in cases {
        assert_eq!(udp(a, input), *want, "{:?}", String::from_utf8_lossy(input));
    }
    let long_name = format!("REGISTER|{}|127.0.0.1|1", "n".repeat(128));
    assert_eq!(
        udp(a, long_name.as_bytes()),
        "ERR|REGISTER syntax: name|ip|port"
    );
    let huge = vec![b'A'; 4000];
    assert!(udp(a, &huge).starts_with("ERR|request too long"));
    // Still serving, registration intact.
    assert_eq!(udp(a, b"LIST").split('|').nth(2), Some("1"));
    assert_eq!(udp(a, b"LOOKUP|keep"), "OK|LOOKUP|keep|127.0.0.1|1");
}

#[test]
fn echo_style_trailing_newline_is_accepted() {
    let t = tower("30s");
    assert_eq!(
        udp(t.addr, b"REGISTER|nl|127.0.0.1|5\n"),
        "OK|REGISTERED|nl"
    );
}

#[test]
fn registrations_expire_after_ttl() {
    let t = tower("400ms");
    let start = Instant::now();
    assert_eq!(
        udp(t.addr, b"REGISTER|brief|127.0.0.1|7"),
        "OK|REGISTERED|brief"
    );
    assert_eq!(udp(t.addr, b"LOOKUP|brief"), "OK|LOOKUP|brief|127.0.0.1|7");
    let deadline = Instant::now() + Duration::from_secs(5);
    while udp(t.addr, b"LOOKUP|brief") != "ERR|NOT_FOUND|brief" {
        assert!(Instant::now() < deadline, "never expired");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        start.elapsed() >= Duration::from_millis(400),
        "expired early"
    );
    assert_eq!(udp(t.addr, b"LIST"), "OK|LIST|0|");
}

#[test]
fn heartbeat_keeps_a_registration_alive() {
    let t = tower("400ms");
    let until = Instant::now() + Duration::from_millis(1200);
    while Instant::now() < until {
        assert_eq!(udp(t.addr, b"REGISTER|hb|127.0.0.1|7"), "OK|REGISTERED|hb");
        assert_eq!(udp(t.addr, b"LOOKUP|hb"), "OK|LOOKUP|hb|127.0.0.1|7");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn registry_full_is_an_error_not_a_crash() {
    let t = Proc::start(
        &["tower", "--listen", "127.0.0.1:0", "--max-entries", "2"],
        "tower listening on udp ",
    );
    assert_eq!(udp(t.addr, b"REGISTER|a|127.0.0.1|1"), "OK|REGISTERED|a");
    assert_eq!(udp(t.addr, b"REGISTER|a|127.0.0.1|2"), "OK|REGISTERED|a");
    assert_eq!(udp(t.addr, b"REGISTER|b|127.0.0.1|3"), "ERR|registry full");
    assert_eq!(udp(t.addr, b"LOOKUP|a").split('|').next(), Some("OK"));
}
