//! Header rewriting, as pure functions over `HeaderMap`: hop-by-hop removal
//! (RFC 9110 section 7.6.1) and the X-Forwarded-* family.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;

const HOP_BY_HOP_COUNT: usize = 6;

/// Headers that describe one hop and never travel further, TE among them
/// (RFC 9110 section 7.6.1): a backend hears our own `TE: trailers`
/// instead (`wants_trailers`). `Trailer` is end to end (RFC 9110 section
/// 6.6.2), and hyper only sends the trailer fields it declares.
const HOP_BY_HOP: [HeaderName; HOP_BY_HOP_COUNT] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
];

/// The longest X-Request-Id kept from a client; a longer one is replaced.
const MAX_REQUEST_ID: usize = 128;

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Whether a client's X-Request-Id is kept: 1 to 128 visible ASCII
/// characters, no space. The id is written unquoted into the access log and
/// passed to the backend: anything else could forge a log field.
pub fn is_valid_request_id(id: &HeaderValue) -> bool {
    let id = id.as_bytes();
    !id.is_empty() && id.len() <= MAX_REQUEST_ID && id.iter().all(|b| b.is_ascii_graphic())
}

/// 32 random hex digits.
fn new_request_id() -> HeaderValue {
    // Formatted on the stack, two digits from each random byte: this runs
    // for every request, and shifting a u128 for each digit is more work.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 32];
    for (pair, byte) in id.chunks_exact_mut(2).zip(fastrand::u128(..).to_be_bytes()) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0xf)];
    }
    // Hex digits are always a valid header value. Owned by its `Bytes`, so
    // the copy kept for a replay is a reference count, not an allocation.
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(id))
        .unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// The protocol a request asks to switch to: an `Upgrade` header with
/// `upgrade` among the Connection tokens (RFC 9110 section 7.8).
pub fn requested_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let upgrade = headers.get(header::UPGRADE)?;
    connection_has(headers, "upgrade").then(|| upgrade.clone())
}

/// The connection closes after the response to this HTTP/1.x request
/// (RFC 9112 section 9.3): it says `close`, or it is HTTP/1.0 and does not
/// say `keep-alive`. hyper's server reads the fields the same way.
pub fn request_closes(version: Version, headers: &HeaderMap) -> bool {
    match version {
        Version::HTTP_11 => connection_has(headers, "close"),
        Version::HTTP_10 => {
            connection_has(headers, "close") || !connection_has(headers, "keep-alive")
        }
        _ => false,
    }
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(token))
}

/// The comma-separated tokens of every Connection field, trimmed.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Put back the two headers an upgrade needs on the next hop.
pub fn set_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// One of the fields that always describe one hop (the fields Connection
/// names are apart: see `remove_hop_by_hop`).
/// The request's Transfer-Encoding, if any, is `chunked` alone. hyper
/// de-chunks a body whose last coding is chunked (`gzip, chunked`) and
/// keeps no note of the others, so forwarding it would drop them.
pub fn only_chunked(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .all(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.iter().any(|h| h == name)
}

/// Whether a request's TE field accepts trailers. We pass a backend's
/// trailers on to such a client, so the backend is told that its next hop
/// (us) takes them: our own `TE: trailers`, as Go's ReverseProxy and Envoy
/// send. gRPC requires it; hyper's server sends no trailers without it. The
/// client's other codings (`gzip`, ...) are its hop's only.
pub fn wants_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
}

/// Our `TE: trailers` to an HTTP/1.1 backend, with the `TE` connection
/// option an HTTP/1.1 sender of TE must add (RFC 9110 section 10.1.4).
/// Call after `remove_hop_by_hop` (and `set_upgrade`): the option is added
/// to whatever Connection says already.
pub fn accept_trailers(headers: &mut HeaderMap) {
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    headers.append(header::CONNECTION, HeaderValue::from_static("te"));
}

/// Remove hop-by-hop headers, including every header the Connection header
/// names (a client must not be able to smuggle e.g. `Connection: x-real-ip`
/// past us either: that only removes its own copy, ours is added after).
/// Host is never hop-by-hop: `Connection: host` leaves it in place, since an
/// HTTP/1.1 request must carry one (RFC 9112 section 3.2).
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names present finds what to remove: a removal per
    // listed name hashes and probes for each, and this runs twice per
    // request. Most messages carry none, or only `Connection: keep-alive`.
    let mut present = [false; HOP_BY_HOP_COUNT];
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
        }
    }
    // HOP_BY_HOP[0] is Connection.
    if present[0] {
        let mut named = connection_tokens(headers)
            // Connection options, not header names (keep-alive goes below).
            .filter(|t| !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close"))
            .peekable();
        // Most Connection fields name no other field (`close`, `keep-alive`):
        // then there is nothing to collect.
        if named.peek().is_some() {
            let named: Vec<HeaderName> = named
                .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
                .collect();
            for name in named.into_iter().filter(|n| *n != header::HOST) {
                headers.remove(name);
            }
        }
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(name);
    }
}

