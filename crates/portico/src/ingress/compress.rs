//! Response compression (`--compress`, or `compress` on a route): the
//! coding a client accepts (Accept-Encoding, pure), whether a response may
//! be compressed (its head, pure), and `Encoded`, the body that compresses a
//! response as it streams. The request path calls `plan` once the route is
//! known and `apply` on the response that leaves.
//!
//! Codings, in the server's order of preference when the client's weights
//! tie: zstd, then gzip, then Brotli, cheapest first for output within 10%
//! of each other at the levels chosen for speed. On the pages measured
//! (docs/benchmarks.md, "compression (issue 19)") zstd 3 took a third to a
//! half of gzip 3's CPU for 5% more bytes, and Brotli 4 (the brotli crate)
//! 1.4 to 2 times gzip's for the same bytes: Brotli only made smaller
//! output from level 5 up, at twice gzip's CPU. A client that weighs
//! Brotli higher still gets it.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use async_compression::tokio::bufread::{BrotliEncoder, GzipEncoder, ZstdEncoder};
use async_compression::Level;
use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncBufRead, AsyncRead, ReadBuf};

/// A body shorter than this is sent as it is: a few hundred bytes gain
/// little, and the coding's own framing eats part of that.
pub const MIN_BYTES: u64 = 1024;

/// The most a compressed frame carries; a 20 KB page fits in one.
const FRAME_BYTES: usize = 16 * 1024;

/// The most input one poll of a compressed body takes. A backend that has
/// megabytes ready of something that compresses 100 to 1 would otherwise
/// keep the worker thread encoding for as long, its other connections
/// waiting; past this the body flushes and yields.
const INPUT_PER_POLL: usize = 128 * 1024;

/// Levels chosen for speed (the figures are in docs/benchmarks.md): each
/// the last before the CPU per response climbs faster than the bytes fall.
pub const GZIP_LEVEL: i32 = 3;
pub const BROTLI_LEVEL: i32 = 4;
pub const ZSTD_LEVEL: i32 = 3;
/// Brotli's window (log2 bytes): 256 KiB rather than its default 4 MiB,
/// which bounds what one response's encoder may hold, and costs less to
/// set up (a 20 KB page took twice the CPU with the 4 MiB window).
const BROTLI_WINDOW_LOG: i32 = 18;
/// zstd's window (log2 bytes), for the same reason: its level 3 would use
/// 2 MiB on a long body.
const ZSTD_WINDOW_LOG: u32 = 18;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A content coding Portico can apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Zstd,
    Brotli,
    Gzip,
}

/// Best first: the order in which equal weights are broken.
const PREFERENCE: [Coding; 3] = [Coding::Zstd, Coding::Gzip, Coding::Brotli];

impl Coding {
    /// Its Content-Encoding token.
    pub fn token(self) -> &'static str {
        match self {
            Coding::Zstd => "zstd",
            Coding::Brotli => "br",
            Coding::Gzip => "gzip",
        }
    }

    fn index(self) -> usize {
        match self {
            Coding::Zstd => 0,
            Coding::Gzip => 1,
            Coding::Brotli => 2,
        }
    }

    fn level(self) -> i32 {
        match self {
            Coding::Zstd => ZSTD_LEVEL,
            Coding::Brotli => BROTLI_LEVEL,
            Coding::Gzip => GZIP_LEVEL,
        }
    }
}

/// What a request's response may get: nothing (compression is off for its
/// route), or compression with the coding the client prefers (`None`: the
/// client takes none of ours, yet the response still varies by
/// Accept-Encoding).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Plan {
    #[default]
    Off,
    On(Option<Coding>),
}

/// The plan for a request, from its route's setting and its Accept-Encoding.
pub fn plan(enabled: bool, request: &HeaderMap) -> Plan {
    match enabled {
        true => Plan::On(accepted(request)),
        false => Plan::Off,
    }
}

/// The coding to use for a request's response, from its Accept-Encoding
/// fields (RFC 9110 section 12.5.3): the highest weight wins, ties go to
/// `PREFERENCE`; `q=0` refuses a coding; `*` weighs every coding not named;
/// `x-gzip` is gzip. An element whose weight is malformed (`q=`, `q=0.5x`,
/// `q=2`, more than three decimals) is ignored, as is a coding we do not
/// have. A coding named twice gets the lower of its weights, so that a
/// refusal anywhere stands. `identity` named with a higher weight than
/// every coding we have means: send it as it is.
pub fn accepted(request: &HeaderMap) -> Option<Coding> {
    // Thousandths, per coding in `PREFERENCE` order; `None`: not named.
    let mut named: [Option<u16>; 3] = [None; 3];
    let mut star: Option<u16> = None;
    let mut identity: Option<u16> = None;
    for field in request.get_all(header::ACCEPT_ENCODING) {
        let Ok(text) = field.to_str() else { continue };
        for element in text.split(',') {
            let Some((name, weight)) = element_weight(element) else {
                continue;
            };
            let slot = if name.eq_ignore_ascii_case("gzip") || name.eq_ignore_ascii_case("x-gzip") {
                &mut named[Coding::Gzip.index()]
            } else if name.eq_ignore_ascii_case("br") {
                &mut named[Coding::Brotli.index()]
            } else if name.eq_ignore_ascii_case("zstd") {
                &mut named[Coding::Zstd.index()]
            } else if name == "*" {
                &mut star
            } else if name.eq_ignore_ascii_case("identity") {
                &mut identity
            } else {
                continue;
            };
            *slot = Some(slot.map_or(weight, |w| w.min(weight)));
        }
    }
    let mut best: Option<(u16, Coding)> = None;
    for coding in PREFERENCE {
        let Some(weight) = named[coding.index()].or(star) else {
            continue;
        };
        if weight > 0 && best.is_none_or(|(w, _)| weight > w) {
            best = Some((weight, coding));
        }
    }
    let (weight, coding) = best?;
    match identity {
        Some(id) if id > weight => None,
        _ => Some(coding),
    }
}

