//! Our HTTP/1.1 server path, for plain connections whose requests have no
//! body (most traffic): the head parsed by `h1::server`, the request put
//! through the same front door and request path as hyper's, the response
//! written by us. The first request this path does not take (a body, an
//! upgrade, an error to answer) hands the connection to hyper with the
//! bytes read so far, for the rest of its life.
//!
//! Between requests the connection holds its socket and no buffer: a head
//! is read into an allocation of its own size, the request's state is
//! boxed for that request only, and both go when its response is written.
//! hyper keeps its 8 KiB read buffer and more for as long as the
//! connection lives.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{Method, Response, Version};
use hyper::body::{Body, Frame};
use socket2::SockRef;
use tokio::net::TcpStream;

use super::body::DownstreamBody;
use super::conn::{ConnState, HoldWrite};
use super::front::FrontDoor;
use super::h1::server::{self, Asked, BodyFraming, BodyLength, Head};
use super::handler::{self, Client, Shared};
use super::request_line::{LineGuard, URI_TOO_LONG};
use super::upstream::ClientBody;

/// What a request's input buffer grows by: a usual head in one read.
const READ_SCRATCH: usize = 4096;

/// Response bytes gathered before they are written: the head and a body
/// in hand go out in one write, a streamed body in writes of up to this.
const WRITE_BATCH: usize = 64 * 1024;

/// How the fast path ended.
#[derive(Debug)]
pub enum Ended {
    /// The connection is done (closed by either side, or failed).
    Closed,
    /// hyper serves the connection from here; these bytes first.
    HandOver(Bytes),
}

/// What a connection on this path shares with its requests.
pub struct FastConn<'a> {
    pub stream: &'a TcpStream,
    pub state: &'a Arc<ConnState>,
    pub client: &'a Client,
    pub proxy: &'a Arc<Shared>,
    pub front: &'a FrontDoor,
    pub max_head: usize,
    pub max_headers: usize,
}

/// Bytes read and not yet part of a request, and whether the client has
/// ended its side.
#[derive(Default)]
struct Input {
    pending: BytesMut,
    eof: bool,
}

/// Serve requests from `first` (the bytes read when the protocol was
/// told) until the connection ends or hyper must take it. A graceful
/// shutdown (`ConnState::close_gracefully`) closes it between requests.
pub async fn serve(conn: &FastConn<'_>, first: Bytes) -> Ended {
    let mut line = LineGuard::new(conn.proxy.limits.max_uri_bytes);
    let mut input = Input {
        pending: first
            .try_into_mut()
            .unwrap_or_else(|b| BytesMut::from(&b[..])),
        eof: false,
    };
    conn.state.touch_read();
    if line.over_limit(&input.pending) {
        Box::pin(refuse(conn.stream, URI_TOO_LONG)).await;
        return Ended::Closed;
    }
    loop {
        let request = match next_head(conn, &mut input, &mut line).await {
            Next::Request(request) => request,
            Next::HandOver => return Ended::HandOver(input.pending.freeze()),
            Next::Closed => return Ended::Closed,
        };
        let last = conn.state.closing();
        // Boxed: the request's state lives as long as its exchange, and
        // the connection's future stays small between requests.
        let keep = Box::pin(exchange(conn, request, &mut input, last)).await;
        if !keep || conn.state.closing() {
            let _ = SockRef::from(conn.stream).shutdown(std::net::Shutdown::Write);
            return Ended::Closed;
        }
        if input.pending.is_empty() {
            // An emptied buffer still holds its allocation.
            input.pending = BytesMut::new();
        } else {
            // Pipelined bytes read during the exchange begin the next head.
            if conn.state.touch_read() {
                line.arm();
            }
            if line.over_limit(&input.pending) {
                Box::pin(refuse(conn.stream, URI_TOO_LONG)).await;
                return Ended::Closed;
            }
        }
    }
}

