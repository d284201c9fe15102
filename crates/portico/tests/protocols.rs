//! Protocols end to end: WebSocket through the ingress with a real client
//! and server (tokio-tungstenite), HTTP/2 and TLS with curl, gRPC, and the
//! RFC 9110/9112 corner cases.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::pem::PemObject;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn websocket_echo_through_the_ingress() {
    let t = tower("30s");
    let echo = websocket_echo().await;
    register(t.addr, "ws", echo);
    let web = Backend::start("web").await;
    register(t.addr, "web", web.addr);
    let ing = ingress(t.addr, &["/ws:ws", "/:web"], &[]);
    wait_synced(&ing, 1).await;

    let stream = tokio::net::TcpStream::connect(ing.addr).await.unwrap();
    let url = format!("ws://{}/ws/chat", ing.addr);
    let (mut ws, resp) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("hello through portico"))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("hello through portico")
    );
    let blob: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(blob));
    ws.close(None).await.unwrap();
    // The server's close frame comes back, then the stream ends.
    let mut seen = Vec::new();
    while let Some(msg) = tokio::time::timeout(DEADLINE, ws.next()).await.unwrap() {
        seen.push(format!("{msg:?}"));
    }
    assert!(
        seen.iter().any(|m| m.contains("Close")),
        "clean close handshake: {seen:?}"
    );
    // Plain requests still route as before.
    assert_eq!(get(ing.addr, "/").await.headers["x-backend"], "web");
}

/// A backend that switches protocols for any request and reports, on
/// `closed`, when its side of the tunnel sees the connection end.
async fn upgrade_backend() -> (SocketAddr, tokio::sync::mpsc::Receiver<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let switch = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: upgrade\r\n\r\n";
                s.write_all(switch.as_bytes()).await.unwrap();
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                let _ = tx.send(()).await;
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn a_client_that_resets_its_tunnel_closes_the_backend_side_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = tower("30s");
    let (backend, mut closed) = upgrade_backend().await;
    register(t.addr, "up", backend);
    // The idle timeout is far off: only the reset can end the tunnel in time.
    let ing = ingress(t.addr, &["/:up"], &["--idle-timeout", "120s"]);
    wait_synced(&ing, 1).await;
    let mut c = tokio::net::TcpStream::connect(ing.addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: echo\r\nConnection: upgrade\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = c.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"));
    // A reset, not a FIN: the client is gone without a half-close.
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    tokio::time::timeout(DEADLINE, closed.recv())
        .await
        .expect("the backend's side of a reset tunnel stayed open")
        .unwrap();
}

#[tokio::test]
async fn idle_tunnels_are_closed() {
    let t = tower("30s");
    let echo = websocket_echo().await;
    register(t.addr, "ws", echo);
    let ing = ingress(t.addr, &["/:ws"], &["--idle-timeout", "300ms"]);
    wait_synced(&ing, 1).await;
    let stream = tokio::net::TcpStream::connect(ing.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{}/", ing.addr), stream)
        .await
        .unwrap();
    ws.send(Message::text("x")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("x"));
    let started = std::time::Instant::now();
    // Nothing more is sent: the tunnel ends at the idle timeout.
    let end = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .expect("tunnel never closed");
    assert!(!matches!(end, Some(Ok(Message::Text(_)))));
    assert!(started.elapsed() >= Duration::from_millis(250));
}

/// An HTTP/2 connection with prior knowledge to `addr`, its SETTINGS
/// received (one plain request answered), so that an extended CONNECT may go.
async fn h2_client(
    addr: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let warm = http::Request::get(format!("http://{addr}/"))
        .body(http_body_util::Empty::new())
        .unwrap();
    sender.send_request(warm).await.unwrap();
    sender
}

/// An extended CONNECT for `protocol` (RFC 8441) to `path`.
fn extended_connect(
    addr: SocketAddr,
    path: &str,
    protocol: &'static str,
) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("http://{addr}{path}"))
        .header("sec-websocket-version", "13")
        .body(http_body_util::Empty::new())
        .unwrap();
    req.extensions_mut()
        .insert(hyper::ext::Protocol::from_static(protocol));
    req
}

