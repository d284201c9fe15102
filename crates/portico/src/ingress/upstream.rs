//! Connections to backends: a pool of keep-alive HTTP/1.1 connections per
//! replica. Connecting is apart from sending, so a replica that refuses the
//! connection costs nothing of the request: its body is still unsent and the
//! next replica can take it.
//!
//! An HTTP/1.1 connection has no task of its own. hyper's connection state
//! machine (the driver) is polled by the request that holds the connection:
//! while sending, then from the response body. A task per connection cost
//! every request two extra task switches (request to connection task and
//! back, then again for the body), which was a tenth of the proxy's CPU.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Either, Empty};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;

use super::conn::{coarse_ms, ConnState};
use super::error::{ClientBodyFault, UpstreamError};
use super::h1::client::{self as own, Release};
use super::quickack::QuickAck;
use crate::discovery::snapshot::Load;

/// A response body's error: hyper's, or our HTTP/1.1 client's.
pub type AnyBodyError = Box<dyn std::error::Error + Send + Sync>;

/// What we send to a backend: the client's streamed body (capped), or
/// nothing (a replayed bodiless request).
pub type UpstreamRequestBody = Either<Capped, Empty<Bytes>>;

/// A failed send; holds the request when hyper never started sending it.
pub type SendError = hyper::client::conn::TrySendError<Request<UpstreamRequestBody>>;

/// What read ahead of a request body holds at most before a backend is
/// chosen: the rest streams as it comes.
const READ_AHEAD_BYTES: usize = 64 * 1024;

/// Where the body notes its fault for the handler: the send that failed
/// through it reports hyper's error, which tells nothing of who failed.
#[derive(Debug, Default)]
pub struct FaultNote(std::sync::atomic::AtomicU8);

impl FaultNote {
    fn set(&self, fault: ClientBodyFault) {
        let code = match fault {
            ClientBodyFault::TooLarge => 1,
            ClientBodyFault::Malformed => 2,
        };
        self.0.store(code, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn get(&self) -> Option<ClientBodyFault> {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            1 => Some(ClientBodyFault::TooLarge),
            2 => Some(ClientBodyFault::Malformed),
            _ => None,
        }
    }
}

/// A client's request body with a byte limit (`--max-body-bytes`), whose
/// errors are the client's. Past the limit, or on bad framing, the body
/// fails, which aborts the upstream request and discards its connection,
/// and the note says why, so the client gets 413 or 400 rather than 502.
pub struct Capped {
    inner: Incoming,
    /// Frames `read_ahead` took before a backend was chosen; sent first.
    ahead: std::collections::VecDeque<Frame<Bytes>>,
    /// `inner` ended during `read_ahead`.
    ended: bool,
    left: u64,
    /// `None` for a body that had ended before it was read, which cannot
    /// fail: most requests, spared an allocation.
    fault: Option<Arc<FaultNote>>,
    /// The client connection, told when the body has been read to its end
    /// (`ConnState::body_ended`); `None` once told, or if it had ended.
    conn: Option<Arc<ConnState>>,
}

impl Capped {
    pub fn new(inner: Incoming, limit: u64) -> (Self, Option<Arc<FaultNote>>) {
        let fault = (!inner.is_end_stream()).then(|| Arc::new(FaultNote::default()));
        let capped = Self {
            inner,
            ahead: Default::default(),
            ended: false,
            left: limit,
            fault: fault.clone(),
            conn: None,
        };
        (capped, fault)
    }

    /// Tell `conn` when this body has been read to its end.
    pub fn ending_for(mut self, conn: &Arc<ConnState>) -> Self {
        if !self.is_end_stream() {
            conn.body_held();
            self.conn = Some(conn.clone());
        }
        self
    }

    fn note_trailers(&self, frame: &Frame<Bytes>) {
        if let (true, Some(conn)) = (frame.is_trailers(), &self.conn) {
            conn.saw_trailers();
        }
    }

    fn note_end(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.body_let_go(true);
        }
    }

    fn fail(&self, fault: ClientBodyFault) -> ClientBodyFault {
        if let Some(note) = &self.fault {
            note.set(fault);
        }
        fault
    }