// As `h1::server::Head`: moved once, not worth a box.
#[allow(clippy::large_enum_variant)]
enum Next {
    Request(http::Request<()>),
    HandOver,
    Closed,
}

/// The next request head: parsed from what is pending, reading more as
/// needed. While nothing is pending the connection waits for readiness
/// alone (the socket's own waker slot: no buffer, no waiter node), and
/// leaves on a graceful shutdown.
async fn next_head(conn: &FastConn<'_>, input: &mut Input, line: &mut LineGuard) -> Next {
    loop {
        if !input.pending.is_empty() {
            match server::parse_head(&mut input.pending, conn.max_head, conn.max_headers) {
                Head::Fast { request, .. } => return Next::Request(request),
                Head::HandOver => return Next::HandOver,
                Head::Partial => {}
            }
        }
        if input.eof {
            return Next::Closed;
        }
        if input.pending.is_empty() {
            let idle = poll_fn(|cx| match conn.state.closing() {
                true => Poll::Ready(Err(io::ErrorKind::Interrupted.into())),
                false => conn.stream.poll_read_ready(cx),
            });
            if idle.await.is_err() {
                return Next::Closed;
            }
        }
        let read = poll_fn(|cx| poll_read_into(conn.stream, cx, &mut input.pending)).await;
        match read {
            Ok(0) => input.eof = true,
            Ok(n) => {
                if conn.state.touch_read() {
                    line.arm();
                }
                let at = input.pending.len() - n;
                if line.over_limit(&input.pending[at..]) {
                    Box::pin(refuse(conn.stream, URI_TOO_LONG)).await;
                    return Next::Closed;
                }
            }
            Err(_) => return Next::Closed,
        }
    }
}

/// One read from the socket into `into`, which grows by a read's worth
/// when it has little room: the buffer is the request's, and goes with it.
/// Ok(0) is the client's end of input.
fn poll_read_into(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    into: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    loop {
        std::task::ready!(stream.poll_read_ready(cx))?;
        if into.capacity() - into.len() < READ_SCRATCH / 4 {
            into.reserve(READ_SCRATCH);
        }
        match stream.try_read_buf(into) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            read => return Poll::Ready(read),
        }
    }
}

/// While a request is served, the client is read on: pipelined bytes are
/// kept (up to the head limit, then reading stops until the next head), its
/// end of input is noted (the response is still written, then the
/// connection closes), and a reset or error cancels the request, as on
/// hyper's path. Ready(()) only for that error.
fn poll_client(conn: &FastConn<'_>, input: &mut Input, cx: &mut Context<'_>) -> Poll<()> {
    while !input.eof && input.pending.len() < conn.max_head {
        match poll_read_into(conn.stream, cx, &mut input.pending) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(0)) => input.eof = true,
            Poll::Ready(Ok(_)) => {
                conn.state.touch_read();
            }
            Poll::Ready(Err(_)) => return Poll::Ready(()),
        }
    }
    Poll::Pending
}

/// Answer one request; true if the connection may carry another.
async fn exchange(
    conn: &FastConn<'_>,
    request: http::Request<()>,
    input: &mut Input,
    last: bool,
) -> bool {
    let asked = Asked {
        head: request.method() == Method::HEAD,
        trailers: super::headers::wants_trailers(request.headers()),
    };
    let closes = super::headers::request_closes(Version::HTTP_11, request.headers());
    let request = request.map(|()| ClientBody::None);
    let response = match conn.front.answer(conn.proxy, conn.client, &request) {
        Some(answer) => answer,
        None => {
            let handled = handler::handle(conn.proxy.clone(), conn.client.clone(), request);
            let mut handled = pin!(handled);
            let polled = poll_fn(|cx| match handled.as_mut().poll(cx) {
                Poll::Ready(Ok(response)) => Poll::Ready(Some(response)),
                Poll::Ready(Err(never)) => match never {},
                Poll::Pending => poll_client(conn, input, cx).map(|()| None),
            });
            match polled.await {
                Some(response) => response,
                None => return false,
            }
        }
    };
    let written = respond(conn, response, asked, last || closes, input).await;
    // After the client's end of input, what it pipelined before it is
    // still answered (`next_head` stops at the end).
    matches!(written, Ok(true))
}

