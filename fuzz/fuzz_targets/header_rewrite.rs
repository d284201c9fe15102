//! Header rewriting over arbitrary header maps: no panic; no hop-by-hop
//! header survives; X-Forwarded-For ends with the client; the forwarding
//! fields written by our client are the ones put into the map for hyper's.
#![no_main]
use http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use portico::ingress::headers::{address_value, remove_hop_by_hop, Forwarding, X_FORWARDED_FOR};

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            headers.append(n, v);
        }
    }
    remove_hop_by_hop(&mut headers);
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    ] {
        assert!(!headers.contains_key(name), "{name} survived");
    }
    let client = address_value([10, 0, 0, 1].into());
    let host = HeaderValue::from_static("example.com");
    let f = Forwarding::new(&headers, &client, "http", Some(&host)).with_request_id(&headers);
    let mut applied = headers.clone();
    f.clone().apply(&mut applied);
    let mut applied: Vec<Vec<u8>> = applied.iter().map(|(n, v)| line(n, v)).collect();
    let mut written: Vec<Vec<u8>> = headers
        .iter()
        .filter(|(n, _)| !Forwarding::replaces(n))
        .map(|(n, v)| line(n, v))
        .collect();
    let mut extra = Vec::new();
    f.write(&mut extra);
    written.extend(
        extra
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| l.to_vec()),
    );
    applied.sort();
    written.sort();
    assert_eq!(applied, written);

    Forwarding::new(&headers, &client, "http", None).apply(&mut headers);
    let xff = headers
        .get(&X_FORWARDED_FOR)
        .expect("xff set")
        .to_str()
        .unwrap_or("");
    assert!(xff.ends_with("10.0.0.1"), "{xff}");
});

/// A field as our client writes it, up to the LF.
fn line(name: &HeaderName, value: &HeaderValue) -> Vec<u8> {
    [name.as_str().as_bytes(), b": ", value.as_bytes(), b"\r"].concat()
}
