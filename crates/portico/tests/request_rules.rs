//! The request's own rules (issue 18): what a backend is sent of the
//! client's Host, TE and X-Request-Id, which paths are refused before
//! routing, and what a client can write into the access log. Raw requests
//! over real sockets; the backend records the request head as it got it.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// A backend that records each request head byte for byte (lower-cased
/// field names aside, nothing is parsed away) and answers `200 ok`,
/// keeping the connection for the next request.
struct RawBackend {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
}

impl RawBackend {
    async fn start() -> RawBackend {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = heads.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut s = BufReader::new(s);
                    while let Some(head) = read_head(&mut s).await {
                        let length = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap())
                            })
                            .unwrap_or(0);
                        let mut body = vec![0; length];
                        if s.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        seen.lock().unwrap().push(head);
                        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        if s.get_mut().write_all(ok).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        RawBackend { addr, heads }
    }

    fn count(&self) -> usize {
        self.heads.lock().unwrap().len()
    }

    fn last(&self) -> String {
        self.heads
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a request")
    }

    /// The values of field `name` in the last head.
    fn fields(&self, name: &str) -> Vec<String> {
        self.last()
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    }
}

/// The request line and fields up to the empty line, or `None` at EOF.
async fn read_head(s: &mut BufReader<tokio::net::TcpStream>) -> Option<String> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if s.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            return Some(head);
        }
        head.push_str(&line);
    }
}

fn status(out: &str) -> &str {
    out.get(9..12).unwrap_or("")
}

/// Send one request on its own connection, its status.
async fn send(ing: &Proc, request: &str) -> String {
    let out = raw(ing.addr, request.as_bytes(), DEADLINE).await;
    status(&out).to_owned()
}

/// Item 4: HTTP/1.1 requires Host (RFC 9112 section 3.2), so every request
/// a backend gets has one, through our own client (no body) and hyper's
/// (a body): the client's, or for HTTP/1.0 without one the service's name.
/// `Connection: host` does not remove it; userinfo in Host is refused.
#[tokio::test]
async fn every_backend_request_carries_one_host() {
    let b = RawBackend::start().await;
    let (_t, ing) = serving(b.addr, &[]).await;
    let cases = [
        ("GET /x HTTP/1.0\r\n\r\n", "svc"),
        ("POST /x HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi", "svc"),
        (
            "GET /x HTTP/1.1\r\nHost: example.com\r\nConnection: host, close\r\n\r\n",
            "example.com",
        ),
        (
            "POST /x HTTP/1.1\r\nHost: example.com:8080\r\nConnection: host, close\r\nContent-Length: 2\r\n\r\nhi",
            "example.com:8080",
        ),
        (
            "GET http://example.com/x HTTP/1.0\r\n\r\n",
            "example.com",
        ),
    ];
    for (request, host) in cases {
        assert_eq!(send(&ing, request).await, "200", "{request:?}");
        assert_eq!(b.fields("host"), [host], "{request:?}: {}", b.last());
        let line = b.last().lines().next().unwrap().to_owned();
        assert!(line.ends_with(" /x HTTP/1.1"), "{line}");
    }
    let before = b.count();
    for request in [
        "GET /x HTTP/1.1\r\nHost: user@example.com\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost: user:pw@example.com:80\r\n\r\n",
    ] {
        assert_eq!(send(&ing, request).await, "400", "{request:?}");
    }
    assert_eq!(b.count(), before, "nothing forwarded");
}

