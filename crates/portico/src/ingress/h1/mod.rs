//! HTTP/1.1 towards backends, done here rather than by hyper's client: the
//! response head, how its body is framed (RFC 9112 section 6.3), and the
//! chunked decoder (`chunked`). hyper's client builds a header map and a
//! task-shaped connection for every exchange; most requests need neither
//! (docs/benchmarks.md has the measurements that led here).
//!
//! Everything here works on a `BytesMut` the caller reads into, so it is
//! tested and fuzzed without a socket, whatever way the bytes are split.

pub mod chunked;
pub mod client;
pub mod server;

use std::mem::MaybeUninit;

use bytes::BytesMut;
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Version};

/// Fields a response head may have; more is an error, as in hyper (100).
pub const MAX_HEADERS: usize = 100;

/// How a response's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body, whatever the fields say: a response to HEAD, 1xx, 204, 304.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding: see `chunked::Decoder`.
    Chunked,
    /// Everything until the backend closes; the connection ends with it.
    UntilClose,
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    /// Values share the head's bytes (one allocation for the whole head).
    pub headers: HeaderMap,
    pub framing: Framing,
    /// The connection may carry another request once this body is read.
    pub reusable: bool,
    /// Hop-by-hop fields are still in `headers`, for
    /// `headers::remove_hop_by_hop` to take out. Otherwise the fixed ones
    /// (Connection, Keep-Alive...) were never put in: the usual response
    /// names no other field in Connection and has no TE, and leaving them
    /// out costs nothing where inserting and removing them costs a map
    /// insert and a removal per field.
    pub hop_by_hop: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("the backend's response head is over {0} bytes")]
    TooLarge(usize),
    #[error("the backend's response head has more than {MAX_HEADERS} fields")]
    TooManyHeaders,
    #[error("the backend's response head is malformed ({0})")]
    Malformed(httparse::Error),
    #[error("the backend's response has an invalid status code")]
    BadStatus,
    #[error("the backend's response has both Content-Length and Transfer-Encoding")]
    AmbiguousFraming,
    #[error("the backend's response has an invalid or conflicting Content-Length")]
    BadContentLength,
    #[error("the backend's HTTP/1.0 response has a Transfer-Encoding")]
    TransferEncodingInHttp10,
}

/// Parse the response head at the front of `buf`, and take its bytes out
/// of `buf`. `Ok(None)`: the head is not complete yet; read more and call
/// again. `request_was_head`: the request's method was HEAD, so the
/// response has no body whatever its fields say.
pub fn parse_head(
    buf: &mut BytesMut,
    request_was_head: bool,
    max_head_bytes: usize,
) -> Result<Option<ResponseHead>, HeadError> {
    let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut storage,
    );
    let head_len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > max_head_bytes => {
            return Err(HeadError::TooLarge(max_head_bytes))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(e) => return Err(HeadError::Malformed(e)),
    };
    if head_len > max_head_bytes {
        return Err(HeadError::TooLarge(max_head_bytes));
    }
    let status = response
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(HeadError::BadStatus)?;
    let version = if response.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };

    // Names now; values by their place in the head, so that once the head
    // is frozen they can share its bytes instead of each being copied.
    let base = buf.as_ptr() as usize;
    let mut fields = Vec::with_capacity(response.headers.len());
    let mut framing = FramingFields::default();
    for h in response.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| HeadError::Malformed(httparse::Error::HeaderName))?;
        framing.note(&name, h.value)?;
        let start = h.value.as_ptr() as usize - base;
        fields.push((name, start, start + h.value.len()));
    }
    let head = buf.split_to(head_len).freeze();
    let hop_by_hop = framing.names_fields || framing.te;
    let mut headers = HeaderMap::with_capacity(fields.len());
    for (name, start, end) in fields {
        if !hop_by_hop && crate::ingress::headers::is_hop_by_hop(&name) {
            continue;
        }
        // httparse accepted these bytes as a field value; so does `http`.
        let value = HeaderValue::from_maybe_shared(head.slice(start..end))
            .map_err(|_| HeadError::Malformed(httparse::Error::HeaderValue))?;
        headers.append(name, value);
    }

    if framing.transfer_encoding && framing.content_length.is_some() {
        // RFC 9112 6.3: a sign of smuggling; the connection's state after
        // this response is unknown either way.
        return Err(HeadError::AmbiguousFraming);
    }
    if framing.transfer_encoding && version == Version::HTTP_10 {
        // RFC 9112 6.1: faulty framing, whatever the coding.
        return Err(HeadError::TransferEncodingInHttp10);
    }
    let body = if request_was_head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Empty
    } else if framing.transfer_encoding {
        // Chunked must be the final coding; any other final coding is
        // delimited by the close (RFC 9112 6.3, item 4).
        if framing.chunked_last {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else if let Some(n) = framing.content_length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    };
    let persistent = match version {
        Version::HTTP_10 => framing.keep_alive && !framing.close,
        _ => !framing.close,
    };
    Ok(Some(ResponseHead {
        status,
        headers,
        framing: body,
        reusable: persistent
            && body != Framing::UntilClose
            && status != StatusCode::SWITCHING_PROTOCOLS,
        hop_by_hop,
    }))
}

