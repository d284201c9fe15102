//! The server half of our HTTP/1.1, for the requests most traffic is: a
//! bodiless HTTP/1.1 request with an origin-form target and nothing that
//! asks for protocol work (no body, no upgrade, no Expect). Those are
//! parsed here with httparse (hyper's own parser) and served by
//! `ingress::fast`; anything else is handed to hyper with the bytes read,
//! so what this path accepts is a strict subset of what hyper accepts,
//! and it is never looser (the `h1_differential` fuzz target holds it to
//! that). The response head is encoded by `encode_response_head` with
//! hyper's rules for framing, so a client cannot tell the two apart.
//!
//! Pure: the connection feeds bytes in and writes what comes out.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri, Version};

/// Fields a request head may have on this path. A head with more goes to
/// hyper, which applies `--max-headers`.
pub const MAX_FAST_HEADERS: usize = 64;

/// hyper refuses a longer target (414) before anything of ours sees it.
const MAX_TARGET: usize = u16::MAX as usize - 1;

/// What the bytes at the front of a connection's input are.
// Returned once and taken apart at once: a box would be an allocation
// per request for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Head {
    /// A whole request head of `len` bytes this path serves.
    Fast {
        request: Request<()>,
        len: usize,
        asked: Asked,
    },
    /// The start of a head: read more.
    Partial,
    /// Not for this path (a body, an upgrade, an error, a head too large
    /// to hold): hyper takes the connection from here, these bytes first.
    HandOver,
}

/// Sort the bytes read for a request head, at the front of `buf`: a head
/// this path serves is taken out of `buf` (its field values share its
/// bytes), anything else leaves `buf` as it was. `max_head`: the most bytes
/// a head may take here (`--max-header-bytes`); `max_headers`: the most
/// fields (`--max-headers`).
pub fn parse_head(buf: &mut BytesMut, max_head: usize, max_headers: usize) -> Head {
    let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FAST_HEADERS];
    let fields = max_headers.min(MAX_FAST_HEADERS);
    let mut req = httparse::Request::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut req,
        buf,
        &mut storage[..fields],
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) if len <= max_head => len,
        Ok(httparse::Status::Partial) if buf.len() < max_head => return Head::Partial,
        _ => return Head::HandOver,
    };
    let Some(plan) = plan(buf, &req) else {
        return Head::HandOver;
    };
    let asked = plan.asked;
    let head = buf.split_to(len).freeze();
    match plan.build(&head) {
        Some(request) => Head::Fast {
            request,
            len,
            asked,
        },
        None => {
            // Values `http` refuses though httparse took them: never seen,
            // but hyper is the judge of such a head.
            let mut back = BytesMut::from(&head[..]);
            back.extend_from_slice(buf);
            *buf = back;
            Head::HandOver
        }
    }
}

/// A request this path serves, as places in its head: the fields are
/// copied out only once the head's bytes are frozen and can be shared.
struct Plan {
    asked: Asked,
    method: Method,
    target: (usize, usize),
    fields: Vec<(HeaderName, usize, usize)>,
}

/// The request's plan, if this path serves it.
fn plan(buf: &[u8], req: &httparse::Request<'_, '_>) -> Option<Plan> {
    if req.version != Some(1) {
        // HTTP/1.0 has keep-alive rules of its own: hyper's.
        return None;
    }
    let method = Method::from_bytes(req.method?.as_bytes()).ok()?;
    if method == Method::CONNECT {
        return None;
    }
    let target = req.path?;
    if !target.starts_with('/') || target.len() > MAX_TARGET {
        return None;
    }
    let base = buf.as_ptr() as usize;
    let place = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        (start, start + s.len())
    };
    let mut asked = Asked {
        head: method == Method::HEAD,
        trailers: false,
        close: false,
    };
    let mut fields = Vec::with_capacity(req.headers.len());
    for field in req.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes()).ok()?;
        if !plain_field(&name, field.value) {
            return None;
        }
        // Noted as they pass, so that the response need not look them up.
        if name == header::CONNECTION {
            asked.close |= field.value.eq_ignore_ascii_case(b"close");
        } else if name == header::TE {
            asked.trailers |= has_token(field.value, b"trailers");
        }
        let (start, end) = place(field.value);
        fields.push((name, start, end));
    }
    Some(Plan {
        asked,
        method,
        target: place(target.as_bytes()),
        fields,
    })
}