/// Item 7: TE is hop-by-hop (RFC 9110 section 7.6.1): the client's never
/// reaches an HTTP/1.1 backend, whatever it says; when it accepts trailers,
/// which we pass on to it, the backend gets our own `TE: trailers` with the
/// `Connection: te` option RFC 9110 section 10.1.4 requires of its sender,
/// through our client (no body) and hyper's (a body).
#[tokio::test]
async fn te_is_hop_by_hop_and_ours_asks_for_trailers() {
    let b = RawBackend::start().await;
    let (_t, ing) = serving(b.addr, &[]).await;
    let ours: (Vec<&str>, Vec<&str>) = (vec!["trailers"], vec!["te"]);
    let none: (Vec<&str>, Vec<&str>) = (vec![], vec![]);
    let cases = [
        ("GET /x HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nConnection: TE, close\r\n\r\n", &ours),
        ("GET /x HTTP/1.1\r\nHost: x\r\nTE: gzip, trailers\r\nConnection: close\r\n\r\n", &ours),
        ("GET /x HTTP/1.1\r\nHost: x\r\nTE: gzip\r\nConnection: TE, close\r\n\r\n", &none),
        ("POST /x HTTP/1.1\r\nHost: x\r\nTE: deflate;q=0.5, trailers\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi", &ours),
        ("POST /x HTTP/1.1\r\nHost: x\r\nTE: gzip\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi", &none),
    ];
    for (request, (te, connection)) in cases {
        assert_eq!(send(&ing, request).await, "200", "{request:?}");
        assert_eq!(
            (b.fields("te"), b.fields("connection")),
            (
                te.iter().map(|s| s.to_string()).collect(),
                connection.iter().map(|s| s.to_string()).collect()
            ),
            "{request:?}: {}",
            b.last()
        );
    }
}

/// The TE and :authority of each request an h2c backend got.
type H2cSeen = Arc<Mutex<Vec<(Option<String>, String)>>>;

/// An h2c backend recording the TE and :authority of what it got.
async fn h2c_backend(seen: H2cSeen) -> SocketAddr {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let seen = seen.clone();
            let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                let te = req
                    .headers()
                    .get("te")
                    .map(|v| v.to_str().unwrap().to_owned());
                let authority = req.uri().authority().map_or("", |a| a.as_str()).to_owned();
                seen.lock().unwrap().push((te, authority));
                async { Ok::<_, std::convert::Infallible>(hyper::Response::new(empty())) }
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc),
            );
        }
    });
    addr
}

/// Item 7, the other side: an HTTP/2 backend (gRPC) still gets
/// `TE: trailers`, and only that; and item 4: its :authority is the Host.
#[tokio::test]
async fn an_h2c_backend_gets_te_trailers_and_an_authority() {
    let t = tower("30s");
    let seen = Arc::new(Mutex::new(Vec::new()));
    register(t.addr, "grpc", h2c_backend(seen.clone()).await);
    let ing = ingress(t.addr, &[], &["--route-h2c", "/:grpc"]);
    wait_synced(&ing, 1).await;
    let cases = [
        (
            "GET /x HTTP/1.1\r\nHost: a.example\r\nTE: trailers\r\nConnection: TE, close\r\n\r\n",
            (Some("trailers"), "a.example"),
        ),
        (
            "GET /x HTTP/1.1\r\nHost: a.example\r\nTE: gzip, trailers\r\nConnection: close\r\n\r\n",
            (Some("trailers"), "a.example"),
        ),
        (
            "GET /x HTTP/1.1\r\nHost: a.example\r\nTE: gzip\r\nConnection: close\r\n\r\n",
            (None, "a.example"),
        ),
        ("GET /x HTTP/1.0\r\n\r\n", (None, "grpc")),
    ];
    for (request, (te, authority)) in cases {
        assert_eq!(send(&ing, request).await, "200", "{request:?}");
        let got = seen.lock().unwrap().last().cloned().unwrap();
        assert_eq!(
            (got.0.as_deref(), got.1.as_str()),
            (te, authority),
            "{request:?}"
        );
    }
}

