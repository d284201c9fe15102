//! Test fixtures: the real `portico` binary as a child process, a real echo
//! backend (hyper), and small real clients. Everything binds 127.0.0.1:0;
//! waits are on conditions with deadlines, never fixed sleeps.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};

pub mod etcd;

pub const DEADLINE: Duration = Duration::from_secs(20);

/// A running `portico` process; killed when dropped.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
    /// Set when the log reader has read the last line (end of stderr).
    log_done: Arc<AtomicBool>,
}

impl Proc {
    /// The address a "<marker> http://ADDR" log line gave.
    pub fn logged_addr(&self, marker: &str) -> SocketAddr {
        let log = self.log_text();
        let rest = log.split(marker).nth(1).expect("marker logged");
        let word = rest.split_whitespace().next().unwrap_or("");
        word.trim_start_matches("http://").parse().expect("address")
    }

    /// Start `portico ARGS` and wait for its "<marker> <addr>" log line.
    pub fn start(args: &[&str], marker: &str) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_portico"));
        cmd.args(args);
        Self::spawn(cmd, args, marker)
    }

    /// Start `portico ARGS` under `prlimit --nofile=N:N` (soft and hard).
    pub fn start_with_fd_limit(limit: u32, args: &[&str], marker: &str) -> Proc {
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile={limit}:{limit}"))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_portico"))
            .args(args);
        Self::spawn(cmd, args, marker)
    }

    fn spawn(mut cmd: Command, args: &[&str], marker: &str) -> Proc {
        let mut child = cmd
            .env(
                "RUST_LOG",
                std::env::var("PORTICO_TEST_LOG").unwrap_or("info".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn portico");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        let log_done = Arc::new(AtomicBool::new(false));
        let done = log_done.clone();
        let wanted = marker.to_owned();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(pos) = line.find(&wanted) {
                    let rest = &line[pos + wanted.len()..];
                    let addr = rest.split_whitespace().next().unwrap_or("").to_owned();
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
                log2.lock().unwrap().push(line);
            }
            done.store(true, Ordering::Release);
        });
        let addr = match rx.recv_timeout(DEADLINE) {
            Ok(a) => a.parse().expect("listen address"),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "portico {args:?} did not log {marker:?}: {:?}",
                    log.lock().unwrap()
                );
            }
        };
        Proc {
            child,
            addr,
            log,
            log_done,
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// Wait for the process to exit, with a deadline.
    /// Its last log lines are read too: the reader thread may lag the exit.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                while !self.log_done.load(Ordering::Acquire) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn tower(ttl: &str) -> Proc {
    Proc::start(
        &["tower", "--listen", "127.0.0.1:0", "--ttl", ttl],
        "tower listening on udp ",
    )
}

pub fn ingress(tower: SocketAddr, routes: &[&str], extra: &[&str]) -> Proc {
    let tower = tower.to_string();
    let mut args = vec!["ingress", "--listen", "127.0.0.1:0", "--tower", &tower];
    for r in routes {
        args.push("--route");
        args.push(r);
    }
    // Tests run side by side: the admin listener must not take a fixed port.
    if !extra.contains(&"--admin") {
        args.extend_from_slice(&["--admin", "127.0.0.1:0"]);
    }
    args.extend_from_slice(extra);
    Proc::start(&args, "ingress listening on ")
}

/// One datagram to the Tower, its reply as text.
pub fn udp(tower: SocketAddr, msg: &[u8]) -> String {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.send_to(msg, tower).unwrap();
    let mut buf = [0u8; 65536];
    let (n, _) = s.recv_from(&mut buf).expect("tower reply");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// As `udp`, asking again on silence (UDP may drop the datagram, as under
/// a flood), like Portico's own Tower client; fails after 20 tries.
pub fn udp_retrying(tower: SocketAddr, msg: &[u8]) -> String {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 65536];
    for _ in 0..20 {
        s.send_to(msg, tower).unwrap();
        if let Ok((n, _)) = s.recv_from(&mut buf) {
            return String::from_utf8_lossy(&buf[..n]).into_owned();
        }
    }
    panic!("no reply from the Tower in 20 tries");
}

