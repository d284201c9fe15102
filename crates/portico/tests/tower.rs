//! The Tower's UDP protocol end to end, against the real `portico tower`.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;
use std::net::{SocketAddr, UdpSocket};
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
        // Garbage gets no more bytes back than it sent (see
        // garbage_gets_no_more_bytes_back_than_it_sent).
        (b"HELLO", "ERR"),
        (b"HELLO, is this the Tower?", "ERR|unknown command"),
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
        (b"\xff\xfe\x00", "ERR"),
        (
            b"\xff\xfe\x00 and enough bytes for the whole reply",
            "ERR|request is not UTF-8 text",
        ),
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

/// Send each datagram of `msgs` from one socket bound to `from`, then read
/// the replies in order: a datagram that gets no reply shows as the next
/// one's reply, so end with one that always answers (PING).
fn replies_from(from: &str, tower: SocketAddr, msgs: &[&[u8]]) -> Vec<String> {
    let s = UdpSocket::bind(from).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    for m in msgs {
        s.send_to(m, tower).unwrap();
    }
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    while out.last().map(String::as_str) != Some("OK|PONG|tower") {
        let (n, _) = s.recv_from(&mut buf).expect("tower reply");
        out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    out
}

#[test]
fn garbage_gets_no_more_bytes_back_than_it_sent() {
    let t = tower("30s");
    // One datagram after the other on one socket: the Tower answers in order,
    // so a datagram it does not answer leaves no reply before PING's.
    let got = replies_from(
        "127.0.0.1:0",
        t.addr,
        &[b"", b"\x01", b"HI", b"HELLO", b"\xff\xfe\x00", b"PING"],
    );
    assert_eq!(got, ["ERR", "ERR", "OK|PONG|tower"]);
}

fn register_many(tower: SocketAddr, n: usize) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 256];
    for i in 0..n {
        let msg = format!(
            "REGISTER|service-{:04}|10.0.{}.{}|8080",
            i,
            i / 250,
            1 + i % 250
        );
        s.send_to(msg.as_bytes(), tower).unwrap();
        let (len, _) = s.recv_from(&mut buf).expect("tower reply");
        assert!(buf[..len].starts_with(b"OK|REGISTERED|"));
    }
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn a_long_list_fits_one_safe_datagram_with_a_truncation_marker() {
    let t = tower("30s");
    register_many(t.addr, 1200);
    let list = udp(t.addr, b"LIST");
    // Was 33-64 KB to a 4-byte datagram from anyone.
    assert!(list.len() <= 1232, "{} bytes", list.len());
    // OK|LIST|n|entries|TRUNCATED|total: n counts the entries sent, so the
    // seed's reading (count, then the fourth field split on ',') holds.
    let fields: Vec<&str> = list.split('|').collect();
    assert_eq!(fields.len(), 6, "{list}");
    assert_eq!(fields[..2], ["OK", "LIST"]);
    assert_eq!(fields[4..], ["TRUNCATED", "1200"]);
    let n: usize = fields[2].parse().unwrap();
    let entries: Vec<&str> = fields[3].split(',').collect();
    assert_eq!(entries.len(), n);
    assert!(n >= 20, "{n} entries");
    assert!(
        entries[0].starts_with("service-0000:10.0.0.1:8080:"),
        "{list}"
    );
    // The whole list is on the HTTP API.
    let doc = http_get(t.addr, "/v1/services");
    assert!(doc.starts_with("HTTP/1.1 200"), "{doc}");
    assert_eq!(doc.matches("\"port\":8080").count(), 1200);
    // `portico services` shows what came, and says where the rest is.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portico"))
        .args(["services", "--tower", &t.addr.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert_eq!(stdout.matches("service-").count(), n, "{stdout}");
    assert!(
        stderr.contains("of 1200") && stderr.contains("/v1/services"),
        "{stderr}"
    );
}

#[test]
fn udp_replies_are_rate_limited_per_source() {
    let t = Proc::start(
        &[
            "tower",
            "--listen",
            "127.0.0.1:0",
            "--udp-reply-rate",
            "20",
            "--udp-rate-exempt",
            "none",
        ],
        "tower listening on udp ",
    );
    // One source (as a forged one would be) sends 100 datagrams at once
    // (few enough for the Tower's receive buffer to hold them all).
    let s = UdpSocket::bind("127.0.0.2:0").unwrap();
    let started = Instant::now();
    for _ in 0..100 {
        s.send_to(b"PING", t.addr).unwrap();
    }
    // A source over its budget is still heard: a heartbeat among a flood
    // forged in its name keeps its registration (only the reply is held).
    s.send_to(b"REGISTER|victim|10.9.9.9|8080", t.addr).unwrap();
    // Its burst comes back, then nothing more for the rest of the flood.
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 64];
    let mut answered = 0;
    while s.recv_from(&mut buf).is_ok() {
        answered += 1;
    }
    let refill = (started.elapsed().as_secs_f64() * 20.0).ceil() as usize;
    assert!(answered >= 20, "the burst is answered: {answered}");
    assert!(answered <= 20 + refill, "{answered} of 101 answered");
    // Another source has its own budget.
    assert_eq!(udp(t.addr, b"PING"), "OK|PONG|tower");
    assert_eq!(
        udp(t.addr, b"LOOKUP|victim"),
        "OK|LOOKUP|victim|10.9.9.9|8080"
    );
}

#[test]
fn loopback_senders_are_exempt_from_the_rate_limit_by_default() {
    let t = Proc::start(
        &["tower", "--listen", "127.0.0.1:0", "--udp-reply-rate", "5"],
        "tower listening on udp ",
    );
    let s = UdpSocket::bind("127.0.0.3:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    for _ in 0..50 {
        s.send_to(b"PING", t.addr).unwrap();
    }
    let mut buf = [0u8; 64];
    for i in 0..50 {
        assert!(s.recv_from(&mut buf).is_ok(), "reply {i} of 50");
    }
}

fn http_post_json(addr: SocketAddr, path: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn register_json(ip: &str, port: u16) -> String {
    format!(r#"{{"name":"web","ip":"{ip}","port":{port}}}"#)
}

const NEVER_BACKENDS: [&str; 13] = [
    "169.254.169.254",
    "64:ff9b::a9fe:a9fe",
    "2002:a9fe:a9fe::1",
    "fd00:ec2::254",
    "100.100.100.200",
    "240.0.0.1",
    "0.0.0.0",
    "::",
    "255.255.255.255",
    "224.0.0.1",
    "fe80::1",
    "ff02::1",
    "::ffff:169.254.169.254",
];

#[test]
fn register_refuses_addresses_that_are_never_a_backend() {
    let t = tower("30s");
    for ip in NEVER_BACKENDS {
        let reply = udp(t.addr, format!("REGISTER|web|{ip}|80").as_bytes());
        assert!(reply.starts_with("ERR|REGISTER refused: "), "{ip}: {reply}");
        let answer = http_post_json(t.addr, "/v1/register", &register_json(ip, 80));
        assert!(answer.starts_with("HTTP/1.1 400"), "{ip}: {answer}");
        assert!(answer.contains("REGISTER refused: "), "{ip}: {answer}");
    }
    assert_eq!(udp(t.addr, b"LIST"), "OK|LIST|0|");
    // Loopback from a loopback sender: the seed's demo.
    assert_eq!(
        udp(t.addr, b"REGISTER|web|127.0.0.1|8181"),
        "OK|REGISTERED|web"
    );
    let answer = http_post_json(t.addr, "/v1/register", &register_json("::1", 8182));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(udp(t.addr, b"LIST").split('|').nth(2), Some("2"));
}

#[test]
fn allow_register_admits_only_endpoints_in_its_networks() {
    let t = Proc::start(
        &[
            "tower",
            "--listen",
            "127.0.0.1:0",
            "--allow-register",
            "10.0.0.0/8",
            "--allow-register",
            "fd00::/8",
        ],
        "tower listening on udp ",
    );
    assert_eq!(
        udp(t.addr, b"REGISTER|web|10.1.2.3|80"),
        "OK|REGISTERED|web"
    );
    assert_eq!(udp(t.addr, b"REGISTER|web|fd00::7|80"), "OK|REGISTERED|web");
    for ip in ["192.168.1.1", "127.0.0.1", "2001:db8::1"] {
        let reply = udp(t.addr, format!("REGISTER|web|{ip}|80").as_bytes());
        assert!(
            reply.starts_with("ERR|REGISTER refused: ") && reply.contains("--allow-register"),
            "{ip}: {reply}"
        );
        let answer = http_post_json(t.addr, "/v1/register", &register_json(ip, 80));
        assert!(answer.starts_with("HTTP/1.1 400"), "{ip}: {answer}");
    }
    let answer = http_post_json(t.addr, "/v1/register", &register_json("10.9.9.9", 80));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Never-backend addresses stay refused inside an allowed network.
    let t = Proc::start(
        &[
            "tower",
            "--listen",
            "127.0.0.1:0",
            "--allow-register",
            "0.0.0.0/0",
        ],
        "tower listening on udp ",
    );
    let reply = udp(t.addr, b"REGISTER|web|169.254.169.254|80");
    assert!(reply.starts_with("ERR|REGISTER refused: "), "{reply}");
}

#[test]
fn portico_up_takes_allow_register_too() {
    let up = up(&[
        "--admin",
        "127.0.0.1:0",
        "--route",
        "/:web",
        "--allow-register",
        "10.0.0.0/8",
    ]);
    let tower = up.logged_addr("tower listening on udp ");
    assert_eq!(udp(tower, b"REGISTER|web|10.0.0.5|80"), "OK|REGISTERED|web");
    let reply = udp(tower, b"REGISTER|web|192.168.0.5|80");
    assert!(reply.starts_with("ERR|REGISTER refused: "), "{reply}");
}

/// A Tower started with `--key-file`, and the key, for signing.
fn keyed_tower(tag: &str) -> (Proc, portico::registry::auth::Key, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("portico-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tower.key");
    std::fs::write(&path, "s3cret-key-of-enough-length\n").unwrap();
    let t = Proc::start(
        &[
            "tower",
            "--listen",
            "127.0.0.1:0",
            "--key-file",
            path.to_str().unwrap(),
        ],
        "tower listening on udp ",
    );
    let key = portico::registry::auth::Key::from_bytes(b"s3cret-key-of-enough-length");
    (t, key, path)
}

fn signed(key: &portico::registry::auth::Key, request: &[u8]) -> Vec<u8> {
    let request = portico_wire::decode_request(request).unwrap();
    portico::registry::auth::sign(key, &request, portico::registry::unix_ms())
}

#[test]
fn a_signed_list_gets_the_whole_list_in_one_datagram() {
    let (t, key, key_path) = keyed_tower("signed-list");
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 256];
    for i in 0..300 {
        let write = format!(
            "REGISTER|service-{i:04}|10.0.{}.{}|8080",
            i / 250,
            1 + i % 250
        );
        s.send_to(&signed(&key, write.as_bytes()), t.addr).unwrap();
        let (len, _) = s.recv_from(&mut buf).expect("tower reply");
        assert!(buf[..len].starts_with(b"OK|REGISTERED|"));
    }
    // Unsigned: as to anyone, cut to one safe datagram.
    let cut = udp(t.addr, b"LIST");
    assert!(cut.len() <= 1232, "{} bytes", cut.len());
    assert!(cut.ends_with("|TRUNCATED|300"), "{cut}");
    // Signed with the Tower's key: every entry, in one datagram.
    let list = signed(&key, b"LIST");
    let whole = udp(t.addr, &list);
    assert!(whole.len() > 1232, "{whole}");
    match portico_wire::decode_reply(whole.as_bytes()).unwrap() {
        portico_wire::Reply::List(entries) => {
            assert_eq!(entries.len(), 300);
            assert_eq!(entries[299].name.as_str(), "service-0299");
        }
        other => panic!("{other:?}"),
    }
    // The same datagram again is a replay; another key's, or an old one,
    // is refused too, never with more bytes than it sent.
    assert_eq!(udp(t.addr, &list), "ERR|unauthorized: replayed signature");
    let forged = portico::registry::auth::sign(
        &portico::registry::auth::Key::from_bytes(b"not-the-towers-key!!"),
        &portico_wire::Request::List,
        portico::registry::unix_ms(),
    );
    let refused = udp(t.addr, &forged);
    assert!(
        refused.starts_with("ERR|unauthorized: bad signature"),
        "{refused}"
    );
    assert!(refused.len() <= forged.len());
    let stale_ms = portico::registry::unix_ms() - 120_000;
    let old = portico::registry::auth::sign(&key, &portico_wire::Request::List, stale_ms);
    let refused = udp(t.addr, &old);
    assert!(
        refused.starts_with("ERR|unauthorized: timestamp"),
        "{refused}"
    );
    assert!(refused.len() <= old.len(), "{refused}");
    // A timestamp of one digit makes the request (71 bytes) shorter than
    // that reply (76): a bare ERR.
    let short = portico::registry::auth::sign(&key, &portico_wire::Request::List, 1);
    assert_eq!(udp(t.addr, &short), "ERR");

    // `portico services --key-file` signs its LIST and shows every entry.
    let services = |extra: &[&str]| {
        let tower = t.addr.to_string();
        let mut args = vec!["services", "--tower", &tower];
        args.extend_from_slice(extra);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_portico"))
            .args(&args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stdout}{stderr}");
        (stdout, stderr)
    };
    let (stdout, stderr) = services(&["--key-file", key_path.to_str().unwrap()]);
    assert_eq!(stdout.matches("service-").count(), 300, "{stdout}");
    assert!(!stderr.contains("first entries"), "{stderr}");
    // Without it, the first entries and a note on where the rest is.
    let (stdout, stderr) = services(&[]);
    assert!(stdout.matches("service-").count() < 300, "{stdout}");
    assert!(
        stderr.contains("of 300") && stderr.contains("--key-file"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(key_path.parent().unwrap());
}

#[test]
fn a_signed_list_to_a_tower_without_a_key_is_capped() {
    let t = tower("30s");
    register_many(t.addr, 300);
    // Anyone can sign without the key: a signature earns nothing here.
    let key = portico::registry::auth::Key::from_bytes(b"any key of enough length");
    let reply = udp(t.addr, &signed(&key, b"LIST"));
    assert!(reply.len() <= 1232, "{} bytes", reply.len());
    assert!(reply.ends_with("|TRUNCATED|300"), "{reply}");
}

/// A change stream read line by line: HTTP/1.0, so the body is the bytes
/// until the close, no chunk framing.
struct Stream {
    lines: std::io::BufReader<std::net::TcpStream>,
}

impl Stream {
    fn open(addr: SocketAddr, query: &str) -> Stream {
        use std::io::{BufRead, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        write!(s, "GET /v1/services?{query} HTTP/1.0\r\nHost: t\r\n\r\n").unwrap();
        let mut lines = std::io::BufReader::new(s);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            lines.read_line(&mut line).unwrap();
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        assert!(
            head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
            "{head}"
        );
        assert!(
            head.contains("content-type: application/x-ndjson"),
            "{head}"
        );
        Stream { lines }
    }

    fn next(&mut self) -> portico::services_doc::StreamLine {
        use std::io::BufRead;
        let mut line = String::new();
        self.lines.read_line(&mut line).unwrap();
        assert!(line.ends_with('\n'), "a whole line: {line:?}");
        portico::services_doc::decode_line(line.trim_end().as_bytes()).unwrap()
    }

    fn full(&mut self) -> portico::services_doc::ServicesDoc {
        match self.next() {
            portico::services_doc::StreamLine::Full(doc) => doc,
            other => panic!("expected a full document, got {other:?}"),
        }
    }

    /// The next change; asserts it is `want`'s index.
    fn change(&mut self, want: u64) -> portico::services_doc::Change {
        match self.next() {
            portico::services_doc::StreamLine::Change { index, change } => {
                assert_eq!(index, want, "consecutive indexes");
                change
            }
            other => panic!("expected change {want}, got {other:?}"),
        }
    }
}

/// A document's endpoints, without their TTLs (which age).
fn endpoints(doc: &portico::services_doc::ServicesDoc) -> Vec<(String, std::net::IpAddr, u16)> {
    doc.services
        .iter()
        .flat_map(|(name, eps)| eps.iter().map(move |e| (name.clone(), e.ip, e.port)))
        .collect()
}

fn services_doc(addr: SocketAddr) -> portico::services_doc::ServicesDoc {
    let answer = http_get(addr, "/v1/services");
    let body = answer.split_once("\r\n\r\n").unwrap().1;
    serde_json::from_str(body).unwrap()
}

#[test]
fn the_change_stream_sends_a_full_document_then_each_change_and_resumes() {
    use portico::services_doc::Change;
    let t = tower("30s");
    register(t.addr, "web", "127.0.0.1:8001".parse().unwrap());
    let mut s = Stream::open(t.addr, "watch=1");
    let full = s.full();
    let plain = services_doc(t.addr);
    assert_eq!((full.index, full.epoch), (plain.index, plain.epoch));
    assert_eq!(endpoints(&full), endpoints(&plain));
    let i = full.index;
    register(t.addr, "web", "127.0.0.1:8002".parse().unwrap());
    assert_eq!(
        udp(t.addr, b"DEREGISTER|web|127.0.0.1|8001"),
        "OK|DEREGISTERED|web"
    );
    assert!(matches!(
        s.change(i + 1),
        Change::Add { ttl_ms: 30_000, .. }
    ));
    assert!(matches!(s.change(i + 2), Change::Remove { .. }));
    drop(s);
    // Resumed from the last index seen: no full, the next change.
    register(t.addr, "api", "127.0.0.1:8003".parse().unwrap());
    let mut s = Stream::open(
        t.addr,
        &format!("watch=1&index={}&epoch={}", i + 2, full.epoch),
    );
    assert!(matches!(s.change(i + 3), Change::Add { .. }));
    // Another run's epoch: a full document.
    let other = full.epoch.wrapping_add(1);
    let mut s = Stream::open(t.addr, &format!("watch=1&index={}&epoch={other}", i + 2));
    assert_eq!(s.full().index, i + 3);
    // The document and the blocking query are unchanged beside streams.
    let answer = http_get(t.addr, &format!("/v1/services?index={}&wait=1s", i + 3));
    assert!(
        answer.contains("content-type: application/json"),
        "{answer}"
    );
    assert!(
        answer.contains(&format!("x-portico-index: {}", i + 3)),
        "{answer}"
    );
}

#[test]
fn a_watcher_resuming_past_the_change_log_gets_one_full_document() {
    let t = Proc::start(
        &[
            "tower",
            "--listen",
            "127.0.0.1:0",
            "--ttl",
            "30s",
            "--http-watch-log",
            "16",
        ],
        "tower listening on udp ",
    );
    let first = Stream::open(t.addr, "watch=1").full();
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 256];
    for i in 0..40 {
        let msg = format!("REGISTER|svc-{}|127.0.0.1|{}", i % 7, 9000 + i);
        s.send_to(msg.as_bytes(), t.addr).unwrap();
        s.recv_from(&mut buf).unwrap();
    }
    let query = format!("watch=1&index={}&epoch={}", first.index, first.epoch);
    let mut stream = Stream::open(t.addr, &query);
    let full = stream.full();
    let plain = services_doc(t.addr);
    assert_eq!((full.index, full.epoch), (plain.index, plain.epoch));
    assert_eq!(endpoints(&full), endpoints(&plain));
    assert_eq!(full.index, first.index + 40);
    register(t.addr, "late", "127.0.0.1:9999".parse().unwrap());
    stream.change(full.index + 1);
    // Within the log: no full.
    let query = format!("watch=1&index={}&epoch={}", full.index - 5, first.epoch);
    let mut stream = Stream::open(t.addr, &query);
    for i in full.index - 4..=full.index + 1 {
        stream.change(i);
    }
    let metrics = http_get(t.addr, "/metrics");
    assert!(
        metrics.contains("portico_tower_watch_streams "),
        "{metrics}"
    );
    assert!(
        metrics.contains("portico_tower_changes_total 41"),
        "{metrics}"
    );
}

#[test]
fn a_bad_watch_log_is_refused_at_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portico"))
        .args(["tower", "--listen", "127.0.0.1:0", "--http-watch-log", "8"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--http-watch-log") && err.contains("16 to 1,048,576"),
        "{err}"
    );
}

/// How many registrations the Tower holds, by its metrics.
fn registrations(addr: SocketAddr) -> usize {
    let metrics = http_get(addr, "/metrics");
    let line = metrics
        .lines()
        .find(|l| l.starts_with("portico_tower_registrations "))
        .expect("the registrations gauge");
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn a_burst_while_the_tower_is_descheduled_is_not_dropped() {
    // 40,000 replicas heartbeat thousands of datagrams a second; a Tower
    // off the CPU for a few milliseconds must find them queued, not lost
    // (the kernel's default receive buffer holds about 300).
    let t = tower("60s");
    t.signal(nix::sys::signal::Signal::SIGSTOP);
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    // The kernel queues at most twice net.core.rmem_max, about 1.7 KiB a
    // small datagram on loopback: stay within it where it is low.
    let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .map_or(4 << 20, |v| v.trim().parse().unwrap());
    let n = (rmem_max * 2 / 2048).min(3000);
    for i in 0..n {
        let msg = format!(
            "REGISTER|burst-{}|10.9.{}.{}|80",
            i % 300,
            i / 250,
            1 + i % 250
        );
        s.send_to(msg.as_bytes(), t.addr).unwrap();
    }
    t.signal(nix::sys::signal::Signal::SIGCONT);
    let deadline = Instant::now() + DEADLINE;
    let mut held = registrations(t.addr);
    while held < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        held = registrations(t.addr);
    }
    assert_eq!(held, n, "registrations sent while the Tower was stopped");
}