impl Plan {
    fn build(self, head: &Bytes) -> Option<Request<()>> {
        let uri = Uri::from_maybe_shared(head.slice(self.target.0..self.target.1)).ok()?;
        let mut headers = HeaderMap::with_capacity(self.fields.len());
        for (name, start, end) in self.fields {
            let value = HeaderValue::from_maybe_shared(head.slice(start..end)).ok()?;
            headers.append(name, value);
        }
        let mut request = Request::new(());
        *request.method_mut() = self.method;
        *request.uri_mut() = uri;
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() = headers;
        Some(request)
    }
}

/// Whether a field leaves the request plain: one that frames a body, asks
/// for an upgrade or an interim response, or names other fields in
/// Connection is hyper's to handle.
fn plain_field(name: &HeaderName, value: &[u8]) -> bool {
    match *name {
        header::CONTENT_LENGTH | header::TRANSFER_ENCODING | header::UPGRADE | header::EXPECT => {
            false
        }
        header::CONNECTION => {
            value.eq_ignore_ascii_case(b"keep-alive") || value.eq_ignore_ascii_case(b"close")
        }
        _ => true,
    }
}

/// How a response body is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyFraming {
    /// Nothing is sent, whatever the body holds (HEAD, 204, 304, or an
    /// empty body).
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked; trailers the client accepts and the response declared in
    /// its Trailer field are sent, others dropped (as hyper does).
    Chunked { trailers: Option<Vec<HeaderName>> },
}

/// What the body tells of its length: `None` when it is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    Empty,
    Known(u64),
    Unknown,
}

/// What the request asked that shapes its response.
#[derive(Debug, Clone, Copy)]
pub struct Asked {
    pub head: bool,
    /// `TE: trailers`.
    pub trailers: bool,
    /// `Connection: close`: the response is the connection's last.
    pub close: bool,
}

/// Whether a comma-separated field value lists `token` (any case).
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// The response head could not be written as it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("the response has an invalid or conflicting Content-Length")]
    BadContentLength,
    #[error("the response has an interim (1xx) status")]
    Interim,
}

