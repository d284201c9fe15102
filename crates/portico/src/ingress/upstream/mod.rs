//! The way to a backend: one interface (`Upstream::send`, one try of one
//! replica) over three clients, chosen once per request (`Outgoing`):
//!
//! - `h1_client`: our HTTP/1.1 client (`ingress::h1`), for requests without
//!   a body that ask for no upgrade;
//! - `hyper_h1`: hyper's HTTP/1.1 client, for bodies and upgrades;
//! - `h2c`: hyper's HTTP/2 client, prior knowledge.
//!
//! Each finds its connection the same way (`connection`: a pooled one, or
//! a new one), and fails with an `AttemptError` that says whether the
//! connection was reused; what that allows is decided in `error`, and the
//! failover loop (`ingress::failover`) acts on it. Connecting is apart from
//! sending, so a replica that refuses the connection costs nothing of the
//! request. To add a protocol: a `Connector`, a `send`, a variant of
//! `Outgoing`, and its arm in `Clients::send`.

mod h1_client;
mod h2c;
mod hyper_h1;
mod pool;
mod request_body;
mod response_body;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{request, Request, Response};
use http_body_util::{Either, Empty};
use hyper::body::Body;

use super::error::{replayable, AttemptError, BadRequest, UpstreamError};
use super::headers::Forwarding;
use super::route::UpstreamProtocol;

pub use pool::{Pool, PoolSettings};
pub use request_body::{Capped, ClientBody, FaultNote};
pub use response_body::{AnyBodyError, UpstreamBody};

/// What we send to a backend through hyper's clients: the client's
/// streamed body (capped), or nothing (a replayed bodiless request).
pub type UpstreamRequestBody = Either<Capped, Empty<Bytes>>;

/// One try of one replica. A second implementation stands in for the
/// network in the failover loop's tests.
pub trait Upstream: Sync {
    /// Send `out` to `addr` and wait, up to `timeout`, for the response
    /// head. On failure `out` still holds what a next try may send.
    fn send<'a>(
        &'a self,
        addr: SocketAddr,
        out: &'a mut Outgoing,
        via: Connection,
        timeout: Duration,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, AttemptError>> + Send + 'a;
}

/// Which connection a try may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connection {
    /// A pooled one if there is one fit, else a new one.
    PooledOrNew,
    /// A new one: the pooled one just failed.
    New,
}

/// Where one client finds its connections to a replica.
trait Connector {
    type Conn;
    fn checkout(&self, addr: SocketAddr) -> Option<Self::Conn>;
    fn connect(
        &self,
        addr: SocketAddr,
    ) -> impl Future<Output = Result<Self::Conn, UpstreamError>> + Send;
}

/// THE checkout-or-connect, for every client: the connection, and whether
/// it was reused.
async fn connection<C: Connector>(
    connector: &C,
    addr: SocketAddr,
    via: Connection,
) -> Result<(C::Conn, bool), AttemptError> {
    if via == Connection::PooledOrNew {
        if let Some(conn) = connector.checkout(addr) {
            return Ok((conn, true));
        }
    }
    // Boxed: few requests connect, and a handshake's state need not size
    // the future of every one.
    match Box::pin(connector.connect(addr)).await {
        Ok(conn) => Ok((conn, false)),
        Err(e) => Err(AttemptError::new(e, false)),
    }
}

/// The request as the backend will get it, in the form its client takes,
/// chosen once before the first try: a request gets the same client on
/// every try.
pub enum Outgoing {
    H1(H1Request),
    Hyper(HyperRequest),
}

/// For our HTTP/1.1 client: the head is written from the parts, which stay
/// here, and the forwarding fields after the request's own.
pub struct H1Request {
    pub parts: request::Parts,
    pub forwarding: Forwarding,
}

/// For hyper's clients, which take the request: what a next try sends is
/// the request hyper gave back unsent, or else a copy of a replayable one.
pub struct HyperRequest {
    h2c: bool,
    request: Option<Request<UpstreamRequestBody>>,
    replay: Option<Box<Request<()>>>,
}

