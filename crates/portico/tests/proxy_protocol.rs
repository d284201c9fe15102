//! The PROXY protocol (issue 19) with real senders: HAProxy's send-proxy
//! and send-proxy-v2 in front of Portico (HTTP/1.1, h2c and TLS, its health
//! checks too), curl's --haproxy-protocol, and headers written by hand,
//! good, bad and stalled. The trusted front proxy connects from 127.0.0.2,
//! clients behind it from 127.0.0.5, anyone else from 127.0.0.1: Linux
//! answers the whole of 127.0.0.0/8 on loopback.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TRUSTED: &str = "127.0.0.2";
const CLIENT: &str = "127.0.0.5";
const UNTRUSTED_ANSWER: &str = "PROXY protocol header from a source that is not trusted.\n";

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("portico-pp-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).to_str().unwrap().to_owned()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free port on 127.0.0.1 (bound, then released) for HAProxy to bind.
fn free_port() -> u16 {
    dead_addr().port()
}

/// HAProxy in TCP mode, one frontend per `(server options, portico)`,
/// connecting to Portico from `source`. With `check` among the options it
/// sends Portico an HTTP health check, `GET /hc`, every 100 ms.
struct Haproxy {
    child: std::process::Child,
    fronts: Vec<SocketAddr>,
    _dir: Scratch,
}

impl Haproxy {
    async fn start(tag: &str, servers: &[(&str, SocketAddr)], source: &str) -> Self {
        let dir = Scratch::new(&format!("haproxy-{tag}"));
        let mut cfg = String::from(
            "global\n  maxconn 200\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
             timeout client 30s\n  timeout server 30s\n  option httpchk\n  \
             http-check send meth GET uri /hc ver HTTP/1.1 hdr host pp.test\n",
        );
        let mut fronts = Vec::new();
        for (i, (options, portico)) in servers.iter().enumerate() {
            let front = SocketAddr::from(([127, 0, 0, 1], free_port()));
            fronts.push(front);
            cfg.push_str(&format!(
                "listen front{i}\n  bind {front}\n  \
                 server portico {portico} {options} source {source} inter 100ms\n"
            ));
        }
        let file = dir.path("haproxy.cfg");
        std::fs::write(&file, cfg).unwrap();
        let child = std::process::Command::new("/usr/sbin/haproxy")
            .args(["-db", "-f", &file])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("run /usr/sbin/haproxy");
        let haproxy = Self {
            child,
            fronts,
            _dir: dir,
        };
        let deadline = Instant::now() + DEADLINE;
        for front in &haproxy.fronts {
            while TcpStream::connect(front).await.is_err() {
                assert!(
                    Instant::now() < deadline,
                    "haproxy never listened on {front}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        haproxy
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// curl with `args`: its exit code and what it printed.
async fn curl(args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .await
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.code().unwrap_or(-1), text)
}

/// A TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from.parse().unwrap(), 0))
        .unwrap();
    socket.connect(to).await.unwrap()
}

/// Send `bytes` from `from`, then read until Portico closes.
async fn exchange(from: &str, to: SocketAddr, bytes: &[u8]) -> String {
    let mut s = connect_from(from, to).await;
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut out))
        .await
        .expect("Portico closes the connection")
        .ok();
    String::from_utf8_lossy(&out).into_owned()
}

fn get_closing(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: pp.test\r\nconnection: close\r\n\r\n")
}

/// X-Forwarded-For and X-Real-IP as the backend saw them for `path`.
fn forwarded_for(b: &Backend, path: &str) -> (String, String) {
    let seen = b.seen.lock().unwrap();
    let s = seen
        .iter()
        .rev()
        .find(|s| s.path == path)
        .unwrap_or_else(|| panic!("the backend never saw {path}"));
    let h = |name| s.header(name).unwrap_or("").to_owned();
    (h("x-forwarded-for"), h("x-real-ip"))
}

fn assert_client(b: &Backend, path: &str, client: &str) {
    let (xff, real) = forwarded_for(b, path);
    assert_eq!((xff.as_str(), real.as_str()), (client, client), "{path}");
}

/// A self-signed certificate for `localhost` (openssl, P-256).
fn certificate(dir: &Scratch) -> (String, String) {
    let (cert, key) = (dir.path("cert.pem"), dir.path("key.pem"));
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-keyout", &key, "-out", &cert, "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// `portico_proxy_protocol_refused_total{reason}`, 0 when never counted.
async fn refused(admin: SocketAddr, reason: &str) -> u64 {
    let metrics = get(admin, "/metrics").await.body;
    let series = format!("portico_proxy_protocol_refused_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse().unwrap())
}

fn admin_of(ing: &Proc) -> SocketAddr {
    ing.logged_addr("admin listening on ")
}

#[tokio::test]
async fn haproxy_send_proxy_names_the_client_over_http1_and_h2c() {
    let scratch = Scratch::new("v1");
    let log = scratch.path("access.log");
    let (_t, b, ing) = one_backend(&[
        "--proxy-protocol-from",
        TRUSTED,
        "--access-log",
        "json",
        "--access-log-file",
        &log,
    ])
    .await;
    let hap = Haproxy::start("v1", &[("send-proxy check", ing.addr)], TRUSTED).await;
    let front = hap.fronts[0];

    let url = format!("http://{front}");
    let (code, body) = curl(&["--interface", CLIENT, &format!("{url}/v1-http1")]).await;
    assert_eq!(code, 0, "{body}");
    assert!(body.starts_with("backend=b GET /v1-http1"), "{body}");
    assert_client(&b, "/v1-http1", CLIENT);
    let (code, body) = curl(&[
        "--http2-prior-knowledge",
        "--interface",
        CLIENT,
        &format!("{url}/v1-h2c"),
    ])
    .await;
    assert_eq!(code, 0, "{body}");
    assert_client(&b, "/v1-h2c", CLIENT);

    // The access log names the client, not HAProxy.
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually(DEADLINE, "two access log lines", || {
        read().lines().filter(|l| l.contains("/v1-")).count() >= 2
    })
    .await;
    for line in read().lines().filter(|l| l.contains("/v1-")) {
        assert!(line.contains(r#""client":"127.0.0.5""#), "{line}");
    }

    // HAProxy's v1 health checks name HAProxy's own address.
    eventually(DEADLINE, "a health check", || {
        b.seen.lock().unwrap().iter().any(|s| s.path == "/hc")
    })
    .await;
    assert_client(&b, "/hc", TRUSTED);

    // A client behind HAProxy that sends a header of its own is refused:
    // the trusted proxy's header is the only one taken.
    let (_, answer) = curl(&["-i", "--haproxy-protocol", &format!("{url}/spoof")]).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.ends_with(UNTRUSTED_ANSWER), "{answer}");
    assert_eq!(refused(admin_of(&ing), "untrusted").await, 1);
}

#[tokio::test]
async fn haproxy_send_proxy_v2_names_the_client_over_tls_and_h2c() {
    let scratch = Scratch::new("v2");
    let (cert, key) = certificate(&scratch);
    let b = Backend::start("b").await;
    let (_t, plain) = serving(b.addr, &["--proxy-protocol-from", "127.0.0.0/30"]).await;
    let (_t2, tls) = serving(
        b.addr,
        &[
            "--proxy-protocol-from",
            "127.0.0.0/30",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
    )
    .await;
    let hap = Haproxy::start(
        "v2",
        // No checks of the TLS server: they are plain HTTP.
        &[
            ("send-proxy-v2 check", plain.addr),
            ("send-proxy-v2", tls.addr),
        ],
        TRUSTED,
    )
    .await;
    let (plain_front, tls_front) = (hap.fronts[0], hap.fronts[1]);

    for (proto, path) in [("--http1.1", "/v2-tls-h1"), ("--http2", "/v2-tls-h2")] {
        let url = format!("https://localhost:{}{path}", tls_front.port());
        let resolve = format!("localhost:{}:127.0.0.1", tls_front.port());
        let (code, body) = curl(&[
            "-k",
            proto,
            "--resolve",
            &resolve,
            "--interface",
            CLIENT,
            &url,
        ])
        .await;
        assert_eq!(code, 0, "{proto}: {body}");
        assert_client(&b, path, CLIENT);
    }
    let (code, body) = curl(&[
        "--http2-prior-knowledge",
        "--interface",
        CLIENT,
        &format!("http://{plain_front}/v2-h2c"),
    ])
    .await;
    assert_eq!(code, 0, "{body}");
    assert_client(&b, "/v2-h2c", CLIENT);

    // Health checks carry v2's LOCAL command: the real peer stays.
    eventually(DEADLINE, "a health check", || {
        b.seen.lock().unwrap().iter().any(|s| s.path == "/hc")
    })
    .await;
    assert_client(&b, "/hc", TRUSTED);

    // Nothing was refused along the way, health checks included.
    for ing in [&plain, &tls] {
        for reason in ["missing", "malformed", "incomplete", "timeout", "untrusted"] {
            assert_eq!(refused(admin_of(ing), reason).await, 0, "{reason}");
        }
    }
}

#[tokio::test]
async fn curl_haproxy_protocol_from_trusted_and_untrusted_sources() {
    // `portico up`, with the trusted network from the config file.
    let scratch = Scratch::new("curl");
    let config = scratch.path("portico.toml");
    std::fs::write(
        &config,
        format!("proxy_protocol_from = [\"{TRUSTED}/32\"]\n[[route]]\nprefix = \"/\"\nservice = \"svc\"\n"),
    )
    .unwrap();
    let b = Backend::start("b").await;
    let up = up(&["--config", &config, "--admin", "127.0.0.1:0"]);
    let tower: SocketAddr = up.logged_addr("tower listening on udp ");
    register(tower, "svc", b.addr);
    let url = format!("http://{}", up.addr);
    wait_for_value("a routed answer", &0, Duration::from_millis(20), || async {
        curl(&["-f", "--haproxy-protocol", "--interface", TRUSTED, &url])
            .await
            .0
    })
    .await;

    let (code, body) = curl(&[
        "--haproxy-protocol",
        "--interface",
        TRUSTED,
        &format!("{url}/curl"),
    ])
    .await;
    assert_eq!(code, 0, "{body}");
    assert!(body.starts_with("backend=b GET /curl"), "{body}");
    assert_client(&b, "/curl", TRUSTED);

    // The same header from a source not trusted: refused, never forwarded.
    let (code, answer) = curl(&[
        "-i",
        "--haproxy-protocol",
        "--interface",
        "127.0.0.1",
        &format!("{url}/spoofed"),
    ])
    .await;
    assert_eq!(code, 0, "{answer}");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.ends_with(UNTRUSTED_ANSWER), "{answer}");
    // The trusted source without a header: closed without an answer.
    let (code, answer) = curl(&["--interface", TRUSTED, &format!("{url}/bare")]).await;
    // Its request is left unread: the close is a reset (curl's 56).
    assert_eq!(code, 56, "{answer}");
    assert!(!b
        .seen
        .lock()
        .unwrap()
        .iter()
        .any(|s| s.path == "/spoofed" || s.path == "/bare"));

    let admin = up.logged_addr("admin listening on http://");
    assert_eq!(refused(admin, "untrusted").await, 1);
    assert_eq!(refused(admin, "missing").await, 1);
}

#[tokio::test]
async fn on_tls_a_header_from_a_source_not_trusted_fails_the_handshake() {
    let scratch = Scratch::new("tls-untrusted");
    let (cert, key) = certificate(&scratch);
    let (_t, b, ing) = one_backend(&[
        "--proxy-protocol-from",
        TRUSTED,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ])
    .await;
    let url = format!("https://localhost:{}/tls", ing.addr.port());
    let resolve = format!("localhost:{}:127.0.0.1", ing.addr.port());
    let (code, _) = curl(&["-k", "--resolve", &resolve, "--haproxy-protocol", &url]).await;
    assert_eq!(code, 35, "a failed TLS handshake");
    // From the trusted source the header comes before the ClientHello.
    let (code, body) = curl(&[
        "-k",
        "--resolve",
        &resolve,
        "--haproxy-protocol",
        "--interface",
        TRUSTED,
        &url,
    ])
    .await;
    assert_eq!(code, 0, "{body}");
    assert_client(&b, "/tls", TRUSTED);
}

fn v2_header(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x20 | command);
    h.push(family);
    h.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
    h.extend_from_slice(addresses);
    h
}

#[tokio::test]
async fn headers_written_by_hand_good_and_bad() {
    let (_t, b, ing) = one_backend(&["--proxy-protocol-from", TRUSTED]).await;
    let to = ing.addr;
    let with = |header: &[u8], path: &str| [header, get_closing(path).as_bytes()].concat();

    let good: [(Vec<u8>, &str, &str); 5] = [
        (
            b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 80\r\n".to_vec(),
            "/tcp4",
            "203.0.113.7",
        ),
        (
            b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 80\r\n".to_vec(),
            "/tcp6",
            "2001:db8::7",
        ),
        (b"PROXY UNKNOWN\r\n".to_vec(), "/unknown", TRUSTED),
        (
            v2_header(1, 0x11, &[198, 51, 100, 9, 10, 0, 0, 1, 0x9c, 0x40, 0, 80]),
            "/v2",
            "198.51.100.9",
        ),
        (
            v2_header(0, 0x11, &[198, 51, 100, 9, 10, 0, 0, 1, 0x9c, 0x40, 0, 80]),
            "/v2-local",
            TRUSTED,
        ),
    ];
    for (header, path, client) in &good {
        let answer = exchange(TRUSTED, to, &with(header, path)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
        assert_client(&b, path, client);
    }

    let mut v3 = v2_header(1, 0x11, &[0; 12]);
    v3[12] = 0x31;
    let bad: [(Vec<u8>, &str); 6] = [
        (b"PROXY TCP4 1.2.3.4\r\n".to_vec(), "malformed"),
        (b"PROXY TCP4 ::1 ::1 1 2\r\n".to_vec(), "malformed"),
        (
            [&b"PROXY TCP4 "[..], &[b'9'; 120][..], &b"\r\n"[..]].concat(),
            "malformed",
        ),
        (v3, "malformed"),
        (v2_header(1, 0x11, &[0; 4]), "malformed"),
        (Vec::new(), "missing"),
    ];
    for (header, _) in &bad {
        let answer = exchange(TRUSTED, to, &with(header, "/bad")).await;
        assert_eq!(answer, "", "closed without an answer: {header:?}");
    }
    assert!(!b.seen.lock().unwrap().iter().any(|s| s.path == "/bad"));
    let admin = admin_of(&ing);
    assert_eq!(refused(admin, "malformed").await, 5);
    assert_eq!(refused(admin, "missing").await, 1);

    // An untrusted source's v2 header gets the 400 as a v1 one does.
    let answer = exchange("127.0.0.1", to, &with(&good[3].0, "/bad")).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // And the connection that ends inside its header is counted.
    let mut s = connect_from(TRUSTED, to).await;
    s.write_all(b"PROXY TCP4 1.2.3.4 ").await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut out))
        .await
        .expect("closed at the end of input")
        .ok();
    assert_eq!(refused(admin, "incomplete").await, 1);
}

#[tokio::test]
async fn a_stalled_header_is_closed_at_the_header_timeout_while_others_are_served() {
    let (_t, b, ing) =
        one_backend(&["--proxy-protocol-from", TRUSTED, "--header-timeout", "1s"]).await;
    let started = Instant::now();
    let mut stalled = Vec::new();
    for part in [&b"PROXY TCP4 203.0.113.7 "[..], b"\r\n\r\n\0\r\nQU"] {
        let mut s = connect_from(TRUSTED, ing.addr).await;
        s.write_all(part).await.unwrap();
        stalled.push(s);
    }
    // A v2 header that promises more than it sends.
    let mut promised = v2_header(1, 0x11, &[198, 51, 100, 9, 10, 0, 0, 1, 0x9c, 0x40, 0, 80]);
    promised[15] = 40;
    let mut s = connect_from(TRUSTED, ing.addr).await;
    s.write_all(&promised).await.unwrap();
    stalled.push(s);

    // Meanwhile other clients are served.
    let header = b"PROXY TCP4 203.0.113.8 10.0.0.1 40000 80\r\n";
    let answer = exchange(
        TRUSTED,
        ing.addr,
        &[&header[..], get_closing("/meanwhile").as_bytes()].concat(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_client(&b, "/meanwhile", "203.0.113.8");

    for mut s in stalled {
        let mut out = Vec::new();
        tokio::time::timeout(DEADLINE, s.read_to_end(&mut out))
            .await
            .expect("closed at the header timeout")
            .ok();
        assert!(out.is_empty(), "{:?}", String::from_utf8_lossy(&out));
    }
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(refused(admin_of(&ing), "timeout").await, 3);
}

#[test]
fn a_bad_network_stops_the_start_with_the_reason() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portico"))
        .args([
            "ingress",
            "--route",
            "/:svc",
            "--proxy-protocol-from",
            "10.0.0.0/33",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--proxy-protocol-from") && err.contains("/33"),
        "{err}"
    );
}