/// Write the head of `status` with `headers` into `dst`, as hyper's server
/// writes it: lower-case names, a Content-Length or chunked coding chosen
/// from the fields and the body, a Date if there is none, and
/// `Connection: close` when `last` and the response does not say so.
/// Returns how the body is to be sent and whether the connection must
/// close after it (`last`, or the response's own Connection: close).
pub fn encode_response_head(
    status: StatusCode,
    headers: &HeaderMap,
    body: BodyLength,
    asked: Asked,
    last: bool,
    date: &[u8],
    dst: &mut Vec<u8>,
) -> Result<(BodyFraming, bool), EncodeError> {
    if status.is_informational() {
        return Err(EncodeError::Interim);
    }
    status_line(status, dst);
    let no_body =
        asked.head || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let may_have_length = status != StatusCode::NO_CONTENT && status != StatusCode::NOT_MODIFIED;
    let mut framing = None;
    let mut closes = last;
    let mut declared: Option<Vec<HeaderName>> = None;
    let mut has_date = false;
    let mut wrote_length: Option<u64> = None;
    // Written as one field, after the others: hyper joins them so.
    let mut codings: Vec<&HeaderValue> = Vec::new();
    for (name, value) in headers {
        match *name {
            header::CONTENT_LENGTH => {
                if body == BodyLength::Empty && !asked.head {
                    // hyper drops it too: nothing follows.
                    continue;
                }
                let n = parse_length(value.as_bytes()).ok_or(EncodeError::BadContentLength)?;
                if framing.is_some() && wrote_length.is_none() {
                    // After a Transfer-Encoding: hyper refuses both.
                    return Err(EncodeError::BadContentLength);
                }
                match wrote_length {
                    Some(prev) if prev != n => return Err(EncodeError::BadContentLength),
                    Some(_) => continue,
                    None => wrote_length = Some(n),
                }
                framing.get_or_insert(BodyFraming::Length(n));
                // One value, as RFC 9110 8.6 has a list of equal ones
                // replaced before it is forwarded.
                field(
                    b"content-length",
                    itoa::Buffer::new().format(n).as_bytes(),
                    dst,
                );
                continue;
            }
            header::TRANSFER_ENCODING => {
                if no_body {
                    continue;
                }
                if wrote_length.is_some() {
                    return Err(EncodeError::BadContentLength);
                }
                framing = Some(BodyFraming::Chunked { trailers: None });
                codings.push(value);
                continue;
            }
            header::CONNECTION => {
                closes |= connection_close(value.as_bytes());
            }
            header::DATE => has_date = true,
            header::TRAILER => {
                if no_body {
                    continue;
                }
                let names = value.to_str().unwrap_or_default().split(',');
                let names = names.filter_map(|s| HeaderName::from_bytes(s.trim().as_bytes()).ok());
                declared.get_or_insert_with(Vec::new).extend(names);
            }
            _ => {}
        }
        field(name.as_str().as_bytes(), value.as_bytes(), dst);
    }
    let framing = match framing {
        Some(BodyFraming::Chunked { .. }) => {
            write_codings(&codings, dst);
            BodyFraming::Chunked {
                trailers: declared.filter(|_| asked.trailers),
            }
        }
        Some(length) => length,
        None => match body {
            BodyLength::Unknown if !no_body => {
                field(b"transfer-encoding", b"chunked", dst);
                BodyFraming::Chunked {
                    trailers: declared.filter(|_| asked.trailers),
                }
            }
            BodyLength::Unknown => BodyFraming::None,
            BodyLength::Empty | BodyLength::Known(0) => {
                if may_have_length && !asked.head {
                    field(b"content-length", b"0", dst);
                }
                BodyFraming::None
            }
            BodyLength::Known(n) => {
                if may_have_length {
                    field(
                        b"content-length",
                        itoa::Buffer::new().format(n).as_bytes(),
                        dst,
                    );
                }
                BodyFraming::Length(n)
            }
        },
    };
    if last
        && !headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| connection_close(v.as_bytes()))
    {
        field(b"connection", b"close", dst);
    }
    if !has_date {
        field(b"date", date, dst);
    }
    dst.extend_from_slice(b"\r\n");
    let framing = if no_body { BodyFraming::None } else { framing };
    Ok((framing, closes))
}

fn status_line(status: StatusCode, dst: &mut Vec<u8>) {
    if status == StatusCode::OK {
        dst.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        return;
    }
    dst.extend_from_slice(b"HTTP/1.1 ");
    dst.extend_from_slice(status.as_str().as_bytes());
    dst.push(b' ');
    // A reason must be written: many parsers expect one.
    let reason = status.canonical_reason().unwrap_or("<none>");
    dst.extend_from_slice(reason.as_bytes());
    dst.extend_from_slice(b"\r\n");
}

fn field(name: &[u8], value: &[u8], dst: &mut Vec<u8>) {
    dst.extend_from_slice(name);
    dst.extend_from_slice(b": ");
    dst.extend_from_slice(value);
    dst.extend_from_slice(b"\r\n");
}

/// A Content-Length value as our HTTP/1.1 client and hyper take it: digits,
/// or a list of equal ones (RFC 9110 8.6).
fn parse_length(value: &[u8]) -> Option<u64> {
    let mut length = None;
    for part in value.split(|b| *b == b',') {
        let digits = part.trim_ascii();
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
        if length.is_some_and(|l| l != n) {
            return None;
        }
        length = Some(n);
    }
    length
}

fn connection_close(value: &[u8]) -> bool {
    has_token(value, b"close")
}

/// The Transfer-Encoding values as one field, chunked last: the body is
/// sent chunked whatever codings the response names before it (hyper adds
/// the chunked coding a field left out).
fn write_codings(codings: &[&HeaderValue], dst: &mut Vec<u8>) {
    dst.extend_from_slice(b"transfer-encoding: ");
    for (i, value) in codings.iter().enumerate() {
        if i > 0 {
            dst.extend_from_slice(b", ");
        }
        dst.extend_from_slice(value.as_bytes());
    }
    let last = codings
        .last()
        .and_then(|v| v.as_bytes().rsplit(|b| *b == b',').next());
    if !last.is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked")) {
        dst.extend_from_slice(b", chunked");
    }
    dst.extend_from_slice(b"\r\n");
}