pub fn register(tower: SocketAddr, name: &str, addr: SocketAddr) {
    let reply = udp(
        tower,
        format!("REGISTER|{name}|{}|{}", addr.ip(), addr.port()).as_bytes(),
    );
    assert_eq!(reply, format!("OK|REGISTERED|{name}"));
}

/// A port on which nothing listens (bound, then released).
pub fn dead_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// What the echo backend saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, Vec<String>>,
    pub body_len: usize,
    /// The address the request's connection came from (the proxy's side
    /// of a pooled connection).
    pub peer: SocketAddr,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| v.first())
            .map(String::as_str)
    }
}

/// A real HTTP/1.1 server answering:
/// - `/slow?ms=N`: after N ms;
/// - `/gate`: only once `release` is notified (arrival reported on `arrived`);
/// - `/download?bytes=N`: N bytes in 64 KiB chunks; the first chunk, then
///   the rest only after `release` (proving the proxy streams);
/// - `/upload`: counts the body, reporting arrival of its first bytes;
/// - anything else: `backend=<id>` and the request line.
pub struct Backend {
    pub addr: SocketAddr,
    pub id: String,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub hits: Arc<AtomicUsize>,
    pub release: Arc<Notify>,
    pub arrived: Arc<Notify>,
    /// When each request arrived, in order.
    pub arrivals: Arc<Mutex<Vec<Instant>>>,
    /// What `/healthz` answers: 200 while true, 503 after; health checks
    /// are not counted in `hits`.
    pub healthy: Arc<std::sync::atomic::AtomicBool>,
    kill: tokio::sync::watch::Sender<bool>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Backend {
    pub async fn start(id: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let hits = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(Notify::new());
        let arrived = Arc::new(Notify::new());
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (kill, killed) = tokio::sync::watch::channel(false);
        let ctx = Ctx {
            healthy: healthy.clone(),
            arrivals: arrivals.clone(),
            id: id.to_owned(),
            seen: seen.clone(),
            hits: hits.clone(),
            release: release.clone(),
            arrived: arrived.clone(),
            peer: None,
        };
        tokio::spawn(async move {
            let mut stop = killed.clone();
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = stop.wait_for(|k| *k) => return,
                };
                let Ok((stream, peer)) = accepted else {
                    continue;
                };
                let ctx = Ctx {
                    peer: Some(peer),
                    ..ctx.clone()
                };
                let mut stop = killed.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| answer(ctx.clone(), req));
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc);
                    // Killed: the socket is dropped mid-whatever, as a crash would.
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.wait_for(|k| *k) => {}
                    }
                });
            }
        });
        Backend {
            addr,
            id: id.to_owned(),
            seen,
            hits,
            release,
            arrived,
            arrivals,
            healthy,
            kill,
        }
    }

    /// Stop as a crashed process would: listener and every connection gone.
    pub fn kill(&self) {
        let _ = self.kill.send(true);
    }

    pub fn last_seen(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("backend saw a request")
    }
}