/// One Accept-Encoding element: its coding and weight in thousandths, or
/// `None` when it is empty or its weight is malformed.
fn element_weight(element: &str) -> Option<(&str, u16)> {
    let mut parts = element.split(';');
    let name = parts.next()?.trim();
    if name.is_empty() {
        return None;
    }
    let mut weight = 1000;
    for param in parts {
        let param = param.trim();
        if param.is_empty() {
            continue;
        }
        let (key, value) = param.split_once('=')?;
        if key.trim().eq_ignore_ascii_case("q") {
            weight = qvalue(value.trim())?;
        }
    }
    Some((name, weight))
}

/// RFC 9110 section 12.4.2: `0[.ddd]` or `1[.000]`, in thousandths.
fn qvalue(text: &str) -> Option<u16> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if fraction.len() > 3 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let thousandths = fraction
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(3)
        .fold(0u16, |n, b| n * 10 + u16::from(b - b'0'));
    match whole {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

/// How a response stands for compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Left as it is: its representation does not vary by Accept-Encoding.
    Untouched,
    /// It could have been compressed for another request (another
    /// Accept-Encoding, or GET rather than HEAD): only `Vary` is added.
    Varies,
    /// Compress it.
    Compress(Coding),
}

/// What `apply` does to a response of `status` and `headers` whose body
/// length is `length` (when known), for a request with `method` and
/// `plan`. Pure.
pub fn verdict(
    plan: Plan,
    method: &Method,
    status: StatusCode,
    headers: &HeaderMap,
    length: Option<u64>,
) -> Verdict {
    let Plan::On(coding) = plan else {
        return Verdict::Untouched;
    };
    if status == StatusCode::NOT_MODIFIED {
        // RFC 9110 section 15.4.5: a 304 carries the Vary (and the ETag)
        // the 200 would have. Whether the 200 would have been compressed
        // is unknown here; a Vary and a weak ETag are harmless if not.
        return Verdict::Varies;
    }
    if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::PARTIAL_CONTENT
        || headers.contains_key(header::CONTENT_RANGE)
        || headers.contains_key(header::CONTENT_ENCODING)
        || INTEGRITY.iter().any(|name| headers.contains_key(*name))
        || no_transform(headers)
        || !headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(compressible_type)
        || length.is_some_and(|n| n < MIN_BYTES)
    {
        return Verdict::Untouched;
    }
    match coding {
        Some(c) if method != Method::HEAD => Verdict::Compress(c),
        _ => Verdict::Varies,
    }
}

/// Fields that vouch for the exact bytes sent: compressing would make them
/// lie, so such a response is left as it is.
const INTEGRITY: [&str; 4] = ["content-digest", "repr-digest", "digest", "content-md5"];

/// `Cache-Control: no-transform` (RFC 9111 section 5.2.2.6), in any of the
/// response's Cache-Control fields.
fn no_transform(headers: &HeaderMap) -> bool {
    headers.get_all(header::CACHE_CONTROL).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|d| d.trim().eq_ignore_ascii_case("no-transform"))
        })
    })
}

/// The text types: `text/*` but event streams (each event must reach the
/// client at once, and stay readable by EventSource), JavaScript, JSON,
/// XML and their `+json`/`+xml` kinds (SVG among them). Not gRPC, whose
/// messages are framed and compressed by gRPC itself, nor images, video,
/// audio, fonts or archives, which are compressed already.
pub fn compressible_type(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    let Some((kind, sub)) = essence.split_once('/') else {
        return false;
    };
    let is = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
    let ends = |s: &str, suffix: &str| {
        s.len() >= suffix.len()
            && s.is_char_boundary(s.len() - suffix.len())
            && is(&s[s.len() - suffix.len()..], suffix)
    };
    if is(kind, "text") {
        return !is(sub, "event-stream");
    }
    if is(kind, "application") {
        if sub.len() >= 4 && sub.is_char_boundary(4) && is(&sub[..4], "grpc") {
            return false;
        }
        return ["javascript", "x-javascript", "ecmascript", "json", "xml"]
            .iter()
            .any(|t| is(sub, t))
            || ends(sub, "+json")
            || ends(sub, "+xml");
    }
    ends(sub, "+xml")
}

/// A body that can be replaced by its compressed form.
pub trait Compressible: Body + Sized {
    fn compressed(self, coding: Coding) -> Self;
}

