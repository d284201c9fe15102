//! Automatic certificates against a real ACME server (issue 19): Debian's
//! `pebble`, with `pebble-challtestsrv` answering every name with
//! 127.0.0.1, validating Portico's own listeners over HTTP-01 and
//! TLS-ALPN-01. The issued chains are checked by curl against the root
//! pebble made. Everything on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

/// `n` distinct free ports below the ephemeral range (a port the kernel
/// hands out for outgoing connections could be taken between our check
/// and the server's bind), each free for TCP and UDP.
fn free_ports(n: usize) -> Vec<u16> {
    let start = 20_000 + fastrand::u16(..10_000);
    let mut held = Vec::new();
    for port in (start..30_000).chain(20_000..start) {
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        if let (Ok(t), Ok(u)) = (
            std::net::TcpListener::bind(addr),
            std::net::UdpSocket::bind(addr),
        ) {
            held.push((port, t, u));
            if held.len() == n {
                return held.into_iter().map(|(p, _, _)| p).collect();
            }
        }
    }
    panic!("not {n} free ports in 20000-30000");
}

/// The certificate pebble's own HTTPS (directory and management) serves:
/// self-signed, an end entity for 127.0.0.1 (webpki refuses a CA
/// certificate presented as a server's).
fn pebble_https_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("pebble.crt"), dir.join("pebble.key"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args(["-subj", "/CN=pebble"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
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

fn wait_tcp(port: u16, what: &str) {
    let deadline = std::time::Instant::now() + DEADLINE;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A pebble and its DNS (pebble-challtestsrv), killed when dropped.
struct Pebble {
    dir: PathBuf,
    cert: PathBuf,
    port: u16,
    management: u16,
    children: Vec<Child>,
}

impl Pebble {
    /// Validating on `http_port` and `tls_port` (Portico's listeners);
    /// `validity`: the issued certificates' lifetime in seconds.
    fn start(http_port: u16, tls_port: u16, validity: Option<u64>) -> Pebble {
        let dir = temp_dir("pebble");
        let (cert, key) = pebble_https_cert(&dir);
        let [port, management, dns, dns_management] = free_ports(4)[..] else {
            unreachable!()
        };
        let mut config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{port}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": cert,
            "privateKey": key,
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        if let Some(secs) = validity {
            config["pebble"]["certificateValidityPeriod"] = secs.into();
        }
        let config_path = dir.join("pebble.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let quiet = |c: &mut Command| {
            c.stdout(Stdio::null()).stderr(Stdio::null());
        };
        let mut dns_server = Command::new("pebble-challtestsrv");
        dns_server
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-dns01", &format!("127.0.0.1:{dns}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{dns_management}")]);
        quiet(&mut dns_server);
        let mut children = vec![dns_server.spawn().expect("pebble-challtestsrv")];
        let mut pebble = Command::new("pebble");
        pebble
            .arg("-config")
            .arg(&config_path)
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0");
        quiet(&mut pebble);
        children.push(pebble.spawn().expect("pebble"));
        let started = Pebble {
            dir,
            cert,
            port,
            management,
            children,
        };
        wait_tcp(dns_management, "pebble-challtestsrv");
        wait_tcp(port, "pebble");
        wait_tcp(management, "pebble's management interface");
        started
    }

    fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.port)
    }

    /// The root pebble issues under, from its management interface.
    fn root(&self) -> PathBuf {
        let path = self.dir.join(format!("root-{}.pem", fastrand::u32(..)));
        let out = Command::new("curl")
            .args(["-s", "--fail", "--max-time", "10", "--cacert"])
            .arg(&self.cert)
            .arg(format!("https://127.0.0.1:{}/roots/0", self.management))
            .arg("-o")
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "pebble's root: {out:?}");
        path
    }

    fn stop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `portico up` with its ACME flags, routing `name` to service `svc`.
fn portico(listen: &[(&str, u16)], state: &Path, ca: &Pebble, extra: &[&str]) -> Proc {
    let mut args: Vec<String> = [
        "up",
        "--tower-listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ]
    .map(String::from)
    .to_vec();
    for (flag, port) in listen {
        args.extend([flag.to_string(), format!("127.0.0.1:{port}")]);
    }
    args.extend(
        [
            "--acme",
            "--acme-email",
            "ops@example.com",
            "--acme-directory",
            &ca.directory(),
            "--acme-ca-cert",
            ca.cert.to_str().unwrap(),
            "--acme-state",
            state.to_str().unwrap(),
            "--acme-retry",
            "1s",
        ]
        .map(String::from),
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Proc::start(&args, "ingress listening on ")
}

/// Wait for the `n`-th log line containing `text`; the log on failure.
async fn logged(p: &Proc, text: &str, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let count = || {
        p.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(text))
            .count()
    };
    while count() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "no {n} lines with {text:?}: {}",
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// curl over HTTPS to `name:port`, verifying against `root`: the HTTP
/// status and the verify result, or curl's exit code when it failed.
async fn curl_https(name: &str, port: u16, root: &Path, path: &str) -> String {
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "--max-time", "10", "--cacert"])
        .arg(root)
        .args(["--resolve", &format!("{name}:{port}:127.0.0.1")])
        .args(["-w", "%{http_code} %{ssl_verify_result}"])
        .arg(format!("https://{name}:{port}{path}"))
        .output()
        .await
        .unwrap();
    match out.status.code() {
        Some(0) => String::from_utf8_lossy(&out.stdout).into_owned(),
        code => format!("curl exit {code:?}"),
    }
}

async fn admin_get(p: &Proc, path: &str) -> String {
    get(p.logged_addr("admin listening on "), path).await.body
}

fn register_backend(p: &Proc, backend: SocketAddr) {
    register(p.logged_addr("tower listening on udp "), "svc", backend);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_certificate_then_a_restart_with_the_ca_down_serves_it() {
    let [http, tls] = free_ports(2)[..] else {
        unreachable!()
    };
    let mut ca = Pebble::start(http, tls, None);
    let root = ca.root();
    let state = temp_dir("acme").join("state");
    let backend = Backend::start("b").await;
    let listen = [("--listen", http), ("--tls-listen", tls)];
    // The redirect is on: the challenge path must stay on plain HTTP.
    let config = state.with_file_name("portico.toml");
    std::fs::write(&config, "").unwrap();
    let config_arg = config.to_str().unwrap();
    let args = [
        "--route",
        "a.test/:svc",
        "--redirect-https",
        "--config",
        config_arg,
    ];
    let p = portico(&listen, &state, &ca, &args);
    register_backend(&p, backend.addr);
    logged(&p, "acme: certificate issued and served", 1).await;
    assert_eq!(curl_https("a.test", tls, &root, "/x").await, "200 0");
    assert!(backend.last_seen().path == "/x");

    let metrics = admin_get(&p, "/metrics").await;
    assert!(
        metrics.contains("portico_tls_certificate_expiry_seconds{name=\"a.test\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("portico_acme_orders_total{result=\"issued\"} 1"),
        "{metrics}"
    );
    let status: serde_json::Value =
        serde_json::from_str(&admin_get(&p, "/status.json").await).unwrap();
    let cert = &status["certificates"][0];
    assert_eq!(cert["name"], "a.test");
    assert_eq!(cert["state"], "valid");
    assert!(cert["not_after"].as_u64().unwrap() > cert["renew_at"].as_u64().unwrap());
    let mode = std::fs::metadata(&state).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o700
    );

    // A host route that a config reload adds gets its certificate.
    let route = "[[route]]\nhost = \"c.test\"\nprefix = \"/\"\nservice = \"svc\"\n";
    std::fs::write(&config, route).unwrap();
    logged(&p, "acme: certificate issued and served", 2).await;
    assert_eq!(curl_https("c.test", tls, &root, "/c").await, "200 0");
    drop(p);

    // The CA is gone. A restart serves the stored certificate at once; a
    // new name that has none is ordered, fails, is retried, and blocks
    // nothing.
    ca.stop();
    let more = ["--route", "a.test/:svc", "--acme-domain", "b.test"];
    let p = portico(&listen, &state, &ca, &more);
    register_backend(&p, backend.addr);
    logged(&p, "acme: serving the stored certificate", 1).await;
    assert_eq!(curl_https("a.test", tls, &root, "/again").await, "200 0");
    logged(&p, "acme: order failed, will retry", 2).await;
    assert_eq!(curl_https("a.test", tls, &root, "/still").await, "200 0");
    let log = p.log_text();
    assert!(
        log.contains("name=\"b.test\"") || log.contains("name=b.test"),
        "{log}"
    );
    assert!(
        p.log_text()
            .contains("the CA refused or could not be reached"),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(state.parent().unwrap());
}

/// One HTTPS request on an open connection: the status.
async fn request_on(
    sender: &mut hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    path: &str,
) -> u16 {
    use http_body_util::BodyExt;
    let req = hyper::Request::get(path)
        .header("host", "a.test")
        .body(http_body_util::Empty::new())
        .unwrap();
    sender.ready().await.unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    resp.into_body().collect().await.unwrap();
    status
}

/// A TLS connection to `port` as `a.test`, trusting `root`: the HTTP/1.1
/// sender and the certificate the server showed.
async fn tls_connection(
    port: u16,
    root: &Path,
) -> (
    hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    Vec<u8>,
) {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(root).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("a.test").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let shown = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    (sender, shown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn01_certificate_renewed_under_an_open_connection() {
    let [http, tls] = free_ports(2)[..] else {
        unreachable!()
    };
    // Certificates of 15 s: renewed 10 s after they are issued.
    let ca = Pebble::start(http, tls, Some(15));
    let root = ca.root();
    let state = temp_dir("acme").join("state");
    let backend = Backend::start("b").await;
    // No plain listener: TLS-ALPN-01 is the one challenge Portico can answer.
    let p = portico(
        &[("--tls-listen", tls)],
        &state,
        &ca,
        &["--route", "a.test/:svc"],
    );
    register_backend(&p, backend.addr);
    logged(&p, "acme: certificate issued and served", 1).await;
    assert!(
        p.log_text().contains("challenge=\"tls-alpn-01\"")
            || p.log_text().contains("challenge=tls-alpn-01")
    );
    let (mut open, first) = tls_connection(tls, &root).await;
    assert_eq!(request_on(&mut open, "/before").await, 200);

    logged(&p, "acme: certificate issued and served", 2).await;
    // The open connection carries on; a new one gets the new certificate.
    assert_eq!(request_on(&mut open, "/after").await, 200);
    let (mut fresh, second) = tls_connection(tls, &root).await;
    assert_ne!(
        first, second,
        "a new handshake gets the renewed certificate"
    );
    assert_eq!(request_on(&mut fresh, "/new").await, 200);
    assert_eq!(curl_https("a.test", tls, &root, "/curl").await, "200 0");
    let metrics = admin_get(&p, "/metrics").await;
    assert!(
        metrics.contains("portico_acme_orders_total{result=\"issued\"} 2"),
        "{metrics}"
    );
    let _ = std::fs::remove_dir_all(state.parent().unwrap());
}

/// An HTTPS server that answers every request with the same nonsense.
async fn garbage_ca(cert: &Path, key: &Path) -> u16 {
    use rustls_pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let chain = rustls_pki_types::CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 4096];
                let _ = tls.read(&mut buf).await;
                let body = "{\"newNonce\": 42, <<garbage>>";
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_answers_garbage_is_logged_and_retried() {
    let dir = temp_dir("garbage-ca");
    let (cert, key) = pebble_https_cert(&dir);
    let port = garbage_ca(&cert, &key).await;
    let state = dir.join("state");
    let backend = Backend::start("b").await;
    let [http, tls] = free_ports(2)[..] else {
        unreachable!()
    };
    let mut args = vec![
        "up",
        "--tower-listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ];
    let (http_addr, tls_addr) = (format!("127.0.0.1:{http}"), format!("127.0.0.1:{tls}"));
    let directory = format!("https://127.0.0.1:{port}/dir");
    args.extend([
        "--listen",
        &http_addr,
        "--tls-listen",
        &tls_addr,
        "--route",
        "/:svc",
        "--acme",
        "--acme-domain",
        "a.test",
        "--acme-directory",
        &directory,
        "--acme-ca-cert",
        cert.to_str().unwrap(),
        "--acme-state",
        state.to_str().unwrap(),
        "--acme-retry",
        "1s",
    ]);
    let p = Proc::start(&args, "ingress listening on ");
    register_backend(&p, backend.addr);
    logged(&p, "acme: order failed, will retry", 2).await;
    let log = p.log_text();
    assert!(log.contains("JSON"), "the reason is logged: {log}");
    // Plain traffic carries on, and the process is alive.
    let http_sock: SocketAddr = http_addr.parse().unwrap();
    wait_for_value(
        "plain HTTP served",
        &200,
        Duration::from_millis(50),
        || async { get(http_sock, "/x").await.status },
    )
    .await;
    let status: serde_json::Value =
        serde_json::from_str(&admin_get(&p, "/status.json").await).unwrap();
    let cert = &status["certificates"][0];
    assert_eq!(cert["state"], "obtaining");
    assert!(cert["failures"].as_u64().unwrap() >= 2);
    assert!(
        cert["last_error"].as_str().unwrap().contains("JSON"),
        "{cert}"
    );
    let metrics = admin_get(&p, "/metrics").await;
    assert!(
        metrics.contains("portico_acme_orders_total{result=\"failed\"}"),
        "{metrics}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