#[derive(Clone)]
struct Ctx {
    healthy: Arc<std::sync::atomic::AtomicBool>,
    arrivals: Arc<Mutex<Vec<Instant>>>,
    id: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    hits: Arc<AtomicUsize>,
    release: Arc<Notify>,
    arrived: Arc<Notify>,
    peer: Option<SocketAddr>,
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn query_num(req: &Request<Incoming>, key: &str) -> u64 {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn answer(ctx: Ctx, req: Request<Incoming>) -> Result<Response<BoxBody>, Infallible> {
    if req.uri().path() == "/healthz" {
        let ok = ctx.healthy.load(Ordering::SeqCst);
        let mut r =
            Response::new(Full::new(Bytes::from_static(if ok { b"ok" } else { b"sick" })).boxed());
        *r.status_mut() = if ok {
            hyper::StatusCode::OK
        } else {
            hyper::StatusCode::SERVICE_UNAVAILABLE
        };
        return Ok(r);
    }
    ctx.arrivals.lock().unwrap().push(Instant::now());
    ctx.hits.fetch_add(1, Ordering::SeqCst);
    let mut headers: HashMap<String, Vec<String>> = HashMap::new();
    for (k, v) in req.headers() {
        headers
            .entry(k.as_str().to_owned())
            .or_default()
            .push(v.to_str().unwrap_or("").to_owned());
    }
    let method = req.method().to_string();
    let path = req.uri().to_string();
    let text = |s: String| -> BoxBody { Full::new(Bytes::from(s)).boxed() };
    let record = |body_len| {
        ctx.seen.lock().unwrap().push(Seen {
            method: method.clone(),
            path: path.clone(),
            headers: headers.clone(),
            body_len,
            peer: ctx.peer.expect("set per connection"),
        })
    };
    let resp = match req.uri().path() {
        "/status" => {
            record(0);
            let code = query_num(&req, "code") as u16;
            let mut r = Response::new(Full::new(Bytes::new()).boxed());
            *r.status_mut() = hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::OK);
            r.headers_mut().insert("x-backend", ctx.id.parse().unwrap());
            if code == 304 {
                r.headers_mut().insert("etag", "\"v1\"".parse().unwrap());
            }
            return Ok(r);
        }
        "/trailers" => {
            record(0);
            let (tx, rx) = mpsc::channel::<Frame<Bytes>>(4);
            tokio::spawn(async move {
                let _ = tx.send(Frame::data(Bytes::from_static(b"part one,"))).await;
                let _ = tx.send(Frame::data(Bytes::from_static(b"part two"))).await;
                let mut trailers = hyper::HeaderMap::new();
                trailers.insert("x-checksum", "abc123".parse().unwrap());
                let _ = tx.send(Frame::trailers(trailers)).await;
            });
            let mut r = Response::new(FrameBody(rx).boxed());
            r.headers_mut()
                .insert("trailer", "x-checksum".parse().unwrap());
            return Ok(r);
        }
        "/slow" => {
            record(0);
            tokio::time::sleep(Duration::from_millis(query_num(&req, "ms"))).await;
            text(format!("backend={} slow\n", ctx.id))
        }
        "/gate" => {
            record(0);
            ctx.arrived.notify_one();
            ctx.release.notified().await;
            text(format!("backend={} gate\n", ctx.id))
        }
        "/download" => {
            record(0);
            let total = query_num(&req, "bytes") as usize;
            let (tx, rx) = mpsc::channel::<Bytes>(4);
            let release = ctx.release.clone();
            tokio::spawn(async move {
                let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                let mut sent = 0;
                let mut first = true;
                while sent < total {
                    let n = chunk.len().min(total - sent);
                    if tx.send(chunk.slice(..n)).await.is_err() {
                        return;
                    }
                    sent += n;
                    if first {
                        first = false;
                        release.notified().await;
                    }
                }
            });
            let mut r = Response::new(ChannelBody(rx).boxed());
            r.headers_mut().insert("content-length", total.into());
            return Ok(r);
        }
        "/upload" => {
            let mut body = req.into_body();
            let mut n = 0usize;
            let mut first = true;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { break };
                if let Some(d) = frame.data_ref() {
                    n += d.len();
                    if first && n > 0 {
                        first = false;
                        ctx.arrived.notify_one();
                    }
                }
            }
            record(n);
            text(format!("received={n}\n"))
        }
        _ => {
            let len = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().len())
                .unwrap_or(0);
            record(len);
            text(format!("backend={} {} {}\n", ctx.id, method, path))
        }
    };
    let mut r = Response::new(resp);
    r.headers_mut().insert("x-backend", ctx.id.parse().unwrap());
    Ok(r)
}

/// A response body of whole frames (data and trailers) from a channel.
struct FrameBody(mpsc::Receiver<Frame<Bytes>>);

impl hyper::body::Body for FrameBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(Ok))
    }
}

/// A response body fed from a channel, so the test controls its pace.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// A plain HTTP/1.1 client connection (keep-alive: several requests on it).
pub struct Client {
    sender: hyper::client::conn::http1::SendRequest<
        http_body_util::combinators::BoxBody<Bytes, std::io::Error>,
    >,
}

