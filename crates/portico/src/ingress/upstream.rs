//! Connections to backends: a pool of keep-alive HTTP/1.1 connections per
//! replica. Connecting is apart from sending, so a replica that refuses the
//! connection costs nothing of the request: its body is still unsent and the
//! next replica can take it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Empty};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::error::UpstreamError;
use crate::discovery::snapshot::Load;

/// What we send to a backend: the client's streamed body (capped), or
/// nothing (a replayed bodiless request).
pub type UpstreamRequestBody = Either<Capped, Empty<Bytes>>;

/// A client's request body with a byte limit (`--max-body-bytes`). Past it
/// the body fails, which aborts the upstream request, and `exceeded` says
/// why, so the client gets 413 rather than 502.
pub struct Capped {
    inner: Incoming,
    left: u64,
    exceeded: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
#[error("request body over the --max-body-bytes limit")]
pub struct BodyTooLarge;

impl Capped {
    pub fn new(inner: Incoming, limit: u64) -> (Self, Arc<std::sync::atomic::AtomicBool>) {
        let exceeded = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let capped = Self {
            inner,
            left: limit,
            exceeded: exceeded.clone(),
        };
        (capped, exceeded)
    }
}

impl Body for Capped {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                if len > self.left {
                    self.exceeded
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                }
                self.left -= len;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
pub type Sender = http1::SendRequest<UpstreamRequestBody>;
/// HTTP/2 senders are clones of one multiplexed connection per replica.
pub type H2Sender = hyper::client::conn::http2::SendRequest<UpstreamRequestBody>;

#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    pub max_idle_per_backend: usize,
    pub idle_timeout: Duration,
}

struct IdleConn {
    sender: Sender,
    since: Instant,
}

pub struct Pool {
    settings: PoolSettings,
    idle: Mutex<HashMap<SocketAddr, Vec<IdleConn>>>,
    h2: Mutex<HashMap<SocketAddr, H2Sender>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("settings", &self.settings)
            .finish()
    }
}

impl Pool {
    pub fn new(settings: PoolSettings) -> Arc<Self> {
        Arc::new(Self {
            settings,
            idle: Mutex::new(HashMap::new()),
            h2: Mutex::new(HashMap::new()),
        })
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Vec<IdleConn>>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A pooled connection that is ready for a request, if there is one.
    pub async fn checkout(&self, addr: SocketAddr) -> Option<Sender> {
        loop {
            let conn = self.idle().get_mut(&addr).and_then(Vec::pop)?;
            if conn.sender.is_closed() || conn.since.elapsed() >= self.settings.idle_timeout {
                continue;
            }
            let mut sender = conn.sender;
            if sender.is_ready() {
                return Some(sender);
            }
            // Put back the moment its last response ended: the connection
            // task may not have caught up yet. It does so at once, or closes.
            match tokio::time::timeout(self.settings.connect_timeout, sender.ready()).await {
                Ok(Ok(())) => return Some(sender),
                _ => continue,
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
                .handshake(TokioIo::new(stream))
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
    pub async fn connect(&self, addr: SocketAddr) -> Result<Sender, UpstreamError> {
        let stream = self.tcp(addr).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(UpstreamError::Handshake)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(backend = %addr, error = %e, "backend connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Keep a connection whose exchange finished, for the next request.
    pub fn put(&self, addr: SocketAddr, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle();
        let conns = idle.entry(addr).or_default();
        if conns.len() < self.settings.max_idle_per_backend {
            conns.push(IdleConn {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Drop connections that closed or idled too long, and empty entries.
    pub fn sweep(&self) {
        self.h2
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, s| !s.is_closed());
        let max_idle = self.settings.idle_timeout;
        self.idle().retain(|_, conns| {
            conns.retain(|c| !c.sender.is_closed() && c.since.elapsed() < max_idle);
            !conns.is_empty()
        });
    }

    /// Idle connections held, for tests and metrics.
    pub fn idle_count(&self) -> usize {
        self.idle().values().map(Vec::len).sum()
    }
}

/// A backend's response body, streamed to the client. When it ends cleanly
/// its connection goes back to the pool; dropped early, the connection is
/// closed (its state is unknown).
pub struct UpstreamBody {
    inner: Incoming,
    release: Option<(Arc<Pool>, SocketAddr, Sender)>,
    /// Counts the request against its replica (p2c) until the body ends.
    _load: Option<Load>,
}

impl UpstreamBody {
    pub fn new(
        inner: Incoming,
        pool: Arc<Pool>,
        addr: SocketAddr,
        sender: Sender,
        load: Option<Load>,
    ) -> Self {
        Self {
            inner,
            release: Some((pool, addr, sender)),
            _load: load,
        }
    }

    /// A body whose connection is not pooled this way (HTTP/2: the
    /// connection is shared by its streams).
    pub fn unpooled(inner: Incoming, load: Option<Load>) -> Self {
        Self {
            inner,
            release: None,
            _load: load,
        }
    }

    fn release(&mut self) {
        if let Some((pool, addr, sender)) = self.release.take() {
            pool.put(addr, sender);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => self.release = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // Bodiless responses (HEAD, 204, 304) may never be polled.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}
