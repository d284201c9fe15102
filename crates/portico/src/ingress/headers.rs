//! Header rewriting, as pure functions over `HeaderMap`: hop-by-hop removal
//! (RFC 9110 section 7.6.1) and the X-Forwarded-* family.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one hop and never travel further. TE is handled
/// apart (`TE: trailers` is kept: gRPC requires it end to end). `Trailer`
/// is end to end (RFC 9110 section 6.6.2), and hyper only sends the
/// trailer fields it declares.
const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Keep the client's X-Request-Id, or add a new random one; returns it.
pub fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(id) = headers.get(&X_REQUEST_ID) {
        return id.clone();
    }
    // 32 hex digits, formatted on the stack: this runs for every request.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 32];
    let mut n = fastrand::u128(..);
    for b in id.iter_mut().rev() {
        *b = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    // Hex digits are always a valid header value.
    let value = HeaderValue::from_bytes(&id).unwrap_or_else(|_| HeaderValue::from_static("-"));
    headers.insert(&X_REQUEST_ID, value.clone());
    value
}

/// The protocol a request asks to switch to: an `Upgrade` header with
/// `upgrade` among the Connection tokens (RFC 9110 section 7.8).
pub fn requested_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let upgrade = headers.get(header::UPGRADE)?;
    let asked = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asked.then(|| upgrade.clone())
}

/// Put back the two headers an upgrade needs on the next hop.
pub fn set_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// Remove hop-by-hop headers, including every header the Connection header
/// names (a client must not be able to smuggle e.g. `Connection: x-real-ip`
/// past us either: that only removes its own copy, ours is added after).
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    let only_trailers = headers.get_all(header::TE).iter().all(|v| {
        v.to_str()
            .is_ok_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
    });
    if !only_trailers {
        headers.remove(header::TE);
    }
}

/// Add the forwarding headers: X-Forwarded-For appended to (a client's chain
/// is kept, in order, as one header), X-Real-IP, X-Forwarded-Proto and
/// X-Forwarded-Host set from what this hop saw, replacing client values.
pub fn add_forwarding(
    headers: &mut HeaderMap,
    client: IpAddr,
    proto: &'static str,
    host: Option<&HeaderValue>,
) {
    let client_str = client.to_string();
    let mut chain = String::new();
    for v in headers.get_all(&X_FORWARDED_FOR) {
        if let Ok(v) = v.to_str() {
            let v = v.trim();
            if !v.is_empty() {
                if !chain.is_empty() {
                    chain.push_str(", ");
                }
                chain.push_str(v);
            }
        }
    }
    if !chain.is_empty() {
        chain.push_str(", ");
    }
    chain.push_str(&client_str);
    // Both strings hold only what valid header values held, plus an address.
    if let Ok(v) = HeaderValue::from_str(&chain) {
        headers.insert(&X_FORWARDED_FOR, v);
    }
    if let Ok(v) = HeaderValue::from_str(&client_str) {
        headers.insert(&X_REAL_IP, v);
    }
    headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    match host {
        Some(h) => {
            headers.insert(&X_FORWARDED_HOST, h.clone());
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("trailer", "x-sum"),
            ("te", "gzip, trailers"),
            ("proxy-connection", "keep-alive"),
            ("host", "example.com"),
            ("x-keep", "yes"),
        ]);
        remove_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["host", "trailer", "x-keep"]);
        // TE: trailers alone travels on (gRPC needs it end to end).
        let mut h = map(&[("te", "trailers")]);
        remove_hop_by_hop(&mut h);
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn xff_is_appended_to_the_client_chain() {
        let mut h = map(&[
            ("x-forwarded-for", "1.1.1.1, 2.2.2.2"),
            ("x-forwarded-for", "3.3.3.3"),
        ]);
        add_forwarding(&mut h, "127.0.0.1".parse().unwrap(), "http", None);
        assert_eq!(h.get_all(&X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h[&X_FORWARDED_FOR], "1.1.1.1, 2.2.2.2, 3.3.3.3, 127.0.0.1");
    }

    #[test]
    fn upgrade_needs_both_headers() {
        let h = map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert_eq!(requested_upgrade(&h).unwrap(), "websocket");
        assert!(requested_upgrade(&map(&[("upgrade", "websocket")])).is_none());
        assert!(requested_upgrade(&map(&[("connection", "upgrade")])).is_none());
    }

    #[test]
    fn request_id_is_kept_or_made() {
        let mut h = map(&[("x-request-id", "abc")]);
        assert_eq!(ensure_request_id(&mut h), "abc");
        let mut h = HeaderMap::new();
        let id = ensure_request_id(&mut h);
        assert_eq!(id.len(), 32);
        assert_eq!(h[&X_REQUEST_ID], id);
    }

    #[test]
    fn forwarding_headers_replace_client_values() {
        let host = HeaderValue::from_static("example.com:9090");
        let mut h = map(&[
            ("x-real-ip", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil"),
        ]);
        add_forwarding(&mut h, "::1".parse().unwrap(), "http", Some(&host));
        assert_eq!(h[&X_FORWARDED_FOR], "::1");
        assert_eq!(h[&X_REAL_IP], "::1");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        assert_eq!(h[&X_FORWARDED_HOST], "example.com:9090");
        let mut h = map(&[("x-forwarded-host", "evil")]);
        add_forwarding(&mut h, "::1".parse().unwrap(), "http", None);
        assert!(h.get(&X_FORWARDED_HOST).is_none());
    }
}
