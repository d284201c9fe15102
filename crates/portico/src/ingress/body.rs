//! The body of every response the ingress sends: a backend's, streamed, or
//! one of our own short texts. It carries the request's in-flight mark, so
//! the connection counts the request as done only once the body is written.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use super::conn::InFlight;
use super::upstream::UpstreamBody;

pub struct ResponseBody {
    kind: Kind,
    _in_flight: Option<InFlight>,
}

enum Kind {
    Upstream(UpstreamBody),
    Local(Option<Bytes>),
}

impl ResponseBody {
    pub fn upstream(body: UpstreamBody) -> Self {
        Self {
            kind: Kind::Upstream(body),
            _in_flight: None,
        }
    }

    pub fn text(text: &'static str) -> Self {
        Self {
            kind: Kind::Local(Some(Bytes::from_static(text.as_bytes()))),
            _in_flight: None,
        }
    }

    pub fn with_in_flight(mut self, mark: InFlight) -> Self {
        self._in_flight = Some(mark);
        self
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.kind {
            Kind::Upstream(b) => Pin::new(b).poll_frame(cx),
            Kind::Local(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream(b) => b.is_end_stream(),
            Kind::Local(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream(b) => b.size_hint(),
            Kind::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}