/// The fields of a trailer section that may be sent: declared in the
/// response's Trailer field, and none of those RFC 9110 6.5.1 keeps out of
/// trailers (hyper's list).
pub fn encode_trailers(trailers: &HeaderMap, declared: &[HeaderName], dst: &mut Vec<u8>) {
    dst.extend_from_slice(b"0\r\n");
    for (name, value) in trailers {
        if declared.contains(name) && trailer_allowed(name) {
            field(name.as_str().as_bytes(), value.as_bytes(), dst);
        }
    }
    dst.extend_from_slice(b"\r\n");
}

fn trailer_allowed(name: &HeaderName) -> bool {
    !matches!(
        *name,
        header::AUTHORIZATION
            | header::CACHE_CONTROL
            | header::CONTENT_ENCODING
            | header::CONTENT_LENGTH
            | header::CONTENT_RANGE
            | header::CONTENT_TYPE
            | header::HOST
            | header::MAX_FORWARDS
            | header::SET_COOKIE
            | header::TRAILER
            | header::TRANSFER_ENCODING
            | header::TE
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Head {
        parse_head(&mut BytesMut::from(text.as_bytes()), 8192, 100)
    }

    #[test]
    fn a_plain_get_is_served_here_and_its_values_share_the_head() {
        let text = "GET /a?b=c HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\nGET /next";
        let mut buf = BytesMut::from(text.as_bytes());
        let Head::Fast {
            request,
            len,
            asked,
        } = parse_head(&mut buf, 8192, 100)
        else {
            panic!("a plain GET is this path's");
        };
        assert_eq!(len, text.find("GET /next").unwrap_or_default());
        assert_eq!(&buf[..], b"GET /next", "the head is taken out");
        assert!(!asked.head && !asked.close && !asked.trailers);
        let text = "HEAD / HTTP/1.1\r\nTE: gzip, Trailers\r\nConnection: close\r\n\r\n";
        let Head::Fast { asked, .. } = parse(text) else {
            panic!("a plain HEAD is this path's");
        };
        assert!(asked.head && asked.close && asked.trailers);
        assert_eq!(request.uri(), "/a?b=c");
        assert_eq!(request.headers()["host"], "x");
        assert_eq!(request.headers().len(), 2);
    }

    #[test]
    fn anything_with_protocol_work_goes_to_hyper() {
        for text in [
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na",
            "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: x-hop\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: x\r\n\r\n",
            "CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "GET /\x01 HTTP/1.1\r\n\r\n",
            "\r\nGET / HTTP/1.1\r\n\n\r\n",
        ] {
            assert!(
                matches!(parse(text), Head::HandOver | Head::Fast { .. }),
                "{text:?}"
            );
            if let Head::Fast { .. } = parse(text) {
                assert!(text.starts_with("\r\n"), "{text:?} should go to hyper");
            }
        }
    }

    #[test]
    fn a_head_over_the_limit_goes_to_hyper_and_a_partial_one_waits() {
        let head = &b"GET / HTTP/1.1\r\nHost: x\r\n"[..];
        assert!(matches!(
            parse_head(&mut head.into(), 8192, 100),
            Head::Partial
        ));
        let mut over = BytesMut::from(head);
        assert!(matches!(parse_head(&mut over, 20, 100), Head::HandOver));
        assert_eq!(&over[..], head, "handed over whole");
        let whole = &b"GET / HTTP/1.1\r\nHost: x\r\nA: 1\r\n\r\n"[..];
        assert!(matches!(
            parse_head(&mut whole.into(), 8192, 1),
            Head::HandOver
        ));
        let many: String = (0..MAX_FAST_HEADERS + 1)
            .map(|i| format!("f{i}: v\r\n"))
            .collect();
        assert!(matches!(
            parse(&format!("GET / HTTP/1.1\r\n{many}\r\n")),
            Head::HandOver
        ));
    }

    fn encode(
        status: u16,
        fields: &[(&str, &str)],
        body: BodyLength,
        asked: Asked,
        last: bool,
    ) -> (String, BodyFraming, bool) {
        let mut headers = HeaderMap::new();
        for (n, v) in fields {
            headers.append(
                HeaderName::from_bytes(n.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        let mut dst = Vec::new();
        let status = StatusCode::from_u16(status).expect("status");
        let (framing, closes) =
            encode_response_head(status, &headers, body, asked, last, b"D", &mut dst)
                .expect("encodes");
        (String::from_utf8(dst).expect("text"), framing, closes)
    }

    const GET: Asked = Asked {
        head: false,
        trailers: false,
        close: false,
    };

    #[test]
    fn response_framing_follows_hypers_rules() {
        let (text, framing, closes) = encode(
            200,
            &[("content-type", "text/plain")],
            BodyLength::Known(5),
            GET,
            false,
        );
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\ndate: D\r\n\r\n"
        );
        assert_eq!((framing, closes), (BodyFraming::Length(5), false));

        let (text, framing, _) = encode(502, &[], BodyLength::Unknown, GET, true);
        assert_eq!(text, "HTTP/1.1 502 Bad Gateway\r\ntransfer-encoding: chunked\r\nconnection: close\r\ndate: D\r\n\r\n");
        assert_eq!(framing, BodyFraming::Chunked { trailers: None });

        let (text, framing, _) = encode(
            200,
            &[("content-length", "9")],
            BodyLength::Known(9),
            Asked {
                head: true,
                trailers: false,
                close: false,
            },
            false,
        );
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ncontent-length: 9\r\ndate: D\r\n\r\n"
        );
        assert_eq!(framing, BodyFraming::None);

        let (text, framing, _) = encode(204, &[], BodyLength::Empty, GET, false);
        assert_eq!(text, "HTTP/1.1 204 No Content\r\ndate: D\r\n\r\n");
        assert_eq!(framing, BodyFraming::None);

        let (text, _, _) = encode(200, &[], BodyLength::Empty, GET, false);
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\ndate: D\r\n\r\n"
        );

        let (text, framing, _) = encode(
            200,
            &[("content-length", "5, 5")],
            BodyLength::Unknown,
            GET,
            false,
        );
        assert_eq!(
            framing,
            BodyFraming::Length(5),
            "a list of equal lengths, as our client takes"
        );
        assert!(text.contains("content-length: 5\r\n"), "one value: {text}");

        let (_, _, closes) = encode(
            200,
            &[("connection", "close"), ("date", "x")],
            BodyLength::Empty,
            GET,
            false,
        );
        assert!(closes, "the response's own close is kept");

        let fields = [
            ("transfer-encoding", "chunked"),
            ("trailer", "grpc-status, set-cookie"),
        ];
        let (_, framing, _) = encode(
            200,
            &fields,
            BodyLength::Unknown,
            Asked {
                head: false,
                trailers: true,
                close: false,
            },
            false,
        );
        let BodyFraming::Chunked {
            trailers: Some(names),
        } = framing
        else {
            panic!("chunked with trailers")
        };
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        trailers.insert("set-cookie", HeaderValue::from_static("a=b"));
        trailers.insert("x-undeclared", HeaderValue::from_static("1"));
        let mut dst = Vec::new();
        encode_trailers(&trailers, &names, &mut dst);
        assert_eq!(dst, b"0\r\ngrpc-status: 0\r\n\r\n");
    }

    #[test]
    fn a_response_head_that_cannot_be_framed_is_an_error() {
        let mut dst = Vec::new();
        let mut headers = HeaderMap::new();
        headers.append("content-length", HeaderValue::from_static("1"));
        headers.append("content-length", HeaderValue::from_static("2"));
        let got = encode_response_head(
            StatusCode::OK,
            &headers,
            BodyLength::Unknown,
            GET,
            false,
            b"D",
            &mut dst,
        );
        assert_eq!(got, Err(EncodeError::BadContentLength));
        let got = encode_response_head(
            StatusCode::CONTINUE,
            &HeaderMap::new(),
            BodyLength::Empty,
            GET,
            false,
            b"D",
            &mut dst,
        );
        assert_eq!(got, Err(EncodeError::Interim));
    }
}