/// The response's failure to be written: the connection is closed.
#[derive(Debug)]
enum WriteFailed {
    Client,
    Body,
}

/// Write the response; Ok(true) if the connection may go on.
async fn respond(
    conn: &FastConn<'_>,
    response: Response<DownstreamBody>,
    asked: Asked,
    last: bool,
    input: &mut Input,
) -> Result<bool, WriteFailed> {
    let (parts, body) = response.into_parts();
    let length = if body.is_end_stream() {
        BodyLength::Empty
    } else {
        match body.size_hint().exact() {
            Some(n) => BodyLength::Known(n),
            None => BodyLength::Unknown,
        }
    };
    let mut out = Vec::with_capacity(256 + parts.headers.len() * 48);
    let encoded = date::with(|date| {
        server::encode_response_head(
            parts.status,
            &parts.headers,
            length,
            asked,
            last,
            date,
            &mut out,
        )
    });
    let (framing, closes) = match encoded {
        Ok(encoded) => encoded,
        Err(e) => {
            tracing::warn!(error = %e, status = %parts.status, "response head cannot be written; closing the connection");
            write_all(conn, b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await?;
            return Ok(false);
        }
    };
    drop(parts);
    let mut body = pin!(body);
    let mut sender = Sender::new(framing);
    loop {
        let next = poll_fn(|cx| match body.as_mut().poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(Some(frame)),
            // Nothing more in hand: what is gathered goes out first.
            Poll::Pending if !out.is_empty() => Poll::Ready(None),
            Poll::Pending => match poll_client(conn, input, cx) {
                Poll::Ready(()) => Poll::Ready(Some(Some(Err(client_gone())))),
                Poll::Pending => Poll::Pending,
            },
        })
        .await;
        match next {
            None => {
                write_all(conn, &out).await?;
                out.clear();
            }
            Some(Some(Ok(frame))) => {
                sender.frame(frame, &mut out)?;
                if out.len() >= WRITE_BATCH {
                    write_all(conn, &out).await?;
                    out.clear();
                }
            }
            Some(Some(Err(e))) => {
                tracing::debug!(error = %e, "response body failed; closing the connection");
                return Err(WriteFailed::Body);
            }
            Some(None) => {
                sender.end(&mut out)?;
                write_all(conn, &out).await?;
                return Ok(!closes);
            }
        }
    }
}

fn client_gone() -> super::upstream::AnyBodyError {
    Box::new(io::Error::from(io::ErrorKind::ConnectionReset))
}

/// The body's frames in the response's framing.
struct Sender {
    framing: BodyFraming,
    /// Bytes still owed under a Content-Length.
    left: u64,
    ended: bool,
}

impl Sender {
    fn new(framing: BodyFraming) -> Self {
        let left = match framing {
            BodyFraming::Length(n) => n,
            _ => 0,
        };
        Self {
            framing,
            left,
            ended: false,
        }
    }

    fn frame(&mut self, frame: Frame<Bytes>, out: &mut Vec<u8>) -> Result<(), WriteFailed> {
        let frame = match frame.into_data() {
            Ok(data) => return self.data(&data, out),
            Err(frame) => frame,
        };
        let Ok(trailers) = frame.into_trailers() else {
            return Ok(());
        };
        if let BodyFraming::Chunked {
            trailers: Some(declared),
        } = &self.framing
        {
            server::encode_trailers(&trailers, declared, out);
            self.ended = true;
        }
        Ok(())
    }