#[tokio::test]
async fn websocket_over_http2_reaches_an_http11_websocket_backend() {
    let t = tower("30s");
    let echo = websocket_echo().await;
    register(t.addr, "ws", echo);
    let web = Backend::start("web").await;
    register(t.addr, "web", web.addr);
    let ing = ingress(t.addr, &["/ws:ws", "/:web"], &[]);
    wait_synced(&ing, 1).await;

    let mut h2 = h2_client(ing.addr).await;
    let resp = h2
        .send_request(extended_connect(ing.addr, "/ws/chat", "websocket"))
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        200,
        "the 101 became the 200 that opens the stream"
    );
    assert!(resp.headers().get("sec-websocket-accept").is_none());
    let upgraded = hyper::upgrade::on(resp).await.unwrap();
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        hyper_util::rt::TokioIo::new(upgraded),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    ws.send(Message::text("hello over h2")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("hello over h2")
    );
    let blob: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(blob));

    // The same connection carries ordinary streams meanwhile.
    let plain = http::Request::get(format!("http://{}/", ing.addr))
        .body(http_body_util::Empty::new())
        .unwrap();
    let answer = h2.send_request(plain).await.unwrap();
    assert_eq!(answer.headers()["x-backend"], "web");

    ws.close(None).await.unwrap();
    let mut seen = Vec::new();
    while let Some(msg) = tokio::time::timeout(DEADLINE, ws.next()).await.unwrap() {
        seen.push(format!("{msg:?}"));
    }
    assert!(
        seen.iter().any(|m| m.contains("Close")),
        "clean close: {seen:?}"
    );
}

#[tokio::test]
async fn an_extended_connect_that_cannot_become_a_websocket_gets_a_clear_status() {
    let t = tower("30s");
    // A plain HTTP backend: it answers the upgrade with 200 and no switch.
    let web = Backend::start("web").await;
    register(t.addr, "web", web.addr);
    let ing = ingress(t.addr, &["/:web"], &[]);
    wait_synced(&ing, 1).await;
    let mut h2 = h2_client(ing.addr).await;

    let resp = h2
        .send_request(extended_connect(ing.addr, "/chat", "websocket"))
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        502,
        "a 200 that switched nothing is no tunnel"
    );

    let resp = h2
        .send_request(extended_connect(ing.addr, "/chat", "connect-udp"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 501);

    // The connection carries on.
    let plain = http::Request::get(format!("http://{}/", ing.addr))
        .body(http_body_util::Empty::new())
        .unwrap();
    assert_eq!(h2.send_request(plain).await.unwrap().status(), 200);
}

/// A self-signed certificate for `name` (openssl, P-256), `tag` in its O=.
fn self_signed(dir: &std::path::Path, name: &str, tag: &str) -> (String, String) {
    self_signed_with(dir, name, tag, &[])
}

/// As `self_signed`, marked as an end entity (CA:FALSE): webpki, unlike
/// curl's OpenSSL, refuses a CA certificate presented as a server's.
fn self_signed_leaf(dir: &std::path::Path, name: &str, tag: &str) -> (String, String) {
    self_signed_with(
        dir,
        name,
        tag,
        &["-addext", "basicConstraints=critical,CA:FALSE"],
    )
}

fn self_signed_with(
    dir: &std::path::Path,
    name: &str,
    tag: &str,
    extra: &[&str],
) -> (String, String) {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args([
            "-subj",
            &format!("/CN={name}/O={tag}"),
            "-addext",
            &format!("subjectAltName=DNS:{name}"),
        ])
        .args(extra)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        cert.to_str().unwrap().to_owned(),
        key.to_str().unwrap().to_owned(),
    )
}

