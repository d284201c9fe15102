//! Plain and TLS listeners side by side, and the redirect to HTTPS
//! (issue 19): real `portico` processes, curl following the 308 with the
//! certificate checked, 127.0.0.1 only.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::net::SocketAddr;
use std::path::Path;

/// A self-signed end-entity certificate for `name` (openssl, P-256).
fn self_signed(dir: &Path, name: &str) -> (String, String) {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args(["-subj", &format!("/CN={name}")])
        .args(["-addext", &format!("subjectAltName=DNS:{name}")])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
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

/// The address of the listener a "(TLS)" log line names (logged after
/// the plain one the process was started on).
async fn tls_addr(p: &Proc) -> SocketAddr {
    let tls_line = |l: &String| l.contains("ingress listening on ") && l.ends_with("(TLS)");
    let log = p.log.clone();
    eventually(DEADLINE, "a TLS listener logged", || {
        log.lock().unwrap().iter().any(tls_line)
    })
    .await;
    let line = p
        .log
        .lock()
        .unwrap()
        .iter()
        .find(|l| tls_line(l))
        .cloned()
        .unwrap();
    let rest = line.split("ingress listening on ").nth(1).unwrap();
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

/// The status line and the Location of a plain GET with `host`.
async fn plain_get(addr: SocketAddr, host: &str, target: &str) -> (String, Option<String>) {
    let text = raw(
        addr,
        format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        DEADLINE,
    )
    .await;
    let status = text.lines().next().unwrap_or("").to_owned();
    let location = text
        .lines()
        .find_map(|l| l.strip_prefix("location: "))
        .map(str::to_owned);
    (status, location)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_and_tls_listeners_and_the_redirect_keeps_path_and_query() {
    let dir = temp_dir("redirect");
    let (cert, key) = self_signed(&dir, "a.test");
    let config = dir.join("portico.toml");
    std::fs::write(
        &config,
        "[[route]]\nprefix = \"/open\"\nservice = \"svc\"\nredirect_https = false\n",
    )
    .unwrap();
    let b = Backend::start("b").await;
    let t = tower("30s");
    register(t.addr, "svc", b.addr);
    let ing = ingress(
        t.addr,
        &["/:svc"],
        &[
            "--tls-listen",
            "127.0.0.1:0",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--redirect-https",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    wait_synced(&ing, 1).await;
    let plain = ing.addr;
    let tls = tls_addr(&ing).await;

    let (status, location) =
        plain_get(plain, &format!("a.test:{}", plain.port()), "/p/a?x=1&y=%20").await;
    assert_eq!(status, "HTTP/1.1 308 Permanent Redirect");
    assert_eq!(
        location.as_deref(),
        Some(format!("https://a.test:{}/p/a?x=1&y=%20", tls.port()).as_str())
    );
    // The ACME challenge path and a route that says no stay on plain HTTP.
    let (status, _) = plain_get(plain, "a.test", "/.well-known/acme-challenge/tok").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(b.last_seen().path, "/.well-known/acme-challenge/tok");
    let (status, _) = plain_get(plain, "a.test", "/open/x").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(b.last_seen().header("x-forwarded-proto"), Some("http"));

    // curl follows the 308 to the TLS listener, verifying its certificate,
    // and the backend gets the path and query the client asked for.
    let url = format!("http://a.test:{}/p/a?x=1&y=2", plain.port());
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-L", "--max-time", "10", "--cacert", &cert])
        .args(["--resolve", &format!("a.test:{}:127.0.0.1", plain.port())])
        .args(["--resolve", &format!("a.test:{}:127.0.0.1", tls.port())])
        .args(["-w", "\n%{http_code} %{num_redirects} %{url_effective}"])
        .arg(&url)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, info) = text.rsplit_once('\n').unwrap();
    assert_eq!(
        info,
        format!("200 1 https://a.test:{}/p/a?x=1&y=2", tls.port())
    );
    assert!(body.starts_with("backend=b GET /p/a?x=1&y=2"), "{body}");
    assert_eq!(b.last_seen().header("x-forwarded-proto"), Some("https"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn https_needs_certificates_and_redirects_need_https() {
    for (args, want) in [
        (
            &["--tls-listen", "127.0.0.1:0"][..],
            "HTTPS needs certificates",
        ),
        (&["--redirect-https"][..], "--tls-listen"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_portico"))
            .args(["ingress", "--listen", "127.0.0.1:0", "--route", "/:svc"])
            .args(["--admin", "off"])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