    fn data(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), WriteFailed> {
        if data.is_empty() {
            return Ok(());
        }
        match self.framing {
            BodyFraming::None => {}
            BodyFraming::Length(_) => {
                let n = data.len() as u64;
                if n > self.left {
                    tracing::debug!(
                        over = n - self.left,
                        "response body longer than its Content-Length"
                    );
                    return Err(WriteFailed::Body);
                }
                self.left -= n;
                out.extend_from_slice(data);
            }
            BodyFraming::Chunked { .. } => {
                use std::io::Write as _;
                let _ = write!(out, "{:x}\r\n", data.len());
                out.extend_from_slice(data);
                out.extend_from_slice(b"\r\n");
            }
        }
        Ok(())
    }

    fn end(&mut self, out: &mut Vec<u8>) -> Result<(), WriteFailed> {
        match self.framing {
            BodyFraming::Length(_) if self.left > 0 => {
                tracing::debug!(
                    short = self.left,
                    "response body shorter than its Content-Length"
                );
                Err(WriteFailed::Body)
            }
            BodyFraming::Chunked { .. } if !self.ended => {
                out.extend_from_slice(b"0\r\n\r\n");
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// Write all of `bytes`. The connection's last response, when whole in
/// hand, goes with MSG_MORE (`ConnState::hold_last_response`).
async fn write_all(conn: &FastConn<'_>, mut bytes: &[u8]) -> Result<(), WriteFailed> {
    while !bytes.is_empty() {
        let n = poll_fn(|cx| poll_write(conn, cx, bytes))
            .await
            .map_err(|_| WriteFailed::Client)?;
        if n == 0 {
            return Err(WriteFailed::Client);
        }
        conn.state.touch_write();
        bytes = &bytes[n..];
    }
    Ok(())
}

fn poll_write(conn: &FastConn<'_>, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<io::Result<usize>> {
    if conn.state.holds_next_write() {
        if let Some(polled) = conn.stream.poll_write_held(cx, &[io::IoSlice::new(bytes)]) {
            if polled.is_ready() {
                // One write only: anything after it goes out at once.
                conn.state.write_held();
            }
            return polled;
        }
    }
    loop {
        std::task::ready!(conn.stream.poll_write_ready(cx))?;
        match conn.stream.try_write(bytes) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            written => return Poll::Ready(written),
        }
    }
}

/// Answer a refused head and close.
async fn refuse(stream: &TcpStream, answer: &[u8]) {
    let write = async {
        let mut left = answer;
        while !left.is_empty() {
            stream.writable().await?;
            match stream.try_write(left) {
                Ok(n) => left = &left[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        SockRef::from(stream).shutdown(std::net::Shutdown::Write)
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), write).await;
}

/// The Date field, formatted once a second per thread (as hyper caches it).
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }

    pub fn with<T>(f: impl FnOnce(&[u8]) -> T) -> T {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with(|cached| {
            let mut cached = cached.borrow_mut();
            if cached.0 != second {
                *cached = (second, httpdate::fmt_http_date(now));
            }
            f(cached.1.as_bytes())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_framed_as_its_head_says() {
        let mut out = Vec::new();
        let mut chunked = Sender::new(BodyFraming::Chunked { trailers: None });
        chunked.data(b"hello", &mut out).ok();
        chunked.end(&mut out).ok();
        assert_eq!(out, b"5\r\nhello\r\n0\r\n\r\n");

        let mut length = Sender::new(BodyFraming::Length(3));
        assert!(
            length.data(b"abcd", &mut Vec::new()).is_err(),
            "longer than declared"
        );
        let mut length = Sender::new(BodyFraming::Length(3));
        length.data(b"ab", &mut Vec::new()).ok();
        assert!(
            length.end(&mut Vec::new()).is_err(),
            "shorter than declared"
        );

        let mut none = Sender::new(BodyFraming::None);
        let mut out = Vec::new();
        none.data(b"not for HEAD", &mut out).ok();
        none.end(&mut out).ok();
        assert!(out.is_empty());
    }

    #[test]
    fn the_date_is_an_http_date() {
        date::with(|d| {
            let text = std::str::from_utf8(d).unwrap_or_default();
            assert!(httpdate::parse_http_date(text).is_ok(), "{text}");
        });
    }
}
