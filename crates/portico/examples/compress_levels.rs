//! Bytes and CPU per response of Portico's compressing body at a few
//! levels of each coding, and the memory one response's encoder holds:
//! the figures behind the levels in `ingress::compress`
//! (docs/benchmarks.md).
//!
//!   python3 bench/conf/page.py > /tmp/page.html
//!   cargo run --release --example compress_levels -- /tmp/page.html
//!
//! CPU is this thread's (getrusage), the best of three runs of about half
//! a second each; memory is the resident growth, in a fresh process, with
//! 200 encoders held open mid-response, each after the page and a flush.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use nix::sys::resource::{getrusage, UsageWho};
use portico::ingress::compress::{Coding, Encoded};

// Portico's allocator: the encoders' tables are large allocations, whose
// cost depends on the allocator (glibc's maps and unmaps them at first,
// until its threshold moves, which made early runs look slower).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const LEVELS: [(Coding, &[i32]); 3] = [
    (Coding::Gzip, &[1, 2, 3, 4, 6, 9]),
    (Coding::Brotli, &[1, 2, 3, 4, 5, 6]),
    (Coding::Zstd, &[1, 2, 3, 4, 6]),
];

/// The page as a backend sends it: in 16 KiB frames, then (when `hold`)
/// nothing more for now, as a response still streaming.
struct Page {
    chunks: Vec<Bytes>,
    hold: bool,
}

impl Body for Page {
    type Data = Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.chunks.pop() {
            Some(c) => Poll::Ready(Some(Ok(Frame::data(c)))),
            None if self.hold => Poll::Pending,
            None => Poll::Ready(None),
        }
    }
}

fn page_body(page: &Bytes, hold: bool) -> Page {
    let mut chunks: Vec<Bytes> = page.chunks(16 * 1024).map(|c| page.slice_ref(c)).collect();
    chunks.reverse();
    Page { chunks, hold }
}

fn cpu() -> Duration {
    let u = getrusage(UsageWho::RUSAGE_THREAD).expect("getrusage");
    let t = |tv: nix::sys::time::TimeVal| {
        Duration::from_secs(tv.tv_sec() as u64) + Duration::from_micros(tv.tv_usec() as u64)
    };
    t(u.user_time()) + t(u.system_time())
}

fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4
}

async fn compress(page: &Bytes, coding: Coding, level: i32) -> Bytes {
    Encoded::with_level(page_body(page, false), coding, level)
        .collect()
        .await
        .expect("infallible")
        .to_bytes()
}

/// Resident KiB per encoder, with `n` of them open after the page.
async fn held_kib(page: &Bytes, coding: Coding, level: i32, n: usize) -> f64 {
    let before = rss_kib();
    let mut open = Vec::with_capacity(n);
    for _ in 0..n {
        let mut e = Encoded::with_level(page_body(page, true), coding, level);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        // Take what the encoder gives until it waits for more input.
        while let Poll::Ready(Some(_)) = Pin::new(&mut e).poll_frame(&mut cx) {}
        open.push(e);
    }
    let held = rss_kib();
    drop(open);
    (held.saturating_sub(before)) as f64 / n as f64
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: compress_levels PAGE.html (python3 bench/conf/page.py > PAGE.html)";
    let page = Bytes::from(std::fs::read(args.get(1).expect(usage)).expect("read the page"));
    if let [_, _, flag, coding, level] = args.as_slice() {
        // A fresh process per measurement of memory: freed memory of an
        // earlier run would otherwise be reused and hide the growth.
        assert_eq!(flag, "--held", "{usage}");
        let coding = by_token(coding);
        let held = held_kib(&page, coding, level.parse().expect("level"), 200).await;
        println!("{held:.0}");
        return;
    }
    println!("page: {} bytes", page.len());
    println!(
        "| coding | level | bytes | ratio | CPU µs per response | KiB held per open response |"
    );
    println!("|---|---|---|---|---|---|");
    for (coding, levels) in LEVELS {
        for &level in levels {
            let out = compress(&page, coding, level).await;
            // How many responses a tenth of a second takes, then the best
            // of three runs of five times as many: the machine is shared.
            let start = cpu();
            let mut n = 0u32;
            while cpu() - start < Duration::from_millis(100) {
                std::hint::black_box(compress(&page, coding, level).await);
                n += 1;
            }
            let n = (n * 5).max(5);
            let mut best = f64::MAX;
            for _ in 0..3 {
                let start = cpu();
                for _ in 0..n {
                    std::hint::black_box(compress(&page, coding, level).await);
                }
                best = best.min((cpu() - start).as_secs_f64() * 1e6 / f64::from(n));
            }
            let held = std::process::Command::new(&args[0])
                .args([&args[1], "--held", coding.token(), &level.to_string()])
                .output()
                .expect("run the memory measurement");
            let held = String::from_utf8_lossy(&held.stdout).trim().to_owned();
            println!(
                "| {} | {level} | {} | {:.2} | {best:.0} | {held} |",
                coding.token(),
                out.len(),
                page.len() as f64 / out.len() as f64
            );
        }
    }
}

fn by_token(token: &str) -> Coding {
    match token {
        "gzip" => Coding::Gzip,
        "br" => Coding::Brotli,
        "zstd" => Coding::Zstd,
        other => panic!("no coding {other}"),
    }
}
