//! Response compression end to end: a real backend serving a page, JSON,
//! an image and the responses that must stay as they are; curl (with
//! `--compressed` and each Accept-Encoding alone), hyper and headless
//! Chromium as clients; the bodies decoded by python3's gzip module and by
//! the codecs' own decoders.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::{HeaderMap, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, Notify};

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// A 20 KB HTML page, text a person can read in the browser test.
fn page() -> String {
    let mut s = String::from(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Compressed by Portico</title>\
         </head><body>\n<h1 id=\"title\">Compressed by Portico</h1>\n",
    );
    let mut i = 0u32;
    while s.len() < 20_000 {
        s += &format!(
            "<p class=\"row\">Paragraph {i}: the quick brown fox jumps over the lazy dog, \
             number {}.</p>\n",
            i.wrapping_mul(7919) % 1000
        );
        i += 1;
    }
    s + "<p id=\"end\">The end of the page.</p>\n</body></html>\n"
}

fn json() -> String {
    let items: Vec<String> = (0..100)
        .map(|i| format!("{{\"id\":{i},\"name\":\"item {i}\",\"tags\":[\"a\",\"b\"]}}"))
        .collect();
    format!("{{\"items\":[{}]}}", items.join(","))
}

/// Bytes that do not compress, as an image's.
fn image() -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..20_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn gzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    async_compression::tokio::bufread::GzipEncoder::new(data)
        .read_to_end(&mut out)
        .await
        .unwrap();
    out
}

/// Decode `data` as `coding` with the codecs' own decoders.
async fn decode(coding: &str, data: &[u8]) -> Vec<u8> {
    use async_compression::tokio::bufread::{BrotliDecoder, GzipDecoder, ZstdDecoder};
    let mut out = Vec::new();
    match coding {
        "gzip" => GzipDecoder::new(data).read_to_end(&mut out).await,
        "br" => BrotliDecoder::new(data).read_to_end(&mut out).await,
        "zstd" => ZstdDecoder::new(data).read_to_end(&mut out).await,
        other => panic!("no decoder for {other}"),
    }
    .unwrap();
    out
}

/// The test site: what each path answers is in `answer`.
struct Site {
    addr: SocketAddr,
    /// `/stream.txt` sends its second part once this is notified.
    release: Arc<Notify>,
    /// The Accept-Encoding of each request, in order.
    accept_encoding: Arc<Mutex<Vec<String>>>,
}