    /// Take what of the body has already come, before any backend is
    /// contacted, so that bad framing already in hand is refused with
    /// nothing forwarded. hyper hands a body over one frame at a time,
    /// decoded by the connection as the frame is asked for: each frame in
    /// hand costs a yield to it, and the first that is not costs one more.
    /// For chunked HTTP/1.1 bodies only: a Content-Length body has no
    /// framing to get wrong.
    pub async fn read_ahead(&mut self) -> Result<(), ClientBodyFault> {
        let mut held = 0u64;
        let mut yielded = false;
        while held < READ_AHEAD_BYTES as u64 && !self.ended {
            let polled = poll_fn(|cx| Poll::Ready(Pin::new(&mut self.inner).poll_frame(cx))).await;
            match polled {
                Poll::Ready(Some(Ok(frame))) => {
                    self.note_trailers(&frame);
                    held += frame.data_ref().map_or(0, |d| d.len() as u64);
                    if held > self.left {
                        return Err(self.fail(ClientBodyFault::TooLarge));
                    }
                    self.ahead.push_back(frame);
                    yielded = false;
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(error = %e, "request body failed before a backend was chosen");
                    return Err(self.fail(ClientBodyFault::Malformed));
                }
                Poll::Ready(None) => {
                    self.ended = true;
                    self.note_end();
                }
                Poll::Pending if yielded => break,
                Poll::Pending => {
                    yielded = true;
                    tokio::task::yield_now().await;
                }
            }
        }
        Ok(())
    }
}

impl Drop for Capped {
    /// Let go before its end (an early answer, a failed send): hyper drains
    /// the rest once.
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.body_let_go(false);
        }
    }
}

impl Body for Capped {
    type Data = Bytes;
    type Error = ClientBodyFault;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyFault>>> {
        let frame = match self.ahead.pop_front() {
            Some(frame) => frame,
            None if self.ended => return Poll::Ready(None),
            None => match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    self.note_trailers(&frame);
                    frame
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "request body failed while streaming");
                    return Poll::Ready(Some(Err(self.fail(ClientBodyFault::Malformed))));
                }
                None => {
                    self.note_end();
                    return Poll::Ready(None);
                }
            },
        };
        if self.inner.is_end_stream() {
            self.note_end();
        }
        let len = frame.data_ref().map_or(0, |d| d.len() as u64);
        if len > self.left {
            return Poll::Ready(Some(Err(self.fail(ClientBodyFault::TooLarge))));
        }
        self.left -= len;
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.ahead.is_empty() && (self.ended || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        // Read ahead of a chunked body only, which stays chunked: the
        // inner hint (unknown) is still the right one.
        self.inner.size_hint()
    }
}
type Sender = http1::SendRequest<UpstreamRequestBody>;

/// hyper's HTTP/1.1 connection future (with upgrades; its type is unnameable).
type Driver = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// A keep-alive HTTP/1.1 connection to one backend: the handle requests are
/// sent on, and the driver that moves its bytes, polled by whoever holds it.
pub struct Conn {
    sender: Sender,
    /// `None` once the connection ended (closed, failed, or upgraded).
    driver: Option<Driver>,
    addr: SocketAddr,
}

impl Conn {
    /// Move the connection along; false once it has ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(driver) = &mut self.driver {
            if let Poll::Ready(ended) = driver.as_mut().poll(cx) {
                if let Err(e) = ended {
                    tracing::debug!(backend = %self.addr, error = %e, "backend connection ended with an error");
                }
                self.driver = None;
            }
        }
        self.driver.is_some()
    }

    /// Ready for a request once the backend's last exchange is done; false
    /// if the connection ended instead.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        if !self.drive(cx) {
            return Poll::Ready(false);
        }
        self.sender.poll_ready(cx).map(|r| r.is_ok())
    }

    /// `poll_ready` until it answers or `limit` passes (false then). Almost
    /// always it answers at the first poll, so the timer (and its clock
    /// read) is made only for a connection that does not.
    async fn ready_within(&mut self, limit: Duration) -> bool {
        match poll_fn(|cx| Poll::Ready(self.poll_ready(cx))).await {
            Poll::Ready(ready) => ready,
            Poll::Pending => {
                let ready = poll_fn(|cx| self.poll_ready(cx));
                tokio::time::timeout(limit, ready).await.unwrap_or(false)
            }
        }
    }

    /// Send a request and wait for the response head, driving the
    /// connection meanwhile. A request hyper never started to send comes
    /// back in the error. (Not an `async fn`, which would hold the request
    /// twice in its state; see `handler::handle`.)
    pub fn send(
        &mut self,
        req: Request<UpstreamRequestBody>,
    ) -> impl Future<Output = Result<Response<Incoming>, SendError>> + Send + '_ {
        // hyper queues the request here; the driver writes it.
        let response = self.sender.try_send_request(req);
        async move {
            let mut response = std::pin::pin!(response);
            poll_fn(|cx| {
                // The driver first: it writes the request and reads the answer.
                self.drive(cx);
                response.as_mut().poll(cx)
            })
            .await
        }
    }

    /// After a 101: the driver hands the socket to the upgrade, so it must
    /// run to its end on its own.
    pub fn finish_upgrade(mut self) {
        if let Some(driver) = self.driver.take() {
            tokio::spawn(async move {
                if let Err(e) = driver.await {
                    tracing::debug!(error = %e, "backend connection failed while upgrading");
                }
            });
        }
    }
}

