//! Compression's pure parts over arbitrary heads: Accept-Encoding
//! negotiation and the response rules never panic; the chosen coding is
//! one the request named (or `*` covered); the head rewrite is idempotent
//! and leaves one Vary naming accept-encoding (unless Vary is `*`).
#![no_main]
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use libfuzzer_sys::fuzz_target;
use portico::ingress::compress::{self, Plan, Verdict};

/// `name: value` lines into a map; the lines without a colon are
/// Accept-Encoding values.
fn head(data: &[u8]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        match line.iter().position(|b| *b == b':') {
            Some(colon) => {
                let (name, value) = (&line[..colon], &line[colon + 1..]);
                if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
                {
                    headers.append(n, v);
                }
            }
            None => {
                if let Ok(v) = HeaderValue::from_bytes(line) {
                    headers.append(header::ACCEPT_ENCODING, v);
                }
            }
        }
    }
    headers
}

fuzz_target!(|data: &[u8]| {
    // Request and response heads, apart at the first empty line.
    let split = data.windows(2).position(|w| w == b"\n\n");
    let (request, response) = match split {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &[][..]),
    };
    let request = head(request);
    let mut response = head(response);
    let chosen = compress::accepted(&request);
    if let Some(coding) = chosen {
        let named: String = request
            .get_all(header::ACCEPT_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(",")
            .to_ascii_lowercase();
        assert!(
            named.contains(coding.token()) || named.contains('*'),
            "{coding:?} chosen from {named:?}"
        );
    }
    if let Some(t) = response.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        compress::compressible_type(t);
    }
    let status = StatusCode::from_u16(200 + u16::from(data.first().copied().unwrap_or(0) % 200))
        .unwrap_or(StatusCode::OK);
    let verdict = compress::verdict(Plan::On(chosen), &Method::GET, status, &response, None);
    if let Verdict::Compress(c) = verdict {
        assert_eq!(Some(c), chosen);
    }
    compress::add_vary(&mut response);
    compress::weaken_etag(&mut response);
    let once = response.clone();
    compress::add_vary(&mut response);
    compress::weaken_etag(&mut response);
    assert_eq!(once, response, "the rewrite is idempotent");
    let vary: Vec<String> = response
        .get_all(header::VARY)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).to_ascii_lowercase())
        .collect();
    assert!(
        vary.iter().any(|v| v.contains("accept-encoding") || v.contains('*')),
        "{vary:?}"
    );
});
