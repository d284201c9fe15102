//! One client connection: HTTP/1.1 or h2c (prior knowledge) on the same
//! port, and a watchdog for the timeouts hyper does not express the way we
//! need them. hyper's own header timeout also runs while a keep-alive
//! connection waits for its next request, so it cannot give "10 s for
//! headers, 30 s idle": the watchdog below does, from byte activity and the
//! number of requests in flight.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::server::TlsStream;

use prometheus_client::metrics::gauge::Gauge;

use super::request_line::LineGuard;

/// Timeouts a client connection lives under.
#[derive(Debug, Clone, Copy)]
pub struct ConnTimeouts {
    pub header: Duration,
    pub idle: Duration,
    /// How long a request may wait on its backend with no client traffic.
    pub backend: Duration,
}

/// Milliseconds on the kernel's coarse monotonic clock. Every read and
/// write stamps the connection's activity, and the coarse clock is read
/// from the vDSO without the TSC: a few ns, against tens for `Instant::now`
/// under a hypervisor. Its tick (1-4 ms) is far below any timeout here.
pub(crate) fn coarse_ms() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    match clock_gettime(ClockId::CLOCK_MONOTONIC_COARSE) {
        Ok(t) => t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000,
        // Not on Linux: the precise clock does as well, only slower.
        Err(_) => {
            static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
            START.get_or_init(Instant::now).elapsed().as_millis() as u64
        }
    }
}

/// A client connection's place under `--max-connections` and its count in
/// `portico_active_connections`, given back when the last part of the
/// connection is gone: its `ConnState`, which the socket (`Tracked`) holds,
/// and with it a tunnel after an upgrade. A WebSocket is then refused past
/// the limit, counted, and waited for by the drain like any connection.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    active: Gauge,
}

impl Slot {
    pub fn new(permit: OwnedSemaphorePermit, active: Gauge) -> Self {
        active.inc();
        Self {
            _permit: permit,
            active,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.active.dec();
    }
}

/// `ConnState::body`: none coming, or read to its end.
const BODY_DONE: u8 = 0;
/// Coming, and forwarded by `Capped`, perhaps after the response.
const BODY_HELD: u8 = 1;
/// Coming, and nobody forwards it: hyper drains it once, then stops.
const BODY_UNHELD: u8 = 2;

/// Shared between the connection's IO, its requests and its watchdog.
#[derive(Debug)]
pub struct ConnState {
    /// `coarse_ms()` when the connection was accepted.
    base: u64,
    in_flight: AtomicU32,
    /// Milliseconds since `base` of the last byte read or written.
    last_io: AtomicU64,
    /// Milliseconds since `base` (plus one, 0 meaning none) at which bytes of
    /// a request head arrived with no request in flight.
    head_started: AtomicU64,
    /// HTTP/2: bytes between streams are frames (PING, SETTINGS), not the
    /// start of a request head, so only the idle timeout applies.
    multiplexed: AtomicBool,
    /// Requests begun on this connection.
    served: AtomicU32,
    /// Our HTTP/1.1 path: a graceful shutdown was asked; the connection
    /// closes between requests.
    closing: AtomicBool,
    /// The next write is the last response, whole: it may wait for the FIN.
    hold_next_write: AtomicBool,
    /// HTTP/1.1: the client ended its side (a FIN) while its request was in
    /// flight; kept from hyper until the response is done (`hold_eof`).
    eof_held: AtomicBool,
    /// HTTP/1.1: where the request's body stands (`BODY_*`). A backend may
    /// answer before it has read the whole body, and the rest is read after
    /// the response is done: while a body is being forwarded (`BODY_HELD`),
    /// or drained by hyper (`BODY_UNHELD`: it gets one try, in the poll
    /// that ends the response, then stops reading), those bytes are not a
    /// new request head (no header timeout, no request-line check on them).
    body: AtomicU8,
    /// HTTP/1.1: the request's body ended with a trailer section. hyper ends
    /// that section at the first empty line, a bare LF one too, and drops
    /// what follows up to CRLFCRLF, where a peer that ends lines at LF sees
    /// another request: the connection cannot be trusted to be in step
    /// with the client's (or a front proxy's) idea of it, so it closes.
    trailers: AtomicBool,
    /// Held as long as the connection lives (`None` in unit tests).
    _slot: Option<Slot>,
}

impl ConnState {
    pub fn new() -> Arc<Self> {
        Self::build(None, coarse_ms())
    }

