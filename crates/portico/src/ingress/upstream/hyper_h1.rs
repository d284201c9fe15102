//! hyper's HTTP/1.1 client, for requests with a body and upgrades. A
//! connection has no task of its own: its driver (hyper's connection state
//! machine) is polled by the request that holds it, while sending and then
//! from the response body, which saves the two task switches per request
//! a connection task would cost.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use super::pool::{Pool, Pooled};
use super::{
    connection, send_failed, Connection, Connector, HyperRequest, UpstreamBody, UpstreamRequestBody,
};
use crate::ingress::conn::coarse_ms;
use crate::ingress::error::{AttemptError, UpstreamError};
use crate::ingress::headers;
use crate::ingress::quickack::QuickAck;

/// A failed send; holds the request when hyper never started sending it.
type SendError = hyper::client::conn::TrySendError<Request<UpstreamRequestBody>>;

type Sender = http1::SendRequest<UpstreamRequestBody>;

/// hyper's HTTP/1.1 connection future (with upgrades; its type is unnameable).
type Driver = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// A keep-alive HTTP/1.1 connection to one backend: the handle requests are
/// sent on, and the driver that moves its bytes, polled by whoever holds it.
pub struct HyperConn {
    sender: Sender,
    /// `None` once the connection ended (closed, failed, or upgraded).
    driver: Option<Driver>,
    addr: SocketAddr,
}

impl HyperConn {
    /// Move the connection along; false once it has ended.
    pub(super) fn drive(&mut self, cx: &mut Context<'_>) -> bool {
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

    /// Send a request and wait for the response head, driving the
    /// connection meanwhile. A request hyper never started to send comes
    /// back in the error. (Not an `async fn`, which would hold the request
    /// twice in its state.)
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

impl Pooled for HyperConn {
    fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Nobody polled it while it idled: one poll of the driver reads a
    /// close or stray bytes from the backend, and costs no system call
    /// otherwise. It was parked ready, so anything but ready is unfit.
    fn is_fit(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        matches!(self.poll_ready(&mut cx), Poll::Ready(true))
    }
}

/// hyper's HTTP/1.1 connections in the pool.
pub(super) struct HyperH1<'a>(pub &'a Pool);

impl Connector for HyperH1<'_> {
    type Conn = HyperConn;

    fn checkout(&self, addr: SocketAddr) -> Option<HyperConn> {
        self.0.hyper_h1.checkout(addr, coarse_ms())
    }

    async fn connect(&self, addr: SocketAddr) -> Result<HyperConn, UpstreamError> {
        let stream = self.0.tcp(addr).await?;
        let (sender, driver) = http1::Builder::new()
            .handshake(TokioIo::new(QuickAck::new(stream)))
            .await
            .map_err(UpstreamError::Handshake)?;
        Ok(HyperConn {
            sender,
            driver: Some(Box::pin(driver.with_upgrades())),
            addr,
        })
    }
}

/// One try of `addr` through hyper's HTTP/1.1 client.
pub(super) async fn send(
    pool: &Arc<Pool>,
    addr: SocketAddr,
    out: &mut HyperRequest,
    via: Connection,
    timeout: Duration,
) -> Result<Response<UpstreamBody>, AttemptError> {
    let (mut conn, reused) = connection(&HyperH1(pool), addr, via).await?;
    let failed = |error| AttemptError::new(error, reused);
    let request = out.take().ok_or_else(|| failed(UpstreamError::Spent))?;
    match tokio::time::timeout(timeout, conn.send(request)).await {
        Err(_elapsed) => Err(failed(UpstreamError::Timeout(timeout))),
        Ok(Ok(response)) => answer(pool, conn, response).map_err(failed),
        Ok(Err(e)) => Err(send_failed(e, out, reused)),
    }
}

/// The response as the client will get it: its body keeps the connection
/// until it ends, a 101 hands it to the tunnel.
fn answer(
    pool: &Arc<Pool>,
    conn: HyperConn,
    mut response: Response<Incoming>,
) -> Result<Response<UpstreamBody>, UpstreamError> {
    if response.headers().contains_key(header::TRANSFER_ENCODING)
        && response.headers().contains_key(header::CONTENT_LENGTH)
    {
        // RFC 9112 6.3: ambiguous framing; the connection's state is
        // unknown, so it is dropped, not pooled.
        return Err(UpstreamError::AmbiguousFraming);
    }
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        // The connection now belongs to the tunnel: it never goes back to
        // the pool.
        let protocol = response.headers().get(header::UPGRADE).cloned();
        headers::remove_hop_by_hop(response.headers_mut());
        if let Some(p) = protocol {
            headers::set_upgrade(response.headers_mut(), p);
        }
        conn.finish_upgrade();
        return Ok(response.map(|_| UpstreamBody::empty()));
    }
    headers::remove_hop_by_hop(response.headers_mut());
    let pool = pool.clone();
    Ok(response.map(|body| UpstreamBody::hyper(body, pool, conn)))
}

/// Give a connection whose exchange finished back to the pool. One still
/// busy (a request body the backend answered before reading it all) is
/// driven by a task of its own until it is free.
pub(super) fn release(pool: Arc<Pool>, mut conn: HyperConn, cx: &mut Context<'_>) {
    if !conn.drive(cx) {
        return;
    }
    if conn.sender.is_ready() {
        pool.hyper_h1.park(conn, coarse_ms());
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let idle = pool.settings.idle_timeout;
        let ready = poll_fn(|cx| conn.poll_ready(cx));
        if tokio::time::timeout(idle, ready).await == Ok(true) {
            pool.hyper_h1.park(conn, coarse_ms());
        }
    });
}
