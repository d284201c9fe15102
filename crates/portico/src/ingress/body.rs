//! The body of every response the ingress sends: a backend's, streamed, or
//! one of our own short texts. It carries the request's completion: when
//! the body is done (or dropped), the connection counts the request as
//! finished, and its metrics and access log line are recorded with the real
//! byte count and duration. A compressed response's body is the encoder
//! around the backend's, and counts the bytes that left.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use super::access_log::Record;
use super::compress::{Coding, Compressible, Encoded};
use super::conn::InFlight;
use super::upstream::{AnyBodyError, UpstreamBody};
use crate::metrics::RouteStats;

pub struct DownstreamBody {
    kind: Kind,
    done: Option<Completion>,
}

enum Kind {
    Upstream(UpstreamBody),
    Local(Option<Bytes>),
    /// Boxed: the encoder's state is some 300 bytes, and most responses
    /// are not compressed.
    Compressed(Box<Encoded<DownstreamBody>>),
}

/// Recorded when the response ends.
pub struct Completion {
    pub in_flight: InFlight,
    pub stats: Arc<RouteStats>,
    pub status: u16,
    pub started: Instant,
    /// Boxed: a record is large, and the response carrying it is moved
    /// many times on its way out, logging on or off.
    pub log: Option<Box<Record>>,
    pub bytes: u64,
}

impl Drop for Completion {
    fn drop(&mut self) {
        let took = self.started.elapsed();
        self.stats.record(self.status, took.as_secs_f64());
        if let Some(record) = self.log.take() {
            record.finish(self.status, self.bytes, took);
        }
    }
}

impl DownstreamBody {
    pub fn upstream(body: UpstreamBody) -> Self {
        Self {
            kind: Kind::Upstream(body),
            done: None,
        }
    }

    pub fn empty() -> Self {
        Self {
            kind: Kind::Local(None),
            done: None,
        }
    }

    pub fn text(text: &'static str) -> Self {
        Self {
            kind: Kind::Local(Some(Bytes::from_static(text.as_bytes()))),
            done: None,
        }
    }

    /// A short body of our own made at run time.
    pub fn bytes(bytes: Bytes) -> Self {
        Self {
            kind: Kind::Local(Some(bytes)),
            done: None,
        }
    }

    /// All of the body is in memory, none of it still to be read.
    pub fn is_in_hand(&self) -> bool {
        match &self.kind {
            Kind::Upstream(b) => b.is_in_hand(),
            Kind::Local(_) => true,
            Kind::Compressed(_) => false,
        }
    }

    pub fn on_completion(mut self, done: Completion) -> Self {
        self.done = Some(done);
        self
    }
}

impl Body for DownstreamBody {
    type Data = Bytes;
    type Error = AnyBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, AnyBodyError>>> {
        let polled = match &mut self.kind {
            Kind::Upstream(b) => Pin::new(b).poll_frame(cx),
            Kind::Local(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
            Kind::Compressed(b) => Pin::new(b.as_mut()).poll_frame(cx),
        };
        // An HTTP/2 stream's stall guard learns here whether the stream now
        // waits on its client or on its backend.
        super::conn::note_body_poll(matches!(polled, Poll::Ready(Some(Ok(_)))));
        if let (Poll::Ready(Some(Ok(frame))), Some(done)) = (&polled, self.done.as_mut()) {
            if let Some(data) = frame.data_ref() {
                done.bytes += data.len() as u64;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream(b) => b.is_end_stream(),
            Kind::Local(b) => b.is_none(),
            Kind::Compressed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream(b) => b.size_hint(),
            Kind::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Compressed(b) => b.size_hint(),
        }
    }
}

impl Compressible for DownstreamBody {
    fn compressed(mut self, coding: Coding) -> Self {
        // The completion stays outside, so that it counts the bytes sent.
        let done = self.done.take();
        Self {
            kind: Kind::Compressed(Box::new(Encoded::new(self, coding))),
            done,
        }
    }
}
