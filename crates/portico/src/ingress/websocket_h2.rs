//! WebSocket over HTTP/2 (RFC 8441) to a backend that speaks WebSocket
//! over HTTP/1.1 (RFC 6455): the client's extended CONNECT with
//! `:protocol websocket` becomes an HTTP/1.1 Upgrade, and the backend's
//! 101 becomes the 200 that opens the stream. The bytes after are the same
//! WebSocket frames either way, carried by `tunnel`. Pure: the key's
//! randomness is passed in.

use base64::Engine;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, StatusCode};

use super::error::{ProxyError, UpstreamError};
use super::headers;

/// RFC 6455 section 1.3: appended to the key before hashing.
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The handshake made on the client's behalf: the key the backend must
/// answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    key: HeaderValue,
}

/// Whether `parts` is an extended CONNECT (RFC 8441 section 4).
pub fn is_extended_connect(parts: &Parts) -> bool {
    parts.method == Method::CONNECT && parts.extensions.get::<hyper::ext::Protocol>().is_some()
}

/// Turn an extended CONNECT for `websocket` into the HTTP/1.1 request a
/// WebSocket backend expects: GET with Upgrade, and a key of our own
/// (RFC 8441 section 5: HTTP/2 carries no key). Other protocols have no
/// HTTP/1.1 form: 501.
pub fn to_upgrade(parts: &mut Parts, nonce: [u8; 16]) -> Result<Handshake, ProxyError> {
    let protocol = parts.extensions.remove::<hyper::ext::Protocol>();
    if !protocol.is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket")) {
        return Err(ProxyError::UnsupportedProtocol);
    }
    let key = base64::engine::general_purpose::STANDARD.encode(nonce);
    let key = HeaderValue::from_str(&key).map_err(|_| ProxyError::UnsupportedProtocol)?;
    parts.method = Method::GET;
    headers::set_upgrade(&mut parts.headers, HeaderValue::from_static("websocket"));
    parts.headers.insert(header::SEC_WEBSOCKET_KEY, key.clone());
    if !parts.headers.contains_key(header::SEC_WEBSOCKET_VERSION) {
        parts.headers.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
    }
    Ok(Handshake { key })
}

/// The accept value a backend must send for `key` (RFC 6455 section 4.2.2).
fn accept_for(key: &HeaderValue) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.as_bytes());
    ctx.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(ctx.finish())
}

/// The backend's answer as the HTTP/2 client takes it: a 101 that accepted
/// our key becomes 200 without the HTTP/1.1 handshake's fields. An error
/// status (a backend that refused the upgrade) passes on as it is. A 101
/// with the wrong accept, or a success that switched nothing (which the
/// client would take for an open tunnel), is the backend's failure.
pub fn to_h2_response(
    handshake: &Handshake,
    status: &mut StatusCode,
    fields: &mut HeaderMap,
) -> Result<(), UpstreamError> {
    if status.is_success() {
        return Err(UpstreamError::NotUpgraded);
    }
    if *status != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(());
    }
    let accepted = fields
        .get(header::SEC_WEBSOCKET_ACCEPT)
        .is_some_and(|a| a.as_bytes() == accept_for(&handshake.key).as_bytes());
    if !accepted {
        return Err(UpstreamError::WebSocketAccept);
    }
    *status = StatusCode::OK;
    for name in [
        header::UPGRADE,
        header::CONNECTION,
        header::SEC_WEBSOCKET_ACCEPT,
    ] {
        fields.remove(name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http::Request;

    fn connect(protocol: Option<&'static str>) -> Parts {
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri("https://example.com/chat")
            .header(header::SEC_WEBSOCKET_VERSION, "13")
            .header(header::SEC_WEBSOCKET_PROTOCOL, "chat")
            .body(())
            .unwrap();
        if let Some(p) = protocol {
            req.extensions_mut()
                .insert(hyper::ext::Protocol::from_static(p));
        }
        req.into_parts().0
    }

    #[test]
    fn the_rfc_6455_example_key_gets_its_accept() {
        let key = HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(accept_for(&key), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn an_extended_connect_becomes_an_upgrade_with_our_key() {
        let mut parts = connect(Some("websocket"));
        assert!(is_extended_connect(&parts));
        let handshake = to_upgrade(&mut parts, *b"the sample nonce").unwrap();
        assert_eq!(parts.method, Method::GET);
        assert_eq!(parts.headers[header::UPGRADE], "websocket");
        assert_eq!(parts.headers[header::CONNECTION], "upgrade");
        assert_eq!(
            parts.headers[header::SEC_WEBSOCKET_KEY],
            "dGhlIHNhbXBsZSBub25jZQ=="
        );
        assert_eq!(parts.headers[header::SEC_WEBSOCKET_PROTOCOL], "chat");
        assert_eq!(handshake.key, "dGhlIHNhbXBsZSBub25jZQ==");
        assert!(!is_extended_connect(&parts));
    }

    #[test]
    fn other_protocols_and_plain_connect_are_501() {
        assert!(!is_extended_connect(&connect(None)));
        let mut other = connect(Some("connect-udp"));
        assert!(matches!(
            to_upgrade(&mut other, [0; 16]),
            Err(ProxyError::UnsupportedProtocol)
        ));
    }

    #[test]
    fn a_101_with_the_right_accept_becomes_200() {
        let handshake = Handshake {
            key: HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        };
        let mut fields = HeaderMap::new();
        fields.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        fields.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        fields.insert(
            header::SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_static("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        );
        fields.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("chat"),
        );
        let mut status = StatusCode::SWITCHING_PROTOCOLS;
        to_h2_response(&handshake, &mut status, &mut fields).unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(fields.len(), 1, "only the subprotocol is left: {fields:?}");

        let mut wrong = HeaderMap::new();
        wrong.insert(
            header::SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_static("nope"),
        );
        let mut status = StatusCode::SWITCHING_PROTOCOLS;
        assert!(to_h2_response(&handshake, &mut status, &mut wrong).is_err());

        let mut refused = StatusCode::FORBIDDEN;
        to_h2_response(&handshake, &mut refused, &mut HeaderMap::new()).unwrap();
        assert_eq!(refused, StatusCode::FORBIDDEN, "passed on as it is");

        let mut ignored = StatusCode::OK;
        assert!(
            to_h2_response(&handshake, &mut ignored, &mut HeaderMap::new()).is_err(),
            "a 200 to an HTTP/1.1 upgrade is no tunnel"
        );
    }
}
