//! The backend side of the request path (issue 18): when a failed request
//! may be sent again, what a client's malformed body costs the backend, and
//! how backend connections behave. Real `portico` processes, real backends
//! on raw sockets that record what reached them.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a recording backend got: each request's line (`METHOD /path`) in
/// order, and how many connections it accepted.
#[derive(Debug, Default)]
struct Record {
    requests: Vec<String>,
    connections: usize,
}

impl Record {
    fn count(&self, line: &str) -> usize {
        self.requests.iter().filter(|r| *r == line).count()
    }
}

/// Read one request head (and a Content-Length body) from `s`; `None` at
/// the close.
async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let len: usize = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .map_or(0, |(_, v)| v.trim().parse().unwrap());
            while buf.len() < end + 4 + len {
                let mut b = [0u8; 4096];
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => buf.extend_from_slice(&b[..n]),
                }
            }
            buf.drain(..end + 4 + len);
            let line = head.lines().next().unwrap_or("");
            return Some(line.rsplit_once(' ').map_or(line, |(l, _)| l).to_owned());
        }
        let mut b = [0u8; 4096];
        match s.read(&mut b).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&b[..n]),
        }
    }
}

/// A backend that answers the first request on each connection with
/// keep-alive, then reads the second, records it, and closes without
/// answering: a request sent on a pooled connection reaches it, and its
/// answer never comes.
async fn answers_once_per_connection() -> (SocketAddr, Arc<Mutex<Record>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let record = Arc::new(Mutex::new(Record::default()));
    let rec = record.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            rec.lock().unwrap().connections += 1;
            let rec = rec.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let Some(first) = read_request(&mut s, &mut buf).await else {
                    return;
                };
                rec.lock().unwrap().requests.push(first);
                let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                if s.write_all(answer).await.is_err() {
                    return;
                }
                if let Some(second) = read_request(&mut s, &mut buf).await {
                    rec.lock().unwrap().requests.push(second);
                }
                // Dropped: closed, the second request unanswered.
            });
        }
    });
    (addr, record)
}

fn post(path: &str, body: &'static str) -> hyper::Request<BoxBody> {
    use http_body_util::BodyExt;
    hyper::Request::post(path)
        .header("host", "test.local")
        .body(
            http_body_util::Full::new(bytes::Bytes::from_static(body.as_bytes()))
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap()
}

type BoxBody = http_body_util::combinators::BoxBody<bytes::Bytes, std::io::Error>;

/// Issue 18 item 1: a POST that reached the backend on a pooled connection
/// whose answer never came is not sent again (the backend may have
/// charged the card): 502. A GET in the same spot is sent again on a new
/// connection and succeeds. Both for our own client (no body: POST with
/// Content-Length 0) and hyper's (a body).
#[tokio::test]
async fn a_request_that_went_out_is_sent_again_only_when_idempotent() {
    let (addr, record) = answers_once_per_connection().await;
    let (_t, ing) = serving(addr, &[]).await;
    let mut c = Client::connect(ing.addr).await;

    // Our own client: requests without a body.
    assert_eq!(c.get("/warm").await.status, 200, "pools a connection");
    let a = c.send(post("/charge", "")).await;
    assert_eq!(a.status, 502, "{}", a.body);
    assert_eq!(
        record.lock().unwrap().count("POST /charge"),
        1,
        "the POST reached the backend once: {:?}",
        record.lock().unwrap()
    );
    assert_eq!(c.get("/warm").await.status, 200, "pools a connection");
    let a = c.get("/read").await;
    assert_eq!((a.status, a.body.as_str()), (200, "ok"));
    assert_eq!(
        record.lock().unwrap().count("GET /read"),
        2,
        "the GET went again on a new connection"
    );

    // hyper's client: requests with a body.
    assert_eq!(c.send(post("/warm", "w")).await.status, 200);
    let a = c.send(post("/charge-body", "card")).await;
    assert_eq!(a.status, 502, "{}", a.body);
    assert_eq!(record.lock().unwrap().count("POST /charge-body"), 1);
}

/// What a recording backend got on one connection, and whether the proxy
/// closed it.
#[derive(Debug, Default, Clone)]
struct Conn {
    bytes: Vec<u8>,
    closed: bool,
}

/// A backend that records every connection's bytes and its close, and
/// answers 200 once a chunked body's last chunk has come.
async fn recording_backend() -> (SocketAddr, Arc<Mutex<Vec<Conn>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(Mutex::new(Vec::<Conn>::new()));
    let all = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let i = {
                let mut all = all.lock().unwrap();
                all.push(Conn::default());
                all.len() - 1
            };
            let all = all.clone();
            tokio::spawn(async move {
                let mut b = [0u8; 4096];
                loop {
                    let n = s.read(&mut b).await.unwrap_or(0);
                    let done = {
                        let mut all = all.lock().unwrap();
                        let c = &mut all[i];
                        c.bytes.extend_from_slice(&b[..n]);
                        c.closed = n == 0;
                        c.bytes.ends_with(b"\r\n0\r\n\r\n")
                    };
                    if n == 0 {
                        return;
                    }
                    if done {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .await;
                    }
                }
            });
        }
    });
    (addr, conns)
}

fn status(out: &str) -> &str {
    out.get(9..12).unwrap_or("")
}

