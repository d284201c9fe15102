//! Load for Portico's benchmark, for the two things wrk cannot do:
//!
//! - `rate ADDR RATE CONNS SECONDS`: an open-loop load at a fixed request
//!   rate, spread over CONNS keep-alive connections. Each request has a
//!   scheduled send time, and its latency counts from then, not from when it
//!   was actually sent. A stalled proxy therefore shows up as latency instead
//!   of as a lower load (no coordinated omission).
//! - `idle ADDR CONNS SECONDS`: open CONNS keep-alive connections, one
//!   request each, and hold them. One JSON line says how many are open
//!   (the harness reads the proxy's memory then). Meanwhile a request on a
//!   new connection is timed every 100 ms.
//!
//! tokio's timers have millisecond resolution, so a send is often a little
//! past its scheduled time for no fault of the proxy: a request counts from
//! its scheduled time only when the previous response on its connection
//! came after that time, and from its actual send otherwise.
//!
//! Both print JSON lines on stdout. HTTP/1.1 only, GET /, responses framed
//! by Content-Length (what the benchmark's backends send).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: portico-loadgen\r\n\r\n";

fn usage() -> ! {
    eprintln!("usage: portico-loadgen rate ADDR RATE CONNS SECONDS | idle ADDR CONNS SECONDS");
    std::process::exit(2)
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize) -> T {
    args.get(i)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| usage())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| {
            eprintln!("cannot start the runtime: {e}");
            std::process::exit(1)
        });
    match args.get(1).map(String::as_str) {
        Some("rate") => runtime.block_on(rate(
            arg(&args, 2),
            arg(&args, 3),
            arg(&args, 4),
            arg(&args, 5),
        )),
        Some("idle") => runtime.block_on(idle(arg(&args, 2), arg(&args, 3), arg(&args, 4))),
        _ => usage(),
    }
}

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// One GET; the response status.
    async fn get(&mut self) -> std::io::Result<u16> {
        self.stream.write_all(REQUEST).await?;
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end])
                    .map_err(|_| std::io::Error::other("response head is not text"))?;
                let status: u16 = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| std::io::Error::other("no status"))?;
                let length: usize = head
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, v)| v.trim().parse().ok())
                    .ok_or_else(|| std::io::Error::other("no Content-Length"))?;
                let total = end + 4 + length;
                while self.buf.len() < total {
                    self.fill().await?;
                }
                self.buf.drain(..total);
                return Ok(status);
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn rate(addr: SocketAddr, rate: f64, conns: usize, seconds: f64) {
    let interval = Duration::from_secs_f64(conns as f64 / rate);
    let start = Instant::now() + Duration::from_millis(100);
    let end = start + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for i in 0..conns {
        let offset = interval.mul_f64(i as f64 / conns as f64);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut conn = Conn::open(addr).await.ok();
            let mut next = start + offset;
            let mut previous_done = start;
            while next < end {
                tokio::time::sleep_until(next.into()).await;
                let origin = if previous_done > next {
                    next
                } else {
                    Instant::now()
                };
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => match Conn::open(addr).await {
                        Ok(c) => conn.insert(c),
                        Err(_) => {
                            errors += 1;
                            next += interval;
                            continue;
                        }
                    },
                };
                let got = c.get().await;
                previous_done = Instant::now();
                match got {
                    Ok(s) if s < 400 => latencies.push(origin.elapsed().as_micros() as u64),
                    Ok(_) => errors += 1,
                    Err(_) => {
                        errors += 1;
                        conn = None;
                    }
                }
                next += interval;
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            all.extend(l);
            errors += e;
        }
    }
    all.sort_unstable();
    println!(
        "{{\"rate\":{rate},\"conns\":{conns},\"seconds\":{seconds},\"ok\":{},\"errors\":{errors},\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{}}}",
        all.len(),
        percentile(&all, 0.50),
        percentile(&all, 0.90),
        percentile(&all, 0.99),
        percentile(&all, 0.999),
        all.last().copied().unwrap_or(0),
    );
}

async fn idle(addr: SocketAddr, conns: usize, seconds: f64) {
    let mut held = Vec::with_capacity(conns);
    let mut failed = 0usize;
    // In waves, so that the proxy's accept queue never overflows.
    for wave in (0..conns).collect::<Vec<_>>().chunks(256) {
        let mut set = tokio::task::JoinSet::new();
        for _ in wave {
            set.spawn(async move {
                let mut c = Conn::open(addr).await.ok()?;
                (c.get().await.ok()? < 400).then_some(c)
            });
        }
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Some(c)) => held.push(c),
                _ => failed += 1,
            }
        }
    }
    println!("{{\"open\":{},\"failed\":{failed}}}", held.len());
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut probes = Vec::new();
    let mut probe_errors = 0u64;
    while Instant::now() < end {
        let t = Instant::now();
        let ok = async { Conn::open(addr).await.ok()?.get().await.ok() }.await;
        match ok {
            Some(s) if s < 400 => probes.push(t.elapsed().as_micros() as u64),
            _ => probe_errors += 1,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Still held: every connection answers one more request.
    let mut still = 0usize;
    for c in held.iter_mut().step_by(100) {
        if matches!(c.get().await, Ok(s) if s < 400) {
            still += 1;
        }
    }
    probes.sort_unstable();
    println!(
        "{{\"open\":{},\"failed\":{failed},\"checked_after\":{},\"still_open\":{still},\"probes\":{},\"probe_errors\":{probe_errors},\"probe_p50_us\":{},\"probe_max_us\":{}}}",
        held.len(),
        held.len().div_ceil(100),
        probes.len(),
        percentile(&probes, 0.5),
        probes.last().copied().unwrap_or(0),
    );
}