/// HTTP/2 senders are clones of one multiplexed connection per replica.
pub type H2Sender = hyper::client::conn::http2::SendRequest<UpstreamRequestBody>;

#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    pub max_idle_per_backend: usize,
    pub idle_timeout: Duration,
}

/// A pooled connection, of hyper's client or of ours.
struct Idle<C> {
    conn: C,
    /// When it was pooled, on the coarse clock (`coarse_ms`).
    since_ms: u64,
}

impl<C> Idle<C> {
    fn expired(&self, idle_timeout: Duration) -> bool {
        coarse_ms().saturating_sub(self.since_ms) >= idle_timeout.as_millis() as u64
    }
}

/// Keyed by backend address, looked up twice per request (checkout and
/// return): std's SipHash was 1% of a keep-alive request's instructions.
/// foldhash is seeded per process, so colliding keys (registered
/// addresses) cannot be worked out in advance.
type ByBackend<T> = foldhash::HashMap<SocketAddr, T>;

pub struct Pool {
    settings: PoolSettings,
    /// Connections opened, for the metrics.
    opened: Counter,
    idle: Mutex<ByBackend<Vec<Idle<Conn>>>>,
    /// Connections of our own HTTP/1.1 client (bodiless requests).
    own: Mutex<ByBackend<Vec<Idle<own::Connection>>>>,
    h2: Mutex<ByBackend<H2Sender>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("settings", &self.settings)
            .finish()
    }
}

impl Pool {
    pub fn new(settings: PoolSettings, opened: Counter) -> Arc<Self> {
        Arc::new(Self {
            settings,
            opened,
            idle: Mutex::new(ByBackend::default()),
            own: Mutex::new(ByBackend::default()),
            h2: Mutex::new(ByBackend::default()),
        })
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, ByBackend<Vec<Idle<Conn>>>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn own(&self) -> std::sync::MutexGuard<'_, ByBackend<Vec<Idle<own::Connection>>>> {
        self.own.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A pooled connection of our own client that the backend has neither
    /// closed nor written to, if there is one.
    pub fn checkout_own(&self, addr: SocketAddr) -> Option<own::Connection> {
        loop {
            let mut idle = self.own().get_mut(&addr).and_then(Vec::pop)?;
            if !idle.expired(self.settings.idle_timeout) && idle.conn.is_fit() {
                return Some(idle.conn);
            }
        }
    }

    /// A new connection of our own client to `addr`.
    pub async fn connect_own(&self, addr: SocketAddr) -> Result<own::Connection, UpstreamError> {
        Ok(own::Connection::new(self.tcp(addr).await?, addr))
    }

    fn keep_own(&self, conn: own::Connection) {
        let addr = conn.addr;
        self.park(&mut self.own(), addr, conn);
    }

    /// Pool `conn` unless its replica already has as many idle as allowed.
    fn park<C>(&self, pool: &mut ByBackend<Vec<Idle<C>>>, addr: SocketAddr, conn: C) {
        let conns = pool.entry(addr).or_default();
        if conns.len() < self.settings.max_idle_per_backend {
            conns.push(Idle {
                conn,
                since_ms: coarse_ms(),
            });
        }
    }

    /// A pooled connection that is ready for a request, if there is one.
    pub async fn checkout(&self, addr: SocketAddr) -> Option<Conn> {
        loop {
            let idle = self.idle().get_mut(&addr).and_then(Vec::pop)?;
            if idle.expired(self.settings.idle_timeout) {
                continue;
            }
            let mut conn = idle.conn;
            // Nobody polled it while idle: one poll reads a close or stray
            // bytes from the backend, and is free (no syscall) otherwise.
            if conn.ready_within(self.settings.connect_timeout).await {
                return Some(conn);
            }
        }
    }

    async fn tcp(&self, addr: SocketAddr) -> Result<TcpStream, UpstreamError> {
        let timeout = self.settings.connect_timeout;
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Err(_) => return Err(UpstreamError::ConnectTimeout(timeout)),
            Ok(Err(e)) => return Err(UpstreamError::Connect(e)),
            Ok(Ok(s)) => s,
        };
        // Small requests and responses must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        self.opened.inc();
        Ok(stream)
    }