/// Issue 18 item 5: a chunked request body with broken framing is the
/// client's error: 400 and its connection closed, never a 502 that blames
/// the backend. Broken framing that came with the head reaches no backend
/// at all; broken framing that comes later aborts the forwarded request,
/// and the backend connection is closed, not pooled.
#[tokio::test]
async fn a_malformed_chunked_body_is_the_clients_error() {
    let (addr, conns) = recording_backend().await;
    let (_t, ing) = serving(addr, &[]).await;
    let head = "POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    let bodies = [
        ("a size that is not hex", "5g\r\nhello\r\n0\r\n\r\n"),
        ("a 0x prefix", "0x5\r\nhello\r\n0\r\n\r\n"),
        ("a negative size", "-5\r\nhello\r\n0\r\n\r\n"),
        (
            "a size past 2^64",
            "10000000000000000\r\nhello\r\n0\r\n\r\n",
        ),
        ("data not followed by CRLF", "5\r\nhelloXX\r\n0\r\n\r\n"),
        ("a bare LF ending the size line", "5\nhello\r\n0\r\n\r\n"),
        ("a bare LF after the data", "5\r\nhello\n0\r\n\r\n"),
        (
            "a good chunk, then a bad size",
            "5\r\nhello\r\nzz\r\nabc\r\n0\r\n\r\n",
        ),
    ];
    for (what, body) in bodies {
        let started = std::time::Instant::now();
        let out = raw(
            ing.addr,
            format!("{head}{body}").as_bytes(),
            std::time::Duration::from_secs(5),
        )
        .await;
        assert_eq!(status(&out), "400", "{what}: {out:?}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(4),
            "{what}: the client connection is closed"
        );
        assert!(
            conns.lock().unwrap().is_empty(),
            "{what}: nothing reached the backend: {:?}",
            conns.lock().unwrap()
        );
    }

    // Broken framing after the head was forwarded.
    let mut s = TcpStream::connect(ing.addr).await.unwrap();
    s.write_all(format!("{head}5\r\nhello\r\n").as_bytes())
        .await
        .unwrap();
    eventually(
        DEADLINE,
        "the head and first chunk reach the backend",
        || {
            let conns = conns.lock().unwrap();
            conns.len() == 1 && String::from_utf8_lossy(&conns[0].bytes).contains("hello")
        },
    )
    .await;
    s.write_all(b"zz\r\n").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut out))
        .await
        .expect("the client connection is closed");
    let out = String::from_utf8_lossy(&out);
    assert_eq!(status(&out), "400", "{out:?}");
    eventually(DEADLINE, "the backend connection is closed", || {
        conns.lock().unwrap()[0].closed
    })
    .await;

    // A well-formed body still goes through.
    let closing = head.replace("Host: x\r\n", "Host: x\r\nConnection: close\r\n");
    let out = raw(
        ing.addr,
        format!("{closing}5\r\nhello\r\n0\r\n\r\n").as_bytes(),
        DEADLINE,
    )
    .await;
    assert_eq!(status(&out), "200", "{out:?}");
}

/// A child process, killed when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// python's http.server speaking HTTP/1.1 (keep-alive), without
/// TCP_NODELAY, writing each answer's head and body in two writes; the
/// body names the client port, which tells connections apart.
const PYTHON_BACKEND: &str = r#"
import http.server
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.do_GET()
    def do_GET(self):
        body = str(self.client_address[1]).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;

/// Issue 18 item 10: a backend that writes its head and body apart, with
/// Nagle on, holds the body until its head is acknowledged. On a reused
/// backend connection our ACK was delayed, 40 ms at least (Linux's
/// minimum delayed-ACK timeout), so every request took 40 ms more.
///
/// Timing without asserting speed: that stall is a fixed 40 ms or more,
/// whatever the machine's load, while the exchange itself takes a few ms
/// in a debug build. The median of 20 requests on one reused connection
/// is asserted under 20 ms: a loaded machine slows a few requests (the
/// median ignores them), not every one by 20 ms.
#[tokio::test]
async fn a_backend_that_writes_head_and_body_apart_does_not_stall() {
    median_through_a_nagle_backend(|| get_req("/", &[])).await;
}

/// The same through hyper's client, which takes requests with a body.
#[tokio::test]
async fn a_nagle_backend_does_not_stall_requests_with_a_body() {
    median_through_a_nagle_backend(|| {
        Request::post("/")
            .header("host", "test.local")
            .body(
                Full::new(Bytes::from_static(b"a body"))
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .unwrap()
    })
    .await;
}

async fn median_through_a_nagle_backend(
    request: impl Fn() -> Request<http_body_util::combinators::BoxBody<Bytes, std::io::Error>>,
) {
    use std::io::BufRead;
    let mut python = std::process::Command::new("python3")
        .args(["-c", PYTHON_BACKEND])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let stdout = python.stdout.take().unwrap();
    let python = Child(python);
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line.trim().parse().expect("the backend's port");

    let t = tower("30s");
    register(t.addr, "py", SocketAddr::from(([127, 0, 0, 1], port)));
    let ing = ingress(t.addr, &["/:py"], &[]);
    wait_synced(&ing, 1).await;
    let mut c = Client::connect(ing.addr).await;
    // Past a new connection's first exchanges, which Linux acknowledges
    // at once (quick-ack mode) anyway.
    let first = c.send(request()).await;
    assert_eq!(first.status, 200);
    for _ in 0..10 {
        c.send(request()).await;
    }
    let mut took = Vec::new();
    for i in 0..20 {
        let started = std::time::Instant::now();
        let a = c.send(request()).await;
        took.push(started.elapsed());
        assert_eq!(
            (a.status, &a.body),
            (200, &first.body),
            "request {i} on the same backend connection"
        );
    }
    took.sort();
    let median = took[took.len() / 2];
    assert!(
        median < std::time::Duration::from_millis(20),
        "median {median:?}, each: {took:?}"
    );
    drop(python);
}