    /// The state of a connection that holds `slot` until it is gone.
    pub fn holding(slot: Slot) -> Arc<Self> {
        Self::build(Some(slot), coarse_ms())
    }

    /// `accepted_ms`: when the connection was accepted, on the coarse clock.
    fn build(slot: Option<Slot>, accepted_ms: u64) -> Arc<Self> {
        Arc::new(Self {
            base: accepted_ms,
            in_flight: AtomicU32::new(0),
            last_io: AtomicU64::new(0),
            // A new connection owes its first request head at once.
            head_started: AtomicU64::new(1),
            multiplexed: AtomicBool::new(false),
            served: AtomicU32::new(0),
            closing: AtomicBool::new(false),
            hold_next_write: AtomicBool::new(false),
            eof_held: AtomicBool::new(false),
            body: AtomicU8::new(BODY_DONE),
            trailers: AtomicBool::new(false),
            _slot: slot,
        })
    }

    /// `now_ms` (the coarse clock) as milliseconds since the connection
    /// was accepted.
    fn since_accepted(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.base)
    }

    /// Note bytes moved; true when those read begin a request head.
    fn touch(&self, read: bool) -> bool {
        self.touch_at(read, coarse_ms())
    }

    /// `touch`, with the time given.
    fn touch_at(&self, read: bool, now_ms: u64) -> bool {
        let now = self.since_accepted(now_ms);
        self.last_io.store(now, Ordering::Relaxed);
        let head_starts = read
            && self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_started.load(Ordering::Relaxed) == 0
            && !self.multiplexed.load(Ordering::Relaxed)
            && self.body.load(Ordering::Relaxed) == BODY_DONE;
        if head_starts {
            self.head_started.store(now + 1, Ordering::Relaxed);
        }
        head_starts
    }

    /// Ask our HTTP/1.1 path to close the connection between requests
    /// (a graceful shutdown; the next poll sees it).
    pub fn close_gracefully(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }

    pub fn closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// Bytes were read (our HTTP/1.1 path); true when they begin a head.
    pub fn touch_read(&self) -> bool {
        self.touch(true)
    }

    /// Bytes were written (our HTTP/1.1 path).
    pub fn touch_write(&self) {
        self.touch(false);
    }

    /// Whether the next write is a held last response (see
    /// `hold_last_response`).
    pub fn holds_next_write(&self) -> bool {
        self.hold_next_write.load(Ordering::Relaxed)
    }

    /// The held write was made.
    pub fn write_held(&self) {
        self.hold_next_write.store(false, Ordering::Relaxed);
    }

    /// The connection was upgraded (a 101): from now on its bytes are the
    /// tunnel's, never a request head, as between HTTP/2 streams.
    pub fn upgraded(&self) {
        self.multiplexed.store(true, Ordering::Relaxed);
    }

