//! One HTTP/1.1 connection to a backend, used by one request at a time and
//! driven by it: no task, no channel. The request's head is written from
//! its parts, which stay the caller's (a replay needs no copy), and the
//! response is read with `parse_head` and streamed by `BodyReader`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::chunked::{Chunk, ChunkError, Decoder};
use super::{parse_head, Framing, HeadError, ResponseHead};
use crate::ingress::headers::Forwarding;

/// Interim (1xx) responses skipped before the final one; a backend that
/// sends more is broken or hostile.
const MAX_INTERIM: usize = 16;
/// A response head's limit, hyper's client's own (its `max_buf_size`
/// default): backends with large Set-Cookie fields worked through hyper and
/// must keep working.
pub const MAX_RESPONSE_HEAD_BYTES: usize = 8192 + 4096 * 100;
/// Room made in the read buffer before a read: the first, and the most,
/// doubling while reads fill it (a large body moves in fewer reads, and
/// fewer, larger writes to the client).
const READ_SIZE: usize = 8192;
const MAX_READ_SIZE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// Writing the request failed before its first byte: the backend has
    /// nothing of it, so any request may go again.
    #[error("the backend connection failed before the request was written")]
    Unsent(#[source] io::Error),
    /// The request went out (some or all of it) and nothing of a response
    /// came back. A reused connection the backend had closed fails this
    /// way, but so does a backend that read the request and then closed:
    /// only an idempotent request may be sent again.
    #[error("the backend closed the connection before answering")]
    ClosedBeforeResponse(#[source] Option<io::Error>),
    #[error("reading from or writing to the backend failed")]
    Io(#[source] io::Error),
    #[error(transparent)]
    Head(#[from] HeadError),
    #[error("the backend sent more than {MAX_INTERIM} interim (1xx) responses")]
    TooManyInterim,
}

impl ExchangeError {
    /// Whether any byte of the request may have reached the backend.
    pub fn sent(&self) -> bool {
        !matches!(self, ExchangeError::Unsent(_))
    }

    /// How a pooled connection that the backend closed meanwhile fails:
    /// before anything of a response.
    pub fn before_response(&self) -> bool {
        matches!(
            self,
            ExchangeError::Unsent(_) | ExchangeError::ClosedBeforeResponse(_)
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the backend closed the connection {0} bytes before the end of the body")]
    Truncated(u64),
    #[error("the backend closed the connection inside a chunked body")]
    TruncatedChunked,
    #[error(transparent)]
    Chunked(#[from] ChunkError),
    #[error("reading the body from the backend failed")]
    Io(#[source] io::Error),
}

pub struct Connection {
    stream: TcpStream,
    /// Bytes read and not yet used: what follows a response head.
    read: BytesMut,
    /// The request head, encoded; kept for its capacity.
    write: Vec<u8>,
    /// Room to make before the next body read.
    read_size: usize,
    /// Bytes of the response came since the last ACK we asked for: a wait
    /// for more first acknowledges them (`ack_now`).
    unacked: bool,
    pub addr: SocketAddr,
}

impl Connection {
    pub fn new(stream: TcpStream, addr: SocketAddr) -> Self {
        Self {
            stream,
            read: BytesMut::new(),
            write: Vec::with_capacity(512),
            read_size: READ_SIZE,
            unacked: false,
            addr,
        }
    }

    /// An idle connection is fit for a request if the backend neither
    /// closed it nor sent anything unasked. Free unless the socket became
    /// readable since the last read (the last read was short, which cleared
    /// its readiness): then one read that returns at once.
    pub fn is_fit(&mut self) -> bool {
        if !self.read.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Send a request without a body and read the final response's head.
    /// `parts` stays the caller's.
    pub async fn exchange(
        &mut self,
        parts: &http::request::Parts,
        forwarding: Option<&Forwarding>,
        max_head_bytes: usize,
    ) -> Result<ResponseHead, ExchangeError> {
        encode_head(parts, forwarding, &mut self.write);
        // The request carries the ACK of all that came before it.
        self.unacked = false;
        self.write_request().await?;
        let is_head = parts.method == http::Method::HEAD;
        let mut interim = 0;
        let mut answered = false;
        loop {
            if let Some(head) = parse_head(&mut self.read, is_head, max_head_bytes)? {
                if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS
                {
                    interim += 1;
                    if interim > MAX_INTERIM {
                        return Err(ExchangeError::TooManyInterim);
                    }
                    continue;
                }
                return Ok(head);
            }
            match std::future::poll_fn(|cx| self.poll_fill(cx)).await {
                Ok(0) if answered => {
                    return Err(ExchangeError::Io(io::ErrorKind::UnexpectedEof.into()))
                }
                Ok(0) => return Err(ExchangeError::ClosedBeforeResponse(None)),
                Ok(_) => answered = true,
                Err(e) if !answered => return Err(ExchangeError::ClosedBeforeResponse(Some(e))),
                Err(e) => return Err(ExchangeError::Io(e)),
            }
        }
    }

    /// Write the encoded request, telling a failure before its first byte
    /// (nothing sent) from one after. Written at once when the socket has
    /// room, as it almost always has.
    async fn write_request(&mut self) -> Result<(), ExchangeError> {
        let mut written = 0;
        while written < self.write.len() {
            let failed = match self.stream.write(&self.write[written..]).await {
                Ok(0) => io::ErrorKind::WriteZero.into(),
                Ok(n) => {
                    written += n;
                    continue;
                }
                Err(e) => e,
            };
            return Err(match written {
                0 => ExchangeError::Unsent(failed),
                _ => ExchangeError::ClosedBeforeResponse(Some(failed)),
            });
        }
        Ok(())
    }

    /// Read more into the buffer; `Ok(0)` at the backend's close. Through
    /// `AsyncRead`, not `try_read`: a short read then clears the socket's
    /// readiness, so the next read (or `is_fit`) waits for the kernel's
    /// word instead of trying a read that would block, one system call per
    /// request.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.read.reserve(self.read_size);
        let room = self.read.capacity() - self.read.len();
        let polled = tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.read);
        let Poll::Ready(n) = polled else {
            self.ack_now();
            return Poll::Pending;
        };
        let n = n?;
        if n == room {
            self.read_size = (self.read_size * 2).min(MAX_READ_SIZE);
        }
        self.unacked |= n > 0;
        Poll::Ready(Ok(n))
    }

    /// Part of a response is in and we wait for the rest: acknowledge it
    /// now rather than after the delayed-ACK timer. A backend without
    /// TCP_NODELAY that writes its head and body apart (python's
    /// http.server) holds the body back under Nagle until its head is
    /// acknowledged: 40 ms per request on a connection past its first few
    /// exchanges, whose ACKs are delayed. TCP_QUICKACK sends the pending
    /// ACK at once, but does not stay set (Linux goes back to delayed ACKs
    /// on its own), so it is asked for at each such wait: one setsockopt,
    /// and none for a response that comes in one read.
    fn ack_now(&mut self) {
        if std::mem::take(&mut self.unacked) {
            // A failure costs at most the delay this avoids.
            let _ = socket2::SockRef::from(&self.stream).set_tcp_quickack(true);
        }
    }
}

/// The request line and fields, as hyper's client writes them for a
/// request without a body: the fields as they are (the handler has
/// already removed hop-by-hop ones and set framing), no field added.
pub fn encode_head(
    parts: &http::request::Parts,
    forwarding: Option<&Forwarding>,
    out: &mut Vec<u8>,
) {
    out.clear();
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        if forwarding.is_some() && Forwarding::replaces(name) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(forwarding) = forwarding {
        forwarding.write(out);
    }
    out.extend_from_slice(b"\r\n");
}

/// Where a connection goes when its response ended as framed (the pool).
pub trait Release {
    fn release(self, conn: Connection);
}

impl<F: FnOnce(Connection)> Release for F {
    fn release(self, conn: Connection) {
        self(conn)
    }
}

/// A response body read from its connection. When it ends as framed, the
/// connection is handed to `release` if it may carry another request.
pub struct BodyReader<R: Release + Unpin> {
    conn: Option<Connection>,
    state: Reading,
    /// `None` once used, or from the start if the response's head does not
    /// let the connection carry another request.
    release: Option<R>,
}

enum Reading {
    Length(u64),
    Chunked(Decoder),
    UntilClose,
    Done,
}

impl<R: Release + Unpin> BodyReader<R> {
    pub fn new(conn: Connection, head: &ResponseHead, release: R) -> Self {
        let state = match head.framing {
            Framing::Empty | Framing::Length(0) => Reading::Done,
            Framing::Length(n) => Reading::Length(n),
            Framing::Chunked => Reading::Chunked(Decoder::default()),
            Framing::UntilClose => Reading::UntilClose,
        };
        let mut body = Self {
            conn: Some(conn),
            state,
            release: head.reusable.then_some(release),
        };
        if matches!(body.state, Reading::Done) {
            body.finish();
        }
        body
    }

    /// All that is left of the body is already read: one write can carry
    /// it whole.
    pub fn is_in_hand(&self) -> bool {
        match (&self.state, &self.conn) {
            (Reading::Done, _) => true,
            (Reading::Length(n), Some(conn)) => conn.read.len() as u64 >= *n,
            _ => false,
        }
    }

    /// The body ended as framed: the connection goes back if nothing
    /// unasked follows it.
    fn finish(&mut self) {
        self.state = Reading::Done;
        if let (Some(mut conn), Some(release)) = (self.conn.take(), self.release.take()) {
            if conn.read.is_empty() {
                // An idle connection holds no buffer: what is left of the
                // last one is shared with the body already passed on.
                conn.read = BytesMut::new();
                conn.read_size = READ_SIZE;
                conn.unacked = false;
                release.release(conn);
            }
        }
    }

    fn fail(&mut self, e: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.state = Reading::Done;
        self.conn = None;
        Poll::Ready(Some(Err(e)))
    }
}

impl<R: Release + Unpin> Body for BodyReader<R> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.state {
                Reading::Done => return Poll::Ready(None),
                Reading::Length(left) => {
                    if !conn.read.is_empty() {
                        let n = usize::try_from(*left)
                            .unwrap_or(usize::MAX)
                            .min(conn.read.len());
                        let data = conn.read.split_to(n).freeze();
                        *left -= n as u64;
                        if *left == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    let left = *left;
                    match ready!(conn.poll_fill(cx)) {
                        Ok(0) => return this.fail(BodyError::Truncated(left)),
                        Ok(_) => {}
                        Err(e) => return this.fail(BodyError::Io(e)),
                    }
                }
                Reading::Chunked(decoder) => match decoder.decode(&mut conn.read) {
                    Ok(Some(Chunk::Data(data))) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Some(Chunk::Trailers(trailers))) => {
                        this.finish();
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    Ok(Some(Chunk::End)) => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(None) => match ready!(conn.poll_fill(cx)) {
                        Ok(0) => return this.fail(BodyError::TruncatedChunked),
                        Ok(_) => {}
                        Err(e) => return this.fail(BodyError::Io(e)),
                    },
                    Err(e) => return this.fail(e.into()),
                },
                Reading::UntilClose => {
                    if !conn.read.is_empty() {
                        let data = conn.read.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    match ready!(conn.poll_fill(cx)) {
                        Ok(0) => {
                            this.state = Reading::Done;
                            this.conn = None;
                            return Poll::Ready(None);
                        }
                        Ok(_) => {}
                        Err(e) => return this.fail(BodyError::Io(e)),
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, Reading::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            Reading::Done => SizeHint::with_exact(0),
            Reading::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http::HeaderMap;
    use http_body_util::BodyExt;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A backend that answers each request head it reads with the next of
    /// `answers`, written in pieces of `piece` bytes; it records the heads,
    /// and closes after the last answer.
    async fn backend(
        answers: Vec<&'static str>,
        piece: usize,
    ) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = heads.clone();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            for answer in answers {
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let mut b = [0u8; 1024];
                    let n = s.read(&mut b).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&b[..n]);
                }
                let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&got[..end]).into_owned());
                got.drain(..end);
                for part in answer.as_bytes().chunks(piece) {
                    s.write_all(part).await.unwrap();
                    s.flush().await.unwrap();
                    tokio::task::yield_now().await;
                }
            }
        });
        (addr, heads)
    }

    async fn connect(addr: SocketAddr) -> Connection {
        Connection::new(TcpStream::connect(addr).await.unwrap(), addr)
    }

    fn get(path: &str) -> http::request::Parts {
        let (mut parts, ()) = http::Request::get(path).body(()).unwrap().into_parts();
        parts.headers.insert("host", "svc".parse().unwrap());
        parts
    }

    /// The body's data and trailers, and the connection if it was released.
    async fn read_body(
        conn: Connection,
        head: &ResponseHead,
    ) -> (
        Result<(Vec<u8>, Option<HeaderMap>), BodyError>,
        Option<Connection>,
    ) {
        let released = Arc::new(Mutex::new(None));
        let slot = released.clone();
        let body = BodyReader::new(conn, head, move |c| *slot.lock().unwrap() = Some(c));
        let collected = body.collect().await.map(|c| {
            let trailers = c.trailers().cloned();
            (c.to_bytes().to_vec(), trailers)
        });
        let conn = released.lock().unwrap().take();
        (collected, conn)
    }

    #[tokio::test]
    async fn a_length_framed_answer_frees_the_connection_for_the_next_request() {
        let ok = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Backend: b1\r\n\r\nhello";
        let (addr, heads) = backend(vec![ok, ok], 3).await;
        let mut conn = connect(addr).await;
        for i in 0..2 {
            let head = conn
                .exchange(&get(&format!("/a?n={i}")), None, 8192)
                .await
                .unwrap();
            assert_eq!(head.status, StatusCode::OK);
            assert_eq!(head.headers["x-backend"], "b1");
            let (body, back) = read_body(conn, &head).await;
            assert_eq!(body.unwrap().0, b"hello");
            conn = back.expect("a complete keep-alive answer frees its connection");
        }
        let heads = heads.lock().unwrap();
        assert_eq!(heads[0], "GET /a?n=0 HTTP/1.1\r\nhost: svc\r\n\r\n");
        assert_eq!(heads.len(), 2);
    }

    #[tokio::test]
    async fn interim_answers_are_skipped_and_chunked_bodies_decoded() {
        let answer = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n\
            HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1;x=y\r\n!\r\n0\r\nX-Sum: 6\r\n\r\n";
        let (addr, _) = backend(vec![answer], 2).await;
        let mut conn = connect(addr).await;
        let head = conn.exchange(&get("/"), None, 8192).await.unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert!(
            !head.headers.contains_key("link"),
            "the 103's fields stay with it"
        );
        let (body, back) = read_body(conn, &head).await;
        let (data, trailers) = body.unwrap();
        assert_eq!(data, b"hello!");
        assert_eq!(trailers.unwrap()["x-sum"], "6");
        assert!(back.is_some());
    }

    #[tokio::test]
    async fn a_large_body_arrives_whole_and_the_idle_connection_keeps_no_buffer() {
        let head = "HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n";
        let answer: &'static str =
            Box::leak(format!("{head}{}", "z".repeat(1_000_000)).into_boxed_str());
        let (addr, _) = backend(vec![answer], 100_000).await;
        let mut conn = connect(addr).await;
        let head = conn.exchange(&get("/big"), None, 8192).await.unwrap();
        let (body, back) = read_body(conn, &head).await;
        let data = body.unwrap().0;
        assert_eq!(data.len(), 1_000_000);
        assert!(data.iter().all(|b| *b == b'z'));
        let back = back.unwrap();
        assert_eq!(back.read.capacity(), 0);
        assert_eq!(back.read_size, READ_SIZE);
    }

    #[tokio::test]
    async fn a_close_delimited_body_ends_with_the_connection() {
        let (addr, _) = backend(vec!["HTTP/1.1 200 OK\r\n\r\nuntil the end"], 4).await;
        let mut conn = connect(addr).await;
        let head = conn.exchange(&get("/"), None, 8192).await.unwrap();
        assert_eq!(head.framing, Framing::UntilClose);
        let (body, back) = read_body(conn, &head).await;
        assert_eq!(body.unwrap().0, b"until the end");
        assert!(back.is_none(), "never reused");
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error_not_an_end() {
        for answer in [
            "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
        ] {
            let (addr, _) = backend(vec![answer], 64).await;
            let mut conn = connect(addr).await;
            let head = conn.exchange(&get("/"), None, 8192).await.unwrap();
            let (body, back) = read_body(conn, &head).await;
            assert!(body.is_err(), "{answer:?}");
            assert!(back.is_none());
        }
    }

    #[tokio::test]
    async fn a_backend_gone_before_answering_is_told_apart() {
        let (addr, _) = backend(vec![], 1).await;
        let mut conn = connect(addr).await;
        let err = conn.exchange(&get("/"), None, 8192).await.unwrap_err();
        assert!(
            matches!(err, ExchangeError::ClosedBeforeResponse(_)),
            "{err:?}"
        );
        let (addr, _) = backend(vec!["HTTP/1.1 200"], 64).await;
        let mut conn = connect(addr).await;
        let err = conn.exchange(&get("/"), None, 8192).await.unwrap_err();
        assert!(
            matches!(err, ExchangeError::Io(_)),
            "part of an answer: {err:?}"
        );
    }

    #[tokio::test]
    async fn a_head_request_reads_no_body_whatever_the_length_says() {
        let (addr, _) = backend(vec!["HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"], 64).await;
        let mut conn = connect(addr).await;
        let (mut parts, ()) = http::Request::head("/").body(()).unwrap().into_parts();
        parts.headers.insert("host", "svc".parse().unwrap());
        let head = conn.exchange(&parts, None, 8192).await.unwrap();
        assert_eq!(head.headers["content-length"], "10");
        let (body, back) = read_body(conn, &head).await;
        assert!(body.unwrap().0.is_empty());
        assert!(back.is_some());
    }

    #[tokio::test]
    async fn an_idle_connection_the_backend_closed_is_unfit() {
        let ok = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        let (addr, _) = backend(vec![ok], 64).await;
        let mut conn = connect(addr).await;
        let head = conn.exchange(&get("/"), None, 8192).await.unwrap();
        let (_, back) = read_body(conn, &head).await;
        let mut conn = back.unwrap();
        // The backend closes after its last answer; wait for the FIN.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while conn.is_fit() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the close was never seen"
            );
            conn.stream.readable().await.unwrap();
        }
    }
}
