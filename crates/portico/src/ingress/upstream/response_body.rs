//! A backend's response body on its way to the client. When it ends as
//! framed, its connection goes back to the pool (`ToPool`, the one way
//! back for both HTTP/1.1 clients); dropped early, the connection is closed
//! (its state is unknown).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::hyper_h1::{self, HyperConn};
use super::pool::Pool;
use crate::discovery::snapshot::Load;
use crate::ingress::conn::coarse_ms;
use crate::ingress::h1::client::{self as h1, Release};

/// A response body's error: hyper's, or our HTTP/1.1 client's.
pub type AnyBodyError = Box<dyn std::error::Error + Send + Sync>;

pub struct UpstreamBody {
    inner: Inner,
    /// Counts the request against its replica (p2c) until the body ends.
    load: Option<Load>,
}

enum Inner {
    /// Our HTTP/1.1 client: the body holds its connection.
    H1(h1::BodyReader<ToPool>),
    /// hyper's clients: the HTTP/1.1 connection, driven while the body
    /// streams and pooled at its end; none for HTTP/2, whose connection is
    /// shared by its streams.
    Hyper {
        body: Incoming,
        release: Option<(ToPool, HyperConn)>,
    },
    /// A 101's: the connection went to the tunnel.
    Empty,
}

/// Gives a connection back to its pool when its response ended as framed.
pub struct ToPool(pub Arc<Pool>);

impl Release for ToPool {
    fn release(self, conn: h1::Connection) {
        self.0.h1.park(conn, coarse_ms());
    }
}

impl ToPool {
    fn release_hyper(self, conn: HyperConn, cx: &mut Context<'_>) {
        hyper_h1::release(self.0, conn, cx);
    }
}

impl UpstreamBody {
    pub(super) fn h1(body: h1::BodyReader<ToPool>) -> Self {
        Self::of(Inner::H1(body))
    }

    pub(super) fn hyper(body: Incoming, pool: Arc<Pool>, conn: HyperConn) -> Self {
        Self::of(Inner::Hyper {
            body,
            release: Some((ToPool(pool), conn)),
        })
    }

    pub(super) fn unpooled(body: Incoming) -> Self {
        Self::of(Inner::Hyper {
            body,
            release: None,
        })
    }

    pub fn empty() -> Self {
        Self::of(Inner::Empty)
    }

    fn of(inner: Inner) -> Self {
        Self { inner, load: None }
    }

    /// Count the request against its replica until the body ends.
    pub fn hold_load(&mut self, load: Option<Load>) {
        self.load = load;
    }

    /// All of the body is already read (our client only: hyper's does
    /// not tell).
    pub fn is_in_hand(&self) -> bool {
        match &self.inner {
            Inner::H1(body) => body.is_in_hand(),
            Inner::Empty => true,
            Inner::Hyper { .. } => false,
        }
    }
}

fn release(release: &mut Option<(ToPool, HyperConn)>, cx: &mut Context<'_>) {
    if let Some((pool, conn)) = release.take() {
        pool.release_hyper(conn, cx);
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
            Inner::H1(body) => {
                return Pin::new(body)
                    .poll_frame(cx)
                    .map_err(|e| Box::new(e) as AnyBodyError)
            }
            Inner::Empty => return Poll::Ready(None),
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
            Inner::H1(body) => body.is_end_stream(),
            Inner::Hyper { body, .. } => body.is_end_stream(),
            Inner::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::H1(body) => body.size_hint(),
            Inner::Hyper { body, .. } => body.size_hint(),
            Inner::Empty => SizeHint::with_exact(0),
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // Bodiless responses (HEAD, 204, 304) may never be polled. With no
        // task to wake here, a connection not yet free gets its own. (Our
        // client's bodiless responses gave theirs back when made.)
        if let Inner::Hyper { body, release: r } = &mut self.inner {
            if body.is_end_stream() {
                release(r, &mut Context::from_waker(Waker::noop()));
            }
        }
    }
}