/// The response as it should leave, by `verdict`: a compressed one loses
/// Content-Length and Accept-Ranges, gets Content-Encoding, a weak ETag,
/// and its body streams through the encoder; one that merely varies gets
/// `Vary: Accept-Encoding` (a 304 its ETag weakened too).
pub fn apply<B: Compressible>(plan: Plan, method: &Method, response: Response<B>) -> Response<B> {
    if plan == Plan::Off {
        return response;
    }
    let length = content_length(response.headers()).or(response.body().size_hint().exact());
    let verdict = verdict(plan, method, response.status(), response.headers(), length);
    let (mut head, body) = response.into_parts();
    let body = match verdict {
        Verdict::Untouched => body,
        Verdict::Varies => {
            add_vary(&mut head.headers);
            if head.status == StatusCode::NOT_MODIFIED && matches!(plan, Plan::On(Some(_))) {
                weaken_etag(&mut head.headers);
            }
            body
        }
        Verdict::Compress(_)
            if ENCODERS.load(std::sync::atomic::Ordering::Relaxed) >= MAX_ENCODERS =>
        {
            tracing::debug!(max = MAX_ENCODERS, "compression: at the cap of responses compressed at once; this one goes uncompressed");
            add_vary(&mut head.headers);
            body
        }
        Verdict::Compress(coding) => {
            add_vary(&mut head.headers);
            weaken_etag(&mut head.headers);
            head.headers.remove(header::CONTENT_LENGTH);
            head.headers.remove(header::ACCEPT_RANGES);
            head.headers.insert(
                header::CONTENT_ENCODING,
                HeaderValue::from_static(coding.token()),
            );
            body.compressed(coding)
        }
    };
    Response::from_parts(head, body)
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Adds `Accept-Encoding` to the response's Vary, kept as one field:
/// unless it is there already, or Vary is `*`.
pub fn add_vary(headers: &mut HeaderMap) {
    let mut existing = Vec::new();
    let mut text = true;
    for value in headers.get_all(header::VARY) {
        for name in value
            .as_bytes()
            .split(|b| *b == b',')
            .map(<[u8]>::trim_ascii)
        {
            if name == b"*" || name.eq_ignore_ascii_case(b"accept-encoding") {
                return;
            }
            match std::str::from_utf8(name) {
                Ok(n) if !n.is_empty() => existing.push(n),
                Ok(_) => {}
                Err(_) => text = false,
            }
        }
    }
    let joined = match (existing.is_empty(), text) {
        (true, true) => None,
        (false, true) => HeaderValue::from_str(&(existing.join(", ") + ", accept-encoding")).ok(),
        // Not text: left alone, ours added beside it.
        (_, false) => {
            headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
            return;
        }
    };
    headers.insert(
        header::VARY,
        joined.unwrap_or(HeaderValue::from_static("accept-encoding")),
    );
}

/// A strong ETag names exact bytes, which compression changes: it becomes
/// weak (`"x"` -> `W/"x"`), as nginx and tower-http do.
pub fn weaken_etag(headers: &mut HeaderMap) {
    if let header::Entry::Occupied(mut entry) = headers.entry(header::ETAG) {
        for value in entry.iter_mut() {
            if value.as_bytes().first() == Some(&b'"') {
                let mut weak = Vec::with_capacity(value.len() + 2);
                weak.extend_from_slice(b"W/");
                weak.extend_from_slice(value.as_bytes());
                if let Ok(v) = HeaderValue::from_bytes(&weak) {
                    *value = v;
                }
            }
        }
    }
}

/// A response body compressed as it streams. Each frame of the inner body
/// goes into the encoder as it comes; when the inner body has nothing more
/// for now (its poll is pending) the encoder flushes what it holds
/// (async-compression's bufread encoder does, on a pending read that
/// follows input), so a chunk a backend wrote reaches the client without
/// waiting for the next. Trailers pass through after the last data.
pub struct Encoded<B> {
    encoder: Encoder<B>,
    out: BytesMut,
    /// The encoder has ended (or failed): only trailers are left.
    finished: bool,
    _slot: EncoderSlot,
}

/// Responses being compressed at once, at most. An encoder's state is
/// large (zstd's about 0.9 MiB with its window, Brotli's 0.8, gzip's 0.2),
/// and a client that reads slowly keeps it for as long as it likes: past
/// this many, responses go out uncompressed (still correct, only larger)
/// rather than let clients choose the proxy's memory. At the cap, about
/// 230 MiB.
pub const MAX_ENCODERS: usize = 256;

static ENCODERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One of the `MAX_ENCODERS` places, given back when the body is dropped.
struct EncoderSlot;

impl EncoderSlot {
    /// Counted whether or not the cap is reached: `apply` looks first, and
    /// workers racing past it overshoot by at most one each.
    fn count() -> Self {
        ENCODERS.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        EncoderSlot
    }
}

impl Drop for EncoderSlot {
    fn drop(&mut self) {
        ENCODERS.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

enum Encoder<B> {
    Gzip(GzipEncoder<Source<B>>),
    /// Boxed: Brotli's state is 5.7 KB inline, the others' a few hundred
    /// bytes.
    Brotli(Box<BrotliEncoder<Source<B>>>),
    Zstd(ZstdEncoder<Source<B>>),
}

impl<B> Encoded<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// `body` compressed with `coding` at the level chosen for it.
    pub fn new(body: B, coding: Coding) -> Self {
        Self::with_level(body, coding, coding.level())
    }

    /// At a given level: for measuring (examples/compress_levels.rs).
    pub fn with_level(body: B, coding: Coding, level: i32) -> Self {
        let source = Source {
            body,
            chunk: Bytes::new(),
            ended: false,
            trailers: None,
            budget: 0,
        };
        let level = Level::Precise(level);
        let encoder = match coding {
            Coding::Gzip => Encoder::Gzip(GzipEncoder::with_quality(source, level)),
            Coding::Brotli => {
                let params = async_compression::brotli::EncoderParams::default()
                    .quality(level)
                    .window_size(BROTLI_WINDOW_LOG)
                    .text_mode();
                Encoder::Brotli(Box::new(BrotliEncoder::with_params(source, params)))
            }
            Coding::Zstd => Encoder::Zstd(ZstdEncoder::with_quality_and_params(
                source,
                level,
                &[async_compression::zstd::CParameter::window_log(
                    ZSTD_WINDOW_LOG,
                )],
            )),
        };
        Self {
            encoder,
            out: BytesMut::new(),
            finished: false,
            _slot: EncoderSlot::count(),
        }
    }

    fn source(&mut self) -> &mut Source<B> {
        match &mut self.encoder {
            Encoder::Gzip(e) => e.get_mut(),
            Encoder::Brotli(e) => e.get_mut(),
            Encoder::Zstd(e) => e.get_mut(),
        }
    }

    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.out.reserve(FRAME_BYTES);
        match &mut self.encoder {
            Encoder::Gzip(e) => tokio_util::io::poll_read_buf(Pin::new(e), cx, &mut self.out),
            Encoder::Brotli(e) => tokio_util::io::poll_read_buf(Pin::new(e), cx, &mut self.out),
            Encoder::Zstd(e) => tokio_util::io::poll_read_buf(Pin::new(e), cx, &mut self.out),
        }
    }
}

impl<B> Body for Encoded<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(
                this.source()
                    .trailers
                    .take()
                    .map(|t| Ok(Frame::trailers(t))),
            );
        }
        this.source().budget = INPUT_PER_POLL;
        match ready!(this.poll_read(cx)) {
            Ok(0) => {
                this.finished = true;
                Poll::Ready(
                    this.source()
                        .trailers
                        .take()
                        .map(|t| Ok(Frame::trailers(t))),
                )
            }
            Ok(_) => Poll::Ready(Some(Ok(Frame::data(this.out.split().freeze())))),
            Err(e) => {
                this.finished = true;
                this.source().trailers = None;
                Poll::Ready(Some(Err(body_error(e))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let source = match &self.encoder {
            Encoder::Gzip(e) => e.get_ref(),
            Encoder::Brotli(e) => e.get_ref(),
            Encoder::Zstd(e) => e.get_ref(),
        };
        self.finished && source.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// The inner body's own error when that is what failed, else the codec's.
fn body_error(e: io::Error) -> BoxError {
    if e.get_ref().is_some_and(|inner| inner.is::<SourceError>()) {
        if let Some(inner) = e.into_inner() {
            if let Ok(source) = inner.downcast::<SourceError>() {
                return source.0;
            }
        }
        return Box::new(io::Error::other("response body failed"));
    }
    Box::new(e)
}

/// The inner body's error, carried through the encoder's io::Error.
#[derive(Debug)]
struct SourceError(BoxError);

impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SourceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// The inner body as a buffered reader for the encoder: its data frames
/// in order; trailers kept aside for `Encoded` to send after the data.
struct Source<B> {
    body: B,
    chunk: Bytes,
    /// The body returned its end: never polled again.
    ended: bool,
    trailers: Option<HeaderMap>,
    /// Bytes this poll of `Encoded` may still take (`INPUT_PER_POLL`).
    budget: usize,
}

impl<B> AsyncBufRead for Source<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        if this.budget == 0 {
            // Seen by the encoder as a backend with nothing more for now:
            // it flushes what it has, and the task yields.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        while this.chunk.is_empty() && !this.ended {
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                None => this.ended = true,
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.chunk = data,
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            this.trailers = Some(trailers);
                        }
                    }
                },
                Some(Err(e)) => {
                    this.ended = true;
                    return Poll::Ready(Err(io::Error::other(SourceError(e.into()))));
                }
            }
        }
        let n = this.chunk.len().min(this.budget);
        Poll::Ready(Ok(&this.chunk[..n]))
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        let this = self.get_mut();
        this.chunk.advance(amt);
        this.budget = this.budget.saturating_sub(amt);
    }
}