pub struct Answer {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: String,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        Client { sender }
    }

    /// Over a connection already open; an error, not a panic, if the
    /// handshake fails (for load that counts failures).
    pub async fn over(stream: tokio::net::TcpStream) -> Result<Client, String> {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        Ok(Client { sender })
    }

    /// A GET whose failure is an error, not a panic.
    pub async fn try_get(&mut self, path: &str) -> Result<Answer, String> {
        self.sender
            .ready()
            .await
            .map_err(|e| format!("ready: {e}"))?;
        let resp = self
            .sender
            .send_request(get_req(path, &[]))
            .await
            .map_err(|e| format!("send: {e}"))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok(Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    pub async fn send(
        &mut self,
        req: Request<http_body_util::combinators::BoxBody<Bytes, std::io::Error>>,
    ) -> Answer {
        self.sender.ready().await.unwrap();
        let resp = self.sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    pub async fn get(&mut self, path: &str) -> Answer {
        self.send(get_req(path, &[])).await
    }
}

pub fn empty() -> http_body_util::combinators::BoxBody<Bytes, std::io::Error> {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

pub fn get_req(
    path: &str,
    headers: &[(&str, &str)],
) -> Request<http_body_util::combinators::BoxBody<Bytes, std::io::Error>> {
    let mut b = Request::get(path).header("host", "test.local");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(empty()).unwrap()
}

/// GET on a fresh connection.
pub async fn get(addr: SocketAddr, path: &str) -> Answer {
    Client::connect(addr).await.get(path).await
}

/// Send raw bytes, read until the server closes (or `within` passes).
pub async fn raw(addr: SocketAddr, bytes: &[u8], within: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Poll `cond` until true, failing after `within`.
pub async fn eventually<F: FnMut() -> bool>(within: Duration, what: &str, mut cond: F) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Poll `get` every `pause` until it gives `want`, failing after `DEADLINE`
/// with `what` and the last value it gave.
pub async fn wait_for_value<T, F, Fut>(what: &str, want: &T, pause: Duration, mut get: F)
where
    T: PartialEq + std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        let got = get().await;
        if got == *want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} is {got:?}, want {want:?}"
        );
        tokio::time::sleep(pause).await;
    }
}

/// An access log file in a directory of its own, removed on drop.
pub struct AccessLogFile {
    dir: std::path::PathBuf,
    path: String,
}

impl AccessLogFile {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("portico-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log").to_str().unwrap().to_owned();
        Self { dir, path }
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// An ingress routing `/` to `svc` that logs in `format` to this file.
    pub fn ingress(&self, tower: SocketAddr, format: &str) -> Proc {
        ingress(
            tower,
            &["/:svc"],
            &["--access-log", format, "--access-log-file", &self.path],
        )
    }

    /// The file's text once it has at least `n` lines.
    pub async fn lines(&self, n: usize) -> String {
        let read = || std::fs::read_to_string(&self.path).unwrap_or_default();
        eventually(DEADLINE, &format!("{n} access log lines"), || {
            read().lines().count() >= n
        })
        .await;
        read()
    }
}

