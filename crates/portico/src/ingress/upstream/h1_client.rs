//! Our HTTP/1.1 client (`ingress::h1`) as an upstream: requests without a
//! body that ask for no upgrade, most of the traffic. The request's parts
//! stay in the `Outgoing`, so a replay needs no copy.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Response;

use super::pool::{Pool, Pooled};
use super::response_body::ToPool;
use super::{connection, Connection, Connector, H1Request, UpstreamBody};
use crate::ingress::conn::coarse_ms;
use crate::ingress::error::{AttemptError, UpstreamError};
use crate::ingress::h1::client as h1;
use crate::ingress::headers;

impl Pooled for h1::Connection {
    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn is_fit(&mut self) -> bool {
        h1::Connection::is_fit(self)
    }
}

pub(super) struct H1<'a>(pub &'a Pool);

impl Connector for H1<'_> {
    type Conn = h1::Connection;

    fn checkout(&self, addr: SocketAddr) -> Option<h1::Connection> {
        self.0.h1.checkout(addr, coarse_ms())
    }

    async fn connect(&self, addr: SocketAddr) -> Result<h1::Connection, UpstreamError> {
        Ok(h1::Connection::new(self.0.tcp(addr).await?, addr))
    }
}

/// One try of `addr` with our client, under `timeout` for the response head.
pub(super) async fn send(
    pool: &Arc<Pool>,
    addr: SocketAddr,
    out: &H1Request,
    via: Connection,
    timeout: Duration,
) -> Result<Response<UpstreamBody>, AttemptError> {
    let (mut conn, reused) = connection(&H1(pool), addr, via).await?;
    let failed = |error| AttemptError::new(error, reused);
    let answer = conn.exchange(
        &out.parts,
        Some(&out.forwarding),
        h1::MAX_RESPONSE_HEAD_BYTES,
    );
    let head = match tokio::time::timeout(timeout, answer).await {
        Err(_elapsed) => return Err(failed(UpstreamError::Timeout(timeout))),
        Ok(Err(e)) => return Err(failed(UpstreamError::Exchange(e))),
        Ok(Ok(head)) => head,
    };
    // A 101 to a request that asked for no upgrade is refused by the
    // handler, as for hyper's client; its body gives the connection up.
    let body = h1::BodyReader::new(conn, &head, ToPool(pool.clone()));
    let mut response = Response::new(UpstreamBody::h1(body));
    *response.status_mut() = head.status;
    *response.headers_mut() = head.headers;
    if head.hop_by_hop {
        headers::remove_hop_by_hop(response.headers_mut());
    }
    Ok(response)
}
