//! HTTP/2 with prior knowledge (h2c) to backends: one multiplexed
//! connection per replica on each worker thread, driven by a task of its
//! own on that worker, its sender cloned by each request there.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{request, Response, Uri, Version};
use hyper_util::rt::TokioIo;

use super::pool::Pool;
use super::{
    connection, send_failed, Connection, Connector, HyperRequest, UpstreamBody, UpstreamRequestBody,
};
use crate::ingress::error::{AttemptError, BadRequest, UpstreamError};
use crate::ingress::headers;
use crate::ingress::quickack::QuickAck;

/// HTTP/2 senders are clones of one multiplexed connection per replica and worker.
pub type H2Sender = hyper::client::conn::http2::SendRequest<UpstreamRequestBody>;

/// Turn a request rewritten for HTTP/1.1 into its HTTP/2 form: the host in
/// :authority, taken from the Host it would carry over HTTP/1.1; TE only
/// as `trailers`, the one value HTTP/2 allows (RFC 9113 section 8.2.2).
pub fn request_form(parts: &mut request::Parts, te_trailers: bool) -> Result<(), BadRequest> {
    let authority = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("backend");
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    parts.uri = Uri::try_from(format!("http://{authority}{target}"))
        .map_err(|_| BadRequest::MalformedHost)?;
    parts.version = Version::HTTP_2;
    parts.headers.remove(header::HOST);
    if te_trailers {
        parts
            .headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    Ok(())
}

pub(super) struct H2c<'a>(pub &'a Pool);

impl Connector for H2c<'_> {
    type Conn = H2Sender;

    /// The replica's connection, if it is still open.
    fn checkout(&self, addr: SocketAddr) -> Option<H2Sender> {
        self.0
            .h2_senders()
            .get(&addr)
            .filter(|s| !s.is_closed())
            .cloned()
    }

    async fn connect(&self, addr: SocketAddr) -> Result<H2Sender, UpstreamError> {
        let stream = self.0.tcp(addr).await?;
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
        self.0.h2_senders().insert(addr, sender.clone());
        Ok(sender)
    }
}

/// One try of `addr` over h2c.
pub(super) async fn send(
    pool: &Arc<Pool>,
    addr: SocketAddr,
    out: &mut HyperRequest,
    via: Connection,
    timeout: Duration,
) -> Result<Response<UpstreamBody>, AttemptError> {
    // The shared connection is not "reused" as a pooled HTTP/1.1 one is:
    // a stream the backend reset or refused says nothing of the connection,
    // so a failed try moves on to the next replica rather than replacing
    // the connection every other stream shares.
    let (mut sender, _shared) = connection(&H2c(pool), addr, via).await?;
    let failed = |error| AttemptError::new(error, false);
    let request = out.take().ok_or_else(|| failed(UpstreamError::Spent))?;
    match tokio::time::timeout(timeout, sender.try_send_request(request)).await {
        Err(_elapsed) => Err(failed(UpstreamError::Timeout(timeout))),
        Ok(Ok(mut response)) => {
            headers::remove_hop_by_hop(response.headers_mut());
            Ok(response.map(UpstreamBody::unpooled))
        }
        Ok(Err(e)) => Err(send_failed(e, out, false)),
    }
}