impl Drop for AccessLogFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `portico up` with its listeners on free ports, then `extra`.
pub fn up(extra: &[&str]) -> Proc {
    let mut args = vec![
        "up",
        "--listen",
        "127.0.0.1:0",
        "--tower-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    Proc::start(&args, "ingress listening on ")
}

/// A Tower with `backend` registered as `svc`, and an ingress (given
/// `extra`) routing `/` to it that has seen the registration.
pub async fn serving(backend: SocketAddr, extra: &[&str]) -> (Proc, Proc) {
    let t = tower("30s");
    register(t.addr, "svc", backend);
    let ing = ingress(t.addr, &["/:svc"], extra);
    wait_synced(&ing, 1).await;
    (t, ing)
}

/// `serving` backend "b".
pub async fn one_backend(extra: &[&str]) -> (Proc, Backend, Proc) {
    let b = Backend::start("b").await;
    let (t, ing) = serving(b.addr, extra).await;
    (t, b, ing)
}

/// Counts from a load run.
#[derive(Debug, Default)]
pub struct LoadStats {
    pub ok: AtomicUsize,
    pub non_2xx: AtomicUsize,
    pub socket_errors: AtomicUsize,
}

impl LoadStats {
    pub fn summary(&self) -> (usize, usize, usize) {
        (
            self.ok.load(Ordering::SeqCst),
            self.non_2xx.load(Ordering::SeqCst),
            self.socket_errors.load(Ordering::SeqCst),
        )
    }
}

/// Closed-loop GETs from `keepalive` keep-alive clients and `fresh` clients
/// that open a new connection per request, until `stop` is set. Bounded by
/// the caller's stop flag, loopback only.
pub fn spawn_load(
    addr: SocketAddr,
    keepalive: usize,
    fresh: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (Arc<LoadStats>, Vec<tokio::task::JoinHandle<()>>) {
    let stats = Arc::new(LoadStats::default());
    let mut tasks = Vec::new();
    for i in 0..(keepalive + fresh) {
        let stats = stats.clone();
        let stop = stop.clone();
        let reuse = i < keepalive;
        tasks.push(tokio::spawn(async move {
            let mut sender = None;
            while !stop.load(Ordering::SeqCst) {
                if sender.is_none() {
                    let Ok(s) = tokio::net::TcpStream::connect(addr).await else {
                        stats.socket_errors.fetch_add(1, Ordering::SeqCst);
                        continue;
                    };
                    let Ok((tx, conn)) =
                        hyper::client::conn::http1::handshake(TokioIo::new(s)).await
                    else {
                        stats.socket_errors.fetch_add(1, Ordering::SeqCst);
                        continue;
                    };
                    tokio::spawn(conn);
                    sender = Some(tx);
                }
                let Some(tx) = sender.as_mut() else { continue };
                let req = get_req("/load", &[]);
                let outcome = async {
                    tx.ready().await.ok()?;
                    let resp = tx.send_request(req).await.ok()?;
                    let status = resp.status();
                    resp.into_body().collect().await.ok()?;
                    Some(status)
                }
                .await;
                match outcome {
                    Some(s) if s.is_success() => stats.ok.fetch_add(1, Ordering::SeqCst),
                    Some(_) => stats.non_2xx.fetch_add(1, Ordering::SeqCst),
                    None => {
                        sender = None;
                        stats.socket_errors.fetch_add(1, Ordering::SeqCst)
                    }
                };
                if !reuse {
                    sender = None;
                }
            }
        }));
    }
    (stats, tasks)
}

/// Wait until the ingress logs that its watch is in sync (`times` times).
pub async fn wait_synced(ing: &Proc, times: usize) {
    let log = ing.log.clone();
    eventually(DEADLINE, "discovery in sync", || {
        log.lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("in sync with the Tower"))
            .count()
            >= times
    })
    .await;
}

/// A free port below the ephemeral range (see its callers for why).
pub fn port_below_ephemeral_range() -> std::net::SocketAddr {
    let start = 20_000 + (std::process::id() % 10_000) as u16;
    for port in (start..30_000).chain(20_000..start) {
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        let udp = std::net::UdpSocket::bind(addr);
        let tcp = std::net::TcpListener::bind(addr);
        if udp.is_ok() && tcp.is_ok() {
            return addr;
        }
    }
    panic!("no free port in 20000-30000");
}

/// A WebSocket echo server (tokio-tungstenite): text and binary frames come
/// back as sent. Other frames need no echo: tungstenite queues the close
/// reply itself and sends it on the next read, which then ends the stream.
pub async fn websocket_echo() -> SocketAddr {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    let echo = matches!(msg, Message::Text(_) | Message::Binary(_));
                    if echo && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// The headless Chromium the browser tests drive.
pub fn chromium() -> &'static str {
    for c in [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ] {
        if std::path::Path::new(c).exists() {
            return c;
        }
    }
    panic!("this test opens a page in headless Chromium: apt-get install chromium (.ci/run does)");
}

/// The page as a browser sees it after its scripts ran.
pub fn browser_dom(url: &str, screenshot: Option<&std::path::Path>) -> String {
    let profile = std::env::temp_dir().join(format!(
        "portico-chromium-{}-{}",
        std::process::id(),
        fastrand::u32(..)
    ));
    let mut cmd = Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--virtual-time-budget=4000",
        "--window-size=1200,800",
    ]);
    cmd.arg(format!("--user-data-dir={}", profile.display()));
    match screenshot {
        Some(path) => cmd.arg(format!("--screenshot={}", path.display())),
        None => cmd.arg("--dump-dom"),
    };
    let out = cmd.arg(url).output().expect("run chromium");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fresh directory under the system's temporary one, unique to this
/// process and call.
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "portico-{tag}-{}-{}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