    /// Mark a request as begun; the guard ends it when dropped (with the
    /// response body, once it has been written out). `body_open`: its body
    /// is still to be read.
    pub fn begin_request(self: &Arc<Self>, version: http::Version, body_open: bool) -> InFlight {
        if version == http::Version::HTTP_2 {
            self.multiplexed.store(true, Ordering::Relaxed);
        }
        let body = if body_open { BODY_UNHELD } else { BODY_DONE };
        self.body.store(body, Ordering::Relaxed);
        self.trailers.store(false, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.served.fetch_add(1, Ordering::Relaxed);
        self.head_started.store(0, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// The request's body is being forwarded (`Capped`): it may go on after
    /// the response.
    pub fn body_held(&self) {
        self.body.store(BODY_HELD, Ordering::Relaxed);
    }

    /// The request's body has been read to its end (`ended`), or let go
    /// before it (hyper drains the rest once).
    pub fn body_let_go(&self, ended: bool) {
        let body = if ended { BODY_DONE } else { BODY_UNHELD };
        self.body.store(body, Ordering::Relaxed);
    }

    /// The request's body carried trailers (see `trailers`).
    pub fn saw_trailers(&self) {
        if !self.multiplexed.load(Ordering::Relaxed) {
            self.trailers.store(true, Ordering::Relaxed);
        }
    }

    /// Whether this HTTP/1.1 request's body carried trailers, so that its
    /// response must close the connection.
    pub fn had_trailers(&self) -> bool {
        self.trailers.load(Ordering::Relaxed)
    }

    /// The response about to be written is the connection's last, and all
    /// of it is in hand. Its write is then sent with MSG_MORE: the kernel
    /// holds a short tail until the close, and the FIN rides on the last
    /// data segment. The client then answers both with one ACK, or with its
    /// own FIN: a segment fewer per connection, two when the FIN answers.
    /// Should the close not follow, the kernel sends the tail after an RTO
    /// (200 ms) anyway.
    pub fn hold_last_response(&self) {
        self.hold_next_write.store(true, Ordering::Relaxed);
    }

    /// The client's end of input was read: may hyper see it yet? Not while
    /// an HTTP/1.1 request is in flight. hyper would take it for a client
    /// that left and drop the request, but a client that shut its write
    /// side after a whole request (`nc -N`, `shutdown(SHUT_WR)`) still
    /// reads the response, as HAProxy and nginx give it. The read is
    /// reported as not ready instead, and `supervise` has hyper read again
    /// once the response is done (`release_eof`). hyper keeps reading while
    /// the request is in flight, so a client that resets still fails that
    /// read and cancels its request; a write that fails does too. (hyper's
    /// own `half_close(true)` would stop those reads, and a reset would go
    /// unseen until the response.) HTTP/2 frames its own ends of streams.
    fn hold_eof(&self) -> bool {
        let hold =
            self.in_flight.load(Ordering::Relaxed) > 0 && !self.multiplexed.load(Ordering::Relaxed);
        if hold {
            self.eof_held.store(true, Ordering::Relaxed);
        }
        hold
    }

    /// An end of input was held and no request is in flight any more: true
    /// once, for the connection to be polled again, so that hyper reads
    /// the end and closes.
    fn release_eof(&self) -> bool {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return false;
        }
        // hyper had its one try at a body nobody forwards (in the poll that
        // ended the response): the next bytes begin a head, with its timeout.
        if self.body.load(Ordering::Relaxed) == BODY_UNHELD {
            self.body.store(BODY_DONE, Ordering::Relaxed);
        }
        self.eof_held.load(Ordering::Relaxed) && self.eof_held.swap(false, Ordering::Relaxed)
    }

    /// A request has ended at `now_ms`: the idle timeout counts from here.
    fn end_request(&self, now_ms: u64) {
        self.last_io
            .store(self.since_accepted(now_ms), Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// How long the watchdog may wait from `now_ms` (the coarse clock)
    /// before it must look again, or `None` if a timeout has passed.
    fn next_deadline(&self, t: &ConnTimeouts, now_ms: u64) -> Option<Duration> {
        let now = self.since_accepted(now_ms);
        let idle_for = |limit: Duration| {
            (self.last_io.load(Ordering::Relaxed) + limit.as_millis() as u64).checked_sub(now)
        };
        let left_ms = if self.in_flight.load(Ordering::Relaxed) > 0 {
            idle_for(t.idle.max(t.backend))?
        } else {
            let idle_left = idle_for(t.idle)?;
            match self.head_started.load(Ordering::Relaxed) {
                0 => idle_left,
                started => {
                    let head_left = (started - 1 + t.header.as_millis() as u64).checked_sub(now)?;
                    idle_left.min(head_left)
                }
            }
        };
        if left_ms == 0 {
            return None;
        }
        Some(Duration::from_millis(left_ms))
    }
}

tokio::task_local! {
    /// Within an HTTP/2 stream's task (`StreamExec`): how its response body
    /// stands, as the body's polls report it (`note_body_poll`).
    static STREAM: std::cell::Cell<BodyProgress>;
}

#[derive(Debug, Clone, Copy, Default)]
struct BodyProgress {
    /// The body's last poll gave hyper a frame: the stream now waits for
    /// the client (its flow-control window) to take it, not for the backend.
    waiting_on_client: bool,
    /// A frame was taken during this poll of the stream's task.
    took: bool,
}

/// Called by the response body after each of its polls, with whether it
/// gave a frame. Outside an HTTP/2 stream's task (HTTP/1.1: the body is
/// polled by the connection, whose watchdog sees its bytes) it does
/// nothing.
pub fn note_body_poll(gave_frame: bool) {
    let _ = STREAM.try_with(|p| {
        let took = p.get().took || gave_frame;
        p.set(BodyProgress {
            waiting_on_client: gave_frame,
            took,
        });
    });
}

/// Spawns each HTTP/2 stream of a client connection as a task of its own
/// (as `TokioExecutor` does), under a stall guard. hyper polls a response
/// body's next frame only once the client's window takes the last one, and
/// a client may keep that window shut while PINGs or other streams keep
/// the connection busy: the watchdog, which counts bytes, would never see
/// the stream stall, and the backend connection would be held for as long
/// as the client cares to. A stream whose body has handed hyper a frame and
/// has not been asked for another for `idle` is dropped: hyper's stream is
/// reset (RST_STREAM CANCEL), and the body with its backend connection goes.
/// A stream waiting for its backend (its body's poll was pending) is not
/// the client's doing and is left alone.
#[derive(Debug, Clone, Copy)]
pub struct StreamExec {
    idle: Duration,
}

impl StreamExec {
    pub fn new(idle: Duration) -> Self {
        Self { idle }
    }
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(StreamTask::new(fut, self.idle));
    }
}

pin_project_lite::pin_project! {
    /// One HTTP/2 stream's task (see `StreamExec`).
    struct StreamTask<F> {
        #[pin]
        inner: F,
        // Armed at the stream's first wait on the client; kept armed after
        // (a fire while the stream waits on its backend is ignored).
        #[pin]
        timer: Option<tokio::time::Sleep>,
        idle: Duration,
        waiting_on_client: bool,
        // `coarse_ms()` when the client last took a frame.
        last_taken: u64,
    }
}

impl<F> StreamTask<F> {
    fn new(inner: F, idle: Duration) -> Self {
        Self {
            inner,
            timer: None,
            idle,
            waiting_on_client: false,
            last_taken: 0,
        }
    }
}

impl<F: Future<Output = ()>> Future for StreamTask<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let before = BodyProgress {
            waiting_on_client: *this.waiting_on_client,
            took: false,
        };
        let inner = this.inner.as_mut();
        let (polled, progress) = STREAM.sync_scope(std::cell::Cell::new(before), || {
            (inner.poll(cx), STREAM.with(std::cell::Cell::get))
        });
        if polled.is_ready() {
            return Poll::Ready(());
        }
        *this.waiting_on_client = progress.waiting_on_client;
        if !progress.waiting_on_client {
            return Poll::Pending;
        }
        if progress.took {
            *this.last_taken = coarse_ms();
        }
        if this.timer.is_none() {
            this.timer.set(Some(tokio::time::sleep(*this.idle)));
        }
        let Some(mut timer) = this.timer.as_mut().as_pin_mut() else {
            return Poll::Pending;
        };
        while timer.as_mut().poll(cx).is_ready() {
            let Some(left) = stall_left(*this.last_taken, *this.idle, coarse_ms()) else {
                tracing::debug!(idle = ?this.idle, "HTTP/2 stream cancelled: the client took none of its response for the idle timeout");
                return Poll::Ready(());
            };
            timer.as_mut().reset(tokio::time::Instant::now() + left);
        }
        Poll::Pending
    }
}

/// How long a stream whose client last took a frame at `last_taken_ms`
/// may still wait at `now_ms` (both on the coarse clock), or `None` once it
/// has waited `idle`.
fn stall_left(last_taken_ms: u64, idle: Duration, now_ms: u64) -> Option<Duration> {
    let due = last_taken_ms + idle.as_millis() as u64;
    match due.checked_sub(now_ms) {
        None | Some(0) => None,
        Some(left) => Some(Duration::from_millis(left)),
    }
}

/// A request in flight on a connection.
#[derive(Debug)]
pub struct InFlight(Arc<ConnState>);

impl InFlight {
    /// Requests begun on this connection so far, this one included.
    pub fn served(&self) -> u32 {
        self.0.served.load(Ordering::Relaxed)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end_request(coarse_ms());
    }
}

pin_project_lite::pin_project! {
    /// The client socket (plain or TLS), noting every byte that moves.
    pub struct Tracked<T> {
        #[pin]
        inner: T,
        state: Arc<ConnState>,
        // Bytes read before the protocol was chosen, served before the
        // socket's.
        first: Bytes,
        // HTTP/1.1: each request target checked against its limit as it
        // is read (`request_line`), and the 414 left to write once one is
        // over it; after that, the end of input.
        line: LineGuard,
        refusal: Option<&'static [u8]>,
    }
}

impl<T> Tracked<T> {
    /// `first`: what was already read from `inner` (empty if nothing).
    pub fn new(inner: T, state: Arc<ConnState>, first: Bytes) -> Self {
        Self {
            inner,
            state,
            first,
            line: LineGuard::off(),
            refusal: None,
        }
    }

