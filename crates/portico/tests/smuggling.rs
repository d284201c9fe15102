//! Hostile HTTP/1.1 (issue 6): request smuggling and malformed framing,
//! each case naming the RFC rule it checks. Raw bytes over real sockets; a
//! recording backend must never see a smuggled request, and the client
//! connection must be closed after a framing error.
#![allow(clippy::unwrap_used)]

mod common;
use common::*;

use std::sync::atomic::Ordering;

/// A second request glued after the first: if the proxy's idea of where
/// the first ends differs from the backend's, this is what leaks through.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";

struct Case {
    rule: &'static str,
    request: String,
    /// Acceptable statuses for the refusal.
    statuses: &'static [&'static str],
}

fn case(rule: &'static str, head_and_body: &str, statuses: &'static [&'static str]) -> Case {
    Case {
        rule,
        request: format!("{head_and_body}{SMUGGLED}"),
        statuses,
    }
}

fn cases() -> Vec<Case> {
    vec![
        // RFC 9112 6.3 lets an intermediary forward such a message if it
        // removes Content-Length and frames by Transfer-Encoding, and says
        // to close the connection after: hyper does exactly that, so the
        // glued request is never read. It is answered, not refused.
        case(
            "RFC 9112 6.3: Content-Length with Transfer-Encoding (CL.TE): TE wins, CL dropped, connection closed",
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX",
            &["200"],
        ),
        case(
            "RFC 9112 6.3: differing Content-Length values",
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 40\r\n\r\nabc",
            &["400"],
        ),
        case(
            "RFC 9112 6.3: Content-Length list with differing values",
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 40\r\n\r\nabc",
            &["400"],
        ),
        case(
            "RFC 9112 6.3: Content-Length not a number",
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc",
            &["400"],
        ),
        case(
            "RFC 9112 6.3: chunked not the final coding (chunked, identity)",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
            &["400", "501"],
        ),
        case(
            "RFC 9112 6.3: a coding other than chunked last (gzip)",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
            &["400", "501"],
        ),
        case(
            "RFC 9112 6.1: a coding before chunked (gzip, chunked) would be lost when re-framed",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            &["501"],
        ),
        case(
            "RFC 9112 6.1: the same, in two fields",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            &["400", "501"],
        ),
        case(
            "RFC 9112 6.3 / RFC 9110 5.1: obfuscated coding name (xchunked)",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
            &["400", "501"],
        ),
        case(
            "RFC 9112 6.1: Transfer-Encoding in an HTTP/1.0 request",
            "POST /a HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            &["400"],
        ),
        case(
            "RFC 9112 5.1: whitespace between field name and colon",
            "GET /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
            &["400"],
        ),
        case(
            "RFC 9112 5.2: obs-fold in a request",
            "GET /a HTTP/1.1\r\nHost: x\r\nX-Folded: one\r\n two\r\n\r\n",
            &["400"],
        ),
        case(
            "RFC 9110 5.5: NUL in a field value",
            "GET /a HTTP/1.1\r\nHost: x\r\nX-Bad: a\0b\r\n\r\n",
            &["400"],
        ),
        case(
            "RFC 9110 5.5: bare CR in a field value",
            "GET /a HTTP/1.1\r\nHost: x\r\nX-Bad: a\rb\r\n\r\n",
            &["400"],
        ),
        case(
            "RFC 9112 2.2: bare CR as a line ending",
            "GET /a HTTP/1.1\rHost: x\r\r",
            &["400"],
        ),
        case(
            "RFC 9112 3: invalid method token",
            "G@T /a HTTP/1.1\r\nHost: x\r\n\r\n",
            &["400"],
        ),
        case(
            "RFC 9112 2.3: unknown HTTP version",
            "GET /a HTTP/1.7\r\nHost: x\r\n\r\n",
            &["400", "505"],
        ),
        case(
            "RFC 9112 3.2: HTTP/1.1 without Host",
            "GET /a HTTP/1.1\r\n\r\n",
            &["400"],
        ),
        case(
            "RFC 9112 3.2: two Host fields",
            "GET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
            &["400"],
        ),
        case(
            "RFC 9112 3.2.2: absolute-form naming another host than Host",
            "GET http://other.example/a HTTP/1.1\r\nHost: x\r\n\r\n",
            &["400"],
        ),
        case(
            "RFC 9112 7.1: invalid chunk size",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
            &["400"],
        ),
        case(
            "RFC 9112 7.1: chunk size overflowing 64 bits",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
            &["400"],
        ),
    ]
}

/// How many status lines (`HTTP/1.x NNN `) the output holds.
fn status_lines(out: &str) -> usize {
    out.match_indices("HTTP/1.")
        .filter(|(i, _)| {
            let rest = &out.as_bytes()[i + 7..];
            rest.len() >= 6
                && rest[1] == b' '
                && rest[2..5].iter().all(u8::is_ascii_digit)
                && rest[5] == b' '
        })
        .count()
}

#[tokio::test]
async fn malformed_and_smuggling_requests_are_refused_and_nothing_leaks() {
    let (_t, b, ing) = one_backend(&[]).await;
    let mut failures = Vec::new();
    for c in cases() {
        // `raw` reads until the proxy closes the connection: a case that left
        // it open would hang here until the deadline and fail.
        let started = std::time::Instant::now();
        let out = raw(
            ing.addr,
            c.request.as_bytes(),
            std::time::Duration::from_secs(5),
        )
        .await;
        let status = out.get(9..12).unwrap_or("");
        let closed = started.elapsed() < std::time::Duration::from_secs(4);
        let responses = status_lines(&out);
        if !c.statuses.contains(&status) || !closed || responses > 1 {
            failures.push(format!(
                "{}: status {status:?}, closed {closed}, {responses} responses: {out:?}",
                c.rule
            ));
        }
    }
    let smuggled = b
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.path.contains("smuggled"))
        .count();
    assert_eq!(smuggled, 0, "a smuggled request reached the backend");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Only CL.TE (forwarded with TE framing and no body) may reach the
    // backend: a bad chunk size in hand with the head is refused first.
    let seen: Vec<(String, usize)> = b
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| (format!("{} {}", s.method, s.path), s.body_len))
        .collect();
    assert!(seen.iter().all(|(s, _)| s == "POST /a"), "{seen:?}");
    assert!(b.hits.load(Ordering::SeqCst) <= 3);
    let cl_te = b
        .seen
        .lock()
        .unwrap()
        .iter()
        .find(|s| s.body_len == 0)
        .map(|s| s.header("content-length").map(str::to_owned));
    if let Some(cl) = cl_te {
        assert_ne!(
            cl.as_deref(),
            Some("6"),
            "the client's Content-Length must not be forwarded"
        );
    }
}