impl HyperRequest {
    fn take(&mut self) -> Option<Request<UpstreamRequestBody>> {
        self.request.take()
    }

    /// After a failed try: the request hyper gave back, or a copy.
    fn restore(&mut self, unsent: Option<Request<UpstreamRequestBody>>) {
        self.request = unsent.or_else(|| self.replay.as_deref().map(rebuild));
    }
}

/// A send hyper failed: the request it gave back (nothing of it went out)
/// or a copy goes back into `out` for a next try; the error says which.
fn send_failed(
    mut e: hyper::client::conn::TrySendError<Request<UpstreamRequestBody>>,
    out: &mut HyperRequest,
    reused: bool,
) -> AttemptError {
    let unsent = e.take_message();
    let error = UpstreamError::Request {
        unsent: unsent.is_some(),
        source: e.into_error(),
    };
    out.restore(unsent);
    AttemptError::new(error, reused)
}

fn rebuild(template: &Request<()>) -> Request<UpstreamRequestBody> {
    let mut r = Request::new(Either::Right(Empty::<Bytes>::new()));
    *r.method_mut() = template.method().clone();
    *r.uri_mut() = template.uri().clone();
    *r.version_mut() = template.version();
    *r.headers_mut() = template.headers().clone();
    r
}

impl Outgoing {
    /// Choose the client: ours for a request without a body that asks for
    /// no upgrade on an HTTP/1.1 route, hyper's for the others. The parts
    /// are already rewritten for HTTP/1.1 (hop-by-hop fields removed).
    pub fn new(
        mut parts: request::Parts,
        body: Capped,
        forwarding: Forwarding,
        protocol: UpstreamProtocol,
        te_trailers: bool,
    ) -> Result<Self, BadRequest> {
        let h2c = protocol == UpstreamProtocol::H2c;
        if !h2c && body.is_end_stream() && !parts.headers.contains_key(http::header::UPGRADE) {
            return Ok(Outgoing::H1(H1Request { parts, forwarding }));
        }
        forwarding.apply(&mut parts.headers);
        if h2c {
            h2c::request_form(&mut parts, te_trailers)?;
        }
        // A bodiless idempotent request may be sent again after bytes went
        // out: only then is a copy worth keeping.
        let replay = replayable(&parts.method, body.is_end_stream()).then(|| {
            let mut r = Request::new(());
            *r.method_mut() = parts.method.clone();
            *r.uri_mut() = parts.uri.clone();
            *r.version_mut() = parts.version;
            *r.headers_mut() = parts.headers.clone();
            Box::new(r)
        });
        Ok(Outgoing::Hyper(HyperRequest {
            h2c,
            request: Some(Request::from_parts(parts, Either::Left(body))),
            replay,
        }))
    }

    /// Whether the request may go again once some of it went out.
    pub fn replayable(&self) -> bool {
        match self {
            Outgoing::H1(r) => replayable(&r.parts.method, true),
            Outgoing::Hyper(r) => r.replay.is_some(),
        }
    }
}

/// The real clients, over the shared pool.
#[derive(Debug, Clone)]
pub struct Clients {
    pub pool: Arc<Pool>,
}

impl Upstream for Clients {
    async fn send(
        &self,
        addr: SocketAddr,
        out: &mut Outgoing,
        via: Connection,
        timeout: Duration,
    ) -> Result<Response<UpstreamBody>, AttemptError> {
        match out {
            Outgoing::H1(r) => h1_client::send(&self.pool, addr, r, via, timeout).await,
            // Boxed: hyper's clients' state is kilobytes, and the bodiless
            // requests of ours would otherwise carry it.
            Outgoing::Hyper(r) if r.h2c => {
                Box::pin(h2c::send(&self.pool, addr, r, via, timeout)).await
            }
            Outgoing::Hyper(r) => Box::pin(hyper_h1::send(&self.pool, addr, r, via, timeout)).await,
        }
    }
}