impl Site {
    async fn start() -> Site {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let release = Arc::new(Notify::new());
        let accept_encoding = Arc::new(Mutex::new(Vec::new()));
        let encoded = Bytes::from(gzip(page().as_bytes()).await);
        let (r, ae) = (release.clone(), accept_encoding.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (r, ae, encoded) = (r.clone(), ae.clone(), encoded.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        answer(req, r.clone(), ae.clone(), encoded.clone())
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Site {
            addr,
            release,
            accept_encoding,
        }
    }
}

fn full(body: impl Into<Bytes>) -> BoxBody {
    Full::new(body.into()).boxed()
}

async fn answer(
    req: Request<Incoming>,
    release: Arc<Notify>,
    accept_encoding: Arc<Mutex<Vec<String>>>,
    encoded: Bytes,
) -> Result<Response<BoxBody>, Infallible> {
    let ae = req
        .headers()
        .get("accept-encoding")
        .map(|v| v.to_str().unwrap_or("?").to_owned())
        .unwrap_or_default();
    accept_encoding.lock().unwrap().push(ae);
    let html = "text/html; charset=utf-8";
    let (status, headers, body): (u16, Vec<(&str, &str)>, BoxBody) = match req.uri().path() {
        "/page.html" => (
            200,
            vec![
                ("content-type", html),
                ("etag", "\"page-v1\""),
                ("accept-ranges", "bytes"),
            ],
            full(page()),
        ),
        "/vary.html" => (
            200,
            vec![("content-type", html), ("vary", "Origin")],
            full(page()),
        ),
        "/data.json" => (
            200,
            vec![("content-type", "application/json")],
            full(json()),
        ),
        "/image.png" => (200, vec![("content-type", "image/png")], full(image())),
        "/small.html" => (
            200,
            vec![("content-type", html)],
            full(page()[..500].to_owned()),
        ),
        "/encoded.html" => (
            200,
            vec![("content-type", html), ("content-encoding", "gzip")],
            full(encoded),
        ),
        "/no-transform.html" => (
            200,
            vec![
                ("content-type", html),
                ("cache-control", "public, no-transform"),
            ],
            full(page()),
        ),
        "/not-modified" => (304, vec![("etag", "\"page-v1\"")], full(Bytes::new())),
        "/range.html" => (
            206,
            vec![
                ("content-type", html),
                ("content-range", "bytes 0-1999/20000"),
            ],
            full(page()[..2000].to_owned()),
        ),
        "/events" => (
            200,
            vec![("content-type", "text/event-stream")],
            full("data: an event that is long enough to be worth compressing\n\n".repeat(40)),
        ),
        "/chunked.html" => {
            // No length: streamed in four parts.
            let page = Bytes::from(page());
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(async move {
                for part in page.chunks(page.len() / 4 + 1) {
                    let _ = tx.send(page.slice_ref(part)).await;
                }
            });
            (200, vec![("content-type", html)], Channel(rx).boxed())
        }
        "/stream.txt" => {
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(async move {
                let _ = tx.send(Bytes::from_static(b"first part\n")).await;
                release.notified().await;
                let _ = tx.send(Bytes::from_static(b"second part\n")).await;
            });
            (
                200,
                vec![("content-type", "text/plain")],
                Channel(rx).boxed(),
            )
        }
        _ => (
            404,
            vec![("content-type", "text/plain")],
            full("not here\n"),
        ),
    };
    let mut r = Response::new(body);
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    for (k, v) in headers {
        r.headers_mut().append(k, v.parse().unwrap());
    }
    Ok(r)
}

/// A response body fed from a channel, so the site controls its pace.
struct Channel(mpsc::Receiver<Bytes>);

impl hyper::body::Body for Channel {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// A response as it came over the wire: no decoding.
struct Raw {
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

async fn fetch(addr: SocketAddr, method: &str, path: &str, accept: Option<&str>) -> Raw {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "test.local");
    if let Some(a) = accept {
        req = req.header("accept-encoding", a);
    }
    let resp = sender
        .send_request(req.body(http_body_util::Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    Raw {
        status,
        headers,
        body,
    }
}

/// curl's raw body and response head (`-D`), with `args`.
fn curl(url: &str, args: &[&str]) -> (Vec<u8>, String) {
    let head = std::env::temp_dir().join(format!(
        "portico-curl-head-{}-{}",
        std::process::id(),
        fastrand::u32(..)
    ));
    let out = std::process::Command::new("curl")
        .args(["-s", "--max-time", "10", "-D"])
        .arg(&head)
        .args(args)
        .arg(url)
        .output()
        .unwrap();
    assert!(out.status.success(), "curl {args:?} {url}: {out:?}");
    let head_text = std::fs::read_to_string(&head).unwrap();
    let _ = std::fs::remove_file(&head);
    (out.stdout, head_text.to_ascii_lowercase())
}

/// python3's gzip module, as a second decoder.
fn python_gunzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = std::process::Command::new("python3")
        .args([
            "-c",
            "import gzip, sys; sys.stdout.buffer.write(gzip.decompress(sys.stdin.buffer.read()))",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "python3 gzip: {out:?}");
    out.stdout
}

async fn compressing(extra: &[&str]) -> (Proc, Site, Proc) {
    let site = Site::start().await;
    let (t, ing) = serving(site.addr, extra).await;
    (t, site, ing)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_gets_each_coding_alone_and_with_compressed_and_the_page_is_intact() {
    let (_t, _site, ing) = compressing(&["--compress"]).await;
    let url = format!("http://{}/page.html", ing.addr);
    let page = page();
    for coding in ["br", "zstd", "gzip"] {
        let (body, head) = tokio::task::spawn_blocking({
            let (url, h) = (url.clone(), format!("Accept-Encoding: {coding}"));
            move || curl(&url, &["-H", &h])
        })
        .await
        .unwrap();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(
            head.contains(&format!("\ncontent-encoding: {coding}\r\n")),
            "{coding}: {head}"
        );
        assert!(head.contains("\nvary: accept-encoding\r\n"), "{head}");
        assert!(head.contains("\netag: w/\"page-v1\"\r\n"), "{head}");
        assert!(!head.contains("content-length"), "{head}");
        assert!(!head.contains("accept-ranges"), "{head}");
        assert!(
            body.len() < page.len() / 4,
            "{coding}: {} bytes on the wire for {}",
            body.len(),
            page.len()
        );
        assert_eq!(decode(coding, &body).await, page.as_bytes(), "{coding}");
        if coding == "gzip" {
            assert_eq!(python_gunzip(&body), page.as_bytes());
        }
    }
    // curl --compressed offers every coding it has (deflate, gzip, br,
    // zstd here): ties go to zstd, and curl decodes it itself.
    let (body, head) = tokio::task::spawn_blocking({
        let url = url.clone();
        move || curl(&url, &["--compressed"])
    })
    .await
    .unwrap();
    assert!(head.contains("\ncontent-encoding: zstd\r\n"), "{head}");
    assert_eq!(body, page.as_bytes());
    // Weights decide over our preference.
    let r = fetch(
        ing.addr,
        "GET",
        "/page.html",
        Some("zstd;q=0.5, br;q=0.8, gzip;q=0.1"),
    )
    .await;
    assert_eq!(r.header("content-encoding"), Some("br"));
    // And HTTP/2 (h2c) gets it too.
    let (body, head) = tokio::task::spawn_blocking({
        let url = url.clone();
        move || curl(&url, &["--http2-prior-knowledge", "--compressed"])
    })
    .await
    .unwrap();
    assert!(head.starts_with("http/2 200"), "{head}");
    assert!(head.contains("\ncontent-encoding: zstd\r\n"), "{head}");
    assert_eq!(body, page.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_a_streamed_page_are_compressed_vary_is_appended() {
    let (_t, _site, ing) = compressing(&["--compress"]).await;
    let r = fetch(ing.addr, "GET", "/data.json", Some("gzip")).await;
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    assert_eq!(decode("gzip", &r.body).await, json().as_bytes());

    let r = fetch(ing.addr, "GET", "/chunked.html", Some("br")).await;
    assert_eq!(r.header("content-encoding"), Some("br"));
    assert_eq!(decode("br", &r.body).await, page().as_bytes());

    let r = fetch(ing.addr, "GET", "/vary.html", Some("zstd")).await;
    assert_eq!(r.header("content-encoding"), Some("zstd"));
    let vary: Vec<_> = r.headers.get_all("vary").iter().collect();
    assert_eq!(vary, ["Origin, accept-encoding"]);
    assert_eq!(decode("zstd", &r.body).await, page().as_bytes());

    // Odd Accept-Encoding values get a clear answer, never an error.
    for (accept, want) in [
        ("gzip;q=1.0000", None),
        ("br;q=0.5x, gzip", Some("gzip")),
        ("GZIP;Q=0.3, unknown;q=1", Some("gzip")),
        ("gzip;q=, br;q=0", None),
        ("compress, sdch, *;q=0", None),
        ("   ", None),
    ] {
        let r = fetch(ing.addr, "GET", "/page.html", Some(accept)).await;
        assert_eq!(r.status, 200, "{accept}");
        assert_eq!(r.header("content-encoding"), want, "{accept}");
        assert_eq!(r.header("vary"), Some("accept-encoding"), "{accept}");
        let body = match want {
            Some(c) => decode(c, &r.body).await,
            None => r.body,
        };
        assert_eq!(body, page().as_bytes(), "{accept}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_rules_leave_alone_arrives_as_the_backend_sent_it() {
    let (_t, _site, ing) = compressing(&["--compress"]).await;
    let all = Some("gzip, br, zstd");
    let expect_untouched = |r: &Raw, what: &str| {
        assert_eq!(r.header("content-encoding"), None, "{what}");
        assert_eq!(r.header("vary"), None, "{what}");
    };
    let r = fetch(ing.addr, "GET", "/image.png", all).await;
    expect_untouched(&r, "image");
    assert_eq!(r.body, image());
    assert_eq!(r.header("content-length"), Some("20000"));

    let r = fetch(ing.addr, "GET", "/small.html", all).await;
    expect_untouched(&r, "small");
    assert_eq!(r.body.len(), 500);

    let r = fetch(ing.addr, "GET", "/encoded.html", all).await;
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    assert_eq!(decode("gzip", &r.body).await, page().as_bytes());

    let r = fetch(ing.addr, "GET", "/no-transform.html", all).await;
    expect_untouched(&r, "no-transform");
    assert_eq!(r.body, page().as_bytes());

    let r = fetch(ing.addr, "GET", "/range.html", all).await;
    assert_eq!(r.status, 206);
    expect_untouched(&r, "range");
    assert_eq!(r.body.len(), 2000);

    let r = fetch(ing.addr, "GET", "/events", all).await;
    expect_untouched(&r, "event-stream");

    // HEAD: the head GET would have, less the coding.
    let r = fetch(ing.addr, "HEAD", "/page.html", all).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-encoding"), None);
    assert_eq!(r.header("vary"), Some("accept-encoding"));
    assert_eq!(
        r.header("content-length"),
        Some(page().len().to_string().as_str())
    );
    assert!(r.body.is_empty());

    // 304: no body to compress; the Vary and weak ETag a 200 would carry.
    let r = fetch(ing.addr, "GET", "/not-modified", all).await;
    assert_eq!(r.status, 304);
    assert_eq!(r.header("content-encoding"), None);
    assert_eq!(r.header("vary"), Some("accept-encoding"));
    assert_eq!(r.header("etag"), Some("W/\"page-v1\""));

    // No Accept-Encoding: as it is, with Vary (a cache must not hand this
    // copy to a client that asked for a coding, nor the other way round).
    let r = fetch(ing.addr, "GET", "/page.html", None).await;
    assert_eq!(r.header("content-encoding"), None);
    assert_eq!(r.header("vary"), Some("accept-encoding"));
    assert_eq!(r.header("etag"), Some("\"page-v1\""));
    assert_eq!(r.body, page().as_bytes());

    // Our own answers are short texts: never compressed.
    let r = fetch(ing.addr, "GET", "/..;/x", all).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.header("content-encoding"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_unless_asked_and_a_route_may_say_otherwise() {
    let site = Site::start().await;
    let t = tower("30s");
    register(t.addr, "svc", site.addr);
    let dir = std::env::temp_dir().join(format!("portico-compress-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("portico.toml");
    std::fs::write(
        &cfg,
        "[[route]]\nprefix = \"/on\"\nservice = \"svc\"\nstrip_prefix = true\ncompress = true\n\
         [[route]]\nprefix = \"/off\"\nservice = \"svc\"\nstrip_prefix = true\ncompress = false\n",
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    let all = Some("gzip, br, zstd");

    // Without --compress: only the route that asks.
    let plain = ingress(t.addr, &["/:svc"], &["--config", cfg]);
    wait_synced(&plain, 1).await;
    let r = fetch(plain.addr, "GET", "/page.html", all).await;
    assert_eq!(r.header("content-encoding"), None);
    assert_eq!(r.header("vary"), None);
    assert_eq!(
        r.header("content-length"),
        Some(page().len().to_string().as_str())
    );
    let r = fetch(plain.addr, "GET", "/on/page.html", all).await;
    assert_eq!(r.header("content-encoding"), Some("zstd"));

    // With --compress: all but the route that declines.
    let on = ingress(t.addr, &["/:svc"], &["--config", cfg, "--compress"]);
    wait_synced(&on, 1).await;
    let r = fetch(on.addr, "GET", "/page.html", all).await;
    assert_eq!(r.header("content-encoding"), Some("zstd"));
    let r = fetch(on.addr, "GET", "/off/page.html", all).await;
    assert_eq!(r.header("content-encoding"), None);
    assert_eq!(r.body, page().as_bytes());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_reaches_the_client_while_the_backend_waits() {
    use std::io::BufRead;
    let (_t, site, ing) = compressing(&["--compress"]).await;
    let url = format!("http://{}/stream.txt", ing.addr);
    let mut curl = std::process::Command::new("curl")
        .args([
            "-s",
            "-N",
            "--max-time",
            "20",
            "-H",
            "Accept-Encoding: gzip",
            "--compressed",
        ])
        .arg(&url)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = curl.stdout.take().unwrap();
    let (tx, mut lines) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The backend holds its second part until the client has the first.
    let first = tokio::time::timeout(DEADLINE, lines.recv())
        .await
        .expect("the first part reached curl while the backend waited");
    assert_eq!(first.as_deref(), Some("first part"));
    site.release.notify_one();
    let second = tokio::time::timeout(DEADLINE, lines.recv()).await.unwrap();
    assert_eq!(second.as_deref(), Some("second part"));
    let status = curl.wait().unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_renders_a_compressed_page() {
    let log = AccessLogFile::new("compress-browser");
    let site = Site::start().await;
    let t = tower("30s");
    register(t.addr, "svc", site.addr);
    let ing = ingress(
        t.addr,
        &["/:svc"],
        &[
            "--compress",
            "--access-log",
            "json",
            "--access-log-file",
            log.path(),
        ],
    );
    wait_synced(&ing, 1).await;
    let url = format!("http://{}/page.html", ing.addr);
    let dom = tokio::task::spawn_blocking(move || browser_dom(&url, None))
        .await
        .unwrap();
    assert!(dom.contains("Compressed by Portico"), "{dom}");
    assert!(
        dom.contains("The end of the page."),
        "the whole page: {dom}"
    );
    let offered = site.accept_encoding.lock().unwrap()[0].clone();
    let text = log.lines(1).await;
    let line: serde_json::Value = serde_json::from_str(
        text.lines()
            .find(|l| l.contains("/page.html"))
            .expect("the page's log line"),
    )
    .unwrap();
    let sent = line["bytes"].as_u64().unwrap() as usize;
    assert!(
        sent < page().len() / 4,
        "Chromium offered {offered:?}; {sent} bytes sent for a {}-byte page",
        page().len()
    );
}