/// A client address as a header value, made once per connection: formatting
/// an address costs more than the rest of the forwarding headers together.
pub fn address_value(ip: IpAddr) -> HeaderValue {
    let IpAddr::V4(v4) = ip else {
        return HeaderValue::from_str(&ip.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
    };
    // `core::fmt` is heavy next to the rest of accepting a connection,
    // and four octets need no formatter.
    let mut text = [0u8; 15];
    let mut len = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text[len] = b'.';
            len += 1;
        }
        if octet >= 100 {
            text[len] = b'0' + octet / 100;
            len += 1;
        }
        if octet >= 10 {
            text[len] = b'0' + octet / 10 % 10;
            len += 1;
        }
        text[len] = b'0' + octet % 10;
        len += 1;
    }
    HeaderValue::from_bytes(&text[..len]).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// The forwarding fields of one request: X-Forwarded-For appended to (a
/// client's chain is kept, in order, as one field), X-Real-IP,
/// X-Forwarded-Proto and X-Forwarded-Host set from what this hop saw,
/// replacing the client's. Made once per request, then either put into its
/// header map (`apply`, for hyper's clients) or written after its fields by
/// our own client (`write`, skipping the client's copies: `replaces`), so
/// that the common request does not insert four fields into a map only to
/// encode them again.
#[derive(Debug, Clone)]
pub struct Forwarding {
    forwarded_for: HeaderValue,
    real_ip: HeaderValue,
    proto: HeaderValue,
    /// `None`: the client's X-Forwarded-Host is dropped, none is added.
    host: Option<HeaderValue>,
    /// The X-Request-Id passed on (`with_request_id`): the client's if
    /// valid, else a new one. `None`: the client's is dropped, none added.
    request_id: Option<HeaderValue>,
}

impl Forwarding {
    /// `client` is the client's address, from `address_value`.
    pub fn new(
        headers: &HeaderMap,
        client: &HeaderValue,
        proto: &'static str,
        host: Option<&HeaderValue>,
    ) -> Self {
        let forwarded_for = match headers.contains_key(&X_FORWARDED_FOR) {
            false => client.clone(),
            true => chain(headers, client),
        };
        Self {
            forwarded_for,
            real_ip: client.clone(),
            proto: HeaderValue::from_static(proto),
            host: host.cloned(),
            request_id: None,
        }
    }

    /// An X-Request-Id too: the client's first if it is valid
    /// (`is_valid_request_id`), else a new one in its place.
    pub fn with_request_id(mut self, headers: &HeaderMap) -> Self {
        self.request_id = Some(
            headers
                .get(&X_REQUEST_ID)
                .filter(|id| is_valid_request_id(id))
                .cloned()
                .unwrap_or_else(new_request_id),
        );
        self
    }

    /// The X-Request-Id this passes on, if any.
    pub fn request_id(&self) -> Option<&HeaderValue> {
        self.request_id.as_ref()
    }

    /// Into the request's map, replacing the client's fields.
    pub fn apply(self, headers: &mut HeaderMap) {
        headers.insert(&X_FORWARDED_FOR, self.forwarded_for);
        headers.insert(&X_REAL_IP, self.real_ip);
        headers.insert(&X_FORWARDED_PROTO, self.proto);
        match self.host {
            Some(h) => headers.insert(&X_FORWARDED_HOST, h),
            None => headers.remove(&X_FORWARDED_HOST),
        };
        match self.request_id {
            Some(id) => headers.insert(&X_REQUEST_ID, id),
            None => headers.remove(&X_REQUEST_ID),
        };
    }

    /// Whether a client's field of this name is replaced by `write`.
    pub fn replaces(name: &HeaderName) -> bool {
        // Every one is a custom name: a standard one is told apart at once.
        name == X_FORWARDED_FOR
            || name == X_REAL_IP
            || name == X_FORWARDED_PROTO
            || name == X_FORWARDED_HOST
            || name == X_REQUEST_ID
    }