    /// The HTTP/2 connection to `addr`, made if there is none alive.
    pub async fn h2(&self, addr: SocketAddr) -> Result<H2Sender, UpstreamError> {
        if let Some(s) = self.h2.lock().unwrap_or_else(|p| p.into_inner()).get(&addr) {
            if !s.is_closed() {
                return Ok(s.clone());
            }
        }
        let stream = self.tcp(addr).await?;
        let (sender, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(20))
                .handshake(TokioIo::new(QuickAck::new(stream)))
                .await
                .map_err(UpstreamError::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(backend = %addr, error = %e, "h2 backend connection ended with an error");
            }
        });
        self.h2
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr, sender.clone());
        Ok(sender)
    }

    /// A new connection to `addr`.
    pub async fn connect(&self, addr: SocketAddr) -> Result<Conn, UpstreamError> {
        let stream = self.tcp(addr).await?;
        let (sender, driver) = http1::Builder::new()
            .handshake(TokioIo::new(QuickAck::new(stream)))
            .await
            .map_err(UpstreamError::Handshake)?;
        Ok(Conn {
            sender,
            driver: Some(Box::pin(driver.with_upgrades())),
            addr,
        })
    }

    /// Keep a connection whose exchange finished, for the next request. One
    /// still busy (a request body the backend answered before reading it
    /// all) is driven by a task of its own until it is free.
    fn put(self: &Arc<Self>, mut conn: Conn, cx: &mut Context<'_>) {
        if !conn.drive(cx) {
            return;
        }
        if !conn.sender.is_ready() {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return;
            };
            let pool = self.clone();
            runtime.spawn(async move {
                if conn.ready_within(pool.settings.idle_timeout).await {
                    pool.keep(conn);
                }
            });
            return;
        }
        self.keep(conn);
    }

    fn keep(&self, conn: Conn) {
        let addr = conn.addr;
        self.park(&mut self.idle(), addr, conn);
    }

    /// Drop connections that closed or idled too long, and empty entries.
    pub fn sweep(&self) {
        self.h2
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, s| !s.is_closed());
        let max_idle = self.settings.idle_timeout;
        // A poll with no waker notices backends that closed idle
        // connections, and lets go of the waker of the last request's task.
        let mut cx = Context::from_waker(Waker::noop());
        self.idle().retain(|_, conns| {
            conns.retain_mut(|c| !c.expired(max_idle) && c.conn.drive(&mut cx));
            !conns.is_empty()
        });
        self.own().retain(|_, conns| {
            conns.retain_mut(|c| !c.expired(max_idle) && c.conn.is_fit());
            !conns.is_empty()
        });
    }

    /// Idle connections held, for tests and metrics.
    pub fn idle_count(&self) -> usize {
        self.idle().values().map(Vec::len).sum::<usize>()
            + self.own().values().map(Vec::len).sum::<usize>()
    }
}

/// A backend's response body, streamed to the client. When it ends cleanly
/// its connection goes back to the pool; dropped early, the connection is
/// closed (its state is unknown).
pub struct UpstreamBody {
    inner: Inner,
    /// Counts the request against its replica (p2c) until the body ends.
    _load: Option<Load>,
}

enum Inner {
    /// hyper's client: the connection, driven while the body streams,
    /// pooled at its end.
    Hyper {
        body: Incoming,
        release: Option<(Arc<Pool>, Conn)>,
    },
    /// Our own client: the body holds its connection.
    Own(own::ResponseBody<ToPool>),
}