/// curl's body and `-w` line, checking the certificate against `ca`.
fn curl_https(host: &str, port: u16, ca: &str, proto: &str) -> (String, String) {
    let out = std::process::Command::new("curl")
        .args(["-s", "--max-time", "10", proto, "--cacert", ca])
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"))
        .args(["-w", "\n%{http_version} %{ssl_verify_result} %{http_code}"])
        .arg(format!("https://{host}:{port}/tls"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, info) = text.rsplit_once('\n').unwrap_or(("", &text));
    (body.to_owned(), info.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_sni_h2_by_alpn_and_http11() {
    let dir = temp_dir("tls");
    let (a_cert, a_key) = self_signed(&dir, "a.test", "one");
    let (b_cert, b_key) = self_signed(&dir, "b.test", "one");
    let t = tower("30s");
    let backend = Backend::start("b").await;
    register(t.addr, "svc", backend.addr);
    let ing = ingress(
        t.addr,
        &["/:svc"],
        &[
            "--tls-cert",
            &a_cert,
            "--tls-key",
            &a_key,
            "--tls-cert",
            &b_cert,
            "--tls-key",
            &b_key,
        ],
    );
    wait_synced(&ing, 1).await;
    let port = ing.addr.port();
    // Each name verifies against its own certificate only: SNI chose it.
    for (host, ca) in [("a.test", &a_cert), ("b.test", &b_cert)] {
        let (host, ca) = (host.to_owned(), ca.clone());
        let (body, info) =
            tokio::task::spawn_blocking(move || curl_https(&host, port, &ca, "--http2"))
                .await
                .unwrap();
        assert_eq!(info, "2 0 200", "h2 by ALPN, certificate verified");
        assert!(body.starts_with("backend=b GET /tls"), "{body}");
    }
    let (a_cert2, port2) = (a_cert.clone(), port);
    let (_, info) =
        tokio::task::spawn_blocking(move || curl_https("a.test", port2, &a_cert2, "--http1.1"))
            .await
            .unwrap();
    assert_eq!(info, "1.1 0 200");
    assert_eq!(
        backend.last_seen().header("x-forwarded-proto"),
        Some("https")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn h2c_prior_knowledge_with_curl() {
    let t = tower("30s");
    let backend = Backend::start("b").await;
    register(t.addr, "svc", backend.addr);
    let ing = ingress(t.addr, &["/:svc"], &[]);
    let out = tokio::process::Command::new("curl")
        .args(["-s", "--http2-prior-knowledge", "-w", "\n%{http_version}"])
        .arg(format!("http://{}/h2c", ing.addr))
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("backend=b GET /h2c") && text.ends_with("\n2"),
        "{text}"
    );
    // RFC 9113 8.3.1: the Host made for HTTP/1.1 is :authority as sent,
    // port included.
    let authority = ing.addr.to_string();
    assert_eq!(backend.last_seen().header("host"), Some(authority.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_swapped_on_disk_is_served_to_new_connections_only() {
    use hyper_util::rt::TokioIo;
    let dir = temp_dir("tls-reload");
    let (cert, key) = self_signed_leaf(&dir, "a.test", "old");
    let old_ca = dir.join("old.crt");
    std::fs::copy(&cert, &old_ca).unwrap();
    let t = tower("30s");
    let backend = Backend::start("b").await;
    register(t.addr, "svc", backend.addr);
    let ing = ingress(
        t.addr,
        &["/:svc"],
        &["--tls-cert", &cert, "--tls-key", &key],
    );
    wait_synced(&ing, 1).await;

    // An open TLS connection that trusts only the old certificate.
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(&old_ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(ing.addr).await.unwrap();
    let tls = connector
        .connect(
            rustls_pki_types::ServerName::try_from("a.test").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = sender.send_request(get_req("/before", &[])).await.unwrap();
    assert_eq!(resp.status(), 200);
    http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap();

    // Swap the certificate and key on disk.
    let fresh = temp_dir("tls-new");
    let (new_cert, new_key) = self_signed_leaf(&fresh, "a.test", "new");
    std::fs::copy(&new_key, &key).unwrap();
    std::fs::copy(&new_cert, &cert).unwrap();
    let log = ing.log.clone();
    eventually(DEADLINE, "certificates reloaded", || {
        log.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("certificates reloaded"))
    })
    .await;

    // New connections get the new certificate...
    let port = ing.addr.port();
    let (nc, oc) = (new_cert.clone(), old_ca.to_str().unwrap().to_owned());
    let (new_ok, old_ok) = tokio::task::spawn_blocking(move || {
        (
            curl_https("a.test", port, &nc, "--http1.1").1,
            curl_https("a.test", port, &oc, "--http1.1").1,
        )
    })
    .await
    .unwrap();
    assert_eq!(new_ok, "1.1 0 200");
    assert!(
        !old_ok.ends_with(" 200"),
        "the old certificate is no longer served: {old_ok}"
    );
    // ...while the open connection stays up.
    sender.ready().await.unwrap();
    let resp = sender.send_request(get_req("/after", &[])).await.unwrap();
    assert_eq!(resp.status(), 200);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&fresh);
}

#[test]
fn bad_certificates_stop_the_start_with_the_reason() {
    let dir = temp_dir("tls-bad");
    let (a_cert, _a_key) = self_signed(&dir, "a.test", "x");
    let (_b_cert, b_key) = self_signed(&dir, "b.test", "x");
    let empty = dir.join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let empty = empty.to_str().unwrap();
    for (cert, key, want) in [
        (a_cert.as_str(), b_key.as_str(), "do not belong together"),
        (empty, b_key.as_str(), "no certificate in"),
        (a_cert.as_str(), empty, "cannot read a private key"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_portico"))
            .args([
                "ingress",
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "off",
                "--route",
                "/:x",
                "--tls-cert",
                cert,
                "--tls-key",
                key,
            ])
            .env("RUST_LOG", "off")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(want), "{want}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_streaming_and_status_through_an_h2c_route() {
    use std::io::BufRead;
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let mut server = std::process::Command::new("python3")
        .arg(format!("{fixtures}/grpc_echo.py"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 with grpcio (.ci/run installs it)");
    let mut line = String::new();
    std::io::BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _server = Child(server);
    let port: u16 = line
        .trim()
        .parse()
        .expect("grpc server port; is grpcio installed? (.ci/run installs it)");

    let t = tower("30s");
    register(t.addr, "echo", SocketAddr::from(([127, 0, 0, 1], port)));
    let ing = ingress(t.addr, &["/:web"], &["--route-h2c", "/portico.Echo:echo"]);
    wait_synced(&ing, 1).await;
    let target = ing.addr.to_string();
    let out = tokio::process::Command::new("python3")
        .arg(format!("{fixtures}/grpc_client.py"))
        .arg(&target)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "unary echo:hello grpc-echo",
            "bidi echo:a,echo:b,echo:c",
            "fail NOT_FOUND no such thing: thing"
        ]
    );
}

/// An h2c route skips a replica that refuses connections, as HTTP/1.1
/// routes do: nothing was sent there, so every request is answered.
#[tokio::test]
async fn an_h2c_route_fails_over_past_a_dead_replica() {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    // A backend speaking HTTP/2 with prior knowledge (hyper's server).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let live = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: hyper::Request<_>| async move {
                    let text = format!("{:?} {}", req.version(), req.uri().path());
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(
                        text,
                    ))))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });

    let t = tower("30s");
    register(t.addr, "h2", dead_addr());
    register(t.addr, "h2", live);
    let ing = ingress(t.addr, &["/:web"], &["--route-h2c", "/h2:h2"]);
    wait_synced(&ing, 1).await;
    // Each request picks between the two replicas at random until the dead
    // one has failed once; twenty leave it unpicked with odds of 1 in 10^6.
    for i in 0..20 {
        let a = get(ing.addr, &format!("/h2/r{i}")).await;
        assert_eq!(a.status, 200, "request {i}: {}", a.body);
        assert_eq!(a.body, format!("HTTP/2.0 /h2/r{i}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2load_100_streams_over_10_connections() {
    let (_t, _b, ing) = one_backend(&[]).await;
    let out = tokio::process::Command::new("h2load")
        .args(["-n", "5000", "-c", "10", "-m", "10"])
        .arg(format!("http://{}/h2load", ing.addr))
        .output()
        .await
        .expect("h2load (Debian nghttp2-client; .ci/run installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    let requests = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .unwrap_or("");
    assert!(
        requests.contains("5000 succeeded, 0 failed, 0 errored, 0 timeout"),
        "{requests}"
    );
    let codes = text
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .unwrap_or("");
    assert!(codes.starts_with("status codes: 5000 2xx"), "{codes}");
}

/// Read one HTTP/1.1 response (head and, by its framing, body) off a
/// kept-alive connection, returning the head and the body.
async fn read_response(s: &mut tokio::net::TcpStream, head_request: bool) -> (String, String) {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(DEADLINE, s.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n == 1,
            "connection closed mid-head: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let lower = head.to_ascii_lowercase();
    let status: u16 = head[9..12].parse().unwrap();
    let mut body = Vec::new();
    if head_request || status == 204 || status == 304 || (100..200).contains(&status) {
        return (head, String::new());
    }
    if let Some(len) = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
    {
        body.resize(len.trim().parse().unwrap(), 0);
        tokio::time::timeout(DEADLINE, s.read_exact(&mut body))
            .await
            .unwrap()
            .unwrap();
    } else if lower.contains("transfer-encoding: chunked") {
        // Keep the raw chunked body, trailers included, up to its end.
        while !(body.ends_with(b"\r\n\r\n") && body.windows(3).any(|w| w == b"0\r\n")) {
            let n = tokio::time::timeout(DEADLINE, s.read(&mut byte))
                .await
                .unwrap()
                .unwrap();
            assert!(n == 1);
            body.push(byte[0]);
        }
    }
    (head, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn head_204_304_keep_the_connection_in_frame() {
    use tokio::io::AsyncWriteExt;
    let t = tower("30s");
    let b = Backend::start("b").await;
    register(t.addr, "svc", b.addr);
    let ing = ingress(t.addr, &["/:svc"], &[]);
    let mut s = tokio::net::TcpStream::connect(ing.addr).await.unwrap();
    // HEAD: the length of what GET would send, and no body (RFC 9110 9.3.2).
    s.write_all(b"HEAD /page HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_response(&mut s, true).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("content-length: 21"),
        "{head}"
    );
    // 204 and 304 carry no body (RFC 9110 15.3.5, 15.4.5), whatever follows.
    for code in [204, 304] {
        s.write_all(format!("GET /status?code={code} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (head, body) = read_response(&mut s, false).await;
        assert!(head.starts_with(&format!("HTTP/1.1 {code}")), "{head}");
        assert_eq!(body, "");
        if code == 304 {
            assert!(head.contains("etag: \"v1\""), "{head}");
        }
    }
    // The connection is still in step: the next answer is the next request's.
    s.write_all(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_response(&mut s, false).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "backend=b GET /after\n");
}

#[tokio::test]
async fn expect_100_continue_then_the_body() {
    use tokio::io::AsyncWriteExt;
    let t = tower("30s");
    let b = Backend::start("b").await;
    register(t.addr, "svc", b.addr);
    let ing = ingress(t.addr, &["/:svc"], &[]);
    let mut s = tokio::net::TcpStream::connect(ing.addr).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\nExpect: 100-continue\r\n\r\n").await.unwrap();
    // The body is held back until the 100 (RFC 9110 10.1.1).
    let (head, _) = read_response(&mut s, false).await;
    assert!(head.starts_with("HTTP/1.1 100 Continue"), "{head}");
    s.write_all(&vec![b'e'; 100_000]).await.unwrap();
    let (head, body) = read_response(&mut s, false).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "received=100000\n");
}

#[tokio::test]
async fn trailers_on_chunked_http11_pass_through() {
    use tokio::io::AsyncWriteExt;
    let t = tower("30s");
    let b = Backend::start("b").await;
    register(t.addr, "svc", b.addr);
    let ing = ingress(t.addr, &["/:svc"], &[]);
    let mut s = tokio::net::TcpStream::connect(ing.addr).await.unwrap();
    s.write_all(b"GET /trailers HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_response(&mut s, false).await;
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    assert!(
        body.contains("part one,") && body.contains("part two"),
        "{body}"
    );
    assert!(
        body.to_ascii_lowercase().contains("x-checksum: abc123"),
        "trailer passed on: {body:?}"
    );
}

/// A client socket whose first bytes go out a few at a time, with pauses:
/// the ingress reads what a connection sends first before it picks
/// HTTP/1.1 or HTTP/2, and must hand on all of it, however it arrives.
struct Trickle {
    inner: tokio::net::TcpStream,
    sent: usize,
    pause: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl Trickle {
    /// Bytes sent in pieces; the rest goes out as the client writes it.
    const SLOW: usize = 40;
    const PIECE: usize = 7;

    async fn connect(addr: SocketAddr) -> Trickle {
        let inner = tokio::net::TcpStream::connect(addr).await.unwrap();
        // Each piece in a segment of its own.
        inner.set_nodelay(true).unwrap();
        Trickle {
            inner,
            sent: 0,
            pause: None,
        }
    }
}

impl tokio::io::AsyncRead for Trickle {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Trickle {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::task::Poll;
        if self.sent >= Self::SLOW {
            return std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        }
        if let Some(pause) = self.pause.as_mut() {
            if pause.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.pause = None;
        }
        let piece = buf.len().min(Self::PIECE);
        let written = std::pin::Pin::new(&mut self.inner).poll_write(cx, &buf[..piece]);
        if let Poll::Ready(Ok(n)) = written {
            self.sent += n;
            // Pacing only: the test holds whether or not the ingress reads
            // between pieces.
            self.pause = Some(Box::pin(tokio::time::sleep(Duration::from_millis(15))));
        }
        written
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

use std::future::Future as _;

#[tokio::test]
async fn a_connection_first_bytes_reach_the_protocol_however_they_arrive() {
    use http_body_util::BodyExt;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::io::AsyncWriteExt;
    let t = tower("30s");
    let b = Backend::start("b").await;
    register(t.addr, "svc", b.addr);
    let ing = ingress(t.addr, &["/:svc"], &[]);

    // HTTP/2 with prior knowledge, its preface in pieces.
    let io = TokioIo::new(Trickle::connect(ing.addr).await);
    let (mut h2, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/h2-in-pieces", ing.addr))
        .body(empty())
        .unwrap();
    let resp = tokio::time::timeout(DEADLINE, h2.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"backend=b GET /h2-in-pieces\n");

    // HTTP/1.1 starting like the preface ("P"), in pieces, with a head
    // larger than the ingress's first read (4 KiB).
    let big = "v".repeat(6000);
    let head = format!(
        "PUT /h1-in-pieces HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\nContent-Length: 3\r\n\r\nabc"
    );
    let mut s = Trickle::connect(ing.addr).await;
    s.write_all(head.as_bytes()).await.unwrap();
    let (head, body) = read_response(&mut s.inner, false).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "backend=b PUT /h1-in-pieces\n");
    let seen = b.last_seen();
    assert_eq!(seen.header("x-big").map(str::len), Some(6000));
    assert_eq!(seen.body_len, 3);

    // The connection goes on from where the first read left it.
    s.write_all(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_response(&mut s.inner, false).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "backend=b GET /next\n");
}