    /// As field lines of an HTTP/1.1 head (`name: value\r\n`).
    pub fn write(&self, out: &mut Vec<u8>) {
        let fields = [
            (&X_FORWARDED_FOR, Some(&self.forwarded_for)),
            (&X_REAL_IP, Some(&self.real_ip)),
            (&X_FORWARDED_PROTO, Some(&self.proto)),
            (&X_FORWARDED_HOST, self.host.as_ref()),
            (&X_REQUEST_ID, self.request_id.as_ref()),
        ];
        for (name, value) in fields {
            if let Some(value) = value {
                out.extend_from_slice(name.as_str().as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(value.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
    }
}

/// X-Forwarded-For from the client's chain (one or more fields) and `client`.
fn chain(headers: &HeaderMap, client: &HeaderValue) -> HeaderValue {
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
    chain.push_str(client.to_str().unwrap_or("unknown"));
    // The string holds only what valid header values held (visible ASCII)
    // and an address, so this cannot fail; the address alone if it did.
    HeaderValue::from_str(&chain).unwrap_or_else(|_| client.clone())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_chunked_is_a_coding_we_forward() {
        let te = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::TRANSFER_ENCODING, HeaderValue::from_str(v).unwrap());
            }
            only_chunked(&h)
        };
        assert!(te(&[]));
        assert!(te(&["chunked"]));
        assert!(te(&["Chunked "]));
        assert!(!te(&["gzip, chunked"]));
        assert!(!te(&["gzip", "chunked"]));
        assert!(!te(&["identity"]));
    }

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
    fn which_requests_close_their_connection() {
        const HTTP_10: Version = Version::HTTP_10;
        const HTTP_11: Version = Version::HTTP_11;
        const HTTP_2: Version = Version::HTTP_2;
        type Case<'a> = (Version, &'a [(&'a str, &'a str)], bool);
        let cases: &[Case] = &[
            (HTTP_11, &[], false),
            (HTTP_11, &[("connection", "keep-alive")], false),
            (HTTP_11, &[("connection", "Keep-Alive, CLOSE")], true),
            (
                HTTP_11,
                &[("connection", "keep-alive"), ("connection", " close ")],
                true,
            ),
            (HTTP_11, &[("connection", "closed")], false),
            (HTTP_10, &[], true),
            (HTTP_10, &[("connection", "keep-alive")], false),
            (HTTP_10, &[("connection", "keep-alive, close")], true),
            (HTTP_2, &[("connection", "close")], false),
        ];
        for (version, fields, closes) in cases {
            assert_eq!(
                request_closes(*version, &map(fields)),
                *closes,
                "{version:?} {fields:?}"
            );
        }
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
        // TE is hop-by-hop, `trailers` too (RFC 9110 section 7.6.1); the
        // backend gets our own from `wants_trailers`.
        let mut h = map(&[("te", "trailers")]);
        assert!(wants_trailers(&h));
        remove_hop_by_hop(&mut h);
        assert!(h.is_empty());
        assert!(wants_trailers(&map(&[("te", "gzip, Trailers")])));
        assert!(!wants_trailers(&map(&[("te", "gzip")])));
        assert!(!wants_trailers(&HeaderMap::new()));
    }

    #[test]
    fn our_te_names_itself_in_connection() {
        let mut h = map(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        accept_trailers(&mut h);
        assert_eq!(h["te"], "trailers");
        let options: Vec<_> = h.get_all("connection").iter().collect();
        assert_eq!(options, ["upgrade", "te"]);
    }

    /// Host is never hop-by-hop: a Connection option naming it is ignored.
    #[test]
    fn connection_cannot_remove_host() {
        let mut h = map(&[
            ("connection", "host, x-secret"),
            ("host", "example.com"),
            ("x-secret", "1"),
        ]);
        remove_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["host"]);
    }

