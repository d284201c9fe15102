//! The Tower's change stream (issue 21) end to end: real Towers, ingresses
//! and backends; a scripted Tower (a TCP listener answering HTTP/1.1 by
//! hand) for what a real one never sends. In every case the ingress's table
//! (admin `/endpoints`) ends equal to the Tower's (`/v1/services`), and a
//! steady stream of requests to a service whose replicas stay registered
//! sees no failure.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use portico::services_doc::{
    encode_change, encode_ping, Change, EndpointDoc, ServicesDoc, FULL_PREFIX,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

/// Endpoints by service, as both sides list them.
type Table = BTreeMap<String, BTreeSet<SocketAddr>>;

async fn json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let answer = get(addr, path).await;
    assert_eq!(answer.status, 200, "{path}: {}", answer.body);
    serde_json::from_str(&answer.body).unwrap()
}

fn tower_table(doc: &serde_json::Value) -> Table {
    let mut out = Table::new();
    for (name, list) in doc["services"].as_object().unwrap() {
        for e in list.as_array().unwrap() {
            let ip: std::net::IpAddr = e["ip"].as_str().unwrap().parse().unwrap();
            let port = e["port"].as_u64().unwrap() as u16;
            out.entry(name.clone())
                .or_default()
                .insert(SocketAddr::new(ip, port));
        }
    }
    out
}

/// The ingress's table; a routed service without endpoints is listed
/// empty there and absent from the Tower's document.
async fn ingress_table(admin: SocketAddr) -> Table {
    let doc = json(admin, "/endpoints").await;
    let mut out = Table::new();
    for (name, list) in doc.as_object().unwrap() {
        for e in list.as_array().unwrap() {
            let addr = e["address"].as_str().unwrap().parse().unwrap();
            out.entry(name.clone()).or_default().insert(addr);
        }
    }
    out
}

/// Wait until `ing` has logged a line with `text` `times` times, and no
/// more. What it logged before its last request may still be on its way
/// through the pipe when that request arrives.
async fn logged_times(ing: &Proc, text: &str, times: usize) {
    let count = || ing.log_text().lines().filter(|l| l.contains(text)).count();
    eventually(DEADLINE, &format!("{text:?} logged {times} times"), || {
        count() >= times
    })
    .await;
    assert_eq!(count(), times, "{text:?} in:\n{}", ing.log_text());
}

fn admin(ing: &Proc) -> SocketAddr {
    ing.logged_addr("admin listening on ")
}