/// Gives a connection of our own client back to its pool.
pub struct ToPool(pub Arc<Pool>);

impl Release for ToPool {
    fn release(self, conn: own::Connection) {
        self.0.keep_own(conn);
    }
}

impl UpstreamBody {
    pub fn new(inner: Incoming, pool: Arc<Pool>, conn: Conn, load: Option<Load>) -> Self {
        Self {
            inner: Inner::Hyper {
                body: inner,
                release: Some((pool, conn)),
            },
            _load: load,
        }
    }

    /// A body whose connection is not pooled this way (HTTP/2: the
    /// connection is shared by its streams).
    pub fn unpooled(inner: Incoming, load: Option<Load>) -> Self {
        Self {
            inner: Inner::Hyper {
                body: inner,
                release: None,
            },
            _load: load,
        }
    }

    /// A body read by our own HTTP/1.1 client.
    pub fn own(body: own::ResponseBody<ToPool>, load: Option<Load>) -> Self {
        Self {
            inner: Inner::Own(body),
            _load: load,
        }
    }

    /// All of the body is already read (our own client only: hyper's does
    /// not tell).
    pub fn is_in_hand(&self) -> bool {
        matches!(&self.inner, Inner::Own(body) if body.is_in_hand())
    }
}

fn release(release: &mut Option<(Arc<Pool>, Conn)>, cx: &mut Context<'_>) {
    if let Some((pool, conn)) = release.take() {
        pool.put(conn, cx);
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = AnyBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, AnyBodyError>>> {
        let (body, conn) = match &mut self.inner {
            Inner::Own(body) => {
                return Pin::new(body)
                    .poll_frame(cx)
                    .map_err(|e| Box::new(e) as AnyBodyError)
            }
            Inner::Hyper { body, release } => (body, release),
        };
        let mut polled = Pin::new(&mut *body).poll_frame(cx);
        if polled.is_pending() {
            // The bytes come through the driver: move it, then look again.
            if let Some((_, c)) = conn {
                c.drive(cx);
                polled = Pin::new(&mut *body).poll_frame(cx);
            }
        }
        match &polled {
            Poll::Ready(None) => release(conn, cx),
            Poll::Ready(Some(Ok(_))) if body.is_end_stream() => release(conn, cx),
            Poll::Ready(Some(Err(_))) => *conn = None,
            _ => {}
        }
        polled.map_err(|e| Box::new(e) as AnyBodyError)
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Hyper { body, .. } => body.is_end_stream(),
            Inner::Own(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Hyper { body, .. } => body.size_hint(),
            Inner::Own(body) => body.size_hint(),
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // Bodiless responses (HEAD, 204, 304) may never be polled. With no
        // task to wake here, a connection not yet free gets its own. (Our
        // own client's bodiless responses gave theirs back when made.)
        if let Inner::Hyper { body, release: r } = &mut self.inner {
            if body.is_end_stream() {
                release(r, &mut Context::from_waker(Waker::noop()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A connection of our client to `addr`, pooled `age_ms` ago.
    async fn pooled(addr: SocketAddr, age_ms: u64) -> Idle<own::Connection> {
        let stream = TcpStream::connect(addr).await.unwrap();
        Idle {
            conn: own::Connection::new(stream, addr),
            since_ms: coarse_ms().saturating_sub(age_ms),
        }
    }

    #[tokio::test]
    async fn a_connection_idle_for_the_timeout_is_not_checked_out() {
        // The backend's listener holds both connections open, unanswered.
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = backend.local_addr().unwrap();
        let idle_timeout = Duration::from_secs(60);
        let settings = PoolSettings {
            connect_timeout: Duration::from_secs(5),
            max_idle_per_backend: 4,
            idle_timeout,
        };
        let pool = Pool::new(settings, Counter::default());
        let stale = pooled(addr, idle_timeout.as_millis() as u64).await;
        pool.own().entry(addr).or_default().push(stale);
        assert!(pool.checkout_own(addr).is_none(), "idle for the timeout");
        let fresh = pooled(addr, 0).await;
        pool.own().entry(addr).or_default().push(fresh);
        assert!(pool.checkout_own(addr).is_some(), "idle for less");
    }
}