    /// HTTP/1.1: a request target over `max` bytes is answered 414 while
    /// it is read, before hyper's buffer for the head fills and it answers
    /// 431 instead.
    pub fn limit_targets(mut self, max: usize) -> Self {
        self.line = LineGuard::new(max);
        self
    }
}

/// Write what is left of `answer`, then report the end of input: hyper
/// then drops the partial head and closes the connection.
fn poll_refuse<T: AsyncWrite>(
    mut inner: Pin<&mut T>,
    answer: &mut &'static [u8],
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    while !answer.is_empty() {
        match std::task::ready!(inner.as_mut().poll_write(cx, answer))? {
            0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            n => *answer = &answer[n..],
        }
    }
    inner.poll_flush(cx)
}

impl<T: AsyncRead + AsyncWrite> AsyncRead for Tracked<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut this = self.project();
        if let Some(answer) = this.refusal {
            return poll_refuse(this.inner, answer, cx);
        }
        let before = buf.filled().len();
        if !this.first.is_empty() && buf.remaining() > 0 {
            let n = this.first.len().min(buf.remaining());
            buf.put_slice(&this.first[..n]);
            this.first.advance(n);
            if this.first.is_empty() {
                // An emptied `Bytes` still holds its buffer; the connection
                // may live for hours.
                *this.first = Bytes::new();
            }
            // The connection's first bytes: the guard is armed already.
            this.state.touch(true);
        } else {
            let polled = this.inner.as_mut().poll_read(cx, buf);
            if !matches!(polled, Poll::Ready(Ok(()))) {
                return polled;
            }
            if buf.filled().len() == before {
                if buf.remaining() > 0 && this.state.hold_eof() {
                    // The end of input, held (no waker is needed:
                    // `supervise` polls again when the response is done).
                    return Poll::Pending;
                }
                return polled;
            }
            if this.state.touch(true) {
                this.line.arm();
            }
        }
        if this.line.over_limit(&buf.filled()[before..]) {
            // hyper never sees this read: the head it holds stays partial.
            buf.set_filled(before);
            let answer = this.refusal.insert(super::request_line::URI_TOO_LONG);
            return poll_refuse(this.inner, answer, cx);
        }
        Poll::Ready(Ok(()))
    }
}