impl<B> AsyncRead for Source<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let data = ready!(self.as_mut().poll_fill_buf(cx))?;
        let n = data.len().min(buf.remaining());
        buf.put_slice(&data[..n]);
        self.consume(n);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn accept(values: &[&str]) -> Option<Coding> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
        }
        accepted(&h)
    }

    #[test]
    fn the_highest_weight_wins_and_ties_go_to_our_preference() {
        assert_eq!(accept(&["gzip, deflate, br, zstd"]), Some(Coding::Zstd));
        assert_eq!(accept(&["gzip, deflate, br"]), Some(Coding::Gzip));
        assert_eq!(accept(&["deflate, br"]), Some(Coding::Brotli));
        assert_eq!(accept(&["gzip;q=0.9, br"]), Some(Coding::Brotli));
        assert_eq!(accept(&["gzip"]), Some(Coding::Gzip));
        assert_eq!(accept(&["br;q=0.5, gzip;q=0.8"]), Some(Coding::Gzip));
        assert_eq!(accept(&["zstd;q=0.1, br;q=0.9, gzip"]), Some(Coding::Gzip));
        // Several fields are one list.
        assert_eq!(accept(&["gzip;q=0.5", "br;q=0.6"]), Some(Coding::Brotli));
        assert_eq!(accept(&[]), None);
        assert_eq!(accept(&[""]), None);
    }

    #[test]
    fn zero_refuses_and_star_covers_the_unnamed() {
        assert_eq!(accept(&["gzip;q=0"]), None);
        assert_eq!(accept(&["zstd;q=0, br;q=0, gzip"]), Some(Coding::Gzip));
        assert_eq!(accept(&["*"]), Some(Coding::Zstd));
        assert_eq!(accept(&["*;q=0"]), None);
        assert_eq!(accept(&["*;q=0, gzip"]), Some(Coding::Gzip));
        assert_eq!(accept(&["zstd;q=0, *"]), Some(Coding::Gzip));
        assert_eq!(accept(&["zstd;q=0, gzip;q=0, *"]), Some(Coding::Brotli));
        assert_eq!(accept(&["*;q=0.2, gzip;q=0.5"]), Some(Coding::Gzip));
        assert_eq!(accept(&["gzip;q=0.000"]), None);
    }

    #[test]
    fn odd_weights_are_read_by_the_grammar_or_ignored() {
        // At most three decimals: q=1.0000 is not a weight; the element goes.
        assert_eq!(accept(&["gzip;q=1.0000"]), None);
        assert_eq!(accept(&["gzip;q=1.000, br;q=1.0000"]), Some(Coding::Gzip));
        assert_eq!(accept(&["gzip;q=1."]), Some(Coding::Gzip));
        for bad in [
            "q=0.5x", "q=", "q=2", "q=1.5", "q=-1", "q=.5", "q=0.1234", "q", "q=1e0",
        ] {
            assert_eq!(accept(&[&format!("gzip;{bad}")]), None, "{bad}");
            assert_eq!(
                accept(&[&format!("br;{bad}, gzip;q=0.1")]),
                Some(Coding::Gzip),
                "{bad} leaves the other elements"
            );
        }
        // Names and parameter names are case-insensitive; whitespace around
        // the parts is allowed.
        assert_eq!(accept(&["GZIP;Q=0.5"]), Some(Coding::Gzip));
        assert_eq!(
            accept(&["  Br ;  q=0.7 ,gzip ; q=0.6 "]),
            Some(Coding::Brotli)
        );
        assert_eq!(accept(&["BR, Gzip;q=0.9"]), Some(Coding::Brotli));
        assert_eq!(accept(&["x-gzip"]), Some(Coding::Gzip));
        // Empty elements and parameters are skipped.
        assert_eq!(accept(&[",,gzip;;q=0.5,,"]), Some(Coding::Gzip));
        // Other parameters do not matter.
        assert_eq!(accept(&["gzip;level=9"]), Some(Coding::Gzip));
    }

    #[test]
    fn a_coding_named_twice_keeps_its_lower_weight() {
        assert_eq!(accept(&["gzip, gzip;q=0"]), None);
        assert_eq!(accept(&["br;q=0, br"]), None);
        assert_eq!(
            accept(&["br;q=0.9, gzip;q=0.5, br;q=0.1"]),
            Some(Coding::Gzip)
        );
    }

    #[test]
    fn unknown_codings_and_identity() {
        assert_eq!(accept(&["deflate, compress, sdch, xpress"]), None);
        assert_eq!(accept(&["deflate, gzip"]), Some(Coding::Gzip));
        assert_eq!(accept(&["identity"]), None);
        assert_eq!(accept(&["identity, gzip"]), Some(Coding::Gzip));
        assert_eq!(accept(&["identity;q=1, gzip;q=0.5"]), None);
        assert_eq!(accept(&["identity;q=0, gzip;q=0.5"]), Some(Coding::Gzip));
        // Not text: the field is skipped, not the request.
        let mut h = HeaderMap::new();
        h.append(
            header::ACCEPT_ENCODING,
            HeaderValue::from_bytes(b"gzip\xff").unwrap(),
        );
        h.append(header::ACCEPT_ENCODING, HeaderValue::from_static("br"));
        assert_eq!(accepted(&h), Some(Coding::Brotli));
    }

    #[test]
    fn a_long_list_is_read_in_one_pass() {
        let long = vec!["unknown;q=0.5"; 5000].join(",") + ",gzip";
        assert_eq!(accept(&[&long]), Some(Coding::Gzip));
    }

    #[test]
    fn text_types_are_compressed_the_rest_is_not() {
        for t in [
            "text/html",
            "text/html; charset=utf-8",
            "TEXT/HTML;charset=UTF-8",
            "text/css",
            "text/plain",
            "text/csv",
            "text/javascript",
            "application/javascript",
            "application/json",
            "application/problem+json",
            "application/ld+json",
            "application/xml",
            "application/atom+xml",
            "application/xhtml+xml",
            "image/svg+xml",
            " text/markdown ",
        ] {
            assert!(compressible_type(t), "{t}");
        }
        for t in [
            "text/event-stream",
            "text/event-stream; charset=utf-8",
            "application/grpc",
            "application/grpc+json",
            "application/grpc-web+json",
            "image/png",
            "image/jpeg",
            "image/webp",
            "video/mp4",
            "audio/ogg",
            "font/woff2",
            "application/zip",
            "application/gzip",
            "application/octet-stream",
            "application/pdf",
            "application/wasm",
            "multipart/form-data",
            "text",
            "",
            "json",
            "application/+jsonx",
        ] {
            assert!(!compressible_type(t), "{t}");
        }
    }

    fn head(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    const HTML: (&str, &str) = ("content-type", "text/html");
    const ON: Plan = Plan::On(Some(Coding::Gzip));

    fn v(
        plan: Plan,
        method: Method,
        status: u16,
        pairs: &[(&str, &str)],
        len: Option<u64>,
    ) -> Verdict {
        verdict(
            plan,
            &method,
            StatusCode::from_u16(status).unwrap(),
            &head(pairs),
            len,
        )
    }

    #[test]
    fn which_responses_are_compressed() {
        use Verdict::*;
        assert_eq!(
            v(ON, Method::GET, 200, &[HTML], Some(20_000)),
            Compress(Coding::Gzip)
        );
        // Unknown length: compressed.
        assert_eq!(
            v(ON, Method::GET, 200, &[HTML], None),
            Compress(Coding::Gzip)
        );
        // An error page is a page too.
        assert_eq!(
            v(ON, Method::GET, 404, &[HTML], Some(5_000)),
            Compress(Coding::Gzip)
        );
        assert_eq!(
            v(ON, Method::POST, 201, &[HTML], None),
            Compress(Coding::Gzip)
        );
        // Off, or a client that takes none of ours.
        assert_eq!(v(Plan::Off, Method::GET, 200, &[HTML], None), Untouched);
        assert_eq!(v(Plan::On(None), Method::GET, 200, &[HTML], None), Varies);
        // HEAD: what GET would get varies, this one is not compressed.
        assert_eq!(v(ON, Method::HEAD, 200, &[HTML], Some(20_000)), Varies);
        // Small bodies.
        assert_eq!(v(ON, Method::GET, 200, &[HTML], Some(1023)), Untouched);
        assert_eq!(
            v(ON, Method::GET, 200, &[HTML], Some(1024)),
            Compress(Coding::Gzip)
        );
        assert_eq!(v(ON, Method::GET, 200, &[HTML], Some(0)), Untouched);
    }

    #[test]
    fn which_responses_are_left_alone() {
        use Verdict::*;
        let big = Some(20_000);
        for (status, pairs) in [
            (200, vec![HTML, ("content-encoding", "gzip")]),
            (200, vec![HTML, ("content-encoding", "identity")]),
            (200, vec![HTML, ("cache-control", "public, No-Transform")]),
            (
                200,
                vec![
                    HTML,
                    ("cache-control", "max-age=1"),
                    ("cache-control", "no-transform"),
                ],
            ),
            (206, vec![HTML, ("content-range", "bytes 0-99/20000")]),
            (200, vec![HTML, ("content-range", "bytes 0-99/20000")]),
            (200, vec![("content-type", "image/png")]),
            (200, vec![("content-type", "application/grpc")]),
            (200, vec![("content-type", "text/event-stream")]),
            (200, vec![]),
            (200, vec![HTML, ("content-digest", "sha-256=:x:")]),
            (101, vec![HTML]),
            (103, vec![HTML]),
            (204, vec![HTML]),
        ] {
            assert_eq!(
                v(ON, Method::GET, status, &pairs, big),
                Untouched,
                "{status} {pairs:?}"
            );
        }
        // A 304 carries the Vary a 200 would.
        assert_eq!(v(ON, Method::GET, 304, &[], None), Varies);
        assert_eq!(v(Plan::Off, Method::GET, 304, &[], None), Untouched);
    }

    #[test]
    fn vary_is_added_once_and_kept_as_one_field() {
        let mut h = HeaderMap::new();
        add_vary(&mut h);
        assert_eq!(h[header::VARY], "accept-encoding");
        add_vary(&mut h);
        assert_eq!(h.get_all(header::VARY).iter().count(), 1);

        let mut h = head(&[("vary", "Origin"), ("vary", "Cookie, Accept-Language")]);
        add_vary(&mut h);
        let all: Vec<_> = h.get_all(header::VARY).iter().collect();
        assert_eq!(all, ["Origin, Cookie, Accept-Language, accept-encoding"]);

        for kept in ["*", "Accept-Encoding", "origin, ACCEPT-ENCODING"] {
            let mut h = head(&[("vary", kept)]);
            add_vary(&mut h);
            assert_eq!(h[header::VARY], kept);
        }

        // A field that is not text stays as it was, ours beside it, once.
        let mut h = HeaderMap::new();
        h.append(header::VARY, HeaderValue::from_bytes(b"x-\xff").unwrap());
        add_vary(&mut h);
        add_vary(&mut h);
        let all: Vec<_> = h.get_all(header::VARY).iter().collect();
        assert_eq!(all, [&b"x-\xff"[..], &b"accept-encoding"[..]]);
    }

    #[test]
    fn strong_etags_become_weak() {
        let mut h = head(&[("etag", "\"abc\"")]);
        weaken_etag(&mut h);
        assert_eq!(h[header::ETAG], "W/\"abc\"");
        weaken_etag(&mut h);
        assert_eq!(h[header::ETAG], "W/\"abc\"");
        let mut h = HeaderMap::new();
        weaken_etag(&mut h);
        assert!(h.is_empty());
    }

    fn response(status: u16, pairs: &[(&str, &str)], body: &'static [u8]) -> Response<Full> {
        let mut r = Response::new(Full(Some(Bytes::from_static(body)), None));
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        *r.headers_mut() = head(pairs);
        r
    }

    /// A body in memory, marked when compressed.
    struct Full(Option<Bytes>, Option<Coding>);

    impl Body for Full {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.take().map(|b| Ok(Frame::data(b))))
        }
        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.0.as_ref().map_or(0, |b| b.len() as u64))
        }
    }

    impl Compressible for Full {
        fn compressed(self, coding: Coding) -> Self {
            Full(self.0, Some(coding))
        }
    }

    #[test]
    fn past_the_cap_of_encoders_a_response_goes_uncompressed() {
        static PAGE: [u8; 2000] = [b'a'; 2000];
        let page = || response(200, &[HTML, ("content-length", "2000")], &PAGE);
        let held: Vec<EncoderSlot> = (0..MAX_ENCODERS).map(|_| EncoderSlot::count()).collect();
        let r = apply(Plan::On(Some(Coding::Gzip)), &Method::GET, page());
        assert_eq!(r.body().1, None, "at the cap: sent as it came");
        assert_eq!(r.headers()[header::VARY], "accept-encoding");
        assert_eq!(r.headers()[header::CONTENT_LENGTH], "2000");
        drop(held);
        let r = apply(Plan::On(Some(Coding::Gzip)), &Method::GET, page());
        assert_eq!(r.body().1, Some(Coding::Gzip), "a place came free");
    }

    #[test]
    fn apply_rewrites_the_head_of_a_compressed_response() {
        static PAGE: [u8; 2000] = [b'a'; 2000];
        let r = response(
            200,
            &[
                HTML,
                ("content-length", "2000"),
                ("etag", "\"v1\""),
                ("accept-ranges", "bytes"),
                ("vary", "Origin"),
            ],
            &PAGE,
        );
        let r = apply(Plan::On(Some(Coding::Brotli)), &Method::GET, r);
        assert_eq!(r.body().1, Some(Coding::Brotli));
        let h = r.headers();
        assert_eq!(h[header::CONTENT_ENCODING], "br");
        assert_eq!(h[header::VARY], "Origin, accept-encoding");
        assert_eq!(h[header::ETAG], "W/\"v1\"");
        assert!(!h.contains_key(header::CONTENT_LENGTH));
        assert!(!h.contains_key(header::ACCEPT_RANGES));

        // No Content-Length: the body's own exact length decides.
        let r = apply(ON, &Method::GET, response(200, &[HTML], b"short"));
        assert_eq!(r.body().1, None);
        assert!(!r.headers().contains_key(header::VARY));

        let r = apply(ON, &Method::GET, response(304, &[("etag", "\"v1\"")], b""));
        assert_eq!(r.headers()[header::ETAG], "W/\"v1\"");
        assert_eq!(r.headers()[header::VARY], "accept-encoding");
        assert_eq!(r.body().1, None);
    }

    /// A body fed from a channel, so a test controls its pace.
    struct Channel(tokio::sync::mpsc::UnboundedReceiver<Frame<Bytes>>);

    impl Body for Channel {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx).map(|f| f.map(Ok))
        }
    }

    async fn encode_all(
        coding: Coding,
        chunks: Vec<&'static [u8]>,
    ) -> (Vec<u8>, Option<HeaderMap>) {
        use http_body_util::BodyExt;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for c in chunks {
            tx.send(Frame::data(Bytes::from_static(c))).unwrap();
        }
        let mut t = HeaderMap::new();
        t.insert("x-sum", HeaderValue::from_static("1"));
        tx.send(Frame::trailers(t)).unwrap();
        drop(tx);
        let collected = Encoded::new(Channel(rx), coding).collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (collected.to_bytes().to_vec(), trailers)
    }

    fn decoder<'a>(
        coding: Coding,
        data: impl AsyncBufRead + Unpin + Send + 'a,
    ) -> Box<dyn AsyncRead + Unpin + Send + 'a> {
        use async_compression::tokio::bufread::{BrotliDecoder, GzipDecoder, ZstdDecoder};
        match coding {
            Coding::Gzip => Box::new(GzipDecoder::new(data)),
            Coding::Brotli => Box::new(BrotliDecoder::new(data)),
            Coding::Zstd => Box::new(ZstdDecoder::new(data)),
        }
    }

    async fn decode(coding: Coding, data: &[u8]) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut out = Vec::new();
        decoder(coding, data).read_to_end(&mut out).await.unwrap();
        out
    }

    fn page() -> &'static [u8] {
        Box::leak(
            (0..2000)
                .map(|i| format!("<p>line {i} of the page</p>\n"))
                .collect::<String>()
                .into_bytes()
                .into_boxed_slice(),
        )
    }

    #[tokio::test]
    async fn each_coding_round_trips_with_its_trailers() {
        let page = page();
        for coding in PREFERENCE {
            let (wire, trailers) = encode_all(coding, page.chunks(3000).collect()).await;
            assert!(wire.len() < page.len() / 4, "{coding:?}: {}", wire.len());
            assert_eq!(decode(coding, &wire).await, page, "{coding:?}");
            assert_eq!(trailers.unwrap()["x-sum"], "1");
            let (wire, _) = encode_all(coding, vec![]).await;
            assert!(decode(coding, &wire).await.is_empty());
        }
    }

    /// Compressed bytes arriving as a test hands them over; pending
    /// between, as a socket would be.
    struct Arriving(tokio::sync::mpsc::UnboundedReceiver<Bytes>, Bytes);

    impl AsyncRead for Arriving {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let data = ready!(self.as_mut().poll_fill_buf(cx))?;
            let n = data.len().min(buf.remaining());
            buf.put_slice(&data[..n]);
            self.consume(n);
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncBufRead for Arriving {
        fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
            let this = self.get_mut();
            while this.1.is_empty() {
                match ready!(this.0.poll_recv(cx)) {
                    Some(b) => this.1 = b,
                    None => break,
                }
            }
            Poll::Ready(Ok(&this.1))
        }
        fn consume(self: Pin<&mut Self>, amt: usize) {
            self.get_mut().1.advance(amt);
        }
    }

    #[tokio::test]
    async fn a_chunk_is_flushed_when_the_backend_pauses() {
        use http_body_util::BodyExt;
        use tokio::io::AsyncReadExt;
        let within = std::time::Duration::from_secs(10);
        for coding in PREFERENCE {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let mut encoded = Encoded::new(Channel(rx), coding);
            let (wire, arriving) = tokio::sync::mpsc::unbounded_channel();
            let mut client = decoder(coding, Arriving(arriving, Bytes::new()));
            for part in ["data: first event\n\n", "data: second event\n\n"] {
                tx.send(Frame::data(Bytes::from_static(part.as_bytes())))
                    .unwrap();
                // The backend has nothing more for now: what the encoder
                // holds must reach the client, decodable, without more input.
                let frame = tokio::time::timeout(within, encoded.frame())
                    .await
                    .expect("a frame without more input")
                    .unwrap()
                    .unwrap();
                wire.send(frame.into_data().unwrap()).unwrap();
                let mut got = vec![0; part.len()];
                tokio::time::timeout(within, client.read_exact(&mut got))
                    .await
                    .expect("the client decodes the chunk")
                    .unwrap();
                assert_eq!(got, part.as_bytes(), "{coding:?}");
            }
            drop(tx);
            while let Some(frame) = encoded.frame().await {
                wire.send(frame.unwrap().into_data().unwrap()).unwrap();
            }
            drop(wire);
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
        }
    }

    #[tokio::test]
    async fn a_poll_takes_a_bounded_part_of_what_is_ready() {
        use http_body_util::BodyExt;
        let zeros: &'static [u8] = Box::leak(vec![0u8; 4 << 20].into_boxed_slice());
        for coding in PREFERENCE {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tx.send(Frame::data(Bytes::from_static(zeros))).unwrap();
            drop(tx);
            let mut encoded = Encoded::new(Channel(rx), coding);
            let mut wire = Vec::new();
            let mut frames = 0;
            while let Some(frame) = encoded.frame().await {
                wire.extend_from_slice(&frame.unwrap().into_data().unwrap());
                frames += 1;
            }
            assert!(
                frames >= zeros.len() / INPUT_PER_POLL,
                "{coding:?}: {frames} frames"
            );
            assert_eq!(decode(coding, &wire).await, zeros, "{coding:?}");
        }
    }

    /// A body that fails after its first chunk, as a backend that resets.
    struct Failing(u8);

    impl Body for Failing {
        type Data = Bytes;
        type Error = io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
            self.0 += 1;
            Poll::Ready(Some(match self.0 {
                1 => Ok(Frame::data(Bytes::from_static(b"<p>half a page"))),
                _ => Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "backend reset",
                )),
            }))
        }
    }

    #[tokio::test]
    async fn the_inner_body_error_comes_out_as_it_was() {
        use http_body_util::BodyExt;
        for coding in PREFERENCE {
            let mut encoded = Encoded::new(Failing(0), coding);
            let err = loop {
                match encoded.frame().await {
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => break e,
                    None => panic!("{coding:?}: ended without the error"),
                }
            };
            let io = err.downcast::<io::Error>().unwrap();
            assert_eq!(io.kind(), io::ErrorKind::ConnectionReset, "{coding:?}");
            assert!(encoded.frame().await.is_none());
            assert!(encoded.is_end_stream());
        }
    }
}
