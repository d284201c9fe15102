//! Header rewriting over arbitrary header maps: no panic; no hop-by-hop
//! header survives; X-Forwarded-For ends with the client.
#![no_main]
use http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use portico::ingress::headers::{add_forwarding, address_value, remove_hop_by_hop, X_FORWARDED_FOR};

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
    add_forwarding(&mut headers, &client, "http", None);
    let xff = headers
        .get(&X_FORWARDED_FOR)
        .expect("xff set")
        .to_str()
        .unwrap_or("");
    assert!(xff.ends_with("10.0.0.1"), "{xff}");
});