/// The fields that decide framing and persistence, as they are read.
#[derive(Default)]
struct FramingFields {
    transfer_encoding: bool,
    /// The last coding of the last Transfer-Encoding field is chunked.
    chunked_last: bool,
    content_length: Option<u64>,
    close: bool,
    keep_alive: bool,
    /// Connection names a field, which is hop-by-hop too.
    names_fields: bool,
    /// A TE field (kept only as `TE: trailers`).
    te: bool,
}

impl FramingFields {
    fn note(&mut self, name: &HeaderName, value: &[u8]) -> Result<(), HeadError> {
        if name == header::TRANSFER_ENCODING {
            self.transfer_encoding = true;
            let last = value.rsplit(|b| *b == b',').next().unwrap_or_default();
            self.chunked_last = trim(last).eq_ignore_ascii_case(b"chunked");
        } else if name == header::CONTENT_LENGTH {
            // A list of equal values is one length (RFC 9110 8.6); any
            // other difference, sign or non-digit is an error.
            for part in value.split(|b| *b == b',') {
                let digits = trim(part);
                if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                    return Err(HeadError::BadContentLength);
                }
                let n = std::str::from_utf8(digits)
                    .ok()
                    .and_then(|d| d.parse::<u64>().ok())
                    .ok_or(HeadError::BadContentLength)?;
                match self.content_length {
                    Some(seen) if seen != n => return Err(HeadError::BadContentLength),
                    _ => self.content_length = Some(n),
                }
            }
        } else if name == header::CONNECTION {
            for token in value.split(|b| *b == b',').map(trim) {
                if token.eq_ignore_ascii_case(b"close") {
                    self.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    self.keep_alive = true;
                } else if !token.is_empty() {
                    self.names_fields = true;
                }
            }
        } else if name == header::TE {
            self.te = true;
        }
        Ok(())
    }
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const LIMIT: usize = 64 * 1024;

    fn parse(text: &str) -> Result<Option<ResponseHead>, HeadError> {
        parse_head(&mut BytesMut::from(text), false, LIMIT)
    }

    fn framing(text: &str) -> Result<(Framing, bool), HeadError> {
        parse(text).map(|h| {
            let h = h.unwrap();
            (h.framing, h.reusable)
        })
    }

    #[test]
    fn a_head_split_anywhere_parses_the_same_and_leaves_the_body() {
        let text =
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Backend: b1\r\nServer: s\r\n\r\nhello";
        let head_len = text.find("\r\n\r\n").unwrap() + 4;
        for cut in 0..text.len() {
            let mut buf = BytesMut::from(&text[..cut]);
            let first = parse_head(&mut buf, false, LIMIT).unwrap();
            let head = match first {
                Some(h) => {
                    assert!(cut >= head_len, "complete at {cut}");
                    h
                }
                None => {
                    assert!(cut < head_len, "incomplete at {cut}");
                    buf.extend_from_slice(&text.as_bytes()[cut..]);
                    parse_head(&mut buf, false, LIMIT).unwrap().unwrap()
                }
            };
            let read = if cut >= head_len { cut } else { text.len() };
            assert_eq!(head.status, StatusCode::OK);
            assert_eq!(head.framing, Framing::Length(5));
            assert_eq!(head.headers["x-backend"], "b1");
            assert_eq!(head.headers.len(), 3);
            assert_eq!(
                &buf[..],
                &text.as_bytes()[head_len..read],
                "the body's bytes stay"
            );
        }
    }

    #[test]
    fn fixed_hop_by_hop_fields_are_left_out_unless_more_must_go() {
        let names = |h: &ResponseHead| -> Vec<String> {
            h.headers.keys().map(|k| k.as_str().to_owned()).collect()
        };
        // The usual answer: Connection names no field, no TE.
        let h = parse(concat!(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n",
            "Transfer-Encoding: chunked\r\nProxy-Connection: x\r\nUpgrade: h2c\r\n",
            "Server: b\r\n\r\n"
        ))
        .unwrap()
        .unwrap();
        assert!(!h.hop_by_hop);
        assert_eq!(names(&h), ["server"]);
        // Left out, still read: the framing and persistence are the fields'.
        assert_eq!((h.framing, h.reusable), (Framing::Chunked, true));
        let h = parse("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.hop_by_hop);
        assert_eq!(names(&h), ["content-length"]);
        assert!(!h.reusable);

        // A field named in Connection, or a TE: everything stays, for the
        // full removal to take out.
        for head in [
            "HTTP/1.1 200 OK\r\nConnection: close, x-secret\r\nX-Secret: s\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTE: trailers\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
        ] {
            let h = parse(head).unwrap().unwrap();
            assert!(h.hop_by_hop, "{head}");
            assert!(h.headers.contains_key(header::CONNECTION), "{head}");
        }
    }

    #[test]
    fn framing_follows_rfc_9112_section_6_3() {
        let ok = |fields: &str| format!("HTTP/1.1 200 OK\r\n{fields}\r\n");
        assert_eq!(
            framing(&ok("Content-Length: 10\r\n")),
            Ok((Framing::Length(10), true))
        );
        assert_eq!(
            framing(&ok("Content-Length: 7, 7\r\nContent-Length: 7\r\n")),
            Ok((Framing::Length(7), true))
        );
        assert_eq!(
            framing(&ok("Transfer-Encoding: chunked\r\n")),
            Ok((Framing::Chunked, true))
        );
        assert_eq!(
            framing(&ok("Transfer-Encoding: gzip, CHUNKED \r\n")),
            Ok((Framing::Chunked, true))
        );
        assert_eq!(
            framing(&ok("Transfer-Encoding: chunked, gzip\r\n")),
            Ok((Framing::UntilClose, false))
        );
        assert_eq!(
            framing(&ok(
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n"
            )),
            Ok((Framing::UntilClose, false))
        );
        assert_eq!(framing(&ok("")), Ok((Framing::UntilClose, false)));
        assert_eq!(
            framing(&ok("Content-Length: 3\r\nConnection: close\r\n")),
            Ok((Framing::Length(3), false))
        );
        assert_eq!(
            framing("HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n"),
            Ok((Framing::Length(3), false))
        );
        assert_eq!(
            framing("HTTP/1.0 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\n"),
            Ok((Framing::Length(3), true))
        );
        for status in [
            "204 No Content",
            "304 Not Modified",
            "100 Continue",
            "103 Early Hints",
        ] {
            let text = format!("HTTP/1.1 {status}\r\nContent-Length: 10\r\n\r\n");
            assert_eq!(framing(&text).unwrap().0, Framing::Empty, "{status}");
        }
        let head = parse_head(
            &mut BytesMut::from(ok("Content-Length: 10\r\n").as_str()),
            true,
            LIMIT,
        );
        assert_eq!(
            head.unwrap().unwrap().framing,
            Framing::Empty,
            "a response to HEAD"
        );
        assert!(
            !framing("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
                .unwrap()
                .1
        );
    }

    #[test]
    fn ambiguous_or_invalid_framing_is_refused() {
        let err = |fields: &str| framing(&format!("HTTP/1.1 200 OK\r\n{fields}\r\n")).unwrap_err();
        assert_eq!(
            err("Content-Length: 3\r\nTransfer-Encoding: chunked\r\n"),
            HeadError::AmbiguousFraming
        );
        assert_eq!(
            err("Transfer-Encoding: chunked\r\nContent-Length: 3\r\n"),
            HeadError::AmbiguousFraming
        );
        for bad in [
            "-1",
            "+3",
            "3 4",
            "",
            "0x10",
            "1,2",
            "99999999999999999999",
            "3,",
        ] {
            assert_eq!(
                err(&format!("Content-Length: {bad}\r\n")),
                HeadError::BadContentLength,
                "{bad:?}"
            );
        }
        assert_eq!(
            err("Content-Length: 3\r\nContent-Length: 4\r\n"),
            HeadError::BadContentLength
        );
        assert_eq!(
            framing("HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap_err(),
            HeadError::TransferEncodingInHttp10
        );
        // Obsolete line folding could hide a field from one parser and not
        // another; httparse refuses it in responses by default.
        assert!(matches!(
            err("X-A: 1\r\n folded\r\n"),
            HeadError::Malformed(_)
        ));
        assert!(matches!(err("Bad Name: 1\r\n"), HeadError::Malformed(_)));
        assert!(matches!(
            framing("HTTP/1.1 2000 OK\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
        assert!(matches!(
            framing("HTTP/1.1 099 Low\r\n\r\n"),
            Err(HeadError::BadStatus)
        ));
        assert!(matches!(
            framing("HTTP/2.0 200 OK\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
    }

    #[test]
    fn heads_past_the_limits_are_refused_before_they_complete() {
        let mut buf = BytesMut::from("HTTP/1.1 200 OK\r\nX-Big: ");
        buf.extend_from_slice(&[b'a'; 2000]);
        assert_eq!(
            parse_head(&mut buf, false, 1024).unwrap_err(),
            HeadError::TooLarge(1024)
        );
        buf.extend_from_slice(b"\r\n\r\n");
        assert_eq!(
            parse_head(&mut buf, false, 1024).unwrap_err(),
            HeadError::TooLarge(1024)
        );
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(
            framing(&format!("HTTP/1.1 200 OK\r\n{many}\r\n")).unwrap_err(),
            HeadError::TooManyHeaders
        );
    }
}