    #[test]
    fn xff_is_appended_to_the_client_chain() {
        let mut h = map(&[
            ("x-forwarded-for", "1.1.1.1, 2.2.2.2"),
            ("x-forwarded-for", "3.3.3.3"),
        ]);
        Forwarding::new(
            &h,
            &address_value("127.0.0.1".parse().unwrap()),
            "http",
            None,
        )
        .apply(&mut h);
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
        let client = address_value([10, 0, 0, 1].into());
        let id_of = |h: &HeaderMap| {
            let mut h = h.clone();
            Forwarding::new(&h, &client, "http", None)
                .with_request_id(&h)
                .apply(&mut h);
            h[&X_REQUEST_ID].to_str().unwrap().to_owned()
        };
        assert_eq!(id_of(&map(&[("x-request-id", "abc")])), "abc");
        let longest = "~".repeat(MAX_REQUEST_ID);
        assert_eq!(id_of(&map(&[("x-request-id", &longest)])), longest);
        // Ids that could forge an access-log field, or are too long, are
        // replaced by a new one.
        for bad in [
            "1 route=/admin",
            "",
            "a\tb",
            &"x".repeat(MAX_REQUEST_ID + 1),
        ] {
            let id = id_of(&map(&[("x-request-id", bad)]));
            assert_eq!(id.len(), 32, "{bad:?} -> {id:?}");
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{bad:?}");
        }
        let mut h = HeaderMap::new();
        h.insert(
            &X_REQUEST_ID,
            HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
        );
        assert_eq!(id_of(&h).len(), 32, "non-ASCII is replaced");
        let id = id_of(&HeaderMap::new());
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        // A new one each time.
        assert_ne!(id_of(&HeaderMap::new()), id);
    }

    /// The id is the random number in lower-case hex, most significant
    /// digit first, all 32 digits.
    #[test]
    fn a_request_id_is_its_number_in_hex() {
        for seed in [0, 7, u64::MAX] {
            fastrand::seed(seed);
            let id = new_request_id();
            let n = fastrand::Rng::with_seed(seed).u128(..);
            assert_eq!(id.to_str().expect("hex"), format!("{n:032x}"));
        }
    }

    /// Our client writes the fields after the request's own, skipping what
    /// they replace; hyper's clients get them in the map. Same result.
    #[test]
    fn written_or_applied_the_fields_are_the_same() {
        let client = address_value([10, 0, 0, 1].into());
        let host = HeaderValue::from_static("example.com");
        type Fields<'a> = &'a [(&'a str, &'a str)];
        let cases: [(Fields<'_>, Option<&HeaderValue>); 4] = [
            (&[], None),
            (&[("accept", "*/*")], Some(&host)),
            (
                &[
                    ("x-forwarded-for", "1.2.3.4"),
                    ("x-forwarded-for", "5.6.7.8"),
                    ("x-real-ip", "6.6.6.6"),
                    ("x-forwarded-proto", "https"),
                    ("x-forwarded-host", "evil"),
                    ("x-request-id", "keep"),
                    ("x-other", "o"),
                ],
                Some(&host),
            ),
            (&[("x-forwarded-host", "evil")], None),
        ];
        for (pairs, host) in cases {
            let h = map(pairs);
            let f = Forwarding::new(&h, &client, "https", host).with_request_id(&h);
            let mut applied = h.clone();
            f.clone().apply(&mut applied);
            let mut applied: Vec<String> = applied
                .iter()
                .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
                .collect();
            let mut written = Vec::new();
            for (n, v) in h.iter().filter(|(n, _)| !Forwarding::replaces(n)) {
                written.extend_from_slice(format!("{n}: {}\r\n", v.to_str().unwrap()).as_bytes());
            }
            f.write(&mut written);
            let mut written: Vec<String> = String::from_utf8(written)
                .unwrap()
                .split("\r\n")
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect();
            applied.sort();
            written.sort();
            assert_eq!(applied, written, "{pairs:?}");
        }
    }

    #[test]
    fn forwarding_headers_replace_client_values() {
        let host = HeaderValue::from_static("example.com:9090");
        let mut h = map(&[
            ("x-real-ip", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil"),
        ]);
        for ip in ["0.0.0.0", "10.0.0.1", "100.20.3.255", "255.255.255.255"] {
            assert_eq!(address_value(ip.parse().unwrap()), ip);
        }
        for _ in 0..10_000 {
            let ip = std::net::Ipv4Addr::from(fastrand::u32(..));
            assert_eq!(address_value(ip.into()), ip.to_string().as_str());
        }
        let v6 = address_value("::1".parse().unwrap());
        Forwarding::new(&h, &v6, "http", Some(&host)).apply(&mut h);
        assert_eq!(h[&X_FORWARDED_FOR], "::1");
        assert_eq!(h[&X_REAL_IP], "::1");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        assert_eq!(h[&X_FORWARDED_HOST], "example.com:9090");
        let mut h = map(&[("x-forwarded-host", "evil")]);
        Forwarding::new(&h, &v6, "http", None).apply(&mut h);
        assert!(h.get(&X_FORWARDED_HOST).is_none());
    }
}