/// A client socket that can send data for the kernel to hold (MSG_MORE).
pub trait HoldWrite {
    /// Write `bufs` with MSG_MORE; `None` when the socket cannot (TLS: its
    /// records are written to the TCP socket by the TLS layer).
    fn poll_write_held(
        &self,
        _cx: &mut Context<'_>,
        _bufs: &[io::IoSlice<'_>],
    ) -> Option<Poll<io::Result<usize>>> {
        None
    }
}

impl HoldWrite for TcpStream {
    fn poll_write_held(
        &self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Option<Poll<io::Result<usize>>> {
        let flags = nix::libc::MSG_MORE | nix::libc::MSG_NOSIGNAL;
        Some(loop {
            match self.poll_write_ready(cx) {
                Poll::Pending => break Poll::Pending,
                Poll::Ready(Err(e)) => break Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            // `try_io` clears the readiness on WouldBlock, so the next poll
            // waits for the kernel.
            match self.try_io(Interest::WRITABLE, || {
                SockRef::from(self).send_vectored_with_flags(bufs, flags)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                written => break Poll::Ready(written),
            }
        })
    }
}

impl HoldWrite for TlsStream<TcpStream> {}

/// The one write of a held last response (`ConnState::hold_last_response`),
/// or `None` to write as usual: nothing is held, or the socket cannot hold.
fn poll_held<T: HoldWrite>(
    state: &ConnState,
    inner: &T,
    cx: &mut Context<'_>,
    bufs: &[io::IoSlice<'_>],
) -> Option<Poll<io::Result<usize>>> {
    if !state.hold_next_write.load(Ordering::Relaxed) {
        return None;
    }
    let polled = inner.poll_write_held(cx, bufs)?;
    if polled.is_ready() {
        // One write only: anything after it goes out at once.
        state.hold_next_write.store(false, Ordering::Relaxed);
    }
    Some(polled)
}

impl<T: AsyncWrite + HoldWrite> AsyncWrite for Tracked<T> {
    // hyper writes a response whole through `poll_write` (its buffer
    // holds the head and the body's first bytes); either way may carry the
    // held last response.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let held = poll_held(
            this.state,
            this.inner.as_ref().get_ref(),
            cx,
            &[io::IoSlice::new(buf)],
        );
        let polled = held.unwrap_or_else(|| this.inner.poll_write(cx, buf));
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.state.touch(false);
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let held = poll_held(this.state, this.inner.as_ref().get_ref(), cx, bufs);
        let polled = held.unwrap_or_else(|| this.inner.poll_write_vectored(cx, bufs));
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.state.touch(false);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// The shutdown as every connection sees it: a flag, and `Notify`s that
/// wake the connections waiting on it. Each connection's wait is a
/// `Notified` (64 bytes), where a `watch` receiver's would be three times
/// that, for the connection's whole life. The waiters are spread over
/// several `Notify`s by a key (as `watch` spreads its own), so that
/// connections coming and going do not all take one lock.
#[derive(Debug, Default)]
pub struct Shutdown {
    asked: AtomicBool,
    notify: [tokio::sync::Notify; 8],
}

impl Shutdown {
    /// Ask every connection to finish: those waiting wake now, the others
    /// see the flag when next they look.
    pub fn fire(&self) {
        self.asked.store(true, Ordering::SeqCst);
        for notify in &self.notify {
            notify.notify_waiters();
        }
    }

    pub fn is_asked(&self) -> bool {
        self.asked.load(Ordering::SeqCst)
    }

    /// Ready once shutdown is asked. `key` spreads the waiters (any number
    /// that differs between connections: the client's port).
    pub async fn asked(&self, key: usize) {
        let notify = &self.notify[key % self.notify.len()];
        loop {
            let notified = notify.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the flag is read: a `fire` in between
            // still wakes this wait.
            notified.as_mut().enable();
            if self.is_asked() {
                return;
            }
            notified.await;
        }
    }
}

/// Drive one connection future until it ends, a timeout passes, or shutdown
/// is asked (then it is closed gracefully: in-flight requests finish).
///
/// This runs on every wake-up of the connection, so the watchdog costs three
/// atomic loads there (the third for a held end of input): its timer and
/// the shutdown signal are polled (which registers them) only when armed
/// anew or when they have fired.
///
/// The connection is pinned by the caller: a future passed by value would
/// be held twice in this one's state (as the argument and as the pinned
/// local), for the connection's whole life.
pub async fn supervise<F, T, E>(
    mut conn: Pin<&mut F>,
    graceful: impl FnOnce(Pin<&mut F>),
    state: &ConnState,
    timeouts: &ConnTimeouts,
    peer: &SocketAddr,
    shutdown: &Shutdown,
) -> Option<T>
where
    F: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut graceful = Some(graceful);
    let first = state.next_deadline(timeouts, coarse_ms())?;
    let timer = tokio::time::sleep(first);
    tokio::pin!(timer);
    let mut timer_armed = false;
    let stop = shutdown.asked(usize::from(peer.port()));
    tokio::pin!(stop);
    let mut stop_armed = false;
    std::future::poll_fn(|cx| loop {
        if let Poll::Ready(ended) = conn.as_mut().poll(cx) {
            return Poll::Ready(match ended {
                Ok(done) => Some(done),
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "client connection ended with an error");
                    None
                }
            });
        }
        if state.release_eof() {
            // The client's end of input, held while it was served: hyper
            // reads it now and closes.
            continue;
        }
        if graceful.is_some() && (!stop_armed || shutdown.is_asked()) {
            stop_armed = true;
            if stop.as_mut().poll(cx).is_ready() {
                if let Some(g) = graceful.take() {
                    g(conn.as_mut());
                }
                // hyper acts on a graceful shutdown when next polled.
                continue;
            }
        }
        if timer_armed && !timer.is_elapsed() {
            return Poll::Pending;
        }
        if timer.as_mut().poll(cx).is_pending() {
            timer_armed = true;
            return Poll::Pending;
        }
        let Some(wait) = state.next_deadline(timeouts, coarse_ms()) else {
            tracing::debug!(%peer, "closing connection: header or idle timeout");
            return Poll::Ready(None);
        };
        timer.as_mut().reset(tokio::time::Instant::now() + wait);
        timer_armed = false;
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reading of the coarse clock that the tests below pass in as the
    /// time a connection was accepted.
    const T0: u64 = 1_000_000;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn timeouts() -> ConnTimeouts {
        ConnTimeouts {
            header: Duration::from_secs(10),
            idle: Duration::from_secs(30),
            backend: Duration::from_secs(60),
        }
    }

    /// End `request` at `now_ms`, as if the clock read that when its guard
    /// was dropped: the drop stamps the clock's reading, and the stamp is
    /// then set to the time given.
    fn end_at(request: InFlight, now_ms: u64) {
        let state = Arc::clone(&request.0);
        drop(request);
        state.touch_at(false, now_ms);
    }

    /// Segments the kernel has received on the local socket at `local`,
    /// as `ss` reports them (TCP_INFO's tcpi_segs_in).
    fn segments_in(local: SocketAddr) -> u64 {
        let out = std::process::Command::new("ss")
            .args(["-tinaH", "src", &local.to_string()])
            .output()
            .expect("run ss (iproute2)");
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .find_map(|f| f.strip_prefix("segs_in:"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no segs_in for {local} in: {text}"))
    }

    /// Write a response through `Tracked` (as one buffer, or as a vector
    /// of head and body), close, and count what the client's socket
    /// received: the SYN-ACK, then the data and the FIN.
    async fn segments_for_a_last_response(hold: bool, vectored: bool) -> u64 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("address"))
            .await
            .expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        let state = ConnState::new();
        let mut server = Tracked::new(accepted, state.clone(), Bytes::new());
        if hold {
            state.hold_last_response();
        }
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\n";
        let body = b"hello";
        let n = if vectored {
            let bufs = [io::IoSlice::new(head), io::IoSlice::new(body)];
            server.write_vectored(&bufs).await.expect("write")
        } else {
            server
                .write(&[&head[..], &body[..]].concat())
                .await
                .expect("write")
        };
        assert_eq!(n, head.len() + body.len());
        server.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("read");
        assert_eq!(got.len(), n, "the whole response, then the end");
        segments_in(client.local_addr().expect("address"))
    }

    #[tokio::test]
    async fn a_held_last_response_leaves_with_the_fin() {
        for vectored in [false, true] {
            assert_eq!(segments_for_a_last_response(false, vectored).await, 3);
            assert_eq!(segments_for_a_last_response(true, vectored).await, 2);
        }
    }

    #[test]
    fn deadlines_follow_activity_and_requests() {
        let t = ConnTimeouts {
            header: Duration::from_secs(10),
            idle: Duration::from_secs(30),
            backend: Duration::from_secs(60),
        };
        let s = ConnState::build(None, T0);
        // Fresh connection: owes its head within the header timeout.
        let d = s.next_deadline(&t, T0).unwrap_or_default();
        assert!(d <= Duration::from_secs(10) && d > Duration::from_secs(9));
        let g = s.begin_request(http::Version::HTTP_11, false);
        let d = s.next_deadline(&t, T0).unwrap_or_default();
        assert!(
            d > Duration::from_secs(59),
            "in flight waits for the backend"
        );
        end_at(g, T0);
        let d = s.next_deadline(&t, T0).unwrap_or_default();
        assert!(
            d > Duration::from_secs(29),
            "idle keep-alive gets the idle timeout"
        );
        s.touch_at(true, T0);
        let d = s.next_deadline(&t, T0).unwrap_or_default();
        assert!(
            d <= Duration::from_secs(10),
            "a started head gets the header timeout"
        );
    }

    #[tokio::test]
    async fn a_stream_goes_when_its_client_takes_nothing_for_the_idle_timeout() {
        let idle = Duration::from_millis(50);
        // Its body gave a frame and was never asked for the next one.
        let stalled = StreamTask::new(
            async {
                note_body_poll(true);
                std::future::pending::<()>().await
            },
            idle,
        );
        tokio::time::timeout(Duration::from_secs(10), stalled)
            .await
            .expect("a stream stalled on its client is dropped");
        // Its body waits for the backend: not the client's doing.
        let waiting = StreamTask::new(
            async {
                note_body_poll(true);
                note_body_poll(false);
                std::future::pending::<()>().await
            },
            idle,
        );
        assert!(tokio::time::timeout(idle * 6, waiting).await.is_err());
    }

    #[test]
    fn an_end_of_input_waits_for_the_http1_response_in_flight() {
        let s = ConnState::new();
        assert!(!s.hold_eof(), "idle: the end closes the connection");
        let request = s.begin_request(http::Version::HTTP_11, false);
        assert!(s.hold_eof());
        assert!(!s.release_eof(), "not while the request is in flight");
        drop(request);
        assert!(s.release_eof());
        assert!(!s.release_eof(), "released once");

        let h2 = ConnState::new();
        let stream = h2.begin_request(http::Version::HTTP_2, false);
        assert!(!h2.hold_eof(), "HTTP/2 is not held");
        drop(stream);
    }

    #[test]
    fn frames_between_h2_streams_are_not_a_request_head() {
        let t = ConnTimeouts {
            header: Duration::from_secs(10),
            idle: Duration::from_secs(30),
            backend: Duration::from_secs(60),
        };
        let s = ConnState::build(None, T0);
        end_at(s.begin_request(http::Version::HTTP_2, false), T0);
        s.touch_at(true, T0);
        let d = s.next_deadline(&t, T0).unwrap_or_default();
        assert!(
            d > Duration::from_secs(29),
            "an h2 PING keeps the idle timeout: {d:?}"
        );
    }

    #[test]
    fn a_request_head_is_owed_from_its_first_byte_however_slowly_the_rest_comes() {
        let t = timeouts();
        let s = ConnState::build(None, T0);
        assert_eq!(s.next_deadline(&t, T0), Some(Duration::from_secs(10)));
        assert_eq!(s.next_deadline(&t, T0 + 9_999), Some(ms(1)));
        assert_eq!(s.next_deadline(&t, T0 + 10_000), None, "no head in time");

        // A keep-alive connection owes nothing until a head begins...
        let s = ConnState::build(None, T0);
        end_at(s.begin_request(http::Version::HTTP_11, false), T0 + 1_000);
        assert_eq!(
            s.next_deadline(&t, T0 + 1_000),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            s.next_deadline(&t, T0 + 5_000),
            Some(Duration::from_secs(26))
        );
        // ...then all of it within the header timeout, bytes or not.
        assert!(s.touch_at(true, T0 + 5_000), "these bytes begin a head");
        assert!(!s.touch_at(true, T0 + 14_000), "these continue it");
        assert_eq!(s.next_deadline(&t, T0 + 14_000), Some(ms(1_000)));
        assert_eq!(s.next_deadline(&t, T0 + 15_000), None);
    }

    #[test]
    fn idle_time_counts_from_the_last_byte_or_the_end_of_a_request() {
        let t = timeouts();
        let s = ConnState::build(None, T0);
        end_at(s.begin_request(http::Version::HTTP_11, false), T0 + 2_000);
        assert_eq!(s.next_deadline(&t, T0 + 31_999), Some(ms(1)));
        assert_eq!(s.next_deadline(&t, T0 + 32_000), None, "idle too long");

        // A response's bytes written after the request ended count too.
        let s = ConnState::build(None, T0);
        end_at(s.begin_request(http::Version::HTTP_11, false), T0 + 2_000);
        assert!(!s.touch_at(false, T0 + 20_000), "a write begins no head");
        assert_eq!(
            s.next_deadline(&t, T0 + 32_000),
            Some(Duration::from_secs(18))
        );
        assert_eq!(s.next_deadline(&t, T0 + 50_000), None);
    }

    #[test]
    fn a_request_in_flight_waits_for_its_backend_not_the_idle_timeout() {
        let t = timeouts();
        let s = ConnState::build(None, T0);
        s.touch_at(true, T0 + 500);
        let request = s.begin_request(http::Version::HTTP_11, false);
        assert_eq!(s.next_deadline(&t, T0 + 40_000), Some(ms(20_500)));
        assert_eq!(s.next_deadline(&t, T0 + 60_500), None, "backend too slow");
        // A shorter backend timeout leaves the idle timeout in charge.
        let short = ConnTimeouts {
            backend: Duration::from_secs(5),
            ..t
        };
        assert_eq!(
            s.next_deadline(&short, T0 + 10_500),
            Some(Duration::from_secs(20))
        );
        end_at(request, T0 + 60_000);
        assert_eq!(
            s.next_deadline(&t, T0 + 60_000),
            Some(Duration::from_secs(30))
        );
    }

    #[test]
    fn a_stream_stalls_when_its_client_takes_nothing_for_the_idle_timeout() {
        let idle = ms(50);
        assert_eq!(stall_left(T0, idle, T0), Some(ms(50)));
        assert_eq!(stall_left(T0, idle, T0 + 49), Some(ms(1)));
        assert_eq!(stall_left(T0, idle, T0 + 50), None);
        assert_eq!(stall_left(T0, idle, T0 + 5_000), None);
    }
}
