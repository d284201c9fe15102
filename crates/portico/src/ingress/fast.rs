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

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::Response;
use hyper::body::{Body, Frame};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::body::DownstreamBody;
use super::conn::{ConnState, HoldWrite};
use super::front::FrontDoor;
use super::h1::server::{self, Asked, BodyFraming, BodyLength, Head};
use super::handler::{self, Client, Shared};
use super::request_line::{LineGuard, URI_TOO_LONG};
use super::upstream::ClientBody;

/// The most one read takes: a usual head in one read.
const READ_SCRATCH: usize = 2048;

/// Framing gathered before it is written: a batch over this goes out
/// before more is added (a batch holds the head, framing and trailers, and
/// one data frame, which is never copied).
const WRITE_BATCH: usize = 64 * 1024;

/// How the fast path ended.
#[derive(Debug)]
pub enum Ended {
    /// The connection is done (closed by either side, or failed).
    Closed,
    /// hyper serves the connection from here; these bytes first.
    HandOver(Bytes),
    /// A head refused while it was read: this answer, then the close
    /// (`netio::answer_and_close`).
    Refused(&'static [u8]),
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
/// (A `Result` that cannot fail, for `conn::supervise`.)
pub async fn serve(conn: &FastConn<'_>, first: Bytes) -> Result<Ended, Infallible> {
    let mut line = LineGuard::new(conn.proxy.limits.max_uri_bytes);
    let mut input = Input {
        pending: first
            .try_into_mut()
            .unwrap_or_else(|b| BytesMut::from(&b[..])),
        eof: false,
    };
    conn.state.touch_read();
    if line.over_limit(&input.pending) {
        return Ok(Ended::Refused(URI_TOO_LONG));
    }
    loop {
        let (request, asked) = match next_head(conn, &mut input, &mut line).await {
            Next::Request(request, asked) => (request, asked),
            Next::HandOver => return Ok(Ended::HandOver(input.pending.freeze())),
            Next::Closed => return Ok(Ended::Closed),
            Next::Refused(answer) => return Ok(Ended::Refused(answer)),
        };
        let keep = begin(conn, request, asked, &mut input).await;
        if !keep || conn.state.closing() {
            let _ = SockRef::from(conn.stream).shutdown(std::net::Shutdown::Write);
            return Ok(Ended::Closed);
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
                return Ok(Ended::Refused(URI_TOO_LONG));
            }
        }
    }
}

// As `h1::server::Head`: moved once, not worth a box.
#[allow(clippy::large_enum_variant)]
enum Next {
    Request(http::Request<()>, Asked),
    HandOver,
    Closed,
    Refused(&'static [u8]),
}

/// The next request head: parsed from what is pending, reading more as
/// needed. While nothing is pending the connection waits for readiness
/// alone (the socket's own waker slot: no buffer, no waiter node), and
/// leaves on a graceful shutdown.
async fn next_head(conn: &FastConn<'_>, input: &mut Input, line: &mut LineGuard) -> Next {
    loop {
        if !input.pending.is_empty() {
            match server::parse_head(&mut input.pending, conn.max_head, conn.max_headers) {
                Head::Fast { request, asked, .. } => return Next::Request(request, asked),
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
                    return Next::Refused(URI_TOO_LONG);
                }
            }
            Err(_) => return Next::Closed,
        }
    }
}

/// One read from the socket into `into`, through a scratch buffer on the
/// stack: `into` grows by what came, an allocation of a head's own size
/// (a block of a few KiB per read would take the allocator's slow path,
/// and be held by the request's head). Ok(0) is the client's end of input.
///
/// A read that does not fill the scratch has drained the socket, and
/// clears its readiness (as tokio's own `poll_read` does): the next wait
/// is for the kernel's next event, not a system call that finds nothing.
fn poll_read_into(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    into: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    loop {
        std::task::ready!(stream.poll_read_ready(cx))?;
        // Zeroed, not uninitialised: safe code, and cheap next to a read.
        let mut scratch = [0u8; READ_SCRATCH];
        let mut got = None;
        let read = stream.try_io(Interest::READABLE, || {
            let n = stream.try_read(&mut scratch)?;
            got = Some(n);
            match n > 0 && n < READ_SCRATCH {
                // Bytes in hand, and the readiness cleared with them.
                true => Err(io::ErrorKind::WouldBlock.into()),
                false => Ok(n),
            }
        });
        match (read, got) {
            (_, Some(n)) => {
                into.extend_from_slice(&scratch[..n]);
                return Poll::Ready(Ok(n));
            }
            (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => {}
            (read, None) => return Poll::Ready(read.map(|_| 0)),
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

/// The exchange of one request, boxed: its state lives as long as it does,
/// and the connection's future stays small between requests. A plain
/// function, so that the request is moved into the box here and no slot
/// for it is kept in the connection's future.
fn begin<'a>(
    conn: &'a FastConn<'a>,
    request: http::Request<()>,
    asked: Asked,
    input: &'a mut Input,
) -> Pin<Box<impl Future<Output = bool> + 'a>> {
    Box::pin(exchange(conn, request, asked, input))
}

/// Answer one request; true if the connection may carry another.
async fn exchange(
    conn: &FastConn<'_>,
    request: http::Request<()>,
    asked: Asked,
    input: &mut Input,
) -> bool {
    let request = request.map(|()| ClientBody::None);
    let response = match conn.front.answer(conn.proxy, conn.client, &request) {
        Some(answer) => answer,
        None => {
            // Boxed apart from the exchange: the request path's future is
            // large, and boxing the exchange with it inline would copy it
            // twice (the exchange into its box, then the request path into
            // its place in the exchange).
            let handled = handler::handle(conn.proxy.clone(), conn.client.clone(), request);
            let mut handled = Box::pin(handled);
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
    let written = respond(conn, response, asked, input).await;
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
    // A graceful shutdown asked while the request was served: this is the
    // connection's last response, and says so.
    let last = asked.close || conn.state.closing();
    let mut batch = Batch::new(256 + parts.headers.len() * 48);
    let encoded = date::with(|date| {
        server::encode_response_head(
            parts.status,
            &parts.headers,
            length,
            asked,
            last,
            date,
            &mut batch.out,
        )
    });
    let (framing, closes) = match encoded {
        Ok(encoded) => encoded,
        Err(e) => {
            tracing::warn!(error = %e, status = %parts.status, "response head cannot be written; closing the connection");
            batch.out.clear();
            batch.out.extend_from_slice(SERVER_ERROR);
            write_batch(conn, &mut batch).await?;
            return Ok(false);
        }
    };
    drop(parts);
    if length == BodyLength::Empty || framing == BodyFraming::None {
        // Nothing of the body is sent (HEAD, 204, 304): it is dropped
        // unread, as hyper drops it, rather than waited for.
        write_batch(conn, &mut batch).await?;
        return Ok(!closes);
    }
    let mut body = pin!(body);
    let mut sender = Sender::new(framing);
    loop {
        let next = poll_fn(|cx| match body.as_mut().poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(Some(frame)),
            // Nothing more in hand: what is gathered goes out first.
            Poll::Pending if !batch.is_empty() => Poll::Ready(None),
            Poll::Pending => match poll_client(conn, input, cx) {
                Poll::Ready(()) => Poll::Ready(Some(Some(Err(client_gone())))),
                Poll::Pending => Poll::Pending,
            },
        })
        .await;
        match next {
            None => write_batch(conn, &mut batch).await?,
            Some(Some(Ok(frame))) => {
                if batch.data.is_some() {
                    write_batch(conn, &mut batch).await?;
                }
                sender.frame(frame, &mut batch)?;
                // A body in hand (most) ends with its frame: the head and
                // the body go out in one write, with no poll to learn it.
                // One whose length is all sent is done too, whenever its
                // end comes (an HTTP/2 backend's END_STREAM may follow).
                if body.is_end_stream() || sender.is_complete() {
                    sender.end(&mut batch)?;
                    write_batch(conn, &mut batch).await?;
                    return Ok(!closes);
                }
                if batch.len() >= WRITE_BATCH {
                    write_batch(conn, &mut batch).await?;
                }
            }
            Some(Some(Err(e))) => {
                tracing::debug!(error = %e, "response body failed; closing the connection");
                return Err(WriteFailed::Body);
            }
            Some(None) => {
                sender.end(&mut batch)?;
                write_batch(conn, &mut batch).await?;
                return Ok(!closes);
            }
        }
    }
}

/// The answer when a response head cannot be written as it stands.
const SERVER_ERROR: &[u8] =
    b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

fn client_gone() -> super::upstream::AnyBodyError {
    Box::new(io::Error::from(io::ErrorKind::ConnectionReset))
}

/// What the next write sends, in order: the head and any framing gathered
/// in `out`, at most one data frame as it came (never copied), and a short
/// tail (the CRLF after a chunk, the last chunk). Written with one
/// vectored write.
struct Batch {
    out: Vec<u8>,
    data: Option<Bytes>,
    tail: [u8; 8],
    tail_len: usize,
}

impl Batch {
    fn new(capacity: usize) -> Self {
        Self {
            out: Vec::with_capacity(capacity),
            data: None,
            tail: [0; 8],
            tail_len: 0,
        }
    }

    fn tail(&mut self, bytes: &[u8]) {
        let end = self.tail_len + bytes.len();
        self.tail[self.tail_len..end].copy_from_slice(bytes);
        self.tail_len = end;
    }

    fn len(&self) -> usize {
        self.out.len() + self.data.as_ref().map_or(0, Bytes::len) + self.tail_len
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
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

    /// All of a Content-Length body has been sent.
    fn is_complete(&self) -> bool {
        matches!(self.framing, BodyFraming::Length(_)) && self.left == 0
    }

    /// Add a frame to `batch`, whose data part is free.
    fn frame(&mut self, frame: Frame<Bytes>, batch: &mut Batch) -> Result<(), WriteFailed> {
        let frame = match frame.into_data() {
            Ok(data) => return self.data(data, batch),
            Err(frame) => frame,
        };
        let Ok(trailers) = frame.into_trailers() else {
            return Ok(());
        };
        if let BodyFraming::Chunked {
            trailers: Some(declared),
        } = &self.framing
        {
            server::encode_trailers(&trailers, declared, &mut batch.out);
            self.ended = true;
        }
        Ok(())
    }

    fn data(&mut self, data: Bytes, batch: &mut Batch) -> Result<(), WriteFailed> {
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
                batch.data = Some(data);
            }
            BodyFraming::Chunked { .. } => {
                use std::io::Write as _;
                let _ = write!(batch.out, "{:x}\r\n", data.len());
                batch.data = Some(data);
                batch.tail(b"\r\n");
            }
        }
        Ok(())
    }

    fn end(&mut self, batch: &mut Batch) -> Result<(), WriteFailed> {
        match self.framing {
            BodyFraming::Length(_) if self.left > 0 => {
                tracing::debug!(
                    short = self.left,
                    "response body shorter than its Content-Length"
                );
                Err(WriteFailed::Body)
            }
            BodyFraming::Chunked { .. } if !self.ended => {
                const LAST_CHUNK: &[u8] = b"0\r\n\r\n";
                match batch.data {
                    Some(_) => batch.tail(LAST_CHUNK),
                    None => batch.out.extend_from_slice(LAST_CHUNK),
                }
                self.ended = true;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// Write all of `batch`, and empty it. The connection's last response,
/// when whole in hand, goes with MSG_MORE (`ConnState::hold_last_response`).
async fn write_batch(conn: &FastConn<'_>, batch: &mut Batch) -> Result<(), WriteFailed> {
    let data = batch.data.take();
    let mut parts = [
        io::IoSlice::new(&batch.out),
        io::IoSlice::new(data.as_deref().unwrap_or_default()),
        io::IoSlice::new(&batch.tail[..batch.tail_len]),
    ];
    let mut left: usize = parts.iter().map(|p| p.len()).sum();
    let mut slices = &mut parts[..];
    while left > 0 {
        let n = poll_fn(|cx| poll_write(conn, cx, slices))
            .await
            .map_err(|_| WriteFailed::Client)?;
        if n == 0 {
            return Err(WriteFailed::Client);
        }
        conn.state.touch_write();
        left -= n;
        io::IoSlice::advance_slices(&mut slices, n);
    }
    batch.out.clear();
    batch.tail_len = 0;
    Ok(())
}

fn poll_write(
    conn: &FastConn<'_>,
    cx: &mut Context<'_>,
    slices: &[io::IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    if conn.state.holds_next_write() {
        if let Some(polled) = conn.stream.poll_write_held(cx, slices) {
            if polled.is_ready() {
                // One write only: anything after it goes out at once.
                conn.state.write_held();
            }
            return polled;
        }
    }
    loop {
        std::task::ready!(conn.stream.poll_write_ready(cx))?;
        match conn.stream.try_write_vectored(slices) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            written => return Poll::Ready(written),
        }
    }
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

    fn sent(batch: &Batch) -> Vec<u8> {
        let data = batch.data.as_deref().unwrap_or_default();
        [&batch.out[..], data, &batch.tail[..batch.tail_len]].concat()
    }

    #[test]
    fn a_body_is_framed_as_its_head_says() {
        let mut batch = Batch::new(0);
        let mut chunked = Sender::new(BodyFraming::Chunked { trailers: None });
        assert!(chunked
            .data(Bytes::from_static(b"hello"), &mut batch)
            .is_ok());
        assert!(chunked.end(&mut batch).is_ok());
        assert_eq!(sent(&batch), b"5\r\nhello\r\n0\r\n\r\n");

        let mut batch = Batch::new(0);
        let mut length = Sender::new(BodyFraming::Length(3));
        let long = length.data(Bytes::from_static(b"abcd"), &mut batch);
        assert!(long.is_err(), "longer than declared");
        let mut length = Sender::new(BodyFraming::Length(3));
        assert!(length.data(Bytes::from_static(b"ab"), &mut batch).is_ok());
        assert!(length.end(&mut batch).is_err(), "shorter than declared");

        let mut batch = Batch::new(0);
        let mut none = Sender::new(BodyFraming::None);
        assert!(none
            .data(Bytes::from_static(b"not for HEAD"), &mut batch)
            .is_ok());
        assert!(none.end(&mut batch).is_ok());
        assert!(batch.is_empty());
    }

    #[test]
    fn the_date_is_an_http_date() {
        date::with(|d| {
            let text = std::str::from_utf8(d).unwrap_or_default();
            assert!(httpdate::parse_http_date(text).is_ok(), "{text}");
        });
    }
}