/// A backend that answers with broken framing, raw.
async fn raw_backend(answer: &'static [u8]) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_backends_bad_framing_does_not_desynchronise_the_client() {
    let t = tower("30s");
    let good = Backend::start("good").await;
    register(t.addr, "good", good.addr);
    let answers: [(&str, &'static [u8]); 3] = [
        ("RFC 9112 6.3: response with Content-Length and Transfer-Encoding", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled"),
        ("RFC 9112 6.3: response with differing Content-Length", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 50\r\n\r\nhello"),
        ("RFC 9112 4: garbage status line", b"HTTP/1.1 2OO OK\r\n\r\n"),
    ];
    for (i, (rule, answer)) in answers.iter().enumerate() {
        let name = format!("bad{i}");
        register(t.addr, &name, raw_backend(answer).await);
        let route = format!("/{name}:{name}");
        let ing = ingress(t.addr, &[&route, "/:good"], &[]);
        wait_synced(&ing, 1).await;
        let mut c = Client::connect(ing.addr).await;
        let a = c.get(&format!("/{name}")).await;
        assert_eq!(a.status, 502, "{rule}: {}", a.body);
        assert!(!a.body.contains("smuggled"), "{rule}");
        // The same client connection carries on, in step.
        let a = c.get("/next").await;
        assert_eq!(
            (a.status, a.body.as_str()),
            (200, "backend=good GET /next\n"),
            "{rule}"
        );
    }
}

/// How a backend's answer was framed is how the client gets it: interim
/// answers are not taken for the answer, a body delimited by the close is
/// passed on whole, and a body cut short reaches the client cut short (its
/// connection closed), never as a complete answer.
#[tokio::test]
async fn a_backends_answer_reaches_the_client_as_it_was_framed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = tower("30s");
    let answers: [(&str, &'static [u8]); 3] = [
        ("interim", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal"),
        ("close", b"HTTP/1.1 200 OK\r\nX-Framing: close\r\n\r\nuntil the backend closes"),
        ("short", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this"),
    ];
    let mut routes = Vec::new();
    for (name, answer) in answers {
        register(t.addr, name, raw_backend(answer).await);
        routes.push(format!("/{name}:{name}"));
    }
    let routes: Vec<&str> = routes.iter().map(String::as_str).collect();
    let ing = ingress(t.addr, &routes, &[]);
    wait_synced(&ing, 1).await;

    let a = get(ing.addr, "/interim").await;
    assert_eq!((a.status, a.body.as_str()), (200, "final"));
    assert!(
        !a.headers.contains_key("link"),
        "the 103's fields stay with it"
    );

    let a = get(ing.addr, "/close").await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (200, "until the backend closes")
    );

    let mut s = tokio::net::TcpStream::connect(ing.addr).await.unwrap();
    s.write_all(b"GET /short HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .expect("the client connection is closed, not left waiting")
        .unwrap();
    // hyper closes the client connection at the body's error, with or
    // without what it had buffered; either way the answer is incomplete.
    let text = String::from_utf8_lossy(&got);
    if let Some((head, body)) = text.split_once("\r\n\r\n") {
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase().contains("content-length: 100"),
            "{head}"
        );
        assert_eq!(body, "only this", "the 91 missing bytes are not made up");
    } else {
        assert!(!text.contains("HTTP/1.1 "), "no other answer: {text:?}");
    }
    // The proxy itself carries on.
    let a = get(ing.addr, "/close").await;
    assert_eq!(a.status, 200);
}

/// A backend that closes each connection after one answer, though the
/// answer allows keep-alive: every request after the first finds its
/// pooled connection closed, and must be sent again on a new one rather
/// than fail.
#[tokio::test]
async fn a_pooled_connection_the_backend_closed_costs_the_client_nothing() {
    let t = tower("30s");
    let addr = raw_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    register(t.addr, "svc", addr);
    let ing = ingress(t.addr, &["/:svc"], &[]);
    wait_synced(&ing, 1).await;
    let mut c = Client::connect(ing.addr).await;
    for i in 0..20 {
        let a = c.get(&format!("/{i}")).await;
        assert_eq!((a.status, a.body.as_str()), (200, "ok"), "request {i}");
    }
}

/// Hop-by-hop fields of a backend's answer stop at the proxy: the fixed
/// ones, and those its Connection field names.
#[tokio::test]
async fn a_backends_hop_by_hop_fields_stop_at_the_proxy() {
    let t = tower("30s");
    let plain = raw_backend(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nX-Kept: k\r\nContent-Length: 2\r\n\r\nok",
    )
    .await;
    let naming = raw_backend(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, x-secret\r\nKeep-Alive: timeout=5\r\nX-Secret: s\r\nX-Kept: k\r\nContent-Length: 2\r\n\r\nok",
    )
    .await;
    register(t.addr, "plain", plain);
    register(t.addr, "naming", naming);
    let ing = ingress(t.addr, &["/plain:plain", "/naming:naming"], &[]);
    wait_synced(&ing, 1).await;
    for path in ["/plain", "/naming"] {
        let a = get(ing.addr, path).await;
        assert_eq!((a.status, a.body.as_str()), (200, "ok"), "{path}");
        assert_eq!(a.headers.get("x-kept").unwrap(), "k", "{path}");
        for gone in ["connection", "keep-alive", "proxy-connection", "x-secret"] {
            assert!(
                a.headers.get(gone).is_none(),
                "{path}: {gone} passed through"
            );
        }
    }
}

/// A backend that switches protocols though nobody asked: the client gets
/// 502, not a tunnel, and its connection stays in step.
#[tokio::test]
async fn an_upgrade_nobody_asked_for_is_refused() {
    let t = tower("30s");
    let good = Backend::start("good").await;
    register(t.addr, "good", good.addr);
    let rogue = raw_backend(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    )
    .await;
    register(t.addr, "rogue", rogue);
    let ing = ingress(t.addr, &["/rogue:rogue", "/:good"], &[]);
    wait_synced(&ing, 1).await;
    let mut c = Client::connect(ing.addr).await;
    let a = c.get("/rogue").await;
    assert_eq!(a.status, 502, "{}", a.body);
    let a = c.get("/next").await;
    assert_eq!(
        (a.status, a.body.as_str()),
        (200, "backend=good GET /next\n")
    );
}

/// hyper ends a request's trailer section at its first empty line, a bare
/// LF one too, and drops what follows up to CRLFCRLF: where a front proxy
/// that ends lines at LF sees a second request, we see none, and the two
/// would disagree on which response answers which request. A request whose
/// body carried trailers is answered with the connection closed, so no
/// later response can be taken for another's.
#[tokio::test]
async fn a_request_with_trailers_closes_its_connection() {
    let (_t, b, ing) = one_backend(&[]).await;
    let request = format!(
        "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\n\n{SMUGGLED}"
    );
    let started = std::time::Instant::now();
    let out = raw(
        ing.addr,
        request.as_bytes(),
        std::time::Duration::from_secs(5),
    )
    .await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "the connection stayed open: {out:?}"
    );
    assert_eq!(status_lines(&out), 1, "{out:?}");
    assert!(
        out.to_ascii_lowercase().contains("connection: close"),
        "{out:?}"
    );
    let paths: Vec<String> = b
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.path.clone())
        .collect();
    assert!(paths.iter().all(|p| !p.contains("smuggled")), "{paths:?}");
}