/// Item 11: paths that a backend resolves under another prefix than the
/// one they were routed on (`..;` for Tomcat, `\` for WHATWG parsers,
/// `%2F` for decoding ones) never reach the `/public` backend, as the
/// mode says.
#[tokio::test]
async fn paths_that_escape_their_route_are_refused() {
    let t = tower("30s");
    let public = RawBackend::start().await;
    let admin = RawBackend::start().await;
    register(t.addr, "public", public.addr);
    register(t.addr, "admin", admin.addr);
    let routes = ["/public:public", "/admin:admin"];
    let request =
        |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    // [default (keep-encoded), reject, keep]
    let cases: [(&str, [&str; 3]); 6] = [
        ("/public/x", ["200", "200", "200"]),
        ("/public/..;/admin", ["400", "400", "200"]),
        ("/public/.;x=1/..;y/admin", ["400", "400", "200"]),
        ("/public/\\..\\admin", ["400", "400", "200"]),
        ("/public/..%2fadmin", ["200", "400", "200"]),
        ("/public/..%5Cadmin", ["200", "400", "200"]),
    ];
    for (mode, flags) in [
        (0, &[][..]),
        (1, &["--path-escapes", "reject"][..]),
        (2, &["--path-escapes", "keep"][..]),
    ] {
        let ing = ingress(t.addr, &routes, flags);
        wait_synced(&ing, 1).await;
        for (path, want) in cases {
            let before = public.count();
            assert_eq!(
                send(&ing, &request(path)).await,
                want[mode],
                "{path} {flags:?}"
            );
            if want[mode] == "200" {
                // Forwarded byte for byte, to the route it matched.
                assert_eq!(public.count(), before + 1);
                assert!(public
                    .last()
                    .starts_with(&format!("GET {path} HTTP/1.1\r\n")));
            } else {
                assert_eq!(
                    public.count(),
                    before,
                    "{path} {flags:?}: nothing forwarded"
                );
            }
        }
    }
    assert_eq!(admin.count(), 0);
}

/// The same modes from the config file; a flag wins over it.
#[tokio::test]
async fn path_escapes_from_the_config_file() {
    let t = tower("30s");
    let public = RawBackend::start().await;
    register(t.addr, "public", public.addr);
    let dir = std::env::temp_dir().join(format!("portico-escapes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("portico.toml");
    std::fs::write(
        &file,
        "path_escapes = \"reject\"\n[[route]]\nprefix = \"/public\"\nservice = \"public\"\n",
    )
    .unwrap();
    let config = file.to_str().unwrap();
    let request = "GET /public/a%2Fb HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let ing = ingress(t.addr, &[], &["--config", config]);
    wait_synced(&ing, 1).await;
    assert_eq!(send(&ing, request).await, "400");
    let ing = ingress(
        t.addr,
        &[],
        &["--config", config, "--path-escapes", "keep-encoded"],
    );
    wait_synced(&ing, 1).await;
    assert_eq!(send(&ing, request).await, "200");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Item 12: a client cannot forge an access-log field: quoted values have
/// `"` and `\` escaped, and an X-Request-Id that is not 1-128 visible ASCII
/// characters is replaced by a new one, in the log and towards the backend.
#[tokio::test]
async fn access_log_fields_cannot_be_forged() {
    let t = tower("30s");
    let b = RawBackend::start().await;
    register(t.addr, "svc", b.addr);
    let file = AccessLogFile::new("forge");
    let ing = file.ingress(t.addr, "combined");
    wait_synced(&ing, 1).await;
    let forged = "GET /forged HTTP/1.1\r\nHost: x\r\nUser-Agent: x\\\" a=b\r\nX-Request-Id: 1 route=/admin\r\nConnection: close\r\n\r\n";
    assert_eq!(send(&ing, forged).await, "200");
    let sent_id = b.fields("x-request-id");
    assert_eq!(sent_id.len(), 1, "{}", b.last());
    let id = &sent_id[0];
    assert!(
        id.len() == 32 && id.bytes().all(|c| c.is_ascii_hexdigit()),
        "{id}"
    );
    let kept =
        "GET /kept HTTP/1.1\r\nHost: x\r\nX-Request-Id: abc-123_x.y\r\nConnection: close\r\n\r\n";
    assert_eq!(send(&ing, kept).await, "200");
    assert_eq!(b.fields("x-request-id"), ["abc-123_x.y"]);

    let log = file.lines(2).await;
    let line = log.lines().find(|l| l.contains("/forged")).unwrap();
    // The user agent stays inside its quotes: `x\"` is escaped as `x\\\"`.
    assert!(line.contains(r#" "x\\\" a=b" "#), "{line}");
    assert_eq!(line.matches(" route=").count(), 1, "{line}");
    assert!(line.contains(&format!(" request_id={id} ")), "{line}");
    let line = log.lines().find(|l| l.contains("/kept")).unwrap();
    assert!(line.contains(" request_id=abc-123_x.y "), "{line}");
}