/// Wait until every ingress lists what the Tower lists; the Tower's
/// document at that moment.
async fn wait_same_table(tower: SocketAddr, ingresses: &[&Proc]) -> serde_json::Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let doc = json(tower, "/v1/services").await;
        let want = tower_table(&doc);
        let mut differ = None;
        for ing in ingresses {
            let got = ingress_table(admin(ing)).await;
            if got != want {
                differ = Some(got);
                break;
            }
        }
        if differ.is_none() {
            // The Tower may have moved on while the ingresses were asked (a
            // change, or its `warm` turn): equal only to a document that
            // still stands afterwards.
            let after = json(tower, "/v1/services").await;
            let key =
                |d: &serde_json::Value| [d["epoch"].clone(), d["index"].clone(), d["warm"].clone()];
            if key(&after) == key(&doc) {
                return doc;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the ingress lists {differ:?}\nthe Tower lists {want:?} (or it kept changing)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One counter or gauge of the Tower's /metrics.
async fn tower_metric(tower: SocketAddr, name: &str) -> u64 {
    let body = get(tower, "/metrics").await.body;
    let line = body
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("the Tower's /metrics lacks {name}:\n{body}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// A steady stream of GETs through an ingress (one keep-alive client, one
/// opening a connection per request), paced so that parallel tests keep
/// their share of two cores. Every failure is kept for the assertion.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let tasks = [true, false]
            .into_iter()
            .map(|keepalive| {
                let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
                tokio::spawn(async move {
                    let mut client = None;
                    while !stop.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        if client.is_none() {
                            let connected = match tokio::net::TcpStream::connect(addr).await {
                                Ok(s) => Client::over(s).await,
                                Err(e) => Err(format!("connect: {e}")),
                            };
                            match connected {
                                Ok(c) => client = Some(c),
                                Err(e) => {
                                    failures.lock().unwrap().push(e);
                                    continue;
                                }
                            }
                        }
                        let Some(c) = client.as_mut() else { continue };
                        match c.try_get("/load").await {
                            Ok(a) if a.status == 200 => {
                                ok.fetch_add(1, Ordering::SeqCst);
                            }
                            Ok(a) => failures.lock().unwrap().push(format!(
                                "{} {}",
                                a.status,
                                a.body.trim()
                            )),
                            Err(e) => {
                                failures.lock().unwrap().push(e);
                                client = None;
                            }
                        }
                        if !keepalive {
                            client = None;
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failures,
            tasks,
        }
    }

    fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    /// Wait for `n` more answered requests: the transition is over for traffic.
    async fn wait_more(&self, n: usize) {
        let from = self.ok();
        eventually(DEADLINE, &format!("{n} more requests answered"), || {
            self.ok() >= from + n
        })
        .await;
    }

    async fn assert_none_failed(self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        let failures = self.failures.lock().unwrap();
        let ok = self.ok.load(Ordering::SeqCst);
        assert!(
            failures.is_empty(),
            "{} of {} requests failed, first: {:?}",
            failures.len(),
            failures.len() + ok,
            &failures[..failures.len().min(5)]
        );
        assert!(ok > 0, "no request was answered");
    }
}

/// Registrations and deregistrations over UDP, as workloads come and go:
/// 32 slots spread over 8 services, each toggled at random; a slot comes
/// back on a new port, so an address once removed is not seen again.
struct Changer {
    tower: SocketAddr,
    socket: UdpSocket,
    slots: [Option<u16>; 32],
    made: u32,
    /// Long names make long lines: fewer changes fill a socket's buffers.
    prefix: String,
}

impl Changer {
    fn new(tower: SocketAddr, name_len: usize) -> Changer {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        Changer {
            tower,
            socket,
            slots: [None; 32],
            made: 0,
            prefix: "c".repeat(name_len.saturating_sub(1).max(4)),
        }
    }

    /// The next change's datagram.
    fn next_change(&mut self) -> String {
        let slot = fastrand::usize(..self.slots.len());
        let name = format!("{}{}", self.prefix, slot % 8);
        let ip = format!("10.1.0.{}", slot + 1);
        let msg = match self.slots[slot].take() {
            Some(port) => format!("DEREGISTER|{name}|{ip}|{port}"),
            None => {
                let port = 1000 + (self.made % 60_000) as u16;
                self.slots[slot] = Some(port);
                format!("REGISTER|{name}|{ip}|{port}")
            }
        };
        self.made += 1;
        msg
    }

    /// `n` changes, `WINDOW` datagrams in flight at a time (a few KB, which
    /// the Tower's receive buffer holds): the Tower's work, not the round
    /// trips, sets the pace.
    fn burst(&mut self, n: usize) {
        const WINDOW: usize = 16;
        let mut buf = [0u8; 512];
        let mut left = n;
        while left > 0 {
            let window = left.min(WINDOW);
            for _ in 0..window {
                let msg = self.next_change();
                self.socket.send_to(msg.as_bytes(), self.tower).unwrap();
            }
            // A lost datagram is no failure: the Tower's document is the
            // truth compared against, whatever the changer believes.
            for _ in 0..window {
                let Ok((len, _)) = self.socket.recv_from(&mut buf) else {
                    break;
                };
                let reply = String::from_utf8_lossy(&buf[..len]);
                assert!(
                    reply.starts_with("OK|") || reply.starts_with("ERR|NOT_FOUND"),
                    "{reply}"
                );
            }
            left -= window;
        }
    }

    /// `n` changes, off the runtime's threads.
    async fn steps(mut self, n: usize) -> Changer {
        tokio::task::spawn_blocking(move || {
            self.burst(n);
            self
        })
        .await
        .unwrap()
    }
}

/// A thread making changes every millisecond until stopped.
struct Churn {
    stop: Arc<AtomicBool>,
    made: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Churn {
    fn start(tower: SocketAddr) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let made = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, made) = (stop.clone(), made.clone());
            std::thread::spawn(move || {
                let mut changer = Changer::new(tower, 8);
                while !stop.load(Ordering::SeqCst) {
                    changer.burst(1);
                    made.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        Churn {
            stop,
            made,
            thread: Some(thread),
        }
    }

    async fn wait_more(&self, n: usize) {
        let from = self.made.load(Ordering::SeqCst);
        eventually(DEADLINE, &format!("{n} more changes"), || {
            self.made.load(Ordering::SeqCst) >= from + n
        })
        .await;
    }

    async fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let thread = self.thread.take().unwrap();
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
    }
}

/// A Tower with two live backends registered as `svc`.
async fn steady_service(tower: SocketAddr) -> (Backend, Backend) {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    register(tower, "svc", a.addr);
    register(tower, "svc", b.addr);
    (a, b)
}

fn tower_with(extra: &[&str]) -> Proc {
    let mut args = vec!["tower", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    Proc::start(&args, "tower listening on udp ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_connects_mid_stream_ends_equal_to_the_tower() {
    let t = tower("30s");
    let (_a, _b) = steady_service(t.addr).await;
    let early = ingress(t.addr, &["/:svc"], &[]);
    wait_synced(&early, 1).await;
    let early_load = Load::start(early.addr);
    let churn = Churn::start(t.addr);
    churn.wait_more(150).await;

    let late = ingress(t.addr, &["/:svc"], &[]);
    let late_load = Load::start(late.addr);
    wait_synced(&late, 1).await;
    churn.wait_more(150).await;
    churn.stop().await;

    let doc = wait_same_table(t.addr, &[&early, &late]).await;
    assert!(
        tower_table(&doc).len() > 1,
        "the changes left nothing: {doc}"
    );
    late_load.wait_more(20).await;
    early_load.assert_none_failed().await;
    late_load.assert_none_failed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_falls_behind_the_log_gets_one_full_document() {
    let t = tower_with(&["--ttl", "30s", "--http-watch-log", "16"]);
    let (_a, _b) = steady_service(t.addr).await;
    let ing = ingress(t.addr, &["/:svc"], &[]);
    wait_synced(&ing, 1).await;
    let load = Load::start(ing.addr);
    let changer = Changer::new(t.addr, 120).steps(64).await;
    wait_same_table(t.addr, &[&ing]).await;
    let resyncs = "portico_tower_watch_resyncs_total";
    let before = tower_metric(t.addr, resyncs).await;

    // Stopped, the ingress reads nothing: once the sockets' buffers are
    // full (megabytes on loopback) the Tower's writer waits; changes past
    // that push its place out of the log.
    ing.signal(Signal::SIGSTOP);
    let mut changer = changer;
    let mut queued = 0;
    let deadline = Instant::now() + DEADLINE;
    loop {
        changer = changer.steps(1_000).await;
        let now = tower_send_queue(t.addr.port());
        if now > 0 && now == queued {
            break;
        }
        queued = now;
        assert!(Instant::now() < deadline, "the Tower's writer never waited");
    }
    // More than a batch the writer may hold (512 lines) and the log (16).
    drop(changer.steps(1_000).await);
    ing.signal(Signal::SIGCONT);

    wait_same_table(t.addr, &[&ing]).await;
    let after = tower_metric(t.addr, resyncs).await;
    assert!(after > before, "{resyncs} {before} -> {after}");
    load.wait_more(20).await;
    load.assert_none_failed().await;
}

/// The most bytes a TCP socket on `port` (IPv4) has sent and not had
/// acknowledged, or not sent yet: the Tower's side of a stream whose
/// reader stopped. Read from /proc/net/tcp.
fn tower_send_queue(port: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields.get(1)?.rsplit(':').next()?;
            let established = fields.get(3)? == &"01";
            let tx_queue = fields.get(4)?.split(':').next()?;
            (established && u16::from_str_radix(local_port, 16).ok()? == port)
                .then(|| u64::from_str_radix(tx_queue, 16).ok())?
        })
        .max()
        .unwrap_or(0)
}

/// REGISTERs every 300 ms for a set the test changes, as workloads
/// heartbeating with `portico register` would.
struct Heartbeats {
    set: Arc<Mutex<Vec<(String, SocketAddr)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeats {
    fn start(tower: SocketAddr, set: Vec<(String, SocketAddr)>) -> Heartbeats {
        let set = Arc::new(Mutex::new(set));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (set, stop) = (set.clone(), stop.clone());
            std::thread::spawn(move || {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                while !stop.load(Ordering::SeqCst) {
                    let now = set.lock().unwrap().clone();
                    for (name, a) in now {
                        let msg = format!("REGISTER|{name}|{}|{}", a.ip(), a.port());
                        let _ = s.send_to(msg.as_bytes(), tower);
                    }
                    std::thread::sleep(Duration::from_millis(300));
                }
            })
        };
        Heartbeats {
            set,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn keep(name: &str, i: u8) -> (String, SocketAddr) {
    (name.to_owned(), SocketAddr::from(([10, 2, 0, i], 80)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tower_restarted_under_a_stream_is_followed_into_its_new_epoch() {
    // Below the ephemeral range: see tower_killed_and_restarted_under_load_loses_no_request.
    let listen = port_below_ephemeral_range().to_string();
    let start_tower = || {
        Proc::start(
            &["tower", "--listen", &listen, "--ttl", "2s"],
            "tower listening on udp ",
        )
    };
    let first = start_tower();
    let tower: SocketAddr = format!("127.0.0.1:{}", first.addr.port()).parse().unwrap();
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let mut set = vec![("svc".to_owned(), a.addr), ("svc".to_owned(), b.addr)];
    set.extend((1..=6).map(|i| keep("old", i)));
    let beats = Heartbeats::start(tower, set);
    let ing = ingress(tower, &["/:svc"], &[]);
    wait_synced(&ing, 1).await;
    let load = Load::start(ing.addr);
    let old = wait_same_table(tower, &[&ing]).await;
    assert_eq!(tower_table(&old)["old"].len(), 6, "{old}");

    // The ingress sleeps through the restart, so that it asks the new Tower
    // from the old run's index, which the new run passes meanwhile: only
    // the epoch tells them apart.
    ing.signal(Signal::SIGSTOP);
    drop(first);
    {
        let mut set = beats.set.lock().unwrap();
        set.retain(|(name, _)| name != "old");
        set.extend((1..=3).map(|i| keep("new", i)));
    }
    let second = start_tower();
    Changer::new(tower, 8)
        .steps(old["index"].as_u64().unwrap() as usize + 50)
        .await;
    ing.signal(Signal::SIGCONT);

    // Cold, the new Tower lacks what has not heartbeated yet: the ingress
    // carries the old run's replicas until the `warm` change, then the
    // new document is the whole truth.
    let doc = wait_same_table(tower, &[&ing]).await;
    assert_ne!(doc["epoch"], old["epoch"]);
    assert_eq!(doc["warm"], true, "{doc}");
    let table = tower_table(&doc);
    assert!(
        !table.contains_key("old") && table["new"].len() == 3,
        "{doc}"
    );
    load.wait_more(20).await;
    load.assert_none_failed().await;
    drop(beats);
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_ingress_ends_equal_and_its_old_stream_is_given_back() {
    // One stream at a time: a killed ingress's stream must be released
    // for its successor's to be served.
    let t = tower_with(&["--ttl", "30s", "--http-max-watches", "1"]);
    let (_a, _b) = steady_service(t.addr).await;
    let churn = Churn::start(t.addr);
    let mut ing = ingress(t.addr, &["/:svc"], &[]);
    wait_synced(&ing, 1).await;
    for _ in 0..2 {
        churn.wait_more(50).await;
        drop(ing);
        ing = ingress(t.addr, &["/:svc"], &[]);
        // From its first moment: before its table is filled it asks the
        // Tower per request.
        let load = Load::start(ing.addr);
        wait_synced(&ing, 1).await;
        churn.wait_more(50).await;
        load.wait_more(20).await;
        load.assert_none_failed().await;
    }
    churn.stop().await;
    wait_same_table(t.addr, &[&ing]).await;
    assert_eq!(tower_metric(t.addr, "portico_tower_watch_streams").await, 1);
}

// A scripted Tower: what a real one never sends.

/// One request the scripted Tower read, waiting for the test's answer.
struct Asked {
    line: String,
    reply: oneshot::Sender<Reply>,
}

impl Asked {
    fn query(&self) -> &str {
        self.line
            .split_whitespace()
            .nth(1)
            .and_then(|target| target.split_once('?'))
            .map_or("", |(_, q)| q)
    }

    fn asks_for(&self, key: &str) -> bool {
        self.query()
            .split('&')
            .any(|kv| kv.split('=').next() == Some(key))
    }

    fn answer(self, reply: Reply) {
        self.reply.send(reply).ok().unwrap();
    }
}

enum Reply {
    /// `application/x-ndjson`, chunked: these lines, then `End`.
    Stream(Vec<Vec<u8>>, End),
    /// `application/json` with a length, as a Tower without the stream.
    Plain(ServicesDoc),
}

enum End {
    /// Keep the stream open until the ingress drops it.
    Hold,
    /// Close the connection without the last chunk.
    Cut,
    /// End the body properly.
    Finish,
}

struct ScriptedTower {
    addr: SocketAddr,
    asks: mpsc::UnboundedReceiver<Asked>,
}

impl ScriptedTower {
    /// TCP and UDP on one port, as a Tower's API and protocol are. UDP
    /// answers PING and nothing is registered, should the ingress ask.
    async fn start() -> ScriptedTower {
        let (listener, udp) = loop {
            let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            if let Ok(udp) = UdpSocket::bind(tcp.local_addr().unwrap()) {
                break (tcp, udp);
            }
        };
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = udp.recv_from(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let reply = match text.as_str() {
                    "PING" => "OK|PONG|tower".to_owned(),
                    "LIST" => "OK|LIST|0|".to_owned(),
                    other => format!("ERR|NOT_FOUND|{}", other.rsplit('|').next().unwrap()),
                };
                let _ = udp.send_to(reply.as_bytes(), from);
            }
        });
        let addr = listener.local_addr().unwrap();
        let (tx, asks) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_scripted(stream, tx.clone()));
            }
        });
        ScriptedTower { addr, asks }
    }

    /// The ingress's next request.
    async fn next(&mut self, ing: &Proc) -> Asked {
        match tokio::time::timeout(DEADLINE, self.asks.recv()).await {
            Ok(asked) => asked.unwrap(),
            Err(_) => panic!("the ingress asked nothing more:\n{}", ing.log_text()),
        }
    }
}

async fn serve_scripted(stream: tokio::net::TcpStream, asks: mpsc::UnboundedSender<Asked>) {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    loop {
        let mut line = String::new();
        if read.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        loop {
            let mut header = String::new();
            if read.read_line(&mut header).await.unwrap_or(0) == 0 {
                return;
            }
            if header == "\r\n" {
                break;
            }
        }
        let (reply, replied) = oneshot::channel();
        let line = line.trim_end().to_owned();
        if asks.send(Asked { line, reply }).is_err() {
            return;
        }
        let Ok(reply) = replied.await else { return };
        let (lines, end) = match reply {
            Reply::Plain(doc) => {
                let body = serde_json::to_vec(&doc).unwrap();
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                let sent = write.write_all(head.as_bytes()).await;
                if sent.is_err() || write.write_all(&body).await.is_err() {
                    return;
                }
                continue;
            }
            Reply::Stream(lines, end) => (lines, end),
        };
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n";
        let mut out = head.as_bytes().to_vec();
        for l in lines {
            out.extend_from_slice(format!("{:x}\r\n", l.len()).as_bytes());
            out.extend_from_slice(&l);
            out.extend_from_slice(b"\r\n");
        }
        if let End::Finish = end {
            out.extend_from_slice(b"0\r\n\r\n");
        }
        if write.write_all(&out).await.is_err() {
            return;
        }
        match end {
            End::Finish => continue,
            End::Cut => return,
            // Until the ingress hangs up.
            End::Hold => {
                let mut sink = [0u8; 1024];
                while read.read(&mut sink).await.unwrap_or(0) > 0 {}
                return;
            }
        }
    }
}

const EPOCH: u64 = 77;

fn doc(index: u64, entries: &[(&str, &str)]) -> ServicesDoc {
    let mut services: BTreeMap<String, Vec<EndpointDoc>> = BTreeMap::new();
    for (name, addr) in entries {
        let a: SocketAddr = addr.parse().unwrap();
        services
            .entry((*name).to_owned())
            .or_default()
            .push(EndpointDoc {
                ip: a.ip(),
                port: a.port(),
                ttl_left_ms: 30_000,
            });
    }
    ServicesDoc {
        index,
        epoch: EPOCH,
        warm: true,
        services,
    }
}

fn table(entries: &[(&str, &str)]) -> Table {
    let mut out = Table::new();
    for (name, addr) in entries {
        out.entry((*name).to_owned())
            .or_default()
            .insert(addr.parse().unwrap());
    }
    out
}

fn full_line(doc: &ServicesDoc) -> Vec<u8> {
    let json = serde_json::to_vec(doc).unwrap();
    let mut line = FULL_PREFIX.to_vec();
    line.extend_from_slice(&json[1..]);
    line.push(b'\n');
    line
}

fn add_line(index: u64, service: &str, addr: &str) -> Vec<u8> {
    let change = Change::Add {
        service: portico_wire::ServiceName::parse(service).unwrap(),
        addr: addr.parse().unwrap(),
        ttl_ms: 30_000,
    };
    encode_change(index, &change).to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_lines_from_the_tower_fall_back_to_the_full_document() {
    let mut tower = ScriptedTower::start().await;
    let ing = ingress(tower.addr, &["/:svc"], &["--discovery", "watch"]);
    let admin = admin(&ing);
    // Each round: a full document, then what must never be applied.
    let bad: [(&str, Vec<u8>, End); 4] = [
        (
            "a change that is not JSON",
            b"{\"type\":\"add\",\"index\":6,\"service\":\"svc\",\"ip\":\"10.9.9.9\",\"port\":}\n"
                .to_vec(),
            End::Hold,
        ),
        (
            "a change whose index skips one",
            add_line(7, "svc", "10.9.9.9:80"),
            End::Hold,
        ),
        (
            "a stream cut in the middle of a whole change",
            add_line(6, "svc", "10.9.9.9:80")
                .strip_suffix(b"\n")
                .unwrap()
                .to_vec(),
            End::Cut,
        ),
        (
            "a stream ended in the middle of a whole change",
            add_line(6, "svc", "10.9.9.9:80")
                .strip_suffix(b"\n")
                .unwrap()
                .to_vec(),
            End::Finish,
        ),
    ];
    let mut asked = tower.next(&ing).await;
    for (round, (what, line, end)) in bad.into_iter().enumerate() {
        assert!(asked.asks_for("watch"), "{}", asked.line);
        assert!(!asked.asks_for("index"), "{what}: {}", asked.line);
        let replica = format!("10.0.0.{}:80", round + 2);
        let entries = [("svc", "10.0.0.1:80"), ("svc", replica.as_str())];
        let full = full_line(&doc(5, &entries));
        asked.answer(Reply::Stream(vec![full, line], end));
        // The next question comes after the bad line was read; answering
        // it waits while the table is looked at.
        asked = tower.next(&ing).await;
        assert!(
            !asked.asks_for("index"),
            "after {what} the ingress asked from an index: {}",
            asked.line
        );
        assert_eq!(ingress_table(admin).await, table(&entries), "after {what}");
    }
    // A good stream is followed as ever.
    let entries = [("svc", "10.0.0.1:80")];
    let good = vec![
        full_line(&doc(5, &entries)),
        add_line(6, "svc", "10.0.0.9:80"),
    ];
    asked.answer(Reply::Stream(good, End::Hold));
    let want = table(&[("svc", "10.0.0.1:80"), ("svc", "10.0.0.9:80")]);
    wait_for_value(
        "the ingress's table",
        &want,
        Duration::from_millis(10),
        || ingress_table(admin),
    )
    .await;
    // Said once for the four bad streams, not once a reconnection.
    logged_times(&ing, "WARN", 1).await;
}

/// A Tower that claims the last index there is: before, the ingress's
/// discovery task died on the overflow (debug) and never asked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_document_at_the_last_index_is_refused_and_the_watch_goes_on() {
    let mut tower = ScriptedTower::start().await;
    let ing = ingress(tower.addr, &["/:svc"], &["--discovery", "watch"]);
    let admin = admin(&ing);
    let asked = tower.next(&ing).await;
    let last = full_line(&doc(u64::MAX, &[("svc", "10.0.0.7:80")]));
    let ping = encode_ping(u64::MAX).to_vec();
    asked.answer(Reply::Stream(vec![last, ping], End::Hold));
    let asked = tower.next(&ing).await;
    assert!(!asked.asks_for("index"), "{}", asked.line);
    assert_eq!(ingress_table(admin).await, table(&[]));
    let entries = [("svc", "10.0.0.1:80")];
    asked.answer(Reply::Stream(vec![full_line(&doc(5, &entries))], End::Hold));
    wait_for_value(
        "the ingress's table",
        &table(&entries),
        Duration::from_millis(10),
        || ingress_table(admin),
    )
    .await;
    logged_times(&ing, "the last there can be", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tower_without_the_stream_is_watched_with_blocking_queries() {
    let mut tower = ScriptedTower::start().await;
    let ing = ingress(tower.addr, &["/:svc"], &["--discovery", "watch"]);
    let admin = admin(&ing);
    let asked = tower.next(&ing).await;
    assert!(asked.asks_for("watch"), "{}", asked.line);
    let first = [("svc", "10.0.0.1:80")];
    asked.answer(Reply::Plain(doc(5, &first)));
    let asked = tower.next(&ing).await;
    assert!(
        asked.query().contains("index=5") && asked.asks_for("wait"),
        "{}",
        asked.line
    );
    assert_eq!(ingress_table(admin).await, table(&first));
    let second = [("svc", "10.0.0.2:80"), ("web", "10.0.0.3:80")];
    asked.answer(Reply::Plain(doc(6, &second)));
    let asked = tower.next(&ing).await;
    assert!(
        asked.query().contains("index=6") && asked.asks_for("wait"),
        "{}",
        asked.line
    );
    assert_eq!(ingress_table(admin).await, table(&second));
    // A failed blocking query: the Tower may have been upgraded meanwhile,
    // so the stream is asked for again; still none.
    drop(asked);
    let asked = tower.next(&ing).await;
    assert!(
        asked.asks_for("watch") && !asked.asks_for("index"),
        "{}",
        asked.line
    );
    let third = [("svc", "10.0.0.4:80")];
    asked.answer(Reply::Plain(doc(7, &third)));
    let asked = tower.next(&ing).await;
    assert!(asked.query().contains("index=7"), "{}", asked.line);
    assert_eq!(ingress_table(admin).await, table(&third));
    logged_times(&ing, "has no change stream; using blocking queries", 1).await;
    // Once a recovery: the failed query was a loss.
    logged_times(&ing, "in sync with the Tower", 2).await;
}
